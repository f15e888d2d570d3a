"""Gaussian data x_0 ~ N(mu, s^2) per pixel: the one case whose optimal denoiser is known.

For x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, E[eps | x_t] is
sqrt(1 - abar_t) / (abar_t s^2 + 1 - abar_t) * (x_t - sqrt(abar_t) mu).
"""

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
