"""UNet building blocks (Flax linen). Nothing here knows about diffusion.

Layout is NHWC. Parameters are float32; `dtype` is the compute dtype. Sub-module names follow
diffusers' UNet2DModel (norm1, conv1, time_emb_proj, to_q, ...) so its weights map one-to-one.
Initialisation follows the original DDPM code: variance_scaling(1, fan_avg, uniform) kernels,
zero biases, and zero-initialised last layers of every residual branch.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from diffusion_jax.models import norm
from diffusion_jax.models.conv import conv_general_dilated, dense_dot_general

NORM_EPS = 1e-6
DOWNSAMPLE_PADDINGS = {"same": ((0, 1), (0, 1)), "symmetric": ((1, 1), (1, 1))}

default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros


def conv3x3(features, dtype, name, strides=1, padding=((1, 1), (1, 1)), kernel_init=default_init):
    return nn.Conv(
        features,
        (3, 3),
        strides=strides,
        padding=padding,
        dtype=dtype,
        kernel_init=kernel_init,
        name=name,
        conv_general_dilated=conv_general_dilated,
    )


def dense(features, dtype, name, kernel_init=default_init):
    return nn.Dense(
        features, dtype=dtype, kernel_init=kernel_init, name=name, dot_general=dense_dot_general
    )


class GroupNorm(nn.Module):
    """nn.GroupNorm's parameters (scale, bias) and values, then swish when `act`; the gradient
    keeps only the input (models/norm.py)."""

    num_groups: int
    act: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return norm.group_norm(x, scale, bias, self.num_groups, NORM_EPS, self.act, self.dtype)


def group_norm(num_groups, dtype, name, act=False):
    return GroupNorm(num_groups, act=act, dtype=dtype, name=name)


def pack_bits(mask) -> jax.Array:
    """Boolean array -> uint8 array of ceil(size / 8) bytes; element i is bit i % 8 of byte
    i // 8."""
    flat = mask.reshape(-1)
    flat = jnp.pad(flat, (0, -flat.size % 8)).reshape(-1, 8).astype(jnp.uint8)
    return (flat << jnp.arange(8, dtype=jnp.uint8)).sum(1, dtype=jnp.uint8)


def unpack_bits(packed, shape) -> jax.Array:
    """Inverse of pack_bits: the boolean array of `shape`."""
    bits = (packed[:, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    return bits.reshape(-1)[: math.prod(shape)].reshape(shape).astype(bool)


class Dropout(nn.Module):
    """flax's nn.Dropout (the same mask from the same rng, the same values) whose mask goes
    through pack_bits, so the backward pass keeps it at 1 bit per element: with nn.Dropout XLA
    keeps the uint32 random bits instead (32 bits per element; 1.0 GiB of the CIFAR-10 train
    step's peak at batch 128, experiments/PERFORMANCE.md). The packing is a reduction, which XLA
    does not duplicate into its consumers the way it did the comparison of bits with the
    threshold."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"Dropout: rate={self.rate}; must be in [0, 1)")
        if self.rate == 0.0 or deterministic:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
        mask = unpack_bits(pack_bits(mask), x.shape)
        return lax.select(mask, x / keep, jnp.zeros_like(x))


def timestep_embedding(t, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of t (B,) -> (B, dim) float32, as in the original DDPM code.

    Equals diffusers' get_timestep_embedding with flip_sin_to_cos=False, downscale_freq_shift=1:
    [sin(t * f_i), cos(t * f_i)] with f_i = max_period ** (-i / (dim // 2 - 1)), zero-padded
    when dim is odd. t may be integer or float (a continuous noise level works the same way).
    """
    half = dim // 2
    if half < 2:
        raise ValueError(f"timestep_embedding: dim={dim} is too small; need dim >= 4")
    # float32, in the order of operations diffusers uses, so both agree to rounding.
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: Dense -> swish -> Dense (no final activation)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, emb):
        emb = nn.swish(dense(self.features, self.dtype, "linear_1")(emb))
        return dense(self.features, self.dtype, "linear_2")(emb)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3 -> + Dense(swish(temb)) -> GroupNorm -> swish -> dropout
    -> conv3x3, plus the input (through a 1x1 conv when the channel count changes)."""

    out_channels: int
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, train: bool = False):
        h = group_norm(self.num_groups, self.dtype, "norm1", act=True)(x)
        h = conv3x3(self.out_channels, self.dtype, "conv1")(h)
        temb = dense(self.out_channels, self.dtype, "time_emb_proj")(nn.swish(temb))
        h = h + temb[:, None, None, :]
        h = group_norm(self.num_groups, self.dtype, "norm2", act=True)(h)
        h = Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(self.out_channels, self.dtype, "conv2", kernel_init=zero_init)(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(
                self.out_channels,
                (1, 1),
                dtype=self.dtype,
                kernel_init=default_init,
                name="conv_shortcut",
                conv_general_dilated=conv_general_dilated,
            )(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions with a residual connection:
    x + to_out(softmax(q k^T / sqrt(d)) v), with q, k, v linear maps of GroupNorm(x)."""

    num_heads: int = 1
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        if c % self.num_heads:
            raise ValueError(
                f"AttentionBlock: num_heads={self.num_heads} does not divide the {c} channels"
            )
        h = group_norm(self.num_groups, self.dtype, "group_norm")(x)
        h = h.reshape(b, height * width, c)

        def proj(name, kernel_init=default_init):
            return dense(c, self.dtype, name, kernel_init)

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

    @nn.compact
    def __call__(self, x):
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        if self.padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(
                f"Downsample: padding={self.padding!r}; allowed: {sorted(DOWNSAMPLE_PADDINGS)}"
            )
        pad = DOWNSAMPLE_PADDINGS[self.padding]
        return conv3x3(x.shape[-1], self.dtype, "conv", strides=2, padding=pad)(x)


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour x2, then conv3x3 if with_conv."""

    with_conv: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, height, width, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, height, 2, width, 2, c))
        x = x.reshape(b, 2 * height, 2 * width, c)
        if self.with_conv:
            x = conv3x3(c, self.dtype, "conv")(x)
        return x
