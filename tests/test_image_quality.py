"""PSNR and SSIM against scikit-image (the published implementation) and closed forms."""

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffusion_jax.data import scaling
from diffusion_jax.metrics import image_quality as iq

SKIMAGE_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1)


def _pairs(shape, seed=0, spread=40):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-spread, spread + 1, shape), 0, 255)
    return x, y.astype(np.uint8)


@pytest.mark.parametrize("shape", [(3, 32, 32, 3), (2, 11, 17, 1), (1, 16, 16, 3)])
def test_uint8_matches_skimage(shape):
    x, y = _pairs(shape)
    want_ssim = [
        structural_similarity(a, b, data_range=255, **SKIMAGE_SSIM)
        for a, b in zip(x, y, strict=True)
    ]
    want_psnr = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(x, y, strict=True)]
    np.testing.assert_allclose(iq.ssim(x, y), want_ssim, rtol=0, atol=1e-12)
    np.testing.assert_allclose(iq.psnr(x, y), want_psnr, rtol=1e-12)


def test_float_range_is_data_range_2_and_matches_skimage():
    x, y = _pairs((2, 32, 32, 3), seed=1)
    xf, yf = scaling.to_model_range(x), scaling.to_model_range(y)
    want = [
        structural_similarity(a, b, data_range=2, **SKIMAGE_SSIM)
        for a, b in zip(xf, yf, strict=True)
    ]
    np.testing.assert_allclose(iq.ssim(xf, yf), want, rtol=0, atol=1e-6)
    # PSNR is invariant to the affine map between the ranges when the data range follows it.
    np.testing.assert_allclose(iq.psnr(xf, yf), iq.psnr(x, y), rtol=1e-5)


def test_closed_forms():
    # Constant images a, b: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 100.0, 140.0
    x = np.full((1, 16, 16, 3), a, np.uint8)
    y = np.full((1, 16, 16, 3), b, np.uint8)
    c1 = (0.01 * 255) ** 2
    np.testing.assert_allclose(iq.ssim(x, y), (2 * a * b + c1) / (a * a + b * b + c1), rtol=1e-12)
    # A constant offset d (no clipping): MSE = d^2, PSNR = 20 log10(255 / d).
    z, _ = _pairs((2, 12, 12, 3), seed=2)
    z = np.clip(z, 0, 240)
    np.testing.assert_allclose(iq.psnr(z, z + 15), 20 * np.log10(255 / 15), rtol=1e-12)
    assert np.all(iq.psnr(z, z) == np.inf)
    np.testing.assert_allclose(iq.ssim(z, z), 1.0, rtol=1e-12)


def test_errors():
    x, y = _pairs((2, 16, 16, 3))
    with pytest.raises(ValueError, match="of one shape"):
        iq.psnr(x, y[:1])
    with pytest.raises(ValueError, match="different dtypes"):
        iq.ssim(x, y.astype(np.float32))
    with pytest.raises(ValueError, match="at least 11x11"):
        iq.ssim(x[:, :8, :8], y[:, :8, :8])
