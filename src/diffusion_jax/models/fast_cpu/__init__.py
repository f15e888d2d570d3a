"""The CPU kernels behind model.kernels='fast_cpu' (and 'auto' on CPU in float32).

Each is a drop-in for a plain Flax layer with Flax's parameter names and shapes, so a checkpoint
loads under either setting: `conv_general_dilated` and `dense_dot_general` go into nn.Conv's and
nn.Dense's fields of the same names (conv.py: Winograd 3x3 convolutions, 1x1 convolutions and
dense layers as matmuls, gradients as row-major matmuls), `GroupNorm` is nn.GroupNorm (+ swish)
with a gradient that keeps only the input (norm.py), `Dropout` is nn.Dropout with a bit-packed
mask (dropout.py). `on_cpu` and the modules' `only_on_cpu` choose the kernels where the program
is lowered for CPU and the plain computation elsewhere (`lax.platform_dependent`), so a program
traced on a CPU host and lowered for a GPU or TPU holds none of them. The kernels' gradients are
reverse mode only: forward mode raises a one-line error naming model.kernels (forward_mode.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from diffusion_jax.models.fast_cpu import norm
from diffusion_jax.models.fast_cpu.conv import conv_general_dilated, dense_dot_general
from diffusion_jax.models.fast_cpu.dropout import Dropout, pack_bits, unpack_bits
from diffusion_jax.models.fast_cpu.forward_mode import MESSAGE as FORWARD_MODE_MESSAGE


def on_cpu(fast, plain):
    """f(lhs, rhs, *static, **static): fast(...) where the program is lowered for CPU, plain(...)
    elsewhere. lhs and rhs are arrays; the rest are the static arguments of lax's convolution
    or dot_general."""

    def f(lhs, rhs, *args, **kwargs):
        return lax.platform_dependent(
            lhs,
            rhs,
            cpu=lambda a, b: fast(a, b, *args, **kwargs),
            default=lambda a, b: plain(a, b, *args, **kwargs),
        )

    return f


class GroupNorm(nn.Module):
    """nn.GroupNorm(num_groups, epsilon, dtype) (its parameters `scale` and `bias`, its values),
    then swish when `act`, by norm.group_norm; with only_on_cpu, by nn.GroupNorm itself where the
    program is not lowered for CPU."""

    num_groups: int
    epsilon: float
    act: bool = False
    dtype: Any = jnp.float32
    only_on_cpu: bool = False

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)

        def fast(x, scale, bias):
            return norm.group_norm(
                x, scale, bias, self.num_groups, self.epsilon, self.act, self.dtype
            )

        def plain(x, scale, bias):
            layer = nn.GroupNorm(
                self.num_groups, epsilon=self.epsilon, dtype=self.dtype, parent=None
            )
            y = layer.apply({"params": {"scale": scale, "bias": bias}}, x)
            return nn.swish(y) if self.act else y

        if not self.only_on_cpu:
            return fast(x, scale, bias)
        return lax.platform_dependent(x, scale, bias, cpu=fast, default=plain)


__all__ = [
    "FORWARD_MODE_MESSAGE",
    "Dropout",
    "GroupNorm",
    "conv_general_dilated",
    "dense_dot_general",
    "on_cpu",
    "pack_bits",
    "unpack_bits",
]
