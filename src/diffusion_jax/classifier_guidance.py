"""Classifier guidance (Dhariwal & Nichol 2021): the noisy classifier's training loss and the
gradient it gives the sampler.

A classifier reaches this module only as `classifier_apply(params, x_t, t) -> logits (B, K)`,
as a denoiser reaches diffusion.py only as a denoise_fn. The chain (samplers.run_chain with
`cond_fn`) turns the gradient into a shift of the mean (DDPM, Alg. 1) or of eps (DDIM and
DPM-Solver++, Alg. 2).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.schedules import Schedule


def log_prob_of_labels(logits, labels):
    """log p(y | x) = log_softmax(logits)[y] per example: logits (B, K), labels int (B,)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def classifier_losses(s: Schedule, logits_fn: Callable, x0, labels, t, key) -> dict:
    """The noisy classifier's loss at timesteps t: -log p(y | x_t, t) with x_t = q_sample(x_0,
    t, eps) (eq. 4) and logits_fn(x_t, timesteps[t]) the classifier. Returns per-example
    "loss" (cross-entropy, nats) and "accuracy" (1 where the argmax is y), each (B,)."""
    diffusion.check_timesteps(s, t, x0.shape[0])
    if jnp.shape(labels) != (x0.shape[0],):
        raise ValueError(f"labels have shape {jnp.shape(labels)}; expected ({x0.shape[0]},)")
    noise = jax.random.normal(key, x0.shape, x0.dtype)
    x_t = diffusion.q_sample(s, x0, t, noise)
    logits = logits_fn(x_t, jnp.take(s.timesteps, t))
    return {
        "loss": -log_prob_of_labels(logits, labels),
        "accuracy": (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32),
    }


def classifier_cond_fn(
    classifier_apply: Callable, params, scale, *, t_cutoff: int | None = None
) -> Callable:
    """cond_fn(x_t, t, y, **model_kwargs) = scale * grad_x sum_i log p(y_i | x_t,i, t_i), the
    classifier guidance gradient samplers.run_chain takes (guided-diffusion's cond_fn).

    Labels come from model_kwargs' `y` (the denoiser's class labels; an unconditional denoiser's
    denoise_fn must take and ignore `y`); the other model kwargs are ignored. Summing over the
    batch gives each row its own gradient, since row i's log-probability depends on row i only.
    `scale` may be traced (build cond_fn inside the jitted function: no recompilation per
    scale). With t_cutoff, a classifier trained only on t < t_cutoff (training.t_cutoff) gives
    no gradient at t >= t_cutoff, where it has never seen x_t.
    """

    def cond_fn(x_t, t, y, **model_kwargs):
        del model_kwargs

        def total_log_prob(x):
            return jnp.sum(log_prob_of_labels(classifier_apply(params, x, t), y))

        grad = scale * jax.grad(total_log_prob)(x_t)
        if t_cutoff:
            trained = (t < t_cutoff).astype(grad.dtype).reshape((-1,) + (1,) * (grad.ndim - 1))
            grad = grad * trained
        return grad

    return cond_fn


__all__ = ["classifier_cond_fn", "classifier_losses", "log_prob_of_labels"]
