"""Guidance as denoise_fn -> denoise_fn wrappers: the samplers never know they run guided.

`classifier_free` (Ho & Salimans 2022) mixes a class-conditional network's outputs for the
requested labels and for the null label. It needs a network trained with label dropout
(config.conditioning.p_uncond > 0), where the null label (= num_classes) stands for "no class".
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion


def _per_example(w, x):
    """w as a scalar or one weight per example, shaped to broadcast with x (B, ...)."""
    w = jnp.asarray(w, x.dtype)
    return w.reshape((-1,) + (1,) * (x.ndim - 1)) if w.ndim == 1 else w


def classifier_free(
    denoise_fn: Callable, w, null_label: int, var_type: str = "fixed_large"
) -> Callable:
    """denoise_fn(x_t, t, y, **model_kwargs) guided by eps = (1 + w) eps(x, y) - w eps(x, null)
    (Ho & Salimans 2022, eq. 6).

    Both halves come from ONE model call on the batch doubled along axis 0 (the labels y, then
    the null label everywhere; every other model keyword argument, e.g. a conditioning image,
    repeated). w (a scalar or one weight per example) may be traced: changing it recompiles
    nothing; w = 0 is the conditional model. With a learned variance (var_type
    'learned_range') only the mean part is guided and the variance channels are the
    conditional half's. The mix is linear in the network's mean output, so for the x0 and v
    parameterisations the same formula applies to that output: x0 and v are the same linear
    function of (x_t, eps) at a given t, so mixing them mixes the implied eps alike.
    """
    diffusion.check_options(var_type=var_type)

    def guided(x_t, t, y, **model_kwargs):
        batch = x_t.shape[0]
        null = jnp.full_like(y, null_label)
        doubled = jax.tree.map(lambda a: jnp.concatenate([a, a]), model_kwargs)
        out = denoise_fn(
            jnp.concatenate([x_t, x_t]),
            jnp.concatenate([t, t]),
            y=jnp.concatenate([y, null]),
            **doubled,
        )
        cond, uncond = out[:batch], out[batch:]
        cond_mean, cond_var = diffusion.split_model_output(cond, x_t, var_type)
        uncond_mean, _ = diffusion.split_model_output(uncond, x_t, var_type)
        w_b = _per_example(w, cond_mean)
        mean = (1.0 + w_b) * cond_mean - w_b * uncond_mean
        return mean if cond_var is None else jnp.concatenate([mean, cond_var], axis=-1)

    return guided


__all__ = ["classifier_free"]
