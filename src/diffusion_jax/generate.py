"""Drawing samples from a trained model: a compiled sampler from a config, batched over devices.

Used by the train loop (preview grids) and the sample CLI. The chain is compiled once per
batch shape and sampler; step count, eta, the batch's first sample index and, for a
class-conditional model, the labels and the guidance weight are traced, so changing them does
not recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from diffusion_jax import classifier_guidance, degradations, parallel, samplers, schedules
from diffusion_jax import guidance as guidance_lib
from diffusion_jax.data import to_uint8
from diffusion_jax.models import refiner
from diffusion_jax.models.refiner import Refiner


def num_classes(config, classifier_config=None) -> int:
    """The classes samples are drawn for: the model's (its null label is this number), else
    those of the classifier that guides an unconditional model; 0: none."""
    k = int(config.model.get("num_classes", 0))
    if not k and classifier_config is not None:
        k = int(classifier_config.model.num_classes)
    return k


def cycled_labels(config, num_samples: int, classifier_config=None) -> np.ndarray | None:
    """Labels 0, 1, ..., K-1, 0, 1, ... for num_samples samples of a class-conditional or
    classifier-guided model (K classes, `num_classes`); None for an unguided unconditional one."""
    k = num_classes(config, classifier_config)
    return np.arange(num_samples, dtype=np.int32) % k if k else None


def check_labels(config, labels, num_samples: int, classifier_config=None) -> np.ndarray | None:
    """labels as int32 (num_samples,), or ValueError: they must be given (as one per sample)
    exactly for a class-conditional or classifier-guided model, each in 0..K-1."""
    k = num_classes(config, classifier_config)
    if labels is None:
        return None if not k else cycled_labels(config, num_samples, classifier_config)
    if not k:
        raise ValueError("labels given for an unconditional model (model.num_classes=0)")
    labels = np.asarray(labels)
    if labels.shape != (num_samples,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({num_samples},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        bad = labels[(labels < 0) | (labels >= k)][0]
        raise ValueError(f"label {bad} is outside the model's classes 0..{k - 1}")
    return labels.astype(np.int32)


def check_conditions(config, conditions, num_samples: int) -> np.ndarray | None:
    """conditions as float32 (num_samples, H, W, C), or ValueError: conditioning images (what
    the network sees, `condition_images`) are given exactly for a model with a degradation."""
    name = degradations.configured(config)
    if conditions is None:
        if name:
            raise ValueError(
                f"this model is conditioned on images (conditioning.degradation={name!r}): "
                "give one conditioning image per sample"
            )
        return None
    if not name:
        raise ValueError("conditioning images given for a model without image conditioning")
    size, c = config.data.image_size, config.data.num_channels
    conditions = np.asarray(conditions, np.float32)
    if conditions.shape != (num_samples, size, size, c):
        raise ValueError(
            f"conditioning images must have shape {(num_samples, size, size, c)}, got "
            f"{conditions.shape}"
        )
    return conditions


def condition_images(config, observations) -> np.ndarray:
    """The conditioning images the network sees, float32 (N, H, W, C), of observations (N, h,
    w, C) of any origin (uint8 [0, 255] or float [-1, 1]): DEGRADATIONS[name].condition, e.g.
    for "sr" the low-res images bicubically upsampled."""
    name = degradations.configured(config)
    return np.asarray(degradations.DEGRADATIONS[name].condition(observations, config.conditioning))


def preview_conditions(config, source, num_samples: int) -> np.ndarray | None:
    """Conditioning images for preview samples of an image-conditioned model: those of the
    source's first examples (cycled), degraded with a fixed key; None for other models."""
    name = degradations.configured(config)
    if not name:
        return None
    clean = np.stack([source[i % len(source)]["image"] for i in range(num_samples)])
    degradation = degradations.DEGRADATIONS[name]
    return np.asarray(degradation(clean, config.conditioning, jax.random.key(0)))


def make_predictor(model, config, mesh):
    """sample(params, key, num_samples, *, conditions, batch_size) -> uint8 (N, H, W, C): the
    deterministic prediction of each conditioning image, by a regression model
    (models.refiner.predict) or by a Refiner's predictor g alone; in the sampler's signature so
    that the sample CLI serves both; key and the sampler options are unused."""

    def predictions(params, cond):
        def net(x, t, train):
            return model.apply({"params": params}, x, t, train=train)

        cond = jax.lax.with_sharding_constraint(cond, parallel.batch_sharding(mesh))
        if isinstance(model, Refiner):
            return model.apply({"params": params}, cond, method=Refiner.predict_clean)
        return refiner.predict(net, cond)

    compiled = jax.jit(predictions)
    num_devices = mesh.devices.size

    def sample(params, key, num_samples, *, conditions=None, batch_size=None, **unused):
        del key, unused
        conditions = check_conditions(config, conditions, num_samples)
        batch = min(batch_size or config.sampling.batch_size, num_samples)
        batch = -(-batch // num_devices) * num_devices
        padded = np.resize(conditions, (-(-num_samples // batch) * batch,) + conditions.shape[1:])
        out = []
        for first in range(0, num_samples, batch):
            x = compiled(params, padded[first : first + batch])
            if jax.process_count() > 1:
                x = multihost_utils.process_allgather(x, tiled=True)
            out.append(to_uint8(np.asarray(x)))
        return np.concatenate(out)[:num_samples]

    return sample


def make_sampler(
    model,
    schedule,
    config,
    mesh,
    *,
    progress: bool = False,
    classifier=None,
    predictor_only: bool = False,
):
    """sample(params, key, num_samples, *, batch_size, sampler, steps, eta, labels, guidance,
    classifier_scale, conditions) -> uint8 (N, H, W, C).

    A regression model, or a Refiner with predictor_only, gives its predictions instead
    (`make_predictor`).

    The chain runs on schedules.sampling_schedule(config, schedule): config.sampling.schedule
    when it names one, else `schedule` (the training schedule). Defaults come from
    config.sampling. A class-conditional model samples sample i with class
    labels[i] (default: classes cycled, `cycled_labels`) under classifier-free guidance of
    weight `guidance` (default config.sampling.guidance; 0: the conditional model alone, run
    without the doubled batch); an unconditional model takes neither. Sample i's x_T and chain
    noise depend only on (key, i) (samplers.per_sample_normal with the global index i), so
    sample i is the same whatever the batch size or the device count. The chain is compiled
    once per (batch, sampler): the first index of a batch, the labels and the weight are traced.

    classifier: (apply_fn, params, config) of a noisy classifier (workdir.load_classifier), for
    classifier guidance (Dhariwal & Nichol 2021) at scale `classifier_scale` (traced; default 1)
    towards labels[i] (those of an unconditional model are the classifier's classes, cycled by
    default), by the mean shift (DDPM) or the eps form (DDIM, DPM-Solver++) of
    samplers.GUIDANCE_FORMS.
    """
    if predictor_only and not isinstance(model, Refiner):
        raise ValueError("predictor_only is for a predict-and-refine model (model.name refiner)")
    if predictor_only or config.get("training", {}).get("objective", "diffusion") == "regression":
        return make_predictor(model, config, mesh)
    d, sc = config.diffusion, config.sampling
    schedule = schedules.sampling_schedule(config, schedule)
    size, channels = config.data.image_size, config.data.num_channels
    num_devices = mesh.devices.size
    progress_fn = samplers.tqdm_progress("denoising") if progress else None

    classifier_config = None if classifier is None else classifier[2]
    k = num_classes(config, classifier_config)
    conditional = num_classes(config) > 0
    refine = isinstance(model, Refiner)

    def chain(params, padded, num_steps, key, eta, first, labels, w, guide, cond, batch, sampler):
        def network(x_t, t, **model_kwargs):
            return model.apply({"params": params}, x_t, t, train=False, **model_kwargs)

        denoise_fn, model_kwargs, cond_fn, offset = network, {}, None, 0.0
        if cond is not None:  # the conditioning image; a refiner's g(y) once for the chain
            model_kwargs = {"cond_image": cond}
            if refine:
                offset = model.apply({"params": params}, cond, method=Refiner.predict_clean)
                model_kwargs["prediction"] = offset
        if classifier is not None:  # guide = (classifier params, scale)
            cond_fn = classifier_guidance.classifier_cond_fn(
                classifier[0],
                guide[0],
                guide[1],
                t_cutoff=classifier_config.training.get("t_cutoff", 0) or None,
            )
            model_kwargs = dict(model_kwargs, y=labels)
            if not conditional:  # the labels are the classifier's only

                def denoise_fn(x_t, t, y, **kwargs):
                    return network(x_t, t, **kwargs)

        if conditional:
            guided = guidance_lib.classifier_free(network, w, k, d.var_type)

            def denoise_fn(x_t, t, y, **kwargs):  # w = 0 skips the unconditional half at run time
                return jax.lax.cond(
                    w == 0,
                    lambda: network(x_t, t, y=y, **kwargs),
                    lambda: guided(x_t, t, y=y, **kwargs),
                )

            model_kwargs = dict(model_kwargs, y=labels)

        sample_index = first + jnp.arange(batch)
        init_key, chain_key = jax.random.split(key)
        x_T = samplers.per_sample_normal(init_key, sample_index, (batch, size, size, channels))
        x_T = jax.lax.with_sharding_constraint(x_T, parallel.batch_sharding(mesh))
        return (
            offset
            + samplers.run_chain(
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
                model_kwargs=model_kwargs,
                sample_index=sample_index,
                noise_conditioning=d.get("noise_conditioning", "timestep"),
                cond_fn=cond_fn,
            )["sample"]
        )

    compiled = jax.jit(chain, static_argnums=(10, 11))

    def sample(
        params,
        key,
        num_samples,
        *,
        batch_size=None,
        sampler=None,
        steps=None,
        eta=None,
        labels=None,
        guidance=None,
        classifier_scale=None,
        conditions=None,
    ):
        sampler = sampler or sc.sampler
        steps = steps or sc.steps
        eta = sc.eta if eta is None else eta
        w = sc.get("guidance", 0.0) if guidance is None else guidance
        if w and not conditional:
            raise ValueError("guidance given for an unconditional model (model.num_classes=0)")
        if w < 0:
            raise ValueError(f"guidance must be >= 0, got {w}")
        if classifier_scale is not None and classifier is None:
            raise ValueError("classifier_scale given without a classifier")
        guide = None
        if classifier is not None:
            scale = 1.0 if classifier_scale is None else classifier_scale
            guide = (classifier[1], np.float32(scale))
        labels = check_labels(config, labels, num_samples, classifier_config)
        conditions = check_conditions(config, conditions, num_samples)
        batch = min(batch_size or sc.batch_size, num_samples)
        batch = -(-batch // num_devices) * num_devices  # a multiple of the device count
        padded = samplers.prepare_schedule(schedule, steps, sampler)
        if labels is not None:  # the last batch's padding rows take labels from the start
            labels = np.resize(labels, -(-num_samples // batch) * batch)
        if conditions is not None:  # so are conditioning images
            conditions = np.resize(
                conditions, (-(-num_samples // batch) * batch,) + conditions.shape[1:]
            )
        out = []
        for first in range(0, num_samples, batch):
            y = None if labels is None else labels[first : first + batch]
            cond = None if conditions is None else conditions[first : first + batch]
            traced = (float(eta), first, y, np.float32(w), guide, cond)
            x = compiled(params, padded, steps, key, *traced, batch, sampler)
            if jax.process_count() > 1:
                x = multihost_utils.process_allgather(x, tiled=True)
            out.append(to_uint8(np.asarray(x)))
        return np.concatenate(out)[:num_samples]

    return sample
