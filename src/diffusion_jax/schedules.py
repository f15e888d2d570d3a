"""Noise schedules and the table of coefficients the diffusion process needs.

Time convention (the original DDPM code's, used everywhere in this package): the integer
t in {0, ..., T-1} indexes the tables, and index t holds beta_{t+1} of the paper. So
`alphas_cumprod[t]` is alpha_bar_{t+1}, `alphas_cumprod_prev[0]` is alpha_bar_0 = 1, and the
reverse step at t = 0 is the paper's decoder p(x_0 | x_1).

Tables are computed in float64 with numpy and stored as float32 arrays.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Every per-timestep coefficient of a discrete diffusion, each a float32 array (T,)."""

    betas: jax.Array  # beta_t (Ho et al. eq. 2)
    alphas: jax.Array  # alpha_t = 1 - beta_t
    alphas_cumprod: jax.Array  # alpha_bar_t = prod_{s<=t} alpha_s (eq. 4)
    alphas_cumprod_prev: jax.Array  # alpha_bar_{t-1}, with alpha_bar_0 = 1
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array  # 1 / sqrt(alpha_bar_t)
    sqrt_recipm1_alphas_cumprod: jax.Array  # sqrt(1 / alpha_bar_t - 1)
    posterior_variance: jax.Array  # beta_tilde_t (eq. 7)
    posterior_log_variance_clipped: jax.Array  # log beta_tilde_t, with t=0 set to t=1's value
    posterior_mean_coef1: jax.Array  # coefficient of x_0 in mu_tilde_t (eq. 7)
    posterior_mean_coef2: jax.Array  # coefficient of x_t in mu_tilde_t (eq. 7)
    fixed_large_log_variance: jax.Array  # log sigma_t^2 = log beta_t, t=0 uses beta_tilde_1
    timesteps: jax.Array  # int32: the time the model is conditioned on at each index
    # posterior_mean_coef1/2 of the training step timesteps[t] -> timesteps[t] - 1: what a
    # mean-predicting model's output means (equal to posterior_mean_coef1/2 unless respaced)
    model_mean_coef1: jax.Array
    model_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def _check_num_timesteps(num_timesteps) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
        raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return int(num_timesteps)


def _cosine_alpha_bar(num_timesteps: int, s: float) -> np.ndarray:
    """alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), t = 0..T (Nichol & Dhariwal eq. 17)."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    return np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2


def _linear(T, start, end, **_):
    return np.linspace(start, end, T, dtype=np.float64)


def _quadratic(T, start, end, **_):
    return np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2


def _sigmoid(T, start, end, **_):
    """A sigmoid over [-6, 6], scaled to [start, end]."""
    sig = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T, dtype=np.float64)))
    return sig * (end - start) + start


def _const(T, start, end, **_):
    return np.full(T, end, dtype=np.float64)


def _jsd(T, start, end, **_):
    """1/T, 1/(T-1), ..., 1 (Sohl-Dickstein et al. 2015)."""
    return 1.0 / np.linspace(T, 1, T, dtype=np.float64)


def _warmup(percent: int):
    """beta_end throughout, after a linear warm-up from beta_start over `percent`% of T."""

    def betas(T, start, end, **_):
        out = np.full(T, end, dtype=np.float64)
        warmup = int(T * percent / 100.0)
        out[:warmup] = np.linspace(start, end, warmup, dtype=np.float64)
        return out

    return betas


def _cosine(T, start, end, *, cosine_s, max_beta):
    """Improved DDPM's cosine alpha_bar (eq. 17), betas capped at max_beta."""
    alpha_bar = _cosine_alpha_bar(T, cosine_s)
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


# The one table of beta schedules: name -> betas(T, beta_start, beta_end, *, cosine_s, max_beta).
SCHEDULES = {
    "linear": _linear,
    "quadratic": _quadratic,
    "cosine": _cosine,
    "sigmoid": _sigmoid,
    "const": _const,
    "jsd": _jsd,
    "warmup10": _warmup(10),
    "warmup50": _warmup(50),
}


def get_beta_schedule(
    name: str,
    num_timesteps: int,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> np.ndarray:
    """Betas (float64, (T,)) of a named schedule (a key of SCHEDULES).

    linear, quadratic, sigmoid, const and warmupN use beta_start / beta_end; left unset they are
    DDPM's 1e-4 and 0.02 scaled by 1000 / T (improved DDPM's rule), so T = 1000 gives the paper's
    values and other T keep the same total amount of noise. cosine is improved DDPM's with offset
    cosine_s and betas capped at max_beta; jsd is 1/T, 1/(T-1), ..., 1.
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    scale = 1000.0 / num_timesteps
    start = scale * 1e-4 if beta_start is None else float(beta_start)
    end = scale * 0.02 if beta_end is None else float(beta_end)
    betas = SCHEDULES[name](num_timesteps, start, end, cosine_s=cosine_s, max_beta=max_beta)
    # Only jsd may reach beta = 1 (by design): elsewhere it makes alpha_bar_T = 0 and the
    # x_0 prediction at t = T divides by zero.
    upper_ok = np.all(betas <= 1) if name == "jsd" else np.all(betas < 1)
    if not (np.all(betas > 0) and upper_ok):
        raise ValueError(
            f"schedule {name!r} with T={num_timesteps} gives betas outside (0, 1) "
            f"(min {betas.min():.3g}, max {betas.max():.3g}); use more timesteps or set "
            "beta_start/beta_end explicitly"
        )
    return betas


def from_betas(betas, timesteps=None, model_mean_coefs=None) -> Schedule:
    """Build every table from betas (computed in float64, stored float32).

    `timesteps` (int, (T,)) is the time the model sees at each index: arange(T) for a full
    schedule, the kept original steps for a respaced one; `model_mean_coefs` (two (T,) arrays)
    the posterior-mean coefficients of those original steps (None: this schedule's own).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a 1-D array of length >= 1, got shape {betas.shape}")
    if not (np.all(betas > 0) and np.all(betas <= 1)):
        raise ValueError("betas must lie in (0, 1]")
    num_timesteps = betas.shape[0]
    timesteps = np.arange(num_timesteps) if timesteps is None else np.asarray(timesteps)
    if timesteps.shape != betas.shape:
        raise ValueError(f"timesteps shape {timesteps.shape} != betas shape {betas.shape}")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # posterior_variance[0] is 0: clip the log so the table stays finite (original DDPM code).
    first = posterior_variance[1] if num_timesteps > 1 else betas[0]
    # jsd ends at beta_T = 1, so alpha_bar_T = 0: its 1/alpha_bar entries are inf, as in the
    # original code; every other schedule keeps them finite.
    with np.errstate(divide="ignore"):
        tables = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(np.append(first, posterior_variance[1:])),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev)
            * np.sqrt(alphas)
            / (1.0 - alphas_cumprod),
            fixed_large_log_variance=np.log(np.append(first, betas[1:])),
        )
    # Cast on the host and device_put: jnp.asarray would compile a cast (or, with several
    # devices, a staging program) for every new length, e.g. each respaced step count.
    own = (tables["posterior_mean_coef1"], tables["posterior_mean_coef2"])
    coef1, coef2 = own if model_mean_coefs is None else model_mean_coefs
    tables.update(model_mean_coef1=coef1, model_mean_coef2=coef2)
    arrays = {k: jax.device_put(np.asarray(v, dtype=np.float32)) for k, v in tables.items()}
    return Schedule(**arrays, timesteps=jax.device_put(np.asarray(timesteps, dtype=np.int32)))


def make_schedule(name: str, num_timesteps: int, **kwargs) -> Schedule:
    """The Schedule of a named beta schedule (see get_beta_schedule for the names and options)."""
    return from_betas(get_beta_schedule(name, num_timesteps, **kwargs))


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """`num_steps` indices evenly spread over [0, T-1], both ends included, increasing."""
    num_timesteps = _check_num_timesteps(num_timesteps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an int, got {num_steps!r}")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, T={num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return np.array([num_timesteps - 1])
    return np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)


def respace(schedule: Schedule, timesteps) -> Schedule:
    """The schedule restricted to the kept indices `timesteps` (improved DDPM, Sec. 4).

    New betas are 1 - alpha_bar[t_i] / alpha_bar[t_{i-1}], so alphas_cumprod at the kept steps
    are unchanged and the marginals q(x_t | x_0) are the same. alpha_bar is recomputed in
    float64 from the float32 betas.
    """
    timesteps = np.asarray(timesteps)
    num_timesteps = schedule.num_timesteps
    if timesteps.ndim != 1 or timesteps.size == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {timesteps.shape}")
    if not np.issubdtype(timesteps.dtype, np.integer):
        raise ValueError(f"timesteps must be integers, got dtype {timesteps.dtype}")
    if timesteps.min() < 0 or timesteps.max() >= num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps}), got {timesteps.tolist()}")
    if np.any(np.diff(timesteps) <= 0):
        raise ValueError("timesteps must be strictly increasing")
    alphas_cumprod = np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64))
    kept = alphas_cumprod[timesteps]
    betas = 1.0 - kept / np.append(1.0, kept[:-1])
    original = np.asarray(schedule.timesteps)[timesteps]
    coefs = [
        np.asarray(c)[timesteps] for c in (schedule.model_mean_coef1, schedule.model_mean_coef2)
    ]
    return from_betas(betas, timesteps=original, model_mean_coefs=coefs)


def _schedule_args(name: str, num_timesteps: int, fields) -> tuple[str, int, dict]:
    """(name, T, get_beta_schedule's keyword arguments) of a schedule config: its beta_start and
    beta_end where set (None or absent: get_beta_schedule's defaults for T)."""
    kwargs = {k: fields.get(k) for k in ("beta_start", "beta_end") if fields.get(k) is not None}
    return name, num_timesteps, kwargs


def training_schedule_args(config) -> tuple[str, int, dict]:
    """(name, T, kwargs) of the training schedule: config.diffusion's schedule, num_timesteps,
    beta_start and beta_end."""
    d = config.diffusion
    return _schedule_args(d.schedule, d.num_timesteps, d)


def sampling_schedule_args(config) -> tuple[str, int, dict] | None:
    """(name, T, kwargs) of config.sampling.schedule, or None when it names no schedule (the
    chain then runs on the training schedule)."""
    spec = config.sampling.get("schedule") or {}
    if not spec.get("name"):
        return None
    return _schedule_args(spec["name"], spec.get("num_timesteps"), spec)


def training_schedule(config) -> Schedule:
    """The Schedule the model is trained on (training_schedule_args)."""
    name, num_timesteps, kwargs = training_schedule_args(config)
    return make_schedule(name, num_timesteps, **kwargs)


def sampling_schedule(config, training: Schedule | None = None) -> Schedule:
    """The Schedule the reverse chain runs on, before the sampler respaces it to its steps:
    config.sampling.schedule when it names one (SR3: a model conditioned on the continuous
    level sqrt(alpha_bar) samples on another schedule than it was trained on), else the
    training schedule (`training` when given, saving its construction)."""
    args = sampling_schedule_args(config)
    if args is None:
        return training_schedule(config) if training is None else training
    name, num_timesteps, kwargs = args
    return make_schedule(name, num_timesteps, **kwargs)
