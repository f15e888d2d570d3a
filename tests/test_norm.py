"""GroupNorm (+ swish) with the input-only gradient (models/fast_cpu/norm.py): values equal the
float64 definition and flax's nn.GroupNorm to float32 summation rounding, gradients equal float64
finite differences and autodiff of flax's composition, and the backward pass keeps no image-sized
tensor but the input.

Tolerances: the forward's per-group mean and mean square are float32 sums of n = H * W * C / G
terms, in whatever order the compiler picks (ours and flax's differ: ours stay out of
YNNPACK). Such a sum errs by at most (n - 1) u sum|x_i|, u = 2^-24 (Higham, "Accuracy and
Stability of Numerical Algorithms", 2002, eq. 4.4), so the mean and the variance err by at most
n u times their scale, and y = (x - mean) rstd scale + bias by n u (1 + |y|) times a factor of
order 1 (|scale| <= 2, rstd <= 1 for these inputs, the variance cancellation
E[x^2] / var ~ 1.1); the bound used is 2 n u (1 + max|y|), 1e-4 and 2e-5 for the two shapes,
where ours and flax's both err by 5-9e-7. Gradients are float32 sums over at
most 8 * 8 * 2 = 128 elements per group and 2 * 64 per channel, rounding about
sqrt(n) * 6e-8 < 1e-6 of the largest entry; 1e-5 relative to the largest entry is the bound.
The finite differences are central, in float64, with step 1e-6 (truncation about 1e-12).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from diffusion_jax.models import layers
from diffusion_jax.models.fast_cpu import norm

EPS = 1e-6
RTOL = 1e-5


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def inputs(shape, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    c = shape[-1]
    x = 2.0 * jax.random.normal(k[0], shape) + 0.5
    return x, 1.0 + 0.3 * jax.random.normal(k[1], (c,)), 0.3 * jax.random.normal(k[2], (c,))


def flax_group_norm(x, scale, bias, groups, act):
    y = nn.GroupNorm(num_groups=groups, epsilon=EPS).apply(
        {"params": {"scale": scale, "bias": bias}}, x
    )
    return nn.swish(y) if act else y


def numpy_group_norm(x, scale, bias, groups, act):
    """The definition in float64: normalise each (sample, group), scale, shift, swish."""
    b, h, w, c = x.shape
    xg = x.reshape(b, h * w, groups, c // groups)
    mean = xg.mean((1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean((1, 3), keepdims=True)
    y = ((xg - mean) / np.sqrt(var + EPS)).reshape(x.shape) * scale + bias
    return y / (1.0 + np.exp(-y)) if act else y


@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("shape, groups", [((2, 8, 8, 64), 32), ((3, 5, 3, 12), 4)])
def test_values_equal_the_definition_and_flax_group_norm(shape, groups, act):
    x, scale, bias = inputs(shape)
    got = norm.group_norm(x, scale, bias, groups, EPS, act, jnp.float32)
    assert got.dtype == jnp.float32 and got.shape == shape
    exact = numpy_group_norm(*(np.asarray(a, np.float64) for a in (x, scale, bias)), groups, act)
    n = shape[1] * shape[2] * shape[3] // groups
    bound = 2 * n * 2.0**-24 * (1 + np.max(np.abs(exact)))
    assert np.max(np.abs(np.asarray(got, np.float64) - exact)) <= bound
    flax = np.asarray(flax_group_norm(x, scale, bias, groups, act), np.float64)
    assert np.max(np.abs(flax - exact)) <= bound  # the reference meets the same bound
    assert np.max(np.abs(np.asarray(got, np.float64) - flax)) <= 2 * bound


@pytest.mark.parametrize("batch", [4, 80])  # 2^15 and 5 * 2^16 elements: both sides of the limit
def test_sum_is_the_sum_and_small_ones_stay_out_of_ynnpack(batch):
    x = jax.random.normal(jax.random.key(5), (batch, 64, 32, 2))
    assert (x.size <= norm.XLA_SUM_MAX_ELEMENTS) == (batch == 4)
    got = norm._sum(x, (1, 3))
    want = np.asarray(x, np.float64).sum((1, 3), keepdims=True)
    assert got.shape == want.shape == (batch, 1, 32, 1)
    # float32 sums of 128 terms: (n - 1) u sum|x| (as above), sum|x| <= 128 * max|x|
    assert np.max(np.abs(np.asarray(got) - want)) <= 127 * 2.0**-24 * 128 * np.max(np.abs(x))

    def fwd_bwd(x, scale, bias):
        return jax.vjp(lambda x: norm.group_norm(x, scale, bias, 32, EPS, True, jnp.float32), x)[1](
            x
        )

    # On CPU, XLA gives a reduce with a lone-add reducer to YNNPACK (its fusions are marked
    # __ynn_fusion); GroupNorm's small sums stay in XLA's own loops (models/fast_cpu/norm.py).
    x, scale, bias = inputs((2, 8, 8, 64))
    hlo = jax.jit(fwd_bwd).lower(x, scale, bias).compile().as_text()
    if jax.default_backend() == "cpu":
        assert "__ynn_fusion" not in hlo


@pytest.mark.parametrize("act", [True, False])
def test_gradients_equal_float64_finite_differences(act):
    shape, groups = (2, 3, 2, 4), 2
    x, scale, bias = inputs(shape, seed=1)
    w = np.asarray(jax.random.normal(jax.random.key(9), shape), np.float64)

    def loss(x, s, b):
        return jnp.sum(norm.group_norm(x, s, b, groups, EPS, act, jnp.float32) * w)

    got = jax.grad(loss, (0, 1, 2))(x, scale, bias)
    args = [np.asarray(a, np.float64) for a in (x, scale, bias)]
    step = 1e-6
    for i, arg in enumerate(args):
        fd = np.zeros_like(arg)
        for idx in np.ndindex(arg.shape):
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[i][idx] += step
            minus[i][idx] -= step
            fd[idx] = (
                np.sum(numpy_group_norm(*plus, groups, act) * w)
                - np.sum(numpy_group_norm(*minus, groups, act) * w)
            ) / (2 * step)
        assert rel_err(got[i], fd) < RTOL, ("x", "scale", "bias")[i]


@pytest.mark.parametrize("act", [True, False])
def test_gradients_equal_autodiff_of_flax(act):
    x, scale, bias = inputs((2, 8, 8, 64), seed=2)
    w = jax.random.normal(jax.random.key(3), x.shape)

    def loss(f, x, s, b):
        return jnp.sum(jnp.sin(f(x, s, b) * w))

    def ours(x, s, b):
        return norm.group_norm(x, s, b, 32, EPS, act, jnp.float32)

    def theirs(x, s, b):
        return flax_group_norm(x, s, b, 32, act)

    got = jax.grad(lambda *a: loss(ours, *a), (0, 1, 2))(x, scale, bias)
    want = jax.grad(lambda *a: loss(theirs, *a), (0, 1, 2))(x, scale, bias)
    for g, r in zip(got, want, strict=True):
        assert rel_err(g, r) < RTOL


def test_bfloat16_output_with_float32_gradients():
    x, scale, bias = inputs((2, 4, 4, 32), seed=4)
    out = norm.group_norm(x, scale, bias, 8, EPS, True, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    ref = norm.group_norm(x, scale, bias, 8, EPS, True, jnp.float32)
    # bfloat16 keeps 8 significant bits: relative rounding 2^-8 of each value.
    assert np.all(np.abs(np.asarray(out, np.float32) - ref) <= 2.0**-8 * np.abs(ref) + 1e-6)

    def loss(x, s, b):
        return norm.group_norm(x, s, b, 8, EPS, True, jnp.bfloat16).astype(jnp.float32).sum()

    grads = jax.grad(loss, (0, 1, 2))(x, scale, bias)
    assert [g.dtype for g in grads] == [jnp.float32] * 3


def test_batch_sharded_over_every_device_compiles_and_agrees():
    # The batch axis's sums become all-reduces when it is sharded; XLA's collectives take only
    # the standard reducers, so GroupNorm's own (models/fast_cpu/norm.py `_sum`) must not reduce it.
    devices = jax.devices()
    x, scale, bias = inputs((len(devices), 4, 4, 64), seed=6)
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def loss(x, s, b):
        return jnp.sum(jnp.sin(norm.group_norm(x, s, b, 32, EPS, True, jnp.float32)))

    grad = jax.value_and_grad(loss, (0, 1, 2))
    sharded = jax.jit(grad, in_shardings=(batch, repl, repl))(x, scale, bias)
    single = jax.jit(grad)(x, scale, bias)
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        assert rel_err(got, want) < RTOL  # the same sums, split across devices


def test_sum_refuses_the_batch_axis():
    with pytest.raises(ValueError, match="batch axis"):
        norm._sum(jnp.ones((2, 3)), (0, 1))


def test_backward_keeps_only_the_input(capsys):
    x, scale, bias = inputs((2, 8, 8, 64))
    print_saved_residuals(
        lambda x: norm.group_norm(x, scale, bias, 32, EPS, True, jnp.float32).sum(), x
    )
    saved = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    image_sized = [line for line in saved if "[2,8,8,64]" in line.replace(" ", "")]
    assert image_sized and all("from the argument" in line for line in image_sized), saved
    assert not [line for line in saved if "[2,64,32,2]" in line.replace(" ", "")], saved


@pytest.mark.perf
def test_resnet_blocks_compile_to_less_memory_than_autodiff(monkeypatch):
    """The point of the custom gradient, measured by XLA: the temporaries of a gradient through
    four ResnetBlocks shrink (by 17% at these sizes when written). Autodiff of the same forward
    is the baseline."""

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x, temb):
            for _ in range(4):
                x = layers.ResnetBlock(64, num_groups=8, kernels="fast_cpu")(x, temb)
            return x

    x, temb = jnp.ones((16, 16, 16, 64)), jnp.ones((16, 32))
    params = Stack().init(jax.random.key(0), x, temb)

    def temp_bytes():
        step = jax.jit(jax.grad(lambda p: jnp.sum(Stack().apply(p, x, temb) ** 2)))
        return step.lower(params).compile().memory_analysis().temp_size_in_bytes

    custom = temp_bytes()

    def autodiff(x, scale, bias, groups, eps, act, dtype):
        return norm._group_norm_fwd(x, scale, bias, groups, eps, act, dtype)[0]

    monkeypatch.setattr(norm, "group_norm", autodiff)
    assert custom < 0.9 * temp_bytes()
