"""Pure Gaussian maths used by the variational bound (Ho et al. 2020, Sec. 3.3 and App. B)."""

import math

import jax.numpy as jnp


def mean_flat(x):
    """Mean over every axis but the first (the batch)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def sum_flat(x):
    """Sum over every axis but the first (the batch)."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by the original DDPM code."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log p(x) of data in [-1, 1] discretised to 256 bins under N(means, exp(log_scales)^2).

    Ho et al. eq. 13: each pixel value owns the interval [x - 1/255, x + 1/255], except the
    edge bins, which extend to -inf and +inf, so the 256 probabilities sum to 1. Uses the tanh
    CDF approximation of the original code so bits/dim compare with published numbers.
    """
    if jnp.broadcast_shapes(x.shape, means.shape, log_scales.shape) != x.shape:
        raise ValueError(
            f"means and log_scales must broadcast to x's shape {x.shape}, got "
            f"{means.shape} and {log_scales.shape}"
        )
    centered_x = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    log_probs = jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))),
    )
    return log_probs
