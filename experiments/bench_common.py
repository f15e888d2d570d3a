"""What bench_train.py and bench_sample.py share: config loading, timing, the matmul ceiling,
XLA's FLOP count, and the diffusers (PyTorch) peer of a config's UNet.

Timings are medians of several calls after warm-up; speed is reported as ratios measured in the
same command, never asserted.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import hostmem, training

ROOT = Path(__file__).resolve().parent.parent


def argument_parser(doc: str, batch_help: str, repeats: int) -> argparse.ArgumentParser:
    """The options both benchmarks take: --config, --batch-sizes, --repeats, --set,
    --vs-diffusers, --json, --default-malloc, --flops."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/ddpm_cifar.py")
    p.add_argument("--batch-sizes", default="8,32", help=batch_help)
    p.add_argument("--repeats", type=int, default=repeats, help="timed calls; the median counts")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="config override, e.g. --set training.mixed_precision=True",
    )
    p.add_argument("--vs-diffusers", action="store_true", help="also time the PyTorch peer")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (the CLIs call hostmem.keep_freed_memory())",
    )
    p.add_argument(
        "--flops",
        choices=("compiled", "none"),
        default="compiled",
        help="count FLOPs (XLA's cost analysis of a second compilation, with direct convolutions)\n"
        "or not (none: no GFLOP/s columns; a GPU spends minutes on each compilation)",
    )
    return p


def set_up_process(args) -> None:
    """What the CLIs do to the process before JAX starts: keep freed host memory."""
    if not args.default_malloc:
        hostmem.keep_freed_memory()


def load_config(path: str, overrides: list[str]):
    """get_config() of a config file, with "a.b=value" overrides (values parsed as Python)."""
    config = config_lib.load_config(str(ROOT / path))
    for item in overrides:
        key, _, value = item.partition("=")
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[leaf] = value  # a bare string
    return config


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(fns: dict, repeats: int) -> dict:
    """Wall times of each blocking fn, {name: [seconds] * repeats}, timed in turn within each
    repeat: the machine's speed drifts over minutes, and timing one thing after another would
    put that drift into their ratio. Call each fn once first (compilation, warm-up)."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return times


def median_ratio(a, b) -> float:
    """Median of the per-repeat ratios a[i] / b[i]."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def matmul_ceiling(n: int = 4096, repeats: int = 5, dtype=jnp.float32) -> float:
    """GFLOP/s of an n x n matmul in JAX: the machine's practical compute ceiling."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    seconds = median_seconds(lambda: f(a, b).block_until_ready(), repeats)
    return 2 * n**3 / seconds / 1e9


def model_flops(jitted, *args) -> float:
    """FLOPs of one call of jitted(*args) as the model is written: XLA's cost analysis of the
    program compiled with direct convolutions. On CPU, models/fast_cpu/conv.py computes float32
    3x3 convolutions by Winograd's algorithm, the same result with a quarter of the products;
    GFLOP/s here counts the model's work, so that it compares across algorithms and with PyTorch.
    (The cost analysis of the lowered, uncompiled program would save the compilation, but JAX
    0.11.2 returns None for it on a GPU.)"""
    with jax.default_matmul_precision("highest"):
        return compiled_flops(jitted.lower(*args).compile())


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled function, from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"])


def compute_dtype(config):
    """The dtype the model computes in: bfloat16 under training.mixed_precision."""
    return jnp.bfloat16 if config.training.get("mixed_precision", False) else jnp.float32


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = jax.devices()
    kind = "" if devices[0].platform == "cpu" else f" ({devices[0].device_kind})"
    return (
        f"{os.cpu_count()} CPU cores ({cpu}); JAX {jax.__version__} on {len(devices)} "
        f"{devices[0].platform} device(s){kind}"
    )


def has_diffusers() -> bool:
    return all(importlib.util.find_spec(m) for m in ("torch", "diffusers"))


def diffusers_unet(config):
    """diffusers' UNet2DModel of the identical architecture (the PyTorch peer)."""
    import diffusers

    from diffusion_jax.interop.diffusers import diffusers_config_from_unet

    return diffusers.UNet2DModel(**diffusers_config_from_unet(training.model_config(config)))


def torch_images(config, batch: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    s, c = config.data.image_size, config.data.num_channels
    return torch.rand(batch, c, s, s, generator=g) * 2 - 1


def report(rows: list[dict], header: str, json_path: str | None) -> None:
    """Print rows as an aligned table; also write them (with the machine) as JSON if asked."""
    print(header)
    print(machine())
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


def _fmt(v) -> str:
    if isinstance(v, float | np.floating):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
