"""Drawing samples from a trained model: a compiled sampler from a config, batched over devices.

Used by the train loop (preview grids) and the sample CLI. The chain is compiled once per
batch shape and sampler; step count, eta and the batch's first sample index are traced, so
changing them does not recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from diffusion_jax import parallel, samplers, schedules
from diffusion_jax.data import to_uint8


def make_sampler(model, schedule, config, mesh, *, progress: bool = False):
    """sample(params, key, num_samples, *, batch_size, sampler, steps, eta) -> uint8 (N,H,W,C).

    The chain runs on schedules.sampling_schedule(config, schedule): config.sampling.schedule
    when it names one, else `schedule` (the training schedule). Defaults come from
    config.sampling. Sample i's x_T and chain noise depend only on (key, i)
    (samplers.per_sample_normal with the global index i), so sample i is the same whatever the
    batch size or the device count. The chain is compiled once per (batch, sampler): the
    first index of a batch is traced.
    """
    d, sc = config.diffusion, config.sampling
    schedule = schedules.sampling_schedule(config, schedule)
    size, channels = config.data.image_size, config.data.num_channels
    num_devices = mesh.devices.size
    progress_fn = samplers.tqdm_progress("denoising") if progress else None

    def chain(params, padded, num_steps, key, eta, first, batch, sampler):
        def denoise_fn(x_t, t):
            return model.apply({"params": params}, x_t, t, train=False)

        sample_index = first + jnp.arange(batch)
        init_key, chain_key = jax.random.split(key)
        x_T = samplers.per_sample_normal(init_key, sample_index, (batch, size, size, channels))
        x_T = jax.lax.with_sharding_constraint(x_T, parallel.batch_sharding(mesh))
        return samplers.run_chain(
            denoise_fn,
            padded,
            num_steps,
            x_T,
            chain_key,
            sampler=sampler,
            eta=eta,
            parameterization=d.parameterization,
            var_type=d.var_type,
            clip_denoised=sc.clip_denoised,
            progress_fn=progress_fn,
            sample_index=sample_index,
            noise_conditioning=d.get("noise_conditioning", "timestep"),
        )["sample"]

    compiled = jax.jit(chain, static_argnums=(6, 7))

    def sample(params, key, num_samples, *, batch_size=None, sampler=None, steps=None, eta=None):
        sampler = sampler or sc.sampler
        steps = steps or sc.steps
        eta = sc.eta if eta is None else eta
        batch = min(batch_size or sc.batch_size, num_samples)
        batch = -(-batch // num_devices) * num_devices  # a multiple of the device count
        padded = samplers.prepare_schedule(schedule, steps, sampler)
        out = []
        for first in range(0, num_samples, batch):
            x = compiled(params, padded, steps, key, float(eta), first, batch, sampler)
            if jax.process_count() > 1:
                x = multihost_utils.process_allgather(x, tiled=True)
            out.append(to_uint8(np.asarray(x)))
        return np.concatenate(out)[:num_samples]

    return sample
