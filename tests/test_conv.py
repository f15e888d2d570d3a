"""The UNet's convolution: same values and gradients as lax.conv_general_dilated, with the kernel
gradient of stride-1 same convolutions computed as matrix products (models/fast_cpu/conv.py).

Tolerances: float32 sums of B*H*W*C (at most 2,000) products in a different order; the
rounding is about sqrt(n) * 6e-8 ~ 3e-6 of the largest entry, so 1e-5 relative to the largest
entry is the stated bound. The reference kernel gradient is a float64 loop over the k * k shifts.
On CPU a float32 3x3 same convolution and its gradients are Winograd's F(4x4, 3x3): its
transforms are exact linear algebra (checked in float64 to 1e-12), and its float32 rounding is
checked separately against the direct computation's at one of the UNet's channel counts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from test_unet import random_params, tiny

from diffusion_jax.models.fast_cpu import conv

NHWC = ("NHWC", "HWIO", "NHWC")
RTOL = 1e-5


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def kernel_grad_float64(x, dy, k):
    """dW[i, j] = sum_{b,h,w} xpad[b, h + i, w + j]^T dy[b, h, w]: the definition, in float64."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    p = k // 2
    _, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    dw = np.zeros((k, k, x.shape[-1], dy.shape[-1]))
    for i in range(k):
        for j in range(k):
            dw[i, j] = np.einsum("bhwc,bhwd->cd", xp[:, i : i + h, j : j + w], dy)
    return dw


def random(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def lax_same_conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)


@pytest.mark.parametrize(
    "k, shape", [(3, (2, 8, 8, 5, 7)), (1, (3, 6, 6, 4, 6)), (3, (1, 5, 3, 2, 3))]
)
def test_kernel_grad_by_matmul_is_the_definition(k, shape):
    b, h, w, c, d = shape
    x, dy = random((b, h, w, c), 0), random((b, h, w, d), 1)
    got = jax.jit(conv.kernel_grad_by_matmul, static_argnums=2)(x, dy, k)
    assert got.shape == (k, k, c, d)
    assert rel_err(got, kernel_grad_float64(x, dy, k)) < RTOL


def test_kernel_grad_by_matmul_keeps_float64():
    x, dy = np.random.default_rng(4).standard_normal((2, 2, 6, 6, 3))
    with jax.enable_x64(True):
        got = conv.kernel_grad_by_matmul(jnp.asarray(x), jnp.asarray(dy), 3)
    assert got.dtype == jnp.float64
    assert rel_err(got, kernel_grad_float64(x, dy, 3)) < 1e-12  # float32 sums erred 2.0e-8 here


@pytest.mark.parametrize("k", [1, 3])
def test_same_conv_value_and_gradients_equal_lax(k):
    x, w = random((2, 8, 8, 6), 2), 0.3 * random((k, k, 6, 5), 3)

    def loss(conv_fn, x, w):
        return jnp.sum(jnp.sin(conv_fn(x, w)))

    assert rel_err(conv.same_conv(x, w), lax_same_conv(x, w)) < RTOL
    ours = jax.jit(jax.grad(lambda x, w: loss(conv.same_conv, x, w), (0, 1)))(x, w)
    ref = jax.grad(lambda x, w: loss(lax_same_conv, x, w), (0, 1))(x, w)
    for g, r in zip(ours, ref, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert rel_err(g, r) < RTOL


@pytest.mark.parametrize(
    "shape", [(2, 8, 8, 5, 7), (1, 5, 3, 2, 3), (1, 1, 1, 3, 2), (2, 6, 10, 4, 4), (1, 4, 4, 1, 1)]
)
def test_winograd_is_the_convolution_in_float64(shape):
    # float64 rounding through transforms with coefficients <= 8 over <= 36 * 9 * C terms is
    # below 1e-14 of the largest entry; a wrong transform coefficient errs by order 1.
    b, h, w, c, d = shape
    with jax.enable_x64(True):
        x = np.random.default_rng(0).standard_normal((b, h, w, c))
        k = np.random.default_rng(1).standard_normal((3, 3, c, d))
        got = conv.winograd_conv3x3(jnp.asarray(x), jnp.asarray(k))
        ref = lax_same_conv(x, k)
        assert got.dtype == jnp.float64 and got.shape == ref.shape
        assert rel_err(got, ref) < 1e-12
        # both gradients: winograd_grads, the transforms transposed by hand (odd sizes included)
        dy = np.random.default_rng(3).standard_normal(ref.shape)
        dx, dw = jax.vjp(conv.winograd_conv3x3, jnp.asarray(x), jnp.asarray(k))[1](dy)
        (dx_ref,) = jax.vjp(lambda x: lax_same_conv(x, k), x)[1](dy)
        assert dx.dtype == dw.dtype == jnp.float64
        assert rel_err(dx, dx_ref) < 1e-12
        assert rel_err(dw, kernel_grad_float64(x, dy, 3)) < 1e-12


def test_winograd_float32_rounding_against_a_direct_convolution():
    # 128 input channels, unit-variance input, a fan-in-scaled kernel. Measured rms error against
    # float64 here: direct 3.6e-7, Winograd 2.3e-6 (6.4x; 6-8x at the UNet's shapes). The bound
    # of 16x holds that with room; a lost digit fails it, and so would transforms in bfloat16
    # (1.3e5x, measured).
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 16, 16, 128)).astype(np.float32)
    k = (rng.standard_normal((3, 3, 128, 64)) / np.sqrt(9 * 128)).astype(np.float32)
    with jax.enable_x64(True):
        ref = np.asarray(lax_same_conv(x.astype(np.float64), k.astype(np.float64)))
    direct = lax_same_conv(x, k)
    wino = jax.jit(conv.winograd_conv3x3)(x, k)
    rms = lambda y, ref: np.sqrt(np.mean((np.asarray(y, np.float64) - ref) ** 2))  # noqa: E731
    assert wino.dtype == jnp.float32
    assert 0 < rms(wino, ref) < 16 * rms(direct, ref)
    # gradients, against the direct convolution's dx and the shifted matmuls' dW (measured:
    # 4.8x and 3.5x their rms errors)
    dy = rng.standard_normal(ref.shape).astype(np.float32)
    with jax.enable_x64(True):
        dy64, k64 = dy.astype(np.float64), k.astype(np.float64)
        (dx_ref,) = jax.vjp(lambda x: lax_same_conv(x, k64), x.astype(np.float64))[1](dy64)
    (dx_direct,) = jax.vjp(lambda x: lax_same_conv(x, k), x)[1](dy)
    dw_matmul = jax.jit(conv.kernel_grad_by_matmul, static_argnums=2)(x, dy, 3)
    dx, dw = jax.jit(conv._cpu_grads)(x, k, dy)
    assert dx.dtype == dw.dtype == jnp.float32
    dx_ref, dw_ref = np.asarray(dx_ref), kernel_grad_float64(x, dy, 3)
    assert 0 < rms(dx, dx_ref) < 16 * rms(dx_direct, dx_ref)
    assert 0 < rms(dw, dw_ref) < 16 * rms(dw_matmul, dw_ref)


def test_same_conv_is_winograd_on_cpu_for_float32_3x3_only():
    def hlo(x, w):
        return jax.jit(conv.same_conv).lower(x, w).compile().as_text()

    x, w = random((1, 8, 8, 4), 11), random((3, 3, 4, 4), 12)
    assert "convolution(" not in hlo(x, w)  # Winograd: slices, sums and one batched dot
    assert "convolution(" in hlo(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    with jax.default_matmul_precision("highest"):  # the switch back to a direct convolution
        assert "convolution(" in hlo(x, w)
        assert rel_err(jax.jit(conv.same_conv)(x, w), lax_same_conv(x, w)) < RTOL


def test_bfloat16_kernel_gradient_keeps_the_kernel_dtype():
    x, w = random((2, 4, 4, 3), 4), random((3, 3, 3, 2), 5)
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    dw = jax.grad(lambda w: jnp.sum(conv.same_conv(x16, w).astype(jnp.float32) ** 2))(w16)
    assert dw.dtype == jnp.bfloat16
    ref = jax.grad(lambda w: jnp.sum(conv.same_conv(x, w) ** 2))(w)
    assert rel_err(dw, ref) < 2e-2  # bfloat16 inputs: 8 mantissa bits, about 4e-3 per operand


CASES = [  # (kernel, strides, padding, the primitive it becomes)
    ((3, 3), (1, 1), ((1, 1), (1, 1)), "custom_vjp_call"),  # same_conv
    ((3, 3), (1, 1), "SAME", "custom_vjp_call"),
    ((1, 1), (1, 1), "SAME", "custom_vjp_call"),  # pointwise_conv: channel_matmul
    ((1, 1), (1, 1), ((0, 0), (0, 0)), "custom_vjp_call"),
    ((3, 3), (2, 2), ((0, 1), (0, 1)), "conv_general_dilated"),  # the DDPM downsample
    ((3, 3), (1, 1), ((0, 0), (0, 0)), "conv_general_dilated"),  # valid padding
    ((2, 2), (1, 1), "SAME", "conv_general_dilated"),  # even kernel
]


@pytest.mark.parametrize("kernel, strides, padding, routed", CASES)
def test_conv_general_dilated_is_a_drop_in(kernel, strides, padding, routed):
    x, w = random((2, 8, 8, 3), 6), random((*kernel, 3, 4), 7)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

    def ours(x, w):
        return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)

    def ref(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)

    eqns = jax.make_jaxpr(ours)(x, w).jaxpr.eqns
    names = {e.primitive.name for e in eqns}
    assert routed in names
    assert not names & {"custom_vjp_call", "dot_general", "conv_general_dilated"} - {routed}
    assert rel_err(ours(x, w), ref(x, w)) < RTOL
    loss = lambda f: lambda x, w: jnp.sum(f(x, w) ** 2)  # noqa: E731
    for g, r in zip(
        jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w), strict=True
    ):
        assert rel_err(g, r) < RTOL


@pytest.mark.parametrize("shape", [(6, 5), (2, 7, 5), (2, 3, 4, 5)])
def test_dense_dot_general_is_a_drop_in(shape):
    x, w = random(shape, 11), random((5, 3), 12)
    dense = (((x.ndim - 1,), (0,)), ((), ()))
    ours = lambda x, w: conv.dense_dot_general(x, w, dense)  # noqa: E731
    names = {e.primitive.name for e in jax.make_jaxpr(ours)(x, w).eqns}
    assert names == {"custom_jvp_call", "custom_vjp_call"}  # channel_matmul, marked
    ref = lambda x, w: lax.dot_general(x, w, dense)  # noqa: E731
    assert rel_err(ours(x, w), ref(x, w)) < RTOL
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    for g, r in zip(
        jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w), strict=True
    ):
        assert g.shape == r.shape and rel_err(g, r) < RTOL
    # anything but a dense layer's product is lax.dot_general's
    batched = (((2,), (1,)), ((0,), (0,)))
    a, b = random((2, 3, 4), 13), random((2, 4, 5), 14)
    eqns = jax.make_jaxpr(lambda a, b: conv.dense_dot_general(a, b, batched))(a, b).eqns
    assert [e.primitive.name for e in eqns] == ["dot_general"]


@pytest.mark.slow
def test_unet_gradient_equals_the_one_through_lax_convolutions():
    """The whole UNet's parameter gradient under kernels="fast_cpu" against "xla" (Flax's own
    layers, XLA's autodiff)."""
    model = tiny(kernels="fast_cpu")
    x = jax.random.uniform(jax.random.key(8), (2, 8, 8, 3), minval=-1.0, maxval=1.0)
    t = jnp.array([3, 700])
    params = random_params(model, x, t, seed=9)

    def grads(model):
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t) ** 2)))(params)

    ours, ref = grads(model), grads(tiny(kernels="xla"))
    # softmax(q . (k + b)) = softmax(q . k): the gradient of to_k's bias is zero but for rounding
    # (about 4e-8 here), so its error is taken relative to the largest entry of to_k's kernel's.
    errs = {}
    for path, r in jax.tree_util.tree_leaves_with_path(ref):
        o, name = _at(ours, path), jax.tree_util.keystr(path)
        scale = np.max(np.abs(_at(ref, path[:-1])["kernel"])) if "to_k']['bias" in name else None
        errs[name] = rel_err(o, r) if scale is None else np.max(np.abs(o - r)) / scale
    assert max(errs.values()) < RTOL, errs


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree
