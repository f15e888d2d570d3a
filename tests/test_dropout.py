"""Dropout with a bit-packed mask (models/fast_cpu/dropout.py): flax's nn.Dropout values and
gradients bit for bit, a lossless pack/unpack, and a backward pass that no longer holds uint32
bits.

Tolerances: none. The mask comes from the same rng by the same jax.random.bernoulli call and
the kept values are the same float operation (x / keep), so equality is exact.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models.fast_cpu import Dropout, pack_bits, unpack_bits


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (13,), (3, 5, 7), (2, 4, 4, 16)])
def test_pack_bits_round_trip(shape):
    mask = jax.random.bernoulli(jax.random.key(0), 0.5, shape)
    packed = pack_bits(mask)
    assert packed.dtype == jnp.uint8 and packed.shape == (-(-mask.size // 8),)
    np.testing.assert_array_equal(unpack_bits(packed, shape), mask)


def test_pack_bits_layout():
    mask = jnp.array([True, False, False, False, False, False, False, True, False, True])
    np.testing.assert_array_equal(pack_bits(mask), np.array([1 + 128, 2], np.uint8))


def apply(module, x, seed, deterministic=False):
    return module.apply({}, x, deterministic=deterministic, rngs={"dropout": jax.random.key(seed)})


@pytest.mark.parametrize("rate", [0.1, 0.5])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 4, 4, 16)])
def test_values_and_gradients_equal_flax_dropout(shape, rate):
    x = jax.random.normal(jax.random.key(1), shape)
    g = jax.random.normal(jax.random.key(2), shape)
    ours, theirs = Dropout(rate), nn.Dropout(rate)
    for seed in (3, 4):
        out, vjp = jax.vjp(lambda x, seed=seed: apply(ours, x, seed), x)
        want, vjp_want = jax.vjp(lambda x, seed=seed: apply(theirs, x, seed), x)
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(vjp(g)[0], vjp_want(g)[0])
    assert 0 < np.mean(np.asarray(out) == 0) < 1


def test_identity_when_deterministic_or_rate_zero():
    x = jax.random.normal(jax.random.key(1), (2, 3))
    np.testing.assert_array_equal(apply(Dropout(0.5), x, 0, deterministic=True), x)
    np.testing.assert_array_equal(apply(Dropout(0.0), x, 0), x)


@pytest.mark.parametrize("rate", [1.0, -0.1])
def test_rejects_rate_outside_unit_interval(rate):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        apply(Dropout(rate), jnp.ones(3), 0)


@pytest.mark.perf
def test_backward_holds_less_than_flax_dropout():
    """Three dropout layers, each followed by a matmul: with flax's nn.Dropout XLA keeps the
    uint32 random bits of the masks alive for the backward pass (4 bytes per element); with
    the packed mask it keeps 1 bit. The saving must be at least one uint32 tensor."""
    shape = (8, 32, 32, 128)
    w = jax.random.normal(jax.random.key(2), (shape[-1], shape[-1]))

    def temp_bytes(module):
        def loss(x):
            for seed in range(3):
                x = jnp.tanh(apply(module, x, seed) @ w)
            return x.sum()

        compiled = jax.jit(jax.grad(loss)).lower(jnp.ones(shape)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    uint32_tensor = 4 * np.prod(shape)
    assert temp_bytes(Dropout(0.1)) + uint32_tensor <= temp_bytes(nn.Dropout(0.1))
