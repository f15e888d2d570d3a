"""The diffusion process as pure functions of (Schedule, arrays).

Equation numbers refer to Ho et al. 2020 (DDPM) unless said otherwise; learned variances and
the hybrid loss are Nichol & Dhariwal 2021 (improved DDPM); v is Salimans & Ho 2022; continuous
noise-level conditioning is WaveGrad's (Chen et al. 2020) and SR3's (Saharia et al. 2021).
A model reaches this module only as `denoise_fn(x_t, t, **model_kwargs) -> output`, where t is
what `model_time` gives for the NOISE_CONDITIONINGS entry: the schedule's `timesteps[t]` (the
original step for a respaced schedule), or a continuous noise level.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.gaussian import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from diffusion_jax.schedules import Schedule


def check_choice(name: str, value, allowed) -> str:
    """Raise a ValueError naming the field, the value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_options(
    *, parameterization=None, var_type=None, loss_type=None, noise_conditioning=None
) -> None:
    """Check the enum options once, at the entry of a public function."""
    if noise_conditioning is not None:
        check_choice("noise_conditioning", noise_conditioning, NOISE_CONDITIONINGS)
        if NOISE_CONDITIONINGS[noise_conditioning].of_level is not None and (
            (loss_type is not None and LOSS_TYPES[loss_type].vb)
            or (var_type is not None and VAR_TYPES[var_type].learned)
        ):
            raise ValueError(
                f"noise_conditioning {noise_conditioning!r} trains on levels drawn between the "
                "schedule's steps, where the bound's terms L_t (loss_type 'kl', 'hybrid') and "
                "the learned variance between beta_t and beta-tilde_t (var_type "
                "'learned_range') are not defined; use loss_type 'simple' with a fixed variance"
            )
    if parameterization is not None:
        check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        if (
            noise_conditioning is not None
            and NOISE_CONDITIONINGS[noise_conditioning].of_level is not None
            and PARAMETERIZATIONS[parameterization].steps_only
        ):
            raise ValueError(
                f"parameterization {parameterization!r} predicts a quantity of the training "
                "schedule's steps, not of a continuous level: use noise_conditioning "
                "'timestep', or parameterization 'eps', 'x0' or 'v'"
            )
    if var_type is not None:
        check_choice("var_type", var_type, VAR_TYPES)
    if loss_type is not None:
        check_choice("loss_type", loss_type, LOSS_TYPES)
    if (
        loss_type is not None
        and var_type is not None
        and not LOSS_TYPES[loss_type].vb
        and (VAR_TYPES[var_type].learned)
    ):
        raise ValueError(
            "loss_type 'simple' does not train a learned variance; with var_type "
            "'learned_range' use loss_type 'hybrid' or 'kl'"
        )


def model_output_channels(num_channels: int, var_type: str) -> int:
    """Channels the network must output: doubled when it also predicts the variance."""
    check_options(var_type=var_type)
    return 2 * num_channels if VAR_TYPES[var_type].learned else num_channels


def check_timesteps(schedule: Schedule, t, batch_size: int | None = None) -> None:
    """Check t's shape (B,), integer dtype and, when its value is known, the range [0, T)."""
    if isinstance(t, (int, float)) or getattr(t, "ndim", None) != 1:
        raise ValueError(f"t must be an integer array of shape (B,), got {t!r}")
    if batch_size is not None and t.shape[0] != batch_size:
        raise ValueError(f"t has batch size {t.shape[0]} but x has batch size {batch_size}")
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"t must hold integer timestep indices, got dtype {t.dtype}")
    if not isinstance(t, jax.core.Tracer):  # numpy: a concrete t stays concrete under jit
        values = np.asarray(t)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= schedule.num_timesteps:
            raise ValueError(
                f"t must lie in [0, {schedule.num_timesteps}), got values in [{lo}, {hi}]"
            )


def extract(table, t, shape):
    """table[t] reshaped to (B, 1, ..., 1) so it broadcasts against an array of `shape`."""
    out = jnp.take(table, t, axis=0)
    return out.reshape((t.shape[0],) + (1,) * (len(shape) - 1))


# --- forward process -------------------------------------------------------------------


def q_mean_variance(s: Schedule, x0, t):
    """Mean, variance and log variance of q(x_t | x_0) (eq. 4)."""
    mean = extract(s.sqrt_alphas_cumprod, t, x0.shape) * x0
    # From the float64-built log table: 1 - alphas_cumprod in float32 loses digits at small t.
    log_variance = extract(s.log_one_minus_alphas_cumprod, t, x0.shape)
    return mean, jnp.exp(log_variance), log_variance


def q_sample(s: Schedule, x0, t, noise):
    """A sample of q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} != x0 shape {x0.shape}")
    return (
        extract(s.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(s.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def q_posterior_mean_variance(s: Schedule, x0, x_t, t):
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7)."""
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 shape {x0.shape} != x_t shape {x_t.shape}")
    mean = (
        extract(s.posterior_mean_coef1, t, x_t.shape) * x0
        + extract(s.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    variance = extract(s.posterior_variance, t, x_t.shape)
    log_variance = extract(s.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance


# --- conversions between eps, x0 and v ---------------------------------------------------


def predict_x0_from_eps(s: Schedule, x_t, t, eps):
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), inverting eq. 4."""
    return (
        extract(s.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
        - extract(s.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    )


def predict_eps_from_x0(s: Schedule, x_t, t, x0):
    """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1), inverting eq. 4."""
    return (extract(s.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) / extract(
        s.sqrt_recipm1_alphas_cumprod, t, x_t.shape
    )


def get_v(s: Schedule, x0, eps, t):
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, Sec. 4)."""
    return _v_target(
        extract(s.sqrt_alphas_cumprod, t, x0.shape),
        extract(s.sqrt_one_minus_alphas_cumprod, t, x0.shape),
        x0,
        eps,
    )


def predict_x0_from_v(s: Schedule, x_t, t, v):
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    return (
        extract(s.sqrt_alphas_cumprod, t, x_t.shape) * x_t
        - extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
    )


def predict_eps_from_v(s: Schedule, x_t, t, v):
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    return (
        extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
        + extract(s.sqrt_alphas_cumprod, t, x_t.shape) * v
    )


def _x0_from_x0(s: Schedule, x_t, t, x0):
    return x0


def predict_x0_from_mean(s: Schedule, x_t, t, mean):
    """x_0 = (mu - coef2 x_t) / coef1: eq. 7's mean solved for x_0, with the coefficients of the
    training step the model predicts the mean of (s.model_mean_coef1/2: the same on a
    respaced schedule)."""
    return (mean - extract(s.model_mean_coef2, t, x_t.shape) * x_t) / extract(
        s.model_mean_coef1, t, x_t.shape
    )


def _mean_step_target(s: Schedule, x0, noise, t):
    """mu-tilde_t(x_t, x_0) of eq. 7 for x_t = q_sample(x_0, t, noise)."""
    x_t = q_sample(s, x0, t, noise)
    return q_posterior_mean_variance(s, x0, x_t, t)[0]


def _eps_target(alpha, sigma, x0, noise):
    return noise


def _x0_target(alpha, sigma, x0, noise):
    return x0


def _v_target(alpha, sigma, x0, noise):
    """v = alpha eps - sigma x_0 (Salimans & Ho 2022, Sec. 4)."""
    return alpha * noise - sigma * x0


@dataclasses.dataclass(frozen=True)
class Parameterization:
    """What the network predicts: `to_x0(s, x_t, t, output)` recovers x_0 from its output, and
    `target(alpha, sigma, x0, noise)` is what L_simple regresses it on for
    x_t = alpha x_0 + sigma noise (alpha, sigma broadcastable to x0: sqrt(abar_t) and
    sqrt(1 - abar_t) of a step, or of a continuous level). A target that depends on the step
    itself, not only on its level, is `step_target(s, x0, noise, t)` instead (target None):
    such a model is conditioned on timesteps only (`steps_only`)."""

    to_x0: Callable
    target: Callable | None
    step_target: Callable | None = None

    @property
    def steps_only(self) -> bool:
        return self.target is None


# The one table of parameterisations; a new one is its two functions and an entry.
PARAMETERIZATIONS = {
    "eps": Parameterization(predict_x0_from_eps, _eps_target),  # Ho et al. eq. 11-12
    "x0": Parameterization(_x0_from_x0, _x0_target),
    "v": Parameterization(predict_x0_from_v, _v_target),  # Salimans & Ho 2022
    # The posterior mean mu-tilde_t itself (Ho et al. Sec. 3.2's baseline; loss 'simple' is
    # its unweighted L2, 'kl' eq. 8). It is the mean of the training step t -> t-1, whatever
    # chain samples it: s.model_mean_coef1/2 hold that step's coefficients.
    "mu": Parameterization(predict_x0_from_mean, None, _mean_step_target),
}
STEPS_ONLY = tuple(name for name, p in PARAMETERIZATIONS.items() if p.steps_only)


def predict_x0(s: Schedule, model_mean_output, x_t, t, parameterization: str):
    """The model's prediction of x_0 from its (mean) output in any parameterisation."""
    return PARAMETERIZATIONS[parameterization].to_x0(s, x_t, t, model_mean_output)


def training_target(s: Schedule, x0, noise, t, parameterization: str):
    """What the network regresses at index t of s: eps, x0, v or mu."""
    entry = PARAMETERIZATIONS[parameterization]
    if entry.steps_only:
        return entry.step_target(s, x0, noise, t)
    return entry.target(
        extract(s.sqrt_alphas_cumprod, t, x0.shape),
        extract(s.sqrt_one_minus_alphas_cumprod, t, x0.shape),
        x0,
        noise,
    )


# --- what the network is told of the noise level ------------------------------------------

# The network's time input for a continuous level gamma = sqrt(alpha_bar) in [0, 1] is
# NOISE_LEVEL_SCALE * gamma; see `scaled_level` for why 1000.
NOISE_LEVEL_SCALE = 1000.0


def scaled_level(gamma):
    """NOISE_LEVEL_SCALE * gamma: a level in [0, 1] as a time input in [0, 1000].

    The UNet's sinusoidal embedding (max_period 10000) turns its fastest feature by one radian
    per unit of input and its slowest by 1e-4: it was made for integer steps 0..1000. Scaled by
    1000, a level moves the fastest feature by one radian per 1e-3 of gamma (about one step of
    a 1000-step schedule at mid noise), as one integer step does, while the slowest feature
    stays monotone over the whole range (0.1 rad), so the embedding orders and separates
    levels as it does timesteps. Unscaled (gamma itself, as Janspiry's public SR3 code feeds
    it), every feature turns by at most one radian over [0, 1]: the embedding is nearly linear
    in gamma and levels 1e-3 apart differ in it by about 1e-3. ivanvovk's public WaveGrad code
    scales by 5000; 1000 keeps a continuous model's inputs in the range of a T = 1000 timestep
    model's, so the same network and embedding serve both.
    """
    return NOISE_LEVEL_SCALE * gamma


@dataclasses.dataclass(frozen=True)
class NoiseConditioning:
    """What the network sees of the noise level. `of_level(gamma)` maps a continuous level
    gamma = sqrt(alpha_bar) to its time input; None: it sees the integer timestep
    `s.timesteps[t]`, and only the steps it was trained on. A continuous conditioning trains
    on levels drawn between adjacent steps (`sample_noise_level`) and samples with
    sqrt(alpha_bar_t) of whatever schedule the chain runs on."""

    of_level: Callable | None


# The one table of noise conditionings: config.diffusion.noise_conditioning.
NOISE_CONDITIONINGS = {
    "timestep": NoiseConditioning(None),  # Ho et al.: t
    "sqrt_alpha_bar": NoiseConditioning(scaled_level),  # WaveGrad / SR3: sqrt(alpha_bar)
}


def is_continuous(noise_conditioning: str) -> bool:
    """Whether the network sees a continuous level (and can sample on other schedules)."""
    check_choice("noise_conditioning", noise_conditioning, NOISE_CONDITIONINGS)
    return NOISE_CONDITIONINGS[noise_conditioning].of_level is not None


def model_time(s: Schedule, t, noise_conditioning: str = "timestep", level=None):
    """The network's time input (B,) at indices t of s: `s.timesteps[t]`, or for a continuous
    conditioning of_level(gamma) with gamma = sqrt(alpha_bar_t), or `level` (B,) when given
    (a level drawn in training)."""
    of_level = NOISE_CONDITIONINGS[noise_conditioning].of_level
    if of_level is None:
        if level is not None:
            raise ValueError("a level was given but noise_conditioning 'timestep' takes none")
        return jnp.take(s.timesteps, t)
    return of_level(jnp.take(s.sqrt_alphas_cumprod, t) if level is None else level)


def sample_noise_level(s: Schedule, t, key):
    """gamma (B,) ~ U(sqrt(alpha_bar_t), sqrt(alpha_bar_{t-1})) at indices t, with
    sqrt(alpha_bar_0) = 1 at t = 0 (WaveGrad Alg. 1, SR3 Sec. 2.4).

    Uniform in sqrt(alpha_bar), as WaveGrad and SR3's public code draw it (SR3's paper writes
    the draw uniform in alpha_bar; over one step the two differ by a factor 1 + O(beta) in
    density). Over uniform t the levels cover [sqrt(alpha_bar_T), 1] with no gaps.
    """
    lower = jnp.take(s.sqrt_alphas_cumprod, t)
    upper = jnp.sqrt(jnp.take(s.alphas_cumprod_prev, t))
    u = jax.random.uniform(key, t.shape, lower.dtype)
    return lower + (upper - lower) * u


# --- the reverse process ---------------------------------------------------------------


def _fixed_small(s: Schedule, var_values, t, shape):
    """beta-tilde_t, the posterior's variance (log clipped at t = 0)."""
    return extract(s.posterior_log_variance_clipped, t, shape)


def _fixed_large(s: Schedule, var_values, t, shape):
    """beta_t, with beta-tilde_1 at t = 0 (the original code's choice)."""
    return extract(s.fixed_large_log_variance, t, shape)


def _learned_range(s: Schedule, var_values, t, shape):
    """Improved DDPM eq. 15: log sigma^2 interpolates log beta_t and log beta-tilde_t."""
    min_log = extract(s.posterior_log_variance_clipped, t, shape)
    max_log = extract(jnp.log(s.betas), t, shape)
    frac = (var_values + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


@dataclasses.dataclass(frozen=True)
class VarType:
    """The reverse process's variance: `log_variance(s, var_values, t, shape)`; `learned` ones
    take var_values from C more output channels of the network."""

    log_variance: Callable
    learned: bool = False


# The one table of reverse-process variances.
VAR_TYPES = {
    "fixed_small": VarType(_fixed_small),
    "fixed_large": VarType(_fixed_large),
    "learned_range": VarType(_learned_range, learned=True),
}


def split_model_output(model_output, x_t, var_type: str):
    """(mean part, variance part or None): a learned variance takes C more output channels."""
    channels = x_t.shape[-1]
    learned = VAR_TYPES[var_type].learned
    expected = 2 * channels if learned else channels
    if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != expected:
        raise ValueError(
            f"model output shape {model_output.shape} does not fit x_t {x_t.shape} with "
            f"var_type {var_type!r} (expected {expected} channels)"
        )
    if learned:
        return model_output[..., :channels], model_output[..., channels:]
    return model_output, None


def model_log_variance(s: Schedule, var_values, t, shape, var_type: str):
    """log sigma_t^2 of p(x_{t-1} | x_t) for a variance type (and learned values)."""
    return VAR_TYPES[var_type].log_variance(s, var_values, t, shape)


def p_mean_variance(
    s: Schedule,
    model_output,
    x_t,
    t,
    *,
    parameterization: str = "eps",
    var_type: str = "fixed_large",
    clip_denoised: bool = True,
):
    """Mean and variance of p(x_{t-1} | x_t) from a model output (eq. 11 and its analogues).

    The mean is the posterior mean q(x_{t-1} | x_t, x_0 = pred_x0), which for eps-prediction is
    exactly eq. 11; pred_x0 is clipped to [-1, 1] when clip_denoised. Returns a dict with mean,
    variance, log_variance, pred_x0 and pred_eps (eps consistent with the clipped pred_x0).
    """
    check_options(parameterization=parameterization, var_type=var_type)
    mean_output, var_values = split_model_output(model_output, x_t, var_type)
    log_variance = model_log_variance(s, var_values, t, x_t.shape, var_type)
    pred_x0 = predict_x0(s, mean_output, x_t, t, parameterization)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    if parameterization == "eps" and not clip_denoised:
        pred_eps = mean_output
    else:
        pred_eps = predict_eps_from_x0(s, x_t, t, pred_x0)
    mean, _, _ = q_posterior_mean_variance(s, pred_x0, x_t, t)
    return {
        "mean": mean,
        "variance": jnp.exp(log_variance),
        "log_variance": log_variance,
        "pred_x0": pred_x0,
        "pred_eps": pred_eps,
    }


# --- the variational bound and the losses ----------------------------------------------


def vb_terms_bpd(s: Schedule, out: dict, x0, x_t, t):
    """L_{t-1} of the bound in bits/dim (eq. 5): KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, and
    -log p(x_0 | x_1) under the discretized Gaussian decoder (eq. 13) for t = 0."""
    true_mean, _, true_log_var = q_posterior_mean_variance(s, x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
    kl = kl / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(
        x0, means=out["mean"], log_scales=0.5 * out["log_variance"]
    )
    decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl)


def prior_bpd(s: Schedule, x0):
    """L_T in bits/dim: KL(q(x_T | x_0) || N(0, I)), constant in the model."""
    t = jnp.full((x0.shape[0],), s.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = q_mean_variance(s, x0, t)
    kl = normal_kl(mean, log_variance, jnp.zeros_like(mean), jnp.zeros_like(log_variance))
    return mean_flat(kl) / math.log(2.0)


@dataclasses.dataclass(frozen=True)
class LossType:
    """A training loss from the per-example terms "mse" (L_simple) and "vb" (L_t in bits/dim):
    which it needs, whether the bound's gradient reaches the mean (else only the variance), and
    total(terms, s, x0, hybrid_lambda) -> (B,)."""

    mse: bool
    vb: bool
    vb_trains_mean: bool
    total: Callable


def _simple_total(terms, s: Schedule, x0, hybrid_lambda):
    """Algorithm 1: ||target - output||^2."""
    return terms["mse"]


def _kl_total(terms, s: Schedule, x0, hybrid_lambda):
    """The bound itself, T * L_t + L_T: unbiased for the total bound when t is uniform (eq. 5)."""
    return s.num_timesteps * terms["vb"] + prior_bpd(s, x0)


def _hybrid_total(terms, s: Schedule, x0, hybrid_lambda):
    """Improved DDPM Sec. 3.1: L_simple + lambda T L_t, the bound training only the variance."""
    return terms["mse"] + hybrid_lambda * s.num_timesteps * terms["vb"]


# The one table of training losses.
LOSS_TYPES = {
    "simple": LossType(mse=True, vb=False, vb_trains_mean=False, total=_simple_total),
    "kl": LossType(mse=False, vb=True, vb_trains_mean=True, total=_kl_total),
    "hybrid": LossType(mse=True, vb=True, vb_trains_mean=False, total=_hybrid_total),
}


def training_losses(
    s: Schedule,
    denoise_fn: Callable,
    x0,
    t,
    key,
    *,
    parameterization: str = "eps",
    var_type: str = "fixed_large",
    loss_type: str = "simple",
    hybrid_lambda: float = 0.001,
    model_kwargs: dict | None = None,
    noise_conditioning: str = "timestep",
):
    """Per-example training losses at timesteps t; returns a dict with "loss" (B,) and the
    terms it is made of: "mse" (mean-flat ||target - output||^2, target eps, x0 or v) and "vb"
    (L_t in bits/dim), as LOSS_TYPES[loss_type] combines them.

    With a continuous noise_conditioning, x_t = gamma x_0 + sqrt(1 - gamma^2) eps at a level
    gamma drawn by `sample_noise_level` (key split for it), the network sees that gamma, and
    the target is the one of that level; the loss is then L_simple only (check_options)."""
    check_options(
        parameterization=parameterization,
        var_type=var_type,
        loss_type=loss_type,
        noise_conditioning=noise_conditioning,
    )
    check_timesteps(s, t, x0.shape[0])
    if is_continuous(noise_conditioning):
        noise_key, level_key = jax.random.split(key)
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        gamma = sample_noise_level(s, t, level_key)
        alpha = gamma.reshape((-1,) + (1,) * (x0.ndim - 1))
        sigma = jnp.sqrt(1.0 - jnp.square(alpha))
        x_t = alpha * x0 + sigma * noise
        time = model_time(s, t, noise_conditioning, level=gamma)
        target_fn = functools.partial(
            PARAMETERIZATIONS[parameterization].target, alpha, sigma, x0, noise
        )
    else:
        noise = jax.random.normal(key, x0.shape, x0.dtype)
        x_t = q_sample(s, x0, t, noise)
        time = model_time(s, t, noise_conditioning)
        target_fn = functools.partial(training_target, s, x0, noise, t, parameterization)
    model_output = denoise_fn(x_t, time, **(model_kwargs or {}))
    mean_output, var_values = split_model_output(model_output, x_t, var_type)
    loss = LOSS_TYPES[loss_type]
    terms = {}
    if loss.mse:
        terms["mse"] = mean_flat(jnp.square(target_fn() - mean_output))
    if loss.vb:
        frozen = mean_output if loss.vb_trains_mean else jax.lax.stop_gradient(mean_output)
        vb_output = frozen if var_values is None else jnp.concatenate([frozen, var_values], -1)
        out = p_mean_variance(
            s,
            vb_output,
            x_t,
            t,
            parameterization=parameterization,
            var_type=var_type,
            clip_denoised=False,
        )
        terms["vb"] = vb_terms_bpd(s, out, x0, x_t, t)
    terms["loss"] = loss.total(terms, s, x0, hybrid_lambda)
    return terms


def calc_bpd(
    s: Schedule,
    denoise_fn: Callable,
    x0,
    key,
    *,
    parameterization: str = "eps",
    var_type: str = "fixed_large",
    clip_denoised: bool = True,
    t_batch_size: int | None = None,
    model_kwargs: dict | None = None,
    noise_conditioning: str = "timestep",
):
    """The full variational bound of a batch in bits/dim (eq. 5 summed over all T terms).

    Every term is evaluated with its own noise (key folded with t); the T evaluations run as one
    `lax.map` over t, `t_batch_size` of them vectorised at a time (None: one at a time). The
    network sees `model_time` at each step t: with a continuous noise_conditioning the level
    sqrt(alpha_bar_t) of s, so this is the bound of the chain on s's discrete steps.
    Returns total_bpd, prior_bpd, terms_bpd (sum of L_0..L_{T-1}), decoder_bpd (L_0), each (B,),
    and vb, mse, x0_mse of shape (B, T).
    """
    check_options(
        parameterization=parameterization,
        var_type=var_type,
        noise_conditioning=noise_conditioning,
    )
    batch = x0.shape[0]

    def one_t(t_scalar):
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape, x0.dtype)
        x_t = q_sample(s, x0, t, noise)
        time = model_time(s, t, noise_conditioning)
        model_output = denoise_fn(x_t, time, **(model_kwargs or {}))
        out = p_mean_variance(
            s,
            model_output,
            x_t,
            t,
            parameterization=parameterization,
            var_type=var_type,
            clip_denoised=clip_denoised,
        )
        return (
            vb_terms_bpd(s, out, x0, x_t, t),
            mean_flat(jnp.square(out["pred_eps"] - noise)),
            mean_flat(jnp.square(out["pred_x0"] - x0)),
        )

    ts = jnp.arange(s.num_timesteps, dtype=jnp.int32)
    vb, mse, x0_mse = jax.lax.map(one_t, ts, batch_size=t_batch_size)
    vb, mse, x0_mse = vb.T, mse.T, x0_mse.T
    prior = prior_bpd(s, x0)
    terms = jnp.sum(vb, axis=1)
    return {
        "total_bpd": terms + prior,
        "prior_bpd": prior,
        "terms_bpd": terms,
        "decoder_bpd": vb[:, 0],
        "vb": vb,
        "mse": mse,
        "x0_mse": x0_mse,
    }
