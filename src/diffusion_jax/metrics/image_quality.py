"""Full-reference image quality: PSNR and SSIM per image, in float64 NumPy on the host.

Both take two batches of the same shape (N, H, W, C): uint8 in [0, 255] (data range 255) or
float in [-1, 1] (data range 2, the model's range); another range can be passed explicitly.

PSNR = 10 log10(R^2 / MSE), the MSE over all pixels and channels of one image (inf for equal
images).

SSIM (Wang, Bovik, Sheikh & Simoncelli 2004, eq. 13) with their Gaussian window: local means,
variances and covariance under an 11x11 Gaussian of sigma 1.5 (scipy's reflect boundary,
truncated at 3.5 sigma), population (not sample) covariances, C1 = (0.01 R)^2,
C2 = (0.03 R)^2; the SSIM map's mean over the pixels at least 5 from the border (where the
window lies inside the image), per channel, then the channels' mean. That is
skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=R, channel_axis=-1).
"""

from __future__ import annotations

import numpy as np

from diffusion_jax.degradations import blur_matrix

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # radius int(3.5 * 1.5 + 0.5) = 5: the 11x11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _pair(x, y, data_range):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"expected two batches (N, H, W, C) of one shape, got {x.shape} and {y.shape}"
        )
    if x.dtype != y.dtype:
        raise ValueError(f"the two batches have different dtypes, {x.dtype} and {y.dtype}")
    if data_range is None:
        if x.dtype == np.uint8:
            data_range = 255.0
        elif np.issubdtype(x.dtype, np.floating):
            data_range = 2.0
        else:
            raise ValueError(f"expected uint8 or float images, got {x.dtype}")
    return x.astype(np.float64), y.astype(np.float64), float(data_range)


def psnr(x, y, data_range=None) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of each image pair: (N,) float64."""
    x, y, r = _pair(x, y, data_range)
    mse = np.mean((x - y) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(r * r / mse)


def _window_mean(x: np.ndarray) -> np.ndarray:
    """Gaussian-weighted local mean over H and W (the 11x11 window, reflect boundary)."""
    _, h, w, _ = x.shape
    mh, mw = blur_matrix(h, SSIM_SIGMA, SSIM_TRUNCATE), blur_matrix(w, SSIM_SIGMA, SSIM_TRUNCATE)
    return np.einsum("ij,bjwc,kw->bikc", mh, x, mw)


def ssim_map(x, y, data_range=None) -> np.ndarray:
    """The SSIM index at every pixel and channel, eq. 13 of Wang et al.: (N, H, W, C) float64."""
    x, y, r = _pair(x, y, data_range)
    c1, c2 = (SSIM_K1 * r) ** 2, (SSIM_K2 * r) ** 2
    mu_x, mu_y = _window_mean(x), _window_mean(y)
    var_x = _window_mean(x * x) - mu_x**2
    var_y = _window_mean(y * y) - mu_y**2
    cov = _window_mean(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )


def ssim(x, y, data_range=None) -> np.ndarray:
    """Mean SSIM of each image pair, the border of 5 pixels left out: (N,) float64.

    Images must be at least 11x11 (the window)."""
    pad = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    shape = np.shape(x)
    if len(shape) == 4 and min(shape[1:3]) < 2 * pad + 1:
        raise ValueError(f"SSIM needs images of at least 11x11 (its window), got {shape[1:3]}")
    s = ssim_map(x, y, data_range)[:, pad:-pad, pad:-pad, :]
    return s.mean(axis=(1, 2)).mean(axis=-1)
