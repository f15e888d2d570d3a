"""Degradations against independent computations: PIL's reduce and BICUBIC resize, scipy's
gaussian_filter, a direct bicubic (Keys a = -0.5) written here, and Monte-Carlo for the noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from diffusion_jax import degradations as deg
from diffusion_jax.data import scaling


def _uint8_batch(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_box_downsample_uint8_is_pil_reduce_and_float_is_the_mean():
    x = _uint8_batch((3, 8, 12, 3))
    for factor in (2, 4):
        got = np.asarray(jax.jit(deg.box_downsample, static_argnums=1)(x, factor))
        want = np.stack([np.asarray(Image.fromarray(im).reduce(factor)) for im in x])
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
    xf = scaling.to_model_range(x)
    mean = np.asarray(deg.box_downsample(xf, 2))
    want = xf.astype(np.float64).reshape(3, 4, 2, 6, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(mean, want, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple"):
        deg.box_downsample(x, 5)


def _keys(s, a=-0.5):
    s = np.abs(s)
    return np.where(
        s <= 1,
        (a + 2) * s**3 - (a + 3) * s**2 + 1,
        np.where(s < 2, a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a, 0.0),
    )


def _bicubic_matrix(n, factor):
    """Direct bicubic weights: half-pixel centres, taps outside dropped and renormalised."""
    out = np.zeros((n * factor, n))
    for i in range(n * factor):
        src = (i + 0.5) / factor - 0.5
        w = _keys(src - np.arange(n))
        out[i] = w / w.sum()
    return out


def test_bicubic_upsample_matches_pil_and_a_direct_keys_kernel():
    x = scaling.to_model_range(_uint8_batch((2, 7, 7, 3), seed=1))
    for factor in (2, 3):
        got = np.asarray(jax.jit(deg.bicubic_upsample, static_argnums=1)(x, factor))
        assert got.shape == (2, 7 * factor, 7 * factor, 3)
        m = _bicubic_matrix(7, factor)
        direct = np.einsum("ij,bjwc,kw->bikc", m, x.astype(np.float64), m)
        np.testing.assert_allclose(got, direct, atol=2e-6)
        for b in range(2):
            for c in range(3):
                pil = Image.fromarray(x[b, ..., c], mode="F").resize(
                    (7 * factor, 7 * factor), Image.Resampling.BICUBIC
                )
                np.testing.assert_allclose(got[b, ..., c], np.asarray(pil), atol=2e-6)
    # uint8 in, uint8 out: the float result rounded and clipped.
    u = _uint8_batch((1, 4, 4, 1), seed=2)
    up = np.asarray(deg.bicubic_upsample(u, 2))
    ref = np.asarray(deg.bicubic_upsample(u.astype(np.float32), 2))
    assert up.dtype == np.uint8
    np.testing.assert_array_equal(up, np.round(np.clip(ref, 0, 255)).astype(np.uint8))


@pytest.mark.parametrize(
    "sigma, shape",
    [(0.5, (2, 16, 16, 3)), (1.0, (1, 9, 13, 2)), (2.3, (1, 32, 32, 3)), (3.0, (2, 5, 7, 1))],
)
def test_gaussian_blur_is_scipy_gaussian_filter(sigma, shape):
    # (3.0, 5x7): radius 12 > the image, so scipy's reflect wraps around more than once.
    x = np.random.default_rng(3).uniform(-1, 1, shape).astype(np.float32)
    got = np.asarray(jax.jit(deg.gaussian_blur, static_argnums=1)(x, sigma))
    want = np.stack(
        [
            np.stack(
                [
                    scipy.ndimage.gaussian_filter(
                        x[b, ..., c].astype(np.float64), sigma, mode="reflect", truncate=4.0
                    )
                    for c in range(shape[-1])
                ],
                axis=-1,
            )
            for b in range(shape[0])
        ]
    )
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_gaussian_blur_uint8_and_identity():
    u = _uint8_batch((1, 8, 8, 3), seed=4)
    blurred = np.asarray(deg.gaussian_blur(u, 1.5))
    want = scipy.ndimage.gaussian_filter(u.astype(np.float64), (0, 1.5, 1.5, 0), mode="reflect")
    assert blurred.dtype == np.uint8
    assert np.abs(blurred.astype(int) - np.round(want)).max() == 0
    np.testing.assert_array_equal(np.asarray(deg.gaussian_blur(u, 0.0)), u)


def test_add_noise_moments():
    # n = 40,000 draws of std 0.1: the sample mean's std is 0.1 / sqrt(n) = 5e-4 and the sample
    # std's is 0.1 / sqrt(2n) = 3.5e-4; the bounds are 6 of those.
    x = jnp.zeros((10, 20, 20, 10))
    y = np.asarray(deg.add_noise(x, 0.1, jax.random.key(0)))
    assert abs(y.mean()) < 3e-3 and abs(y.std() - 0.1) < 2.1e-3


def test_quantize_is_a_uint8_round_trip():
    x = np.random.default_rng(5).uniform(-1.2, 1.2, (2, 4, 4, 3)).astype(np.float32)
    want = scaling.to_model_range(scaling.to_uint8(x))
    np.testing.assert_allclose(np.asarray(deg.quantize(x)), want, atol=1e-7)


def test_sr_entry_uses_uint8_box_and_bicubic_and_accepts_either_range():
    clean = _uint8_batch((2, 8, 8, 3), seed=6)
    cfg = {"sr_factor": 2}
    sr = deg.DEGRADATIONS["sr"]
    # As the train step calls it: the config closed over (static), the batch and key traced.
    obs = np.asarray(jax.jit(lambda c, k: sr.observe(c, cfg, k))(clean, jax.random.key(0)))
    lr = np.stack([np.asarray(Image.fromarray(im).reduce(2)) for im in clean])
    np.testing.assert_allclose(obs, scaling.to_model_range(lr), atol=1e-7)
    assert sr.observed_size(8, cfg) == 4
    cond = np.asarray(sr(clean, cfg, jax.random.key(0)))
    cond_f = np.asarray(sr(scaling.to_model_range(clean), cfg, jax.random.key(0)))
    np.testing.assert_array_equal(cond, cond_f)
    np.testing.assert_allclose(cond, deg.bicubic_upsample(scaling.to_model_range(lr), 2), atol=1e-6)
    assert cond.shape == clean.shape and cond.dtype == np.float32


def test_blur_entry_is_quantized_scipy_blur_and_noise_changes_it():
    clean = _uint8_batch((2, 8, 8, 3), seed=7)
    cfg = {"blur_sigma": 1.0}
    blur = deg.DEGRADATIONS["blur"]
    cond = np.asarray(jax.jit(lambda c, k: blur(c, cfg, k))(clean, jax.random.key(0)))
    want = scipy.ndimage.gaussian_filter(
        scaling.to_model_range(clean).astype(np.float64), (0, 1, 1, 0), mode="reflect"
    )
    np.testing.assert_allclose(cond, scaling.to_model_range(scaling.to_uint8(want)), atol=1e-6)
    noisy = np.asarray(blur(clean, {"blur_sigma": 1.0, "noise_std": 0.05}, jax.random.key(1)))
    assert 0.03 < np.std(noisy - cond) < 0.07


def test_observe_uint8_is_the_file_sampling_reads():
    clean = _uint8_batch((2, 8, 8, 3), seed=8)
    lr = deg.observe_uint8("sr", clean, {"sr_factor": 2}, jax.random.key(0))
    want = np.stack([np.asarray(Image.fromarray(im).reduce(2)) for im in clean])
    assert lr.dtype == np.uint8
    np.testing.assert_array_equal(lr, want)
    # Reading that file back and conditioning on it gives what training conditions on.
    sr = deg.DEGRADATIONS["sr"]
    np.testing.assert_array_equal(
        sr.condition(lr, {"sr_factor": 2}), sr(clean, {"sr_factor": 2}, jax.random.key(0))
    )
    blurred = deg.observe_uint8("blur", clean, {"blur_sigma": 0.8}, jax.random.key(0))
    want = scipy.ndimage.gaussian_filter(
        scaling.to_model_range(clean).astype(np.float64), (0, 0.8, 0.8, 0), mode="reflect"
    )
    np.testing.assert_array_equal(blurred, scaling.to_uint8(want))


def test_check_config_errors():
    deg.check_config("sr", {"sr_factor": 2}, 32)
    with pytest.raises(ValueError, match="sr_factor=3 does not divide"):
        deg.check_config("sr", {"sr_factor": 3}, 32)
    with pytest.raises(ValueError, match="blur_sigma must be a number > 0"):
        deg.check_config("blur", {}, 32)
    with pytest.raises(ValueError, match="noise_std"):
        deg.check_config("blur", {"blur_sigma": 1.0, "noise_std": -1.0}, 32)
    with pytest.raises(ValueError, match="degradation must be one of"):
        deg.check_config("jpeg", {}, 32)
