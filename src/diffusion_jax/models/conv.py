"""Convolution for the UNet's layers: `lax.conv_general_dilated`, with a faster kernel gradient
on CPU.

For a stride-1 "same" convolution with a k x k kernel (k odd: the UNet's 3x3 and 1x1 convs),
the kernel gradient is dW[i, j] = sum over (b, h, w) of x[b, h, w]^T dy[b, h - i + p, w - j + p]
(p = k // 2, dy zero outside the image): k * k matrix products contracting over B*H*W. XLA:CPU
lowers the same gradient as a convolution whose window is the whole image: 4 GFLOP/s against 44
as matmuls for a 3x3 kernel at batch 32 on 32x32x128, worse for 1x1 (README "Performance"). On other
backends, and for every other convolution, XLA's own gradient is used unchanged; the forward
pass and the input gradient are XLA's convolutions everywhere.

A 1x1 stride-1 convolution is a matrix product over channels, and becomes one (`pointwise_conv`,
forward and both gradients by autodiff of dot_general): XLA:CPU ran it as a convolution at 33
GFLOP/s against 166 as a matmul at batch 32 on 32x32x128 (AVX-512 EPYC, scratch microbenchmark).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")


def _same_conv(x, w):
    p = w.shape[0] // 2
    return lax.conv_general_dilated(x, w, (1, 1), ((p, p), (p, p)), dimension_numbers=NHWC)


def kernel_grad_by_matmul(x, dy, k: int):
    """dW (k, k, C, D) of a stride-1 same conv from its input x and output cotangent dy, NHWC."""
    b, h, w, c = x.shape
    d = dy.shape[-1]
    p = k // 2
    # x transposed once: (C, BHW) @ (BHW, D) ran 1.3-1.9x faster than contracting both operands
    # on their first axis (scratch microbenchmark); the train step gained 1.03-1.05x.
    xt = x.reshape(b * h * w, c).T
    dyp = jnp.pad(dy, ((0, 0), (p, p), (p, p), (0, 0)))
    shifted = [
        dyp[:, 2 * p - i : 2 * p - i + h, 2 * p - j : 2 * p - j + w].reshape(b * h * w, d)
        for i in range(k)
        for j in range(k)
    ]
    # Without the barrier XLA folds the reshapes back into an image-sized convolution.
    xt, *shifted = lax.optimization_barrier((xt, *shifted))
    dw = [jnp.matmul(xt, s, preferred_element_type=jnp.float32) for s in shifted]
    return jnp.stack(dw).reshape(k, k, c, d)


def _xla_kernel_grad(x, dy, k: int):
    w_shape = jax.ShapeDtypeStruct((k, k, x.shape[-1], dy.shape[-1]), x.dtype)
    (dw,) = jax.linear_transpose(lambda w: _same_conv(x, w), w_shape)(dy)
    return dw


@jax.custom_vjp
def same_conv(x, w):
    """Stride-1 NHWC/HWIO convolution with an odd k x k kernel padded by k // 2 on every side."""
    return _same_conv(x, w)


def _same_conv_fwd(x, w):
    return _same_conv(x, w), (x, w)


def _same_conv_bwd(residuals, dy):
    x, w = residuals
    k = w.shape[0]
    (dx,) = jax.linear_transpose(lambda x: _same_conv(x, w), x)(dy)
    dw = lax.platform_dependent(
        x,
        dy,
        cpu=lambda x, dy: kernel_grad_by_matmul(x, dy, k).astype(w.dtype),
        default=lambda x, dy: _xla_kernel_grad(x, dy, k).astype(w.dtype),
    )
    return dx, dw


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def _is_same_conv(
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **other,
) -> bool:
    k = rhs.shape[0]
    if rhs.ndim != 4 or rhs.shape[1] != k or k % 2 == 0 or feature_group_count != 1:
        return False
    if precision is not None or any(v not in (None, 1) for v in other.values()):
        return False  # batch groups, a preferred output type: leave them to XLA
    if isinstance(padding, str):
        padding = [(k // 2, k // 2)] * 2 if padding.upper() == "SAME" else None
    pads = [tuple(p) for p in padding] if padding is not None else None
    ones = (1, 1)
    specs = tuple(getattr(dimension_numbers, f, None) for f in ("lhs_spec", "rhs_spec", "out_spec"))
    return (
        pads == [(k // 2, k // 2)] * 2
        and tuple(window_strides) == ones
        and tuple(lhs_dilation or ones) == ones
        and tuple(rhs_dilation or ones) == ones
        and specs == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # NHWC, HWIO, NHWC
    )


def pointwise_conv(x, w):
    """A 1x1 stride-1 NHWC/HWIO convolution as the matrix product it is, x @ w[0, 0]."""
    return lax.dot_general(x, w[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


def conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs):
    """Drop-in for lax.conv_general_dilated (flax nn.Conv's `conv_general_dilated` field)."""
    if _is_same_conv(rhs, window_strides, padding, **kwargs):
        return pointwise_conv(lhs, rhs) if rhs.shape[0] == 1 else same_conv(lhs, rhs)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
