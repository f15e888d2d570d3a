"""Gaussian data x_0 ~ N(mu, s^2) per pixel: the one case whose optimal denoiser is known.

For x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, E[eps | x_t] is
sqrt(1 - abar_t) / (abar_t s^2 + 1 - abar_t) * (x_t - sqrt(abar_t) mu).
"""

import jax
import jax.numpy as jnp

from diffusion_jax.schedules import Schedule


def optimal_eps_fn(schedule: Schedule, mu: float, sd: float):
    """denoise_fn(x_t, t) returning E[eps | x_t]; t is the original timestep the model sees."""

    def denoise_fn(x_t, t):
        abar = jnp.take(schedule.alphas_cumprod, t).reshape((-1,) + (1,) * (x_t.ndim - 1))
        return jnp.sqrt(1 - abar) / (abar * sd**2 + 1 - abar) * (x_t - jnp.sqrt(abar) * mu)

    return denoise_fn


def optimal_eps_of_level_fn(mu: float, sd: float):
    """denoise_fn(x_t, time) returning E[eps | x_t] for x_t = gamma x_0 + sqrt(1 - gamma^2) eps
    at the continuous level gamma = time / diffusion.NOISE_LEVEL_SCALE the network is told: it
    knows no schedule, only the level it is given."""
    from diffusion_jax.diffusion import NOISE_LEVEL_SCALE

    def denoise_fn(x_t, time):
        gamma = (time / NOISE_LEVEL_SCALE).reshape((-1,) + (1,) * (x_t.ndim - 1))
        var = 1 - gamma**2
        return jnp.sqrt(var) / (gamma**2 * sd**2 + var) * (x_t - gamma * mu)

    return denoise_fn


# --- a mixture of isotropic Gaussians: the exact denoiser and the exact noisy classifier ------
#
# Data x_0 ~ sum_k w_k N(m_k, s_k^2 I) on the last axis of (B, ..., D) arrays, m (K, D), s (K,).
# Under q, x_t | k ~ N(sqrt(abar_t) m_k, v_k I) with v_k = abar_t s_k^2 + 1 - abar_t, so the
# component's posterior p(k | x_t) is Bayes' rule on these Gaussians and
# E[eps | x_t] = -sqrt(1 - abar_t) grad log p(x_t) = sqrt(1 - abar_t) sum_k p(k | x_t) (x_t -
# sqrt(abar_t) m_k) / v_k.


def _mixture_terms(schedule: Schedule, x_t, t, means, sds):
    """sqrt(1 - abar_t), and per component (B, K): the centred x_t (B, K, D) and v_k."""
    abar = jnp.take(schedule.alphas_cumprod, t).reshape(-1, 1)  # (B, 1)
    flat = x_t.reshape(x_t.shape[0], -1, x_t.shape[-1])  # (B, P, D)
    centred = flat[:, None] - jnp.sqrt(abar)[:, :, None, None] * jnp.asarray(means)[None, :, None]
    var = abar * jnp.asarray(sds) ** 2 + 1 - abar  # (B, K)
    return jnp.sqrt(1 - abar), centred, var


def mixture_log_posterior(schedule: Schedule, weights, means, sds):
    """log_p(x_t, t) -> log p(k | x_t) of shape (B, K), for every pixel of a row drawn from
    the same component (the row is one draw of the mixture)."""

    def log_p(x_t, t):
        _, centred, var = _mixture_terms(schedule, x_t, t, means, sds)
        n = centred.shape[2] * centred.shape[3]  # scalars in a row
        log_joint = (
            jnp.log(jnp.asarray(weights))
            - 0.5 * jnp.sum(centred**2, axis=(2, 3)) / var
            - 0.5 * n * jnp.log(2 * jnp.pi * var)
        )
        return jax.nn.log_softmax(log_joint, axis=-1)

    return log_p


def mixture_eps_fn(schedule: Schedule, weights, means, sds):
    """denoise_fn(x_t, t, **ignored) returning E[eps | x_t] under the mixture."""
    log_p = mixture_log_posterior(schedule, weights, means, sds)

    def denoise_fn(x_t, t, **model_kwargs):
        sigma, centred, var = _mixture_terms(schedule, x_t, t, means, sds)
        post = jnp.exp(log_p(x_t, t))  # (B, K)
        eps = sigma[:, :, None] * jnp.sum((post / var)[:, :, None, None] * centred, axis=1)
        return eps.reshape(x_t.shape)

    return denoise_fn


def mixture_cond_fn(schedule: Schedule, weights, means, sds, scale):
    """cond_fn(x_t, t, y) = scale * grad_x log p(y | x_t) of the exact classifier, by autodiff."""
    log_p = mixture_log_posterior(schedule, weights, means, sds)

    def cond_fn(x_t, t, y, **model_kwargs):
        def selected(x):
            return jnp.sum(jnp.take_along_axis(log_p(x, t), y[:, None], axis=-1))

        return scale * jax.grad(selected)(x_t)

    return cond_fn
