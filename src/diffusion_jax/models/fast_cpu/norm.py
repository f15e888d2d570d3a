"""GroupNorm, optionally followed by swish, for model.kernels='fast_cpu': a gradient that keeps
only the input.

y = (x - mean_g) * rsqrt(var_g + eps) * scale + bias, out = y * sigmoid(y) when `act`, with
mean_g and var_g over each (sample, group of C / G channels), in float32 as flax's nn.GroupNorm
computes them (var_g = E[x^2] - E[x]^2, clipped at 0). Autodiff of that composition saves
about four image-sized float32 tensors per layer for the backward pass (x - mean, the
normalised x, y and sigmoid(y)); the custom gradient here saves x and the per-group mean and
rsqrt(var + eps) and recomputes the rest. Reverse mode only (forward_mode.py).

GroupNorm's sums (`_sum`) of up to XLA_SUM_MAX_ELEMENTS elements stay in XLA's own reduction
loops on CPU: XLA:CPU hands every reduce whose reducer is a lone add to YNNPACK, which runs
GroupNorm's small sums over the middle axes of (B, HW, G, C / G) slowly, while for large sums
it is the faster. Measurements: experiments/PERFORMANCE.md.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_jax.models.fast_cpu.forward_mode import reverse_mode_only


def _grouped(x, groups: int):
    b, *spatial, c = x.shape
    return x.astype(jnp.float32).reshape(b, -1, groups, c // groups)


XLA_SUM_MAX_ELEMENTS = 1 << 18


def _sum(x, axes: tuple[int, ...]):
    """x.sum(axes, keepdims=True); on CPU up to XLA_SUM_MAX_ELEMENTS, as a reduce whose reducer
    a - (-b) (the same IEEE sum) is not the lone add that XLA:CPU gives to YNNPACK. Never over
    the batch axis: a sum over a sharded axis ends in an all-reduce, and XLA's collectives take
    only the standard reducers."""
    if 0 in axes:
        raise ValueError(f"_sum: axes {axes} include the batch axis 0")

    def plain(x):
        return x.sum(axes, keepdims=True)

    def kept_in_xla(x):
        return jnp.expand_dims(
            lax.reduce(x, np.zeros((), x.dtype), lambda a, b: a - (-b), axes), axes
        )

    if x.size > XLA_SUM_MAX_ELEMENTS:
        return plain(x)
    return lax.platform_dependent(x, cpu=kept_in_xla, default=plain)


def _stats(xg, eps: float):
    n = xg.shape[1] * xg.shape[3]
    mean = _sum(xg, (1, 3)) / n
    var = jnp.maximum(_sum(xg * xg, (1, 3)) / n - mean * mean, 0.0)
    return mean, lax.rsqrt(var + eps)


def _pre_activation(xg, mean, rstd, scale, bias):
    """(x - mean) * (rstd * scale) + bias on the grouped layout, float32, as flax orders it."""
    g, cg = xg.shape[2:]
    scale = scale.astype(jnp.float32).reshape(1, 1, g, cg)
    bias = bias.astype(jnp.float32).reshape(1, 1, g, cg)
    return (xg - mean) * (rstd * scale) + bias


def group_norm(x, scale, bias, groups: int, eps: float, act: bool, dtype):
    """GroupNorm of NHWC (or any N...C) x over `groups` channel groups, then swish if `act`;
    the result has `dtype`. scale and bias have shape (C,). Reverse-mode autodiff only."""

    def f(x, scale, bias):
        return _group_norm(x, scale, bias, groups, eps, act, dtype)

    return reverse_mode_only(f)(x, scale, bias)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _group_norm(x, scale, bias, groups: int, eps: float, act: bool, dtype):
    out, _ = _group_norm_fwd(x, scale, bias, groups, eps, act, dtype)
    return out


def _group_norm_fwd(x, scale, bias, groups, eps, act, dtype):
    xg = _grouped(x, groups)
    mean, rstd = _stats(xg, eps)
    y = _pre_activation(xg, mean, rstd, scale, bias)
    if act:
        y = y * jax.nn.sigmoid(y)
    return y.reshape(x.shape).astype(dtype), (x, mean, rstd, scale, bias)


def _group_norm_bwd(groups, eps, act, dtype, residuals, g):
    # The barrier keeps XLA from merging the recomputation below with the forward pass's
    # identical expressions, which would keep the forward's tensors alive until here.
    x, mean, rstd, scale, bias = lax.optimization_barrier(residuals)
    xg = _grouped(x, groups)
    scale_g = scale.astype(jnp.float32).reshape(1, 1, *xg.shape[2:])
    a = rstd * scale_g  # y = a x + (bias - a mean)
    gy = g.astype(jnp.float32).reshape(xg.shape)
    if act:
        y = xg * a + (bias.astype(jnp.float32).reshape(scale_g.shape) - a * mean)
        s = jax.nn.sigmoid(y)
        gy = gy * (s * (1.0 + y * (1.0 - s)))  # d/dy [y sigmoid(y)]
    # Each image-sized value below is written as a function of g and x with per-group
    # coefficients, so XLA cannot compute one (e.g. x - mean) early and hold it until here.
    sum_gy = _sum(gy, (1,))
    sum_gy_xc = _sum(gy * (xg - mean), (1,))
    dbias = sum_gy.sum((0, 1))
    dscale = (rstd * sum_gy_xc).sum((0, 1))
    # d/dx of a (x - mean), mean and rstd being functions of the group's values:
    # a gy - rstd E[scale gy] - (x - mean) rstd^2 E[scale gy (x - mean)], E over the group.
    n = xg.shape[1] * xg.shape[3]
    e1 = _sum(scale_g * sum_gy, (3,)) / n
    k = rstd**3 * _sum(scale_g * sum_gy_xc, (3,)) / n
    dx = a * gy - xg * k + (mean * k - rstd * e1)
    return (
        dx.reshape(x.shape).astype(x.dtype),
        dscale.reshape(scale.shape).astype(scale.dtype),
        dbias.reshape(bias.shape).astype(bias.dtype),
    )


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)
