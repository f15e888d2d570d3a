"""Gaussian maths against independent computations."""

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import gaussian


@pytest.mark.parametrize(
    "m1, v1, m2, v2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0), (1.0, 0.1, 0.0, 0.2)]
)
def test_normal_kl_matches_monte_carlo(m1, v1, m2, v2):
    n = 2_000_000
    x = m1 + np.sqrt(v1) * np.random.default_rng(0).standard_normal(n)
    log_ratio = stats.norm.logpdf(x, m1, np.sqrt(v1)) - stats.norm.logpdf(x, m2, np.sqrt(v2))
    mc, se = log_ratio.mean(), log_ratio.std() / np.sqrt(n)
    kl = float(gaussian.normal_kl(m1, np.log(v1), m2, np.log(v2)))
    # 5 standard errors of the Monte-Carlo mean (plus float32 rounding of the closed form).
    assert abs(kl - mc) <= 5 * se + 1e-6


@pytest.mark.parametrize(
    "mean, log_scale", [(0.0, -1.0), (0.5, -3.0), (-0.99, -2.0), (0.2, 0.5), (1.3, -4.0)]
)
def test_discretized_likelihood_sums_to_one_over_256_bins(mean, log_scale):
    bins = jnp.linspace(-1.0, 1.0, 256)
    logp = gaussian.discretized_gaussian_log_likelihood(
        bins, means=jnp.full(256, mean), log_scales=jnp.full(256, log_scale)
    )
    # The bins telescope exactly; float32 CDF values lose about 1e-6 each.
    assert float(jnp.sum(jnp.exp(logp))) == pytest.approx(1.0, abs=1e-4)


def test_discretized_likelihood_is_close_to_the_exact_bin_mass():
    mean, scale = 0.1, 0.2
    bins = np.linspace(-1.0, 1.0, 256)
    exact = stats.norm.cdf(bins + 1 / 255, mean, scale) - stats.norm.cdf(
        bins - 1 / 255, mean, scale
    )
    logp = gaussian.discretized_gaussian_log_likelihood(
        jnp.asarray(bins, jnp.float32),
        means=jnp.full(256, mean),
        log_scales=jnp.full(256, np.log(scale)),
    )
    # Within 2 standard deviations the tanh CDF approximation (the original code's) changes a
    # bin's mass by < 0.75% (computed with float64 for this mean and scale); allow 1% for float32.
    inner = np.abs(bins - mean) < 2 * scale
    np.testing.assert_allclose(np.exp(np.asarray(logp))[inner], exact[inner], rtol=0.01)


def _tanh_bin_log_mass(x, mean, log_scale):
    """log of the original code's bin mass (tanh CDF differences, no floor) at 60 digits.

    0.5 (1 + tanh u) is written 1 / (1 + exp(-2u)) and the difference is taken on the tail's
    side (survival functions right of the mean) so high precision, not algebra, avoids the
    cancellation.
    """
    with mpmath.workdps(60):
        x, mean, log_scale = (mpmath.mpf(float(v)) for v in (x, mean, log_scale))
        c = mpmath.sqrt(2 / mpmath.pi)

        def two_u(z):
            return 2 * c * (z + mpmath.mpf("0.044715") * z**3)

        def cdf(z):
            return 1 / (1 + mpmath.exp(-two_u(z)))

        def sf(z):
            return 1 / (1 + mpmath.exp(two_u(z)))

        inv = mpmath.exp(-log_scale)
        z_plus, z_min = (
            inv * (x - mean + mpmath.mpf(1) / 255),
            inv * (x - mean - mpmath.mpf(1) / 255),
        )
        if x < -0.999:
            mass = cdf(z_plus)
        elif x > 0.999:
            mass = sf(z_min)
        elif z_min > 0:
            mass = sf(z_min) - sf(z_plus)
        else:
            mass = cdf(z_plus) - cdf(z_min)
        return float(mpmath.log(mass))


def test_discretized_likelihood_matches_high_precision_in_the_tails():
    """Edge and inner bins, means inside and outside [-1, 1], scales from 1e-3 to 1.6: bins
    up to ~1e9 nats from the mean, where float32 CDF differences cancel to the 1e-12 floor."""
    bins = np.linspace(-1, 1, 256)[[0, 1, 50, 127, 128, 200, 254, 255]]
    means = np.array([-1.3, -0.9, -0.2, 0.0, 0.05, 0.5, 1.0, 1.4])
    log_scales = np.array([-7.0, -5.0, -4.6, -3.0, -1.0, 0.0, 0.5])
    grid = np.meshgrid(bins, means, log_scales, indexing="ij")
    x, mean, log_scale = (a.astype(np.float32) for a in grid)
    want = np.vectorize(_tanh_bin_log_mass)(x, mean, log_scale)
    got = gaussian.discretized_gaussian_log_likelihood(
        jnp.asarray(x), means=jnp.asarray(mean), log_scales=jnp.asarray(log_scale)
    )
    # Same float32 inputs on both sides, so only the function's own float32 rounding counts:
    # the logit is a cubic in z = (x - mean) / scale, each a few roundings, so it carries
    # ~1e-6 relative error (measured max 4.4e-7); 1e-5 leaves a factor of 10 over that.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_discretized_likelihood_has_finite_gradients_in_the_tails():
    x = jnp.asarray(np.linspace(-1, 1, 256), jnp.float32)

    def total(means, log_scales):
        logp = gaussian.discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
        return jnp.sum(logp)

    for mean, log_scale in [(0.0, -7.0), (1.4, -5.0), (-0.5, 0.5)]:
        grads = jax.grad(total, argnums=(0, 1))(jnp.full(256, mean), jnp.full(256, log_scale))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_approx_cdf_is_close_to_the_normal_cdf():
    x = np.linspace(-6, 6, 1001)
    approx = np.asarray(gaussian.approx_standard_normal_cdf(jnp.asarray(x)))
    assert np.max(np.abs(approx - stats.norm.cdf(x))) < 2e-4


def test_mean_flat():
    x = jax.random.normal(jax.random.key(0), (3, 4, 5, 2))
    np.testing.assert_allclose(
        gaussian.mean_flat(x), np.asarray(x).reshape(3, -1).mean(1), rtol=1e-6
    )
