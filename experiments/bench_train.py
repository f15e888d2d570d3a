"""Train-step throughput: the project's jitted step (exactly what train.py runs) on a config.

    python experiments/bench_train.py                                  # DDPM CIFAR-10, batch 8, 32
    python experiments/bench_train.py --config=configs/ddpm_digits.py --batch-sizes=64
    python experiments/bench_train.py --vs-diffusers                   # + PyTorch peer, ratios
    python experiments/bench_train.py --batch-sizes=128 --memory       # peak memory of one step

Prints, per batch size: images/s (median step time after compilation and warm-up), GFLOP/s
achieved (XLA's cost analysis of the whole step as written, with direct convolutions: forward,
backward, clipping, Adam, EMA; our 3x3 convolutions on CPU do fewer by Winograd's algorithm), the
fraction of a 4096^2 float32 matmul's GFLOP/s measured in the same command and, with
--vs-diffusers, diffusers' UNet2DModel of the identical architecture doing the same work in
PyTorch (q_sample, forward, MSE, backward, grad-norm clip, Adam, EMA), and ours/theirs: the two
steps alternate within each repeat and the ratio is the median of the per-repeat ratios, so the
machine's drift between minutes cancels.
--memory runs one step per batch size in a fresh process and reports its peak resident memory
(ru_maxrss) next to XLA's own buffer accounting (arguments + outputs + temporaries).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys

import bench_common as bc
import jax
import numpy as np

from diffusion_jax import models, parallel, training


def our_step(config, batch: int, count_flops: bool = True):
    """(run, flops, compiled): run() does one blocking train step on a fixed batch; flops is
    None unless count_flops (which compiles the step a second time, with direct convolutions)."""
    config.training.batch_size = batch
    mesh = parallel.make_mesh()
    repl = parallel.replicated(mesh)
    model = models.create_model(training.model_config(config))
    optimizer, lr_schedule = training.make_optimizer(config)
    step_fn = training.make_train_step(
        model, training.make_schedule(config), config, optimizer, lr_schedule
    )
    jitted = jax.jit(
        step_fn,
        in_shardings=(repl, parallel.batch_sharding(mesh), repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )
    state = jax.jit(lambda k: training.init_state(model, optimizer, config, k), out_shardings=repl)(
        jax.random.key(0)
    )
    s, c = config.data.image_size, config.data.num_channels
    rng = np.random.default_rng(0)
    images = parallel.global_batch(rng.integers(0, 256, (batch, s, s, c), np.uint8), mesh)
    key = jax.random.key(1)
    compiled = jitted.lower(state, images, key).compile()
    holder = [state]

    def run():
        holder[0], metrics = compiled(holder[0], images, key)
        jax.block_until_ready(metrics)

    flops = bc.model_flops(jitted, state, images, key) if count_flops else None
    return run, flops, compiled


def torch_step(config, batch: int):
    """run() does one PyTorch train step of the diffusers peer doing the same work as ours."""
    import torch

    model = bc.diffusers_unet(config).train()
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(
        params,
        lr=config.optim.lr,
        betas=(config.optim.beta1, config.optim.beta2),
        eps=config.optim.eps,
    )
    schedule = training.make_schedule(config)
    sqrt_ab = torch.from_numpy(np.array(schedule.sqrt_alphas_cumprod))
    sqrt_1m_ab = torch.from_numpy(np.array(schedule.sqrt_one_minus_alphas_cumprod))
    x0 = bc.torch_images(config, batch)
    decay = config.optim.ema_decay

    def run():
        t = torch.randint(0, schedule.num_timesteps, (batch,))
        noise = torch.randn_like(x0)
        x_t = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1m_ab[t].view(-1, 1, 1, 1) * noise
        loss = torch.nn.functional.mse_loss(model(x_t, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - decay)
        loss.item()

    return run


def peak_memory(args, batch: int) -> dict:
    """One step at `batch` in a fresh process: peak RSS and XLA's buffer accounting, in GiB."""
    cmd = (
        [
            sys.executable,
            __file__,
            "--config",
            args.config,
            "--batch-sizes",
            str(batch),
            "--repeats",
            "1",
            "--_memory-child",
        ]
        + [f"--set={s}" for s in args.set]
        + ["--default-malloc"] * args.default_malloc
    )
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(zip(("peak_rss_GiB", "xla_buffers_GiB"), map(float, out.split()[-2:]), strict=True))


def memory_child(config, batch: int) -> None:
    run, _, compiled = our_step(config, batch, count_flops=False)
    run()
    m = compiled.memory_analysis()
    xla = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(rss / 2**30, xla / 2**30)


def main() -> None:
    p = bc.argument_parser(__doc__, "comma-separated global batch sizes", repeats=5)
    p.add_argument("--memory", action="store_true", help="peak memory of a step, per batch")
    p.add_argument("--_memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    bc.set_up_process(args)
    config = bc.load_config(args.config, args.set)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args._memory_child:
        memory_child(config, batches[0])
        return
    if args.vs_diffusers and not bc.has_diffusers():
        sys.exit('--vs-diffusers needs torch and diffusers: pip install -e ".[interop]"')

    dtype = bc.compute_dtype(config)
    ceiling = bc.matmul_ceiling(dtype=dtype)
    rows = []
    for batch in batches:
        run, flops, _ = our_step(config, batch, count_flops=args.flops == "compiled")
        fns = {"ours": run}
        if args.vs_diffusers:
            fns["torch"] = torch_step(config, batch)
        for fn in fns.values():
            fn()
            fn()
        times = bc.interleaved_seconds(fns, args.repeats)
        del run, fns
        seconds = statistics.median(times["ours"])
        row = {"batch": batch, "images/s": batch / seconds, "step_ms": 1e3 * seconds}
        if flops:
            row["GFLOP/step"] = flops / 1e9
            row["GFLOP/s"] = flops / seconds / 1e9
            row["of_matmul"] = flops / seconds / 1e9 / ceiling
        if args.vs_diffusers:
            t_seconds = statistics.median(times["torch"])
            row["torch_images/s"] = batch / t_seconds
            if flops:
                row["torch_GFLOP/s"] = flops / t_seconds / 1e9
            row["ours/torch"] = bc.median_ratio(times["torch"], times["ours"])
        if args.memory:
            row.update(peak_memory(args, batch))
        rows.append(row)
    extra = f"; overrides {args.set}" if args.set else ""
    bc.report(
        rows,
        f"train step, {args.config}{extra}; matmul ceiling {ceiling:.0f} GFLOP/s "
        f"(4096^2 {dtype.__name__}, JAX, same command)",
        args.json,
    )


if __name__ == "__main__":
    main()
