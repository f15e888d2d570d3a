"""Dropout for model.kernels='fast_cpu': flax's nn.Dropout (the same mask from the same rng, the
same values) whose mask goes through pack_bits, so the backward pass keeps it at 1 bit per
element where with nn.Dropout XLA keeps the uint32 random bits (32 bits per element). The packing
is a reduction, which XLA does not duplicate into its consumers the way it does the comparison of
the bits with the threshold. Memory measured: experiments/PERFORMANCE.md.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


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
    """nn.Dropout with the mask packed to bits; with only_on_cpu, packed only where the program
    is lowered for CPU (nn.Dropout's computation elsewhere: the same values)."""

    rate: float
    only_on_cpu: bool = False

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"Dropout: rate={self.rate}; must be in [0, 1)")
        if self.rate == 0.0 or deterministic:
            return x
        keep = 1.0 - self.rate

        def apply(x, rng, packed: bool):
            mask = jax.random.bernoulli(rng, keep, x.shape)
            if packed:
                mask = unpack_bits(pack_bits(mask), x.shape)
            return lax.select(mask, x / keep, jnp.zeros_like(x))

        rng = self.make_rng("dropout")
        if not self.only_on_cpu:
            return apply(x, rng, True)
        return lax.platform_dependent(
            x,
            rng,
            cpu=lambda x, rng: apply(x, rng, True),
            default=lambda x, rng: apply(x, rng, False),
        )
