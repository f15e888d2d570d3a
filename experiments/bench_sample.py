"""Inference and sampler throughput for a config's UNet.

    python experiments/bench_sample.py                                  # DDPM CIFAR-10, batch 8, 32
    python experiments/bench_sample.py --config=configs/ddpm_digits.py --batch-sizes=1000
    python experiments/bench_sample.py --vs-diffusers                   # + PyTorch peer, ratios

Per batch size: one jitted model forward (images/s, GFLOP/s from XLA's cost analysis of the
forward with direct convolutions, bench_common.model_flops, fraction
of a 4096^2 float32 matmul measured in the same command); the compiled sampler that train.py and
sample.py use (generate.make_sampler, a lax.fori_loop chain) at --steps and 2 x --steps, giving
the time per chain step as the difference of the two over the extra steps, and its ratio to the
single forward (the goal: within 5%); the whole chain of 2 x --steps in seconds (--steps=500:
a 1000-step DDPM sample of the batch); and whether the second call compiled anything (the step
count is traced, so it must not). With --vs-diffusers, the same forward in PyTorch (diffusers'
UNet2DModel of the identical architecture, torch.inference_mode) and ours/theirs. The forward,
both chains and the peer are timed in turn within each repeat, and each ratio is the median of
the per-repeat ratios, so that the machine's drift between minutes cancels.
"""

from __future__ import annotations

import statistics
import sys

import bench_common as bc
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import generate, models, parallel, samplers, training


class CompileCounter:
    """Counts XLA compilations while active (jax.monitoring's backend-compile events)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.count += 1


def measure(batch, args, config, model, params, sample, method, mesh, compiles, ceiling) -> dict:
    """One table row: the forward, the sampler per step and the PyTorch peer at `batch`."""
    s, c = config.data.image_size, config.data.num_channels
    x = parallel.global_batch(
        np.random.default_rng(0).standard_normal((batch, s, s, c), np.float32), mesh
    )
    t = jnp.full((batch,), 500, jnp.int32)
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
    compiled = forward.lower(params, x, t).compile()
    flops = bc.model_flops(forward, params, x, t) if args.flops == "compiled" else None

    def chain(steps):
        return lambda: sample(
            params, jax.random.key(2), batch, batch_size=batch, sampler=method, steps=steps
        )

    def forward_fn():
        compiled(params, x, t).block_until_ready()

    forward_fn()
    chain(args.steps)()  # compiles the sampler
    before = compiles.count
    chain(2 * args.steps)()
    recompiled = compiles.count > before
    fns = {"forward": forward_fn, "short": chain(args.steps), "long": chain(2 * args.steps)}
    if args.vs_diffusers:
        fns["torch"] = torch_forward_fn(config, batch)
        fns["torch"]()
    times = bc.interleaved_seconds(fns, args.repeats)
    step = [(lg - sh) / args.steps for lg, sh in zip(times["long"], times["short"], strict=True)]
    f_sec = statistics.median(times["forward"])
    row = {
        "batch": batch,
        "images/s": batch / f_sec,
        "forward_ms": 1e3 * f_sec,
        f"{method}_step_ms": 1e3 * statistics.median(step),
        f"{2 * args.steps}_steps_s": statistics.median(times["long"]),
        "step/forward": bc.median_ratio(step, times["forward"]),
        "recompiled": recompiled,
    }
    if flops:
        row["GFLOP/s"] = flops / f_sec / 1e9
        row["of_matmul"] = flops / f_sec / 1e9 / ceiling
    if args.vs_diffusers:
        row["torch_images/s"] = batch / statistics.median(times["torch"])
        row["ours/torch"] = bc.median_ratio(times["torch"], times["forward"])
    return row


def torch_forward_fn(config, batch: int):
    """The diffusers peer's forward at `batch` (inference mode), as a blocking call."""
    import torch

    net = bc.diffusers_unet(config).eval()
    xt, tt = bc.torch_images(config, batch), torch.full((batch,), 500)

    def run():
        with torch.inference_mode():
            net(xt, tt)

    return run


def main() -> None:
    p = bc.argument_parser(__doc__, "comma-separated batch sizes", repeats=3)
    p.add_argument("--steps", type=int, default=4, help="chain steps of the shorter sampler run")
    p.add_argument(
        "--sampler",
        default=None,
        choices=list(samplers.SAMPLERS),
        help="a samplers.SAMPLERS name (default: the config's)",
    )
    args = p.parse_args()
    bc.set_up_process(args)
    config = bc.load_config(args.config, args.set)
    if args.vs_diffusers and not bc.has_diffusers():
        sys.exit('--vs-diffusers needs torch and diffusers: pip install -e ".[interop]"')

    compiles = CompileCounter()
    dtype = bc.compute_dtype(config)
    ceiling = bc.matmul_ceiling(dtype=dtype)
    mesh = parallel.make_mesh()
    model = models.create_model(training.model_config(config))
    s, c = config.data.image_size, config.data.num_channels
    params = jax.jit(
        lambda k: model.init(k, jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32))["params"],
        out_shardings=parallel.replicated(mesh),
    )(jax.random.key(0))
    sample = generate.make_sampler(model, training.make_schedule(config), config, mesh)
    method = args.sampler or config.sampling.sampler
    rows = [
        measure(int(b), args, config, model, params, sample, method, mesh, compiles, ceiling)
        for b in args.batch_sizes.split(",")
    ]
    extra = f"; overrides {args.set}" if args.set else ""
    bc.report(
        rows,
        f"inference and {method} sampler ({args.steps} vs {2 * args.steps} steps), "
        f"{args.config}{extra}; matmul ceiling {ceiling:.0f} GFLOP/s "
        f"(4096^2 {dtype.__name__}, JAX, same command)",
        args.json,
    )


if __name__ == "__main__":
    main()
