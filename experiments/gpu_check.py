"""Does the train step's gradient on an accelerator agree with the CPU's?

    python experiments/gpu_check.py                                   # digits config, batch 16
    python experiments/gpu_check.py --config=configs/ddpm_cifar.py --batch=8

The train step's objective (training.make_loss_fn) and its gradient, from the same parameters
(the init, with its zero-initialised kernels made random), images and key, jitted once for the
CPU and once for the default backend (a GPU or TPU; on a CPU-only machine the "accelerator" is
the CPU again). The CPU side is
float32 under jax.default_matmul_precision("highest"): off the CPU, model.kernels='auto' (the
default) runs plain Flax layers, so this checks those and the
accelerator's kernels against the CPU's. Three accelerator runs, each with its bound on
||g_acc - g_cpu|| / ||g_cpu|| over all parameters (and on the loss's relative difference):

  float32, "highest" precision      1e-4   rounding only (unit roundoff 6e-8, summed over
                                           the forward and backward passes' long reductions)
  float32, default precision        2e-2   a GPU multiplies in TF32 (10-bit mantissa,
                                           unit roundoff 4.9e-4) by default
  mixed precision (bfloat16)        1e-1   bfloat16 activations (unit roundoff 3.9e-3)

Prints one line per run and exits 1 if any exceeds its bound.
"""

from __future__ import annotations

import argparse
import sys

import bench_common as bc
import jax
import numpy as np

from diffusion_jax import models, training

BOUNDS = {"f32_highest": 1e-4, "f32_default": 2e-2, "bf16_mixed": 1e-1}


def loss_and_grad(config, device, params, images, key, precision):
    """(loss, grads) of the train step's objective, computed on `device`."""
    model = models.create_model(training.model_config(config))
    loss_fn = training.make_loss_fn(model, training.make_schedule(config), config)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    args = jax.device_put((params, images, key), device)
    with jax.default_matmul_precision(precision):
        (loss, _), grads = grad_fn(*args)
    return float(loss), jax.tree.map(lambda g: np.asarray(g, np.float64), grads)


def unzeroed(params, scale: float = 0.02):
    """params with every all-zero kernel drawn from N(0, scale^2): the DDPM UNet initialises its
    output convolutions to zero, and at that init the output is 0 and only the last layer has a
    gradient, which would leave most of the network unchecked."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree.unflatten(
        tree,
        [
            scale * jax.random.normal(k, x.shape) if x.ndim > 1 and not x.any() else x
            for x, k in zip(leaves, keys, strict=True)
        ],
    )


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| over all leaves of two pytrees of arrays."""
    num = sum(
        np.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    den = sum(np.sum(y**2) for y in jax.tree.leaves(b))
    return float(np.sqrt(num / den))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/ddpm_digits.py")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    config = bc.load_config(args.config, [])
    cpu, acc = jax.devices("cpu")[0], jax.devices()[0]
    model = models.create_model(training.model_config(config))
    optimizer, _ = training.make_optimizer(config)
    with jax.default_device(cpu):
        params = unzeroed(training.init_state(model, optimizer, config, jax.random.key(0)).params)
    s, c = config.data.image_size, config.data.num_channels
    images = np.random.default_rng(0).integers(0, 256, (args.batch, s, s, c), np.uint8)
    key = jax.random.key(1)

    ref_loss, ref_grads = loss_and_grad(config, cpu, params, images, key, "highest")
    print(f"{bc.machine()}; {args.config}, batch {args.batch}; CPU float32 loss {ref_loss:.6g}")
    mixed = bc.load_config(args.config, ["training.mixed_precision=True"])
    runs = {
        "f32_highest": (config, "highest"),
        "f32_default": (config, "default"),
        "bf16_mixed": (mixed, "default"),
    }
    failed = False
    for name, (cfg, precision) in runs.items():
        loss, grads = loss_and_grad(cfg, acc, params, images, key, precision)
        grad_err = relative_error(grads, ref_grads)
        loss_err = abs(loss - ref_loss) / abs(ref_loss)
        ok = grad_err <= BOUNDS[name] and loss_err <= BOUNDS[name]
        failed |= not ok
        print(
            f"{acc.platform} {name:12s} loss {loss:.6g}  rel. loss diff {loss_err:.2e}  "
            f"rel. grad diff {grad_err:.2e}  bound {BOUNDS[name]:.0e}  {'ok' if ok else 'FAIL'}"
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
