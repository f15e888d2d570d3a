"""Convolutions and dense layers for model.kernels='fast_cpu': drop-ins for
`lax.conv_general_dilated` and `lax.dot_general` with faster float32 CPU kernels.

On CPU the forward pass and both gradients of a float32 stride-1 same 3x3 convolution are
Winograd's F(4x4, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks",
eq. 8 with their F(4x4, 3x3) matrices): per 6x6 input tile d and kernel g, the 4x4 output tile is
A^T [(G g G^T) * (B^T d B)] A, so each tile costs 36 channel products instead of 144. The input
and output transforms are sums of shifted, strided slices that XLA fuses into a few passes over
memory, and the 36 products are one batched matmul. Both gradients run the same algorithm
backwards (`winograd_grads`): one transposed output transform of dy, dx's products with the
forward's kernel transform and dW's contracting over the tiles (`_tile_grads`), then the input
and kernel transforms transposed by hand (`_overlap_add` writes each element once, where
autodiff's transpose of the strided slices pads each slice to the image's size). The float32
rounding error is larger than a direct convolution's (the transforms' coefficients reach 8 and
1/24; tests/test_conv.py states the bound).

bfloat16, every other backend, and any trace under `jax.default_matmul_precision("highest")`
(or JAX_DEFAULT_MATMUL_PRECISION=highest) keep XLA's direct convolution; on CPU its kernel
gradient is k * k matrix products contracting over B*H*W (`kernel_grad_by_matmul`), which
XLA:CPU runs faster than the convolution with an image-sized window it lowers that gradient to.
A 1x1 stride-1 convolution and a dense layer are the matrix product over channels they are
(`channel_matmul`), with gradients as row-major matmuls.

Every kernel here has a custom VJP: reverse-mode autodiff only (forward_mode.py says why and
what forward mode raises). Measurements behind each choice: experiments/PERFORMANCE.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_jax.models.fast_cpu.forward_mode import reverse_mode_only

NHWC = ("NHWC", "HWIO", "NHWC")


def _same_conv(x, w):
    p = w.shape[0] // 2
    return lax.conv_general_dilated(x, w, (1, 1), ((p, p), (p, p)), dimension_numbers=NHWC)


# Winograd F(4x4, 3x3) with interpolation points 0, 1, -1, 2, -2, infinity (Lavin & Gray 2016).
WINOGRAD_BT = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ]
)
WINOGRAD_G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ]
)
WINOGRAD_AT = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
)

# G g G^T for a 3x3 kernel g, as one (36, 9) matrix on the flattened kernel.
WINOGRAD_GG = np.kron(WINOGRAD_G, WINOGRAD_G)


def _lincomb(coefs, terms):
    """sum_k coefs[k] * terms[k], skipping zero coefficients (the transforms are sparse)."""
    out = None
    for c, t in zip(coefs, terms, strict=True):
        if c != 0:
            v = t if c == 1 else -t if c == -1 else t * t.dtype.type(c)
            out = v if out is None else out + v
    return out


def _batched_matmul(a, b):
    """(N, I, J) @ (N, J, K) -> (N, I, K)."""
    return lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))))


def _with_grads(forward, cpu_grads, default_grads=None):
    """forward(x, w), with the VJP cpu_grads(x, w, dy) on CPU and default_grads(x, w, dy) on other
    backends (cpu_grads on every backend if default_grads is None); reverse mode only."""

    def grads(res, dy):
        if default_grads is None:
            return cpu_grads(*res, dy)
        return lax.platform_dependent(*res, dy, cpu=cpu_grads, default=default_grads)

    f = jax.custom_vjp(forward)
    f.defvjp(lambda x, w: (forward(x, w), (x, w)), grads)
    return reverse_mode_only(f)


def _tile_grads(v, u, dm):
    """(dv, du) of m = v @ u: dv = dm u^T, and du = v^T dm with v transposed explicitly: XLA:CPU
    gives YNNPACK only dots whose left operand contracts its last axis, and autodiff's du
    contracts v's tiles axis (the barrier keeps XLA from folding the transpose back into the
    dot)."""
    dv = lax.dot_general(dm, u, (((2,), (2,)), ((0,), (0,))))
    vt = lax.optimization_barrier(jnp.swapaxes(v, 1, 2))
    return dv, _batched_matmul(vt, dm)


def _tiles(h: int, w: int) -> tuple[int, int]:
    """4x4 output tiles per column and row; the image is zero-padded to a multiple of 4."""
    return -(-h // 4), -(-w // 4)


def input_transform(x):
    """B^T d B for every 6x6 tile d of x (NHWC, zero-padded by 1; tiles overlap by 2: stride 4):
    (36, B * tiles, C). Rows, then columns, each as sums of strided slices."""
    b, h, wd, c = x.shape
    th, tw = _tiles(h, wd)
    xp = jnp.pad(x, ((0, 0), (1, 4 * th - h + 1), (1, 4 * tw - wd + 1), (0, 0)))
    rows = [xp[:, k : k + 4 * th : 4] for k in range(6)]
    r = jnp.stack([_lincomb(WINOGRAD_BT[a], rows) for a in range(6)])
    cols = [r[:, :, :, k : k + 4 * tw : 4] for k in range(6)]
    v = jnp.stack([_lincomb(WINOGRAD_BT[a], cols) for a in range(6)], axis=1)
    return v.reshape(36, b * th * tw, c)


def _overlap_add(parts, axis: int, n: int):
    """The transpose of taking parts[k] = z[4t + k] (k = 0..5) from z along `axis`: z (length
    n <= 4T + 2) with z[4t + j] = parts[j][t] + parts[j + 4][t - 1] (the second for j < 2 only:
    tiles overlap by 2). One pass that writes each element once; autodiff's transpose of the
    strided slices pads each part to z's full size and sums the six."""

    def pad_tile_axis(a, before: int):
        pads = [(0, 0)] * a.ndim
        pads[axis] = (before, 1 - before)
        return jnp.pad(a, pads)

    phases = [
        pad_tile_axis(parts[j], 0) + pad_tile_axis(parts[j + 4], 1)
        if j < 2
        else pad_tile_axis(parts[j], 0)
        for j in range(4)
    ]
    z = jnp.stack(phases, axis + 1)  # (..., T + 1, 4, ...)
    z = z.reshape(z.shape[:axis] + (4 * z.shape[axis],) + z.shape[axis + 2 :])
    return lax.slice_in_dim(z, 0, n, axis=axis)


def input_transform_transpose(dv, x_shape):
    """dx from dv (36, B * tiles, C): input_transform transposed, columns then rows."""
    b, h, wd, c = x_shape
    th, tw = _tiles(h, wd)
    dv = dv.reshape(6, 6, b, th, tw, c)
    dcols = [_lincomb(WINOGRAD_BT[:, k], [dv[:, a] for a in range(6)]) for k in range(6)]
    # the barrier keeps XLA from fusing the two passes and recomputing the first in the second
    dr = lax.optimization_barrier(_overlap_add(dcols, 3, 4 * tw + 2))  # (6, b, th, 4tw+2, c)
    drows = [_lincomb(WINOGRAD_BT[:, k], [dr[a] for a in range(6)]) for k in range(6)]
    return _overlap_add(drows, 1, 4 * th + 2)[:, 1 : 1 + h, 1 : 1 + wd]


def kernel_transform(w):
    """G g G^T for every (input, output) channel pair: one (36, 9) @ (9, C * D) product."""
    c, d = w.shape[2:]
    return jnp.matmul(WINOGRAD_GG.astype(w.dtype), w.reshape(9, c * d)).reshape(36, c, d)


def output_transform(m, b: int, h: int, wd: int):
    """A^T m A per tile, from m (36, B * tiles, D) to the (B, H, W, D) image, written straight
    into the (B, th, 4, tw, 4, D) layout."""
    d = m.shape[-1]
    th, tw = _tiles(h, wd)
    m = m.reshape(6, 6, b, th, tw, d)
    s = jnp.stack([_lincomb(WINOGRAD_AT[j], [m[:, q] for q in range(6)]) for j in range(4)], -2)
    y = jnp.stack([_lincomb(WINOGRAD_AT[i], [s[a] for a in range(6)]) for i in range(4)], 2)
    return y.reshape(b, 4 * th, 4 * tw, d)[:, :h, :wd]


def output_transform_transpose(dy):
    """dm (36, B * tiles, D) from dy (B, H, W, D): output_transform transposed, columns, then
    rows."""
    b, h, wd, d = dy.shape
    th, tw = _tiles(h, wd)
    dy = jnp.pad(dy, ((0, 0), (0, 4 * th - h), (0, 4 * tw - wd), (0, 0)))
    dy = dy.reshape(b, th, 4, tw, 4, d)
    e = [_lincomb(WINOGRAD_AT[:, q], [dy[:, :, :, :, j] for j in range(4)]) for q in range(6)]
    e = lax.optimization_barrier(jnp.stack(e))  # (6, b, th, 4, tw, d); barrier as above
    dm = jnp.stack(
        [_lincomb(WINOGRAD_AT[:, a], [e[:, :, :, i] for i in range(4)]) for a in range(6)]
    )
    return dm.reshape(36, b * th * tw, d)


def winograd_grads(x, w, dy):
    """(dx, dW) of winograd_conv3x3: the transforms transposed by hand, the products as
    _tile_grads, dW = (G kron G)^T du."""
    c, d = w.shape[2:]
    dv, du = _tile_grads(input_transform(x), kernel_transform(w), output_transform_transpose(dy))
    dw = jnp.matmul(WINOGRAD_GG.T.astype(w.dtype), du.reshape(36, c * d)).reshape(3, 3, c, d)
    return input_transform_transpose(dv, x.shape), dw


def _winograd_forward(x, w):
    m = _batched_matmul(input_transform(x), kernel_transform(w))
    return output_transform(m, *x.shape[:3])


# Stride-1 same 3x3 convolution, NHWC/HWIO, by Winograd F(4x4, 3x3) over 4x4 output tiles.
winograd_conv3x3 = _with_grads(_winograd_forward, winograd_grads)


def kernel_grad_by_matmul(x, dy, k: int):
    """dW (k, k, C, D) of a stride-1 same conv from its input x and output cotangent dy, NHWC."""
    b, h, w, c = x.shape
    d = dy.shape[-1]
    p = k // 2
    # x transposed once: XLA:CPU runs (C, BHW) @ (BHW, D) faster than a product contracting
    # both operands on their first axis.
    xt = x.reshape(b * h * w, c).T
    dyp = jnp.pad(dy, ((0, 0), (p, p), (p, p), (0, 0)))
    shifted = [
        dyp[:, 2 * p - i : 2 * p - i + h, 2 * p - j : 2 * p - j + w].reshape(b * h * w, d)
        for i in range(k)
        for j in range(k)
    ]
    # Without the barrier XLA folds the reshapes back into an image-sized convolution.
    xt, *shifted = lax.optimization_barrier((xt, *shifted))
    acc = jnp.promote_types(dy.dtype, jnp.float32)  # bfloat16 products summed in float32
    dw = [jnp.matmul(xt, s, preferred_element_type=acc) for s in shifted]
    return jnp.stack(dw).reshape(k, k, c, d)


def _winograd_applies(x, w) -> bool:
    """A float32 3x3 kernel, unless the highest precision is asked for
    (`jax.default_matmul_precision("highest")`, or JAX_DEFAULT_MATMUL_PRECISION=highest)."""
    exact = jax.config.jax_default_matmul_precision in ("highest", "float32")
    return not exact and w.shape[:2] == (3, 3) and x.dtype == w.dtype == jnp.float32


def _fast_same_conv(x, w):
    """_same_conv, by Winograd on CPU where it applies."""
    if not _winograd_applies(x, w):
        return _same_conv(x, w)
    return lax.platform_dependent(x, w, cpu=winograd_conv3x3, default=_same_conv)


def _direct_grads(x, w, dy):
    """(dx, dW) of XLA's direct convolution: autodiff, dx a convolution with the flipped kernel."""
    return jax.vjp(_same_conv, x, w)[1](dy)


def _cpu_grads(x, w, dy):
    """(dx, dW) on CPU: winograd_grads where Winograd applies, else dW as k * k matmuls."""
    if _winograd_applies(x, w):
        return winograd_grads(x, w, dy)
    (dx,) = jax.vjp(lambda x: _same_conv(x, w), x)[1](dy)
    return dx, kernel_grad_by_matmul(x, dy, w.shape[0]).astype(w.dtype)


# Stride-1 NHWC/HWIO convolution with an odd k x k kernel padded by k // 2 on every side.
same_conv = _with_grads(_fast_same_conv, _cpu_grads, _direct_grads)


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


def _channel_product(x, w):
    """x (..., C) @ w (C, D): a 1x1 convolution or a dense layer."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _autodiff_channel_grads(x, w, dy):
    return jax.vjp(_channel_product, x, w)[1](dy)


def _cpu_channel_grads(x, w, dy):
    """dx = dy w^T and dW = x^T dy as row-major matmuls: XLA:CPU gives YNNPACK only dots whose
    left operand contracts its last axis and whose right one contracts its first, and autodiff's
    contract x's rows and w's columns; so x and w are transposed first (the barrier keeps XLA
    from folding the transposes back)."""
    c, d = w.shape
    x2, dy2 = x.reshape(-1, c), dy.reshape(-1, d)
    xt, wt = lax.optimization_barrier((x2.T, w.T))
    return (dy2 @ wt).reshape(x.shape), xt @ dy2


channel_matmul = _with_grads(_channel_product, _cpu_channel_grads, _autodiff_channel_grads)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
    """Drop-in for lax.dot_general (flax nn.Dense's `dot_general` field): channel_matmul for
    a dense layer's product, lax.dot_general for anything else."""
    dense = (((lhs.ndim - 1,), (0,)), ((), ()))
    if rhs.ndim == 2 and precision is None and not kwargs and dimension_numbers == dense:
        return channel_matmul(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


def pointwise_conv(x, w):
    """A 1x1 stride-1 NHWC/HWIO convolution as the matrix product it is, x @ w[0, 0]."""
    return channel_matmul(x, w[0, 0])


def conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs):
    """Drop-in for lax.conv_general_dilated (flax nn.Conv's `conv_general_dilated` field)."""
    if _is_same_conv(rhs, window_strides, padding, **kwargs):
        return pointwise_conv(lhs, rhs) if rhs.shape[0] == 1 else same_conv(lhs, rhs)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
