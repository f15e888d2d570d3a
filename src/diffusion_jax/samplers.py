"""Reverse chains: DDPM ancestral sampling, DDIM, DPM-Solver++(2M), DDIM inversion, slerp.

Every sampler takes `denoise_fn(x_t, t, **model_kwargs) -> model output` and a Schedule, never a
model object. `SAMPLERS` is the one table of chain methods: each is a step function with one
signature and an initial solver state (any pytree, carried through the loop), so a multistep
solver is one function and one table entry. A chain runs as one `lax.fori_loop` over a
schedule padded to a fixed length, with the number of steps a (possibly traced) loop bound:
jitting `run_chain` once serves every step count and eta without recompiling. `sample`,
`ddpm_sample` and `ddim_sample` are the front doors that respace on the host (float64, exact)
and call it.

Randomness is per sample: row i of x_T and of every step's noise is drawn from a key folded
with the sample's index i alone, so sample i of a key is the same in any batch and on any
number of devices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, schedules
from diffusion_jax.diffusion import extract, p_mean_variance
from diffusion_jax.schedules import Schedule


def _nonzero(t, x):
    """1 where t > 0, 0 at t = 0 (the last step adds no noise), shaped to broadcast with x."""
    return (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def no_state(x_T):
    """The solver state of a one-step method: nothing."""
    del x_T
    return ()


def condition_mean(s: Schedule, out: dict, x_t, t, grad) -> dict:
    """Classifier guidance on the mean (Dhariwal & Nichol 2021, Alg. 1): mu + Sigma grad.

    grad is scale * grad_x log p(y | x_t), the scale already applied; Sigma =
    exp(log_variance) of `out` (p_mean_variance's dict), per pixel for a learned variance.
    """
    return {**out, "mean": out["mean"] + out["variance"] * grad}


def condition_score(s: Schedule, out: dict, x_t, t, grad) -> dict:
    """Classifier guidance on eps (Dhariwal & Nichol 2021, Alg. 2): eps' = eps - sqrt(1 - abar_t)
    grad, with x_0 and the posterior mean recomputed from eps'.

    x_0' = (x_t - sqrt(1 - abar_t) eps') / sqrt(abar_t) = x_0 + (1 - abar_t) / sqrt(abar_t) grad,
    computed as that increment of `out`'s (clipped) x_0 so that grad = 0 changes nothing; x_0'
    is not clipped again (guided-diffusion's condition_score does the same).
    """
    sigma = extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
    pred_eps = out["pred_eps"] - sigma * grad
    pred_x0 = out["pred_x0"] + extract(s.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * sigma * grad
    mean, _, _ = diffusion.q_posterior_mean_variance(s, pred_x0, x_t, t)
    return {**out, "mean": mean, "pred_x0": pred_x0, "pred_eps": pred_eps}


# The forms of classifier guidance a step can take (StepMethod.guidance_form names one).
GUIDANCE_FORMS = {"mean": condition_mean, "eps": condition_score}


def guided_mean_variance(s: Schedule, model_output, x_t, t, *, cond_grad, guidance_form, **options):
    """p_mean_variance(s, model_output, x_t, t, **options), shifted by the classifier gradient
    cond_grad in the GUIDANCE_FORMS form `guidance_form` (cond_grad None: unguided)."""
    out = p_mean_variance(s, model_output, x_t, t, **options)
    if cond_grad is None:
        return out
    return GUIDANCE_FORMS[guidance_form](s, out, x_t, t, cond_grad)


def ddpm_step(
    s: Schedule,
    model_output,
    x_t,
    t,
    noise,
    state=(),
    *,
    eta=0.0,
    parameterization: str = "eps",
    var_type: str = "fixed_large",
    clip_denoised: bool = True,
    cond_grad=None,
    guidance_form: str = "mean",
):
    """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (Algorithm 2); no noise at t = 0.

    eta is unused (the variance is var_type's). Returns (x_{t-1}, pred_x0, state).
    """
    del eta
    out = guided_mean_variance(
        s,
        model_output,
        x_t,
        t,
        parameterization=parameterization,
        var_type=var_type,
        clip_denoised=clip_denoised,
        cond_grad=cond_grad,
        guidance_form=guidance_form,
    )
    noise_scale = _nonzero(t, x_t) * jnp.exp(0.5 * out["log_variance"])
    return out["mean"] + noise_scale * noise, out["pred_x0"], state


def ddim_step(
    s: Schedule,
    model_output,
    x_t,
    t,
    noise,
    state=(),
    *,
    eta=0.0,
    parameterization: str = "eps",
    var_type: str = "fixed_large",
    clip_denoised: bool = True,
    cond_grad=None,
    guidance_form: str = "eps",
):
    """One DDIM step from index t to index t-1 of `s` (Song et al. 2021, eqs. 12 and 16).

    sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev);
    x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma_t^2) eps_pred + sigma_t z,
    with eps_pred recomputed from the (clipped) x0_pred and no noise at t = 0.
    Returns (x_prev, pred_x0, state).
    """
    out = guided_mean_variance(
        s,
        model_output,
        x_t,
        t,
        parameterization=parameterization,
        var_type=var_type,
        clip_denoised=clip_denoised,
        cond_grad=cond_grad,
        guidance_form=guidance_form,
    )
    abar = extract(s.alphas_cumprod, t, x_t.shape)
    abar_prev = extract(s.alphas_cumprod_prev, t, x_t.shape)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * out["pred_eps"]
    mean = jnp.sqrt(abar_prev) * out["pred_x0"] + direction
    return mean + _nonzero(t, x_t) * sigma * noise, out["pred_x0"], state


def _log_snr_half(abar):
    """lambda = log(alpha / sigma) = (log abar - log(1 - abar)) / 2; infinite at abar = 1."""
    return 0.5 * (jnp.log(abar) - jnp.log1p(-abar))


def dpm_solver_2m_state(x_T):
    """DPM-Solver++(2M)'s state before the first step: the previous step's x_0 prediction and
    its step size h in lambda (h = 0: there is no previous step)."""
    return {
        "pred_x0": jnp.zeros_like(x_T),
        "h": jnp.zeros((x_T.shape[0],) + (1,) * (x_T.ndim - 1), x_T.dtype),
    }


def dpm_solver_2m_step(
    s: Schedule,
    model_output,
    x_t,
    t,
    noise,
    state,
    *,
    eta=0.0,
    parameterization: str = "eps",
    var_type: str = "fixed_large",
    clip_denoised: bool = True,
    cond_grad=None,
    guidance_form: str = "eps",
    stochastic: bool = False,
):
    """One DPM-Solver++(2M) step from index t to index t-1 of `s` (Lu et al. 2022, Alg. 2).

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma), s the current
    and u the next noise level, h = lambda_u - lambda_s and r = h_prev / h:
    x_u = (sigma_u / sigma_s) x_s + alpha_u (1 - e^{-h}) D, D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev
    (the midpoint form; alpha_u (1 - e^{-h}) = alpha_u - alpha_s sigma_u / sigma_s). The first
    step, with no x0_prev, and the last, to sigma = 0 (abar_prev = 1 at t = 0, where h is
    infinite), are first order: D = x0_s. This is diffusers' DPMSolverMultistepScheduler with
    solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero".
    Deterministic: noise and eta are unused.

    stochastic=True is SDE-DPM-Solver++(2M) (Lu et al. 2022, Sec. 5 and App. C; diffusers'
    algorithm_type="sde-dpmsolver++"), the same D on the reverse SDE instead of the ODE:
    x_u = (sigma_u / sigma_s) e^{-h} x_s + alpha_u (1 - e^{-2h}) D + sigma_u sqrt(1 - e^{-2h}) z,
    with z the step's noise (x_u = D on the last step, where h is infinite).
    Returns (x_prev, pred_x0, state).
    """
    del eta
    out = guided_mean_variance(
        s,
        model_output,
        x_t,
        t,
        parameterization=parameterization,
        var_type=var_type,
        clip_denoised=clip_denoised,
        cond_grad=cond_grad,
        guidance_form=guidance_form,
    )
    pred_x0 = out["pred_x0"]
    abar_s = extract(s.alphas_cumprod, t, x_t.shape)
    abar_u = extract(s.alphas_cumprod_prev, t, x_t.shape)
    alpha_s, sigma_s = jnp.sqrt(abar_s), jnp.sqrt(1.0 - abar_s)
    alpha_u, sigma_u = jnp.sqrt(abar_u), jnp.sqrt(1.0 - abar_u)
    h = _log_snr_half(abar_u) - _log_snr_half(abar_s)
    second_order = (state["h"] > 0) & (_nonzero(t, x_t) > 0)
    half_over_r = jnp.where(second_order, 0.5 * h / jnp.where(second_order, state["h"], 1.0), 0.0)
    d = (1.0 + half_over_r) * pred_x0 - half_over_r * state["pred_x0"]
    ratio = sigma_u / sigma_s
    if stochastic:
        kept = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}: 1 on the last step
        x_prev = ratio * jnp.exp(-h) * x_t + alpha_u * kept * d + sigma_u * jnp.sqrt(kept) * noise
    else:
        x_prev = ratio * x_t + (alpha_u - alpha_s * ratio) * d
    return x_prev, pred_x0, {"pred_x0": pred_x0, "h": h}


def dpm_solver_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """The kept indices of diffusers' "linspace" spacing: num_steps + 1 evenly spread indices of
    [0, T-1] without 0, increasing. The last step then goes from about T / num_steps straight
    to the data (abar = 1), first order. With space_timesteps' t = 0 kept, the linear
    schedule's second-order step into t = 0 spans several times the previous step in lambda
    (0.97 -> 4.6 after 0.77 at 10 steps) and overshoots: 10-step samples of N(0.3, 0.5^2) get
    std 0.69. Outside 1 <= num_steps < T this is space_timesteps (all T indices at
    num_steps = T, an error otherwise)."""
    if not 1 <= num_steps < num_timesteps:
        return schedules.space_timesteps(num_timesteps, num_steps)
    return schedules.space_timesteps(num_timesteps, num_steps + 1)[1:]


@dataclasses.dataclass(frozen=True)
class StepMethod:
    """A chain method: its step, the solver state it starts from, and its timesteps.

    step(s, model_output, x_t, t, noise, state, *, eta, parameterization, var_type,
    clip_denoised) -> (x_prev, pred_x0, state) moves x_t at index t of `s` to index t-1;
    init_state(x_T) -> state is any pytree; uses_noise False means the step ignores its noise
    and the chain draws none (it passes None); timesteps(T, num_steps) -> the kept indices,
    increasing, for a chain of num_steps steps. Under classifier guidance the chain also passes
    step(..., cond_grad=g, guidance_form=form), g = scale * grad_x log p(y | x_t), and the step
    takes its mean and x_0 from `guided_mean_variance`; `guidance_form` names the GUIDANCE_FORMS
    entry: "mean" (Alg. 1, for ancestral steps whose variance is the model's) or "eps" (Alg. 2,
    for steps built from x_0 and eps). A step without these keywords runs unguided chains only.
    """

    step: Callable
    init_state: Callable
    uses_noise: bool
    timesteps: Callable = schedules.space_timesteps
    guidance_form: str = "eps"


# The one table of sampler names: validation, the sample CLI and the docs read it.
SAMPLERS = {
    "ddpm": StepMethod(ddpm_step, no_state, uses_noise=True, guidance_form="mean"),
    "ddim": StepMethod(ddim_step, no_state, uses_noise=True),
    "dpm_solver++2m": StepMethod(
        dpm_solver_2m_step, dpm_solver_2m_state, uses_noise=False, timesteps=dpm_solver_timesteps
    ),
    "sde_dpm_solver++2m": StepMethod(
        functools.partial(dpm_solver_2m_step, stochastic=True),
        dpm_solver_2m_state,
        uses_noise=True,
        timesteps=dpm_solver_timesteps,
    ),
}


def prepare_schedule(s: Schedule, num_steps: int | None = None, sampler: str = "ddpm") -> Schedule:
    """`s` respaced to the `num_steps` steps of `sampler`'s timesteps (None: all), padded to
    length T.

    Padding repeats the last entry; a chain over the first `num_steps` indices never reads it.
    The fixed length lets one compiled chain serve every step count.
    """
    diffusion.check_choice("sampler", sampler, SAMPLERS)
    num_timesteps = s.num_timesteps
    if num_steps is None:
        return s
    kept = SAMPLERS[sampler].timesteps(num_timesteps, num_steps)
    if num_steps == num_timesteps:
        return s
    sub = schedules.respace(s, kept)
    pad = num_timesteps - num_steps

    def padded(a):  # on the host: no op is compiled for a new step count
        a = np.asarray(a)
        return jax.device_put(np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]))

    return jax.tree.map(padded, sub)


def per_sample_normal(key, sample_index, shape, dtype=jnp.float32):
    """Standard normal noise of `shape` whose row i is drawn from fold_in(key, sample_index[i])
    alone: the same row for the same sample whatever the batch it is drawn in."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, sample_index)
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), dtype))(keys)


# How many times a chain reports its progress (run_chain's progress_fn), at most about.
PROGRESS_UPDATES = 50


def run_chain(
    denoise_fn: Callable,
    s: Schedule,
    num_steps,
    x_T,
    key,
    *,
    sampler: str = "ddpm",
    eta=0.0,
    parameterization: str = "eps",
    var_type: str = "fixed_large",
    clip_denoised: bool = True,
    intermediates_every: int = 0,
    progress_fn: Callable | None = None,
    model_kwargs: dict | None = None,
    sample_index=None,
    noise_conditioning: str = "timestep",
    cond_fn: Callable | None = None,
):
    """Run a reverse chain from x_T over indices num_steps-1, ..., 0 of (padded) schedule s.

    `sampler` names a SAMPLERS entry. The network sees `diffusion.model_time` of s at each
    index: the original timestep, or with a continuous noise_conditioning sqrt(alpha_bar_t) of
    s itself, so s may be another schedule than the training one. The noise of chain index n
    for row i is drawn from fold_in(fold_in(key, n), sample_index[i]) (sample_index defaults to
    arange(B)).
    Jittable; `num_steps`, `eta`, `x_T` and `sample_index` may be traced. Returns a dict with
    "sample" and, when intermediates_every = k > 0, "x_t" and "pred_x0" of shape
    (ceil(T/k), *x_T.shape): the state after chain steps k-1, 2k-1, ... (entries past the last
    step stay zero).
    `cond_fn(x_t, t_model, **model_kwargs) -> scale * grad_x log p(y | x_t)` (already scaled, e.g.
    classifier_guidance.classifier_cond_fn), evaluated at every step where the model is, turns
    on classifier guidance (Dhariwal & Nichol 2021) in the form the sampler's StepMethod names.
    `progress_fn(step, total)` is called on the host (jax.debug.callback) after every
    max(1, total // PROGRESS_UPDATES)-th step and after the last, not after every step: each
    callback is a host round trip that slows a CPU chain (experiments/PERFORMANCE.md).
    """
    diffusion.check_choice("sampler", sampler, SAMPLERS)
    diffusion.check_options(
        parameterization=parameterization,
        var_type=var_type,
        noise_conditioning=noise_conditioning,
    )
    method = SAMPLERS[sampler]
    batch = x_T.shape[0]
    if sample_index is None:
        sample_index = jnp.arange(batch)
    options = dict(
        eta=eta, parameterization=parameterization, var_type=var_type, clip_denoised=clip_denoised
    )
    k = intermediates_every
    num_frames = -(-s.num_timesteps // k) if k else 0
    frames = jnp.zeros((2, num_frames) + x_T.shape, x_T.dtype)

    def body(i, carry):
        x, state, frames = carry
        index = num_steps - 1 - i
        t = jnp.full((batch,), index, dtype=jnp.int32)
        t_model = diffusion.model_time(s, t, noise_conditioning)
        model_output = denoise_fn(x, t_model, **(model_kwargs or {}))
        guide = {}
        if cond_fn is not None:
            guide = dict(
                cond_grad=cond_fn(x, t_model, **(model_kwargs or {})),
                guidance_form=method.guidance_form,
            )
        noise = None
        if method.uses_noise:
            step_key = jax.random.fold_in(key, index)
            noise = per_sample_normal(step_key, sample_index, x.shape, x.dtype)
        x, pred_x0, state = method.step(s, model_output, x, t, noise, state, **options, **guide)
        if k:
            frames = jax.lax.cond(
                (i + 1) % k == 0,
                lambda f: f.at[:, (i + 1) // k - 1].set(jnp.stack([x, pred_x0])),
                lambda f: f,
                frames,
            )
        if progress_fn is not None:
            done = i + 1
            every = jnp.maximum(num_steps // PROGRESS_UPDATES, 1)
            jax.lax.cond(
                (done % every == 0) | (done == num_steps),
                lambda: jax.debug.callback(progress_fn, done, num_steps),
                lambda: None,
            )
        return x, state, frames

    init = (x_T, method.init_state(x_T), frames)
    x, _, frames = jax.lax.fori_loop(0, num_steps, body, init)
    result = {"sample": x}
    if k:
        result["x_t"], result["pred_x0"] = frames[0], frames[1]
    return result


def _check_shape(shape) -> tuple:
    shape = tuple(shape)
    if len(shape) != 4 or any(not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
        raise ValueError(f"shape must be (B, H, W, C) of positive ints, got {shape}")
    return shape


def sample(
    denoise_fn: Callable,
    s: Schedule,
    shape,
    key,
    *,
    sampler: str,
    num_steps: int | None = None,
    intermediates_every: int = 0,
    **kwargs,
):
    """Samples of `shape` from N(0, I) by the SAMPLERS method `sampler` over `num_steps` of its
    timesteps (None: all T). Sample i's x_T is drawn from fold_in(k0, i) and its chain noise
    from k1 (see run_chain), with k0, k1 = split(key). kwargs go to run_chain. Returns the
    samples, or with intermediates_every > 0 a dict {"sample", "x_t", "pred_x0"}."""
    shape = _check_shape(shape)
    if num_steps is None:
        num_steps = s.num_timesteps
    padded = prepare_schedule(s, num_steps, sampler)  # checks num_steps in [1, T]
    init_key, chain_key = jax.random.split(key)
    x_T = per_sample_normal(init_key, jnp.arange(shape[0]), shape)
    out = run_chain(
        denoise_fn,
        padded,
        num_steps,
        x_T,
        chain_key,
        sampler=sampler,
        intermediates_every=intermediates_every,
        **kwargs,
    )
    if intermediates_every:
        used = -(-num_steps // intermediates_every)
        out["x_t"], out["pred_x0"] = out["x_t"][:used], out["pred_x0"][:used]
        return out
    return out["sample"]


def ddpm_sample(
    denoise_fn: Callable,
    s: Schedule,
    shape,
    key,
    *,
    num_steps: int | None = None,
    parameterization: str = "eps",
    var_type: str = "fixed_large",
    clip_denoised: bool = True,
    intermediates_every: int = 0,
    progress_fn: Callable | None = None,
    model_kwargs: dict | None = None,
    noise_conditioning: str = "timestep",
    cond_fn: Callable | None = None,
):
    """Ancestral sampling (DDPM Algorithm 2) from N(0, I), over all T steps or `num_steps`
    evenly respaced ones (improved DDPM). Returns samples of `shape`, or with
    intermediates_every > 0 a dict {"sample", "x_t", "pred_x0"}. cond_fn: classifier guidance
    (see run_chain)."""
    return sample(
        denoise_fn,
        s,
        shape,
        key,
        sampler="ddpm",
        num_steps=num_steps,
        intermediates_every=intermediates_every,
        parameterization=parameterization,
        var_type=var_type,
        clip_denoised=clip_denoised,
        progress_fn=progress_fn,
        model_kwargs=model_kwargs,
        noise_conditioning=noise_conditioning,
        cond_fn=cond_fn,
    )


def ddim_sample(
    denoise_fn: Callable,
    s: Schedule,
    shape,
    key,
    *,
    num_steps: int,
    eta: float = 0.0,
    parameterization: str = "eps",
    var_type: str = "fixed_large",
    clip_denoised: bool = True,
    intermediates_every: int = 0,
    progress_fn: Callable | None = None,
    model_kwargs: dict | None = None,
    noise_conditioning: str = "timestep",
    cond_fn: Callable | None = None,
):
    """DDIM sampling over `num_steps` evenly spread steps; eta = 0 is deterministic, eta = 1
    matches DDPM ancestral sampling with the posterior variance. cond_fn: classifier guidance
    (see run_chain)."""
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    return sample(
        denoise_fn,
        s,
        shape,
        key,
        sampler="ddim",
        num_steps=num_steps,
        intermediates_every=intermediates_every,
        eta=eta,
        parameterization=parameterization,
        var_type=var_type,
        clip_denoised=clip_denoised,
        progress_fn=progress_fn,
        model_kwargs=model_kwargs,
        noise_conditioning=noise_conditioning,
        cond_fn=cond_fn,
    )


def ddim_invert(
    denoise_fn: Callable,
    s: Schedule,
    x0,
    *,
    num_steps: int,
    parameterization: str = "eps",
    var_type: str = "fixed_large",
    clip_denoised: bool = False,
    model_kwargs: dict | None = None,
    noise_conditioning: str = "timestep",
):
    """Deterministic DDIM encoding x_0 -> x_T (Song et al. 2021, Sec. 4.3), the inverse of
    `ddim_sample(eta=0)` up to discretisation: at index i the model sees x (at noise level
    abar_{i-1}) with the time input of index i (`diffusion.model_time`), and x moves along its
    eps to level abar_i."""
    diffusion.check_options(
        parameterization=parameterization,
        var_type=var_type,
        noise_conditioning=noise_conditioning,
    )
    _check_shape(x0.shape)
    padded = prepare_schedule(s, num_steps)
    batch = x0.shape[0]

    def body(i, x):
        t = jnp.full((batch,), i, dtype=jnp.int32)
        time = diffusion.model_time(padded, t, noise_conditioning)
        model_output = denoise_fn(x, time, **(model_kwargs or {}))
        out = p_mean_variance(
            padded,
            model_output,
            x,
            t,
            parameterization=parameterization,
            var_type=var_type,
            clip_denoised=False,
        )
        eps = out["pred_eps"]
        abar_prev = extract(padded.alphas_cumprod_prev, t, x.shape)
        abar = extract(padded.alphas_cumprod, t, x.shape)
        pred_x0 = (x - jnp.sqrt(1.0 - abar_prev) * eps) / jnp.sqrt(abar_prev)
        if clip_denoised:
            pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        return jnp.sqrt(abar) * pred_x0 + jnp.sqrt(1.0 - abar) * eps

    return jax.lax.fori_loop(0, num_steps, body, x0)


def slerp(z0, z1, alpha):
    """Spherical interpolation between latents, per example (alpha in [0, 1], scalar or (B,))."""
    flat0 = z0.reshape(z0.shape[0], -1)
    flat1 = z1.reshape(z1.shape[0], -1)
    cos = jnp.sum(flat0 * flat1, -1) / (
        jnp.linalg.norm(flat0, axis=-1) * jnp.linalg.norm(flat1, axis=-1)
    )
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))[:, None]
    alpha = jnp.broadcast_to(jnp.asarray(alpha, z0.dtype), (z0.shape[0],))[:, None]
    sin = jnp.sin(theta)
    safe = jnp.where(sin < 1e-6, 1.0, sin)
    w0 = jnp.where(sin < 1e-6, 1.0 - alpha, jnp.sin((1.0 - alpha) * theta) / safe)
    w1 = jnp.where(sin < 1e-6, alpha, jnp.sin(alpha * theta) / safe)
    return (w0 * flat0 + w1 * flat1).reshape(z0.shape)


def tqdm_progress(desc: str = "sampling") -> Callable:
    """A host-side progress_fn(step, total) drawing a tqdm bar; closes itself at the end."""
    from tqdm.auto import tqdm

    bar = None

    def update(step, total):
        nonlocal bar
        step, total = int(step), int(total)
        if bar is None or step <= bar.n:  # a new chain
            bar = tqdm(total=total, desc=desc, leave=False)
        bar.update(step - bar.n)
        if step >= total:
            bar.close()

    return update


__all__ = [
    "GUIDANCE_FORMS",
    "SAMPLERS",
    "StepMethod",
    "condition_mean",
    "condition_score",
    "ddim_invert",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "dpm_solver_2m_state",
    "dpm_solver_2m_step",
    "dpm_solver_timesteps",
    "guided_mean_variance",
    "no_state",
    "per_sample_normal",
    "prepare_schedule",
    "run_chain",
    "sample",
    "slerp",
    "tqdm_progress",
]
