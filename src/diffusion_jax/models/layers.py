"""UNet building blocks (Flax linen). Nothing here knows about diffusion.

Layout is NHWC. Parameters are float32; `dtype` is the compute dtype. Sub-module names follow
diffusers' UNet2DModel (norm1, conv1, time_emb_proj, to_q, ...) so its weights map one-to-one.
Initialisation follows the original DDPM code: variance_scaling(1, fan_avg, uniform) kernels,
zero biases, and zero-initialised last layers of every residual branch.

The layers are Flax's nn.Conv, nn.Dense, nn.GroupNorm, nn.Dropout and nn.swish. Each block's
`kernels` field (KERNELS) may swap in the CPU kernels of models/fast_cpu for them, in one place,
`layer_kinds`; the parameters (names, shapes, dtypes) are the same under every setting.
"""

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.models import fast_cpu

NORM_EPS = 1e-6  # GroupNorm's epsilon in the original DDPM code (diffusers' default is 1e-5)
DOWNSAMPLE_PADDINGS = {"same": ((0, 1), (0, 1)), "symmetric": ((1, 1), (1, 1))}

# model.kernels: which implementation computes the convolutions, dense layers, GroupNorms and
# dropouts. The parameters are the same under each, so a checkpoint loads under any of them.
KERNELS = {
    "auto": "fast_cpu where the program is lowered for CPU and the model computes in float32; "
    "xla elsewhere (chosen per platform when the program is lowered)",
    "xla": "plain Flax layers: grad, jvp, jacfwd, vmap and every other transformation work",
    "fast_cpu": "the float32 CPU kernels of models/fast_cpu (Winograd 3x3 convolutions, matmul "
    "1x1 convolutions and dense layers, GroupNorm with an input-only gradient, bit-packed "
    "dropout masks): faster training on CPU, reverse-mode autodiff only",
}

default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros


def check_kernels(kernels) -> None:
    """Raise ValueError unless `kernels` is a key of KERNELS."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r}; allowed: {', '.join(map(repr, KERNELS))}")


class LayerKinds(NamedTuple):
    """How each kind of layer is computed; every kind has Flax's parameters."""

    conv_general_dilated: Callable  # nn.Conv's field of that name
    dot_general: Callable  # nn.Dense's field of that name
    group_norm: Callable  # (num_groups, epsilon, dtype, name, act) -> a function of x
    dropout: Callable  # rate -> a module called as (x, deterministic)


def _flax_group_norm(num_groups, epsilon, dtype, name, act=False):
    norm = nn.GroupNorm(num_groups, epsilon=epsilon, dtype=dtype, name=name)
    return (lambda x: nn.swish(norm(x))) if act else norm


def _fast_group_norm(num_groups, epsilon, dtype, name, act=False, only_on_cpu=False):
    return fast_cpu.GroupNorm(num_groups, epsilon, act, dtype, only_on_cpu, name=name)


FLAX_LAYERS = LayerKinds(lax.conv_general_dilated, lax.dot_general, _flax_group_norm, nn.Dropout)
FAST_CPU_LAYERS = LayerKinds(
    fast_cpu.conv_general_dilated, fast_cpu.dense_dot_general, _fast_group_norm, fast_cpu.Dropout
)
# "auto" in float32: the fast kernels, chosen when the program is lowered for CPU.
FAST_ON_CPU_LAYERS = LayerKinds(
    fast_cpu.on_cpu(fast_cpu.conv_general_dilated, lax.conv_general_dilated),
    fast_cpu.on_cpu(fast_cpu.dense_dot_general, lax.dot_general),
    partial(_fast_group_norm, only_on_cpu=True),
    partial(fast_cpu.Dropout, only_on_cpu=True),
)


def layer_kinds(kernels: str, dtype) -> LayerKinds:
    """The layers that `kernels` (KERNELS) selects for the compute dtype `dtype`. "auto" takes
    the fast kernels only in float32: in bfloat16 they would keep XLA's convolutions anyway."""
    check_kernels(kernels)
    if kernels == "fast_cpu":
        return FAST_CPU_LAYERS
    if kernels == "auto" and jnp.dtype(dtype) == jnp.float32:
        return FAST_ON_CPU_LAYERS
    return FLAX_LAYERS


def conv(kinds, features, kernel_size, dtype, name, kernel_init=default_init, **kwargs):
    """nn.Conv (stride 1, padding 1 per side unless given) computed as `kinds` says."""
    kwargs.setdefault("padding", ((1, 1), (1, 1)) if kernel_size == 3 else ((0, 0), (0, 0)))
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        dtype=dtype,
        kernel_init=kernel_init,
        name=name,
        conv_general_dilated=kinds.conv_general_dilated,
        **kwargs,
    )


def dense(kinds, features, dtype, name, kernel_init=default_init):
    """nn.Dense computed as `kinds` says."""
    return nn.Dense(
        features, dtype=dtype, kernel_init=kernel_init, name=name, dot_general=kinds.dot_general
    )


def timestep_embedding(
    t, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal embedding of t (B,) -> (B, dim) float32: diffusers' get_timestep_embedding.

    [sin(t * f_i), cos(t * f_i)] for i < half = dim // 2, with f_i = max_period ** (-i / (half -
    freq_shift)); [cos, sin] when flip_sin_to_cos; zero-padded when dim is odd. The defaults
    (freq_shift=1, sin first) are the original DDPM code's embedding; diffusers' UNet2DModel
    defaults to freq_shift=0 and flip_sin_to_cos=True. t may be integer or float (a continuous
    noise level works the same way).
    """
    half = dim // 2
    if half < 1 or half <= freq_shift:
        raise ValueError(
            f"timestep_embedding: dim={dim} with freq_shift={freq_shift}; need dim // 2 > "
            "freq_shift (and dim >= 2)"
        )
    # float32, in the order of operations diffusers uses, so both agree to rounding.
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin_cos = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(sin_cos, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: Dense -> swish -> Dense (no final activation)."""

    features: int
    dtype: Any = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, emb):
        kinds = layer_kinds(self.kernels, self.dtype)
        emb = nn.swish(dense(kinds, self.features, self.dtype, "linear_1")(emb))
        return dense(kinds, self.features, self.dtype, "linear_2")(emb)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3 -> + Dense(swish(temb)) -> GroupNorm -> swish -> dropout
    -> conv3x3, plus the input (through a 1x1 conv when the channel count changes)."""

    out_channels: int
    dropout: float = 0.0
    num_groups: int = 32
    norm_eps: float = NORM_EPS
    dtype: Any = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x, temb, train: bool = False):
        kinds = layer_kinds(self.kernels, self.dtype)
        c = self.out_channels
        h = kinds.group_norm(self.num_groups, self.norm_eps, self.dtype, "norm1", act=True)(x)
        h = conv(kinds, c, 3, self.dtype, "conv1")(h)
        temb = dense(kinds, c, self.dtype, "time_emb_proj")(nn.swish(temb))
        h = h + temb[:, None, None, :]
        h = kinds.group_norm(self.num_groups, self.norm_eps, self.dtype, "norm2", act=True)(h)
        h = kinds.dropout(self.dropout)(h, deterministic=not train)
        h = conv(kinds, c, 3, self.dtype, "conv2", kernel_init=zero_init)(h)
        if x.shape[-1] != c:
            x = conv(kinds, c, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions with a residual connection:
    x + to_out(softmax(q k^T / sqrt(d)) v), with q, k, v linear maps of GroupNorm(x)."""

    num_heads: int = 1
    num_groups: int = 32
    norm_eps: float = NORM_EPS
    dtype: Any = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x):
        kinds = layer_kinds(self.kernels, self.dtype)
        b, height, width, c = x.shape
        if c % self.num_heads:
            raise ValueError(
                f"AttentionBlock: num_heads={self.num_heads} does not divide the {c} channels"
            )
        h = kinds.group_norm(self.num_groups, self.norm_eps, self.dtype, "group_norm")(x)
        h = h.reshape(b, height * width, c)

        def proj(name, kernel_init=default_init):
            return dense(kinds, c, self.dtype, name, kernel_init)

        shape = (b, height * width, self.num_heads, c // self.num_heads)
        q = proj("to_q")(h).reshape(shape)
        k = proj("to_k")(h).reshape(shape)
        v = proj("to_v")(h).reshape(shape)
        h = jax.nn.dot_product_attention(q, k, v).reshape(b, height * width, c)
        h = proj("to_out_0", zero_init)(h)
        return x + h.reshape(x.shape)


class Downsample(nn.Module):
    """Halve the spatial size: stride-2 conv3x3, or 2x2 average pooling without conv.

    padding "same" is TensorFlow's SAME for stride 2 on even sizes (0 before, 1 after), as in the
    original DDPM code and diffusers' downsample_padding=0; "symmetric" pads 1 on each side
    (diffusers' default downsample_padding=1).
    """

    with_conv: bool = True
    padding: str = "same"
    dtype: Any = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x):
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        if self.padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(
                f"Downsample: padding={self.padding!r}; allowed: {sorted(DOWNSAMPLE_PADDINGS)}"
            )
        pad = DOWNSAMPLE_PADDINGS[self.padding]
        kinds = layer_kinds(self.kernels, self.dtype)
        return conv(kinds, x.shape[-1], 3, self.dtype, "conv", strides=2, padding=pad)(x)


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour x2, then conv3x3 if with_conv."""

    with_conv: bool = True
    dtype: Any = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, height, 2, width, 2, c))
        x = x.reshape(b, 2 * height, 2 * width, c)
        if self.with_conv:
            x = conv(layer_kinds(self.kernels, self.dtype), c, 3, self.dtype, "conv")(x)
        return x
