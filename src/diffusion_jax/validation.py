"""Checks of a whole experiment config at the CLI boundary, before anything compiles.

Each failure is one ConfigError whose message names the field, the value and what is allowed.
`validate_config` uses numpy and plain Python only, so it runs before JAX starts a backend (and
before a multi-process run joins its peers); `check_devices` needs the device count.
"""

from __future__ import annotations

import numpy as np

from diffusion_jax import degradations, diffusion, samplers, schedules, training

NAN_POLICIES = ("stop", "skip")

# How far (in gamma = sqrt(alpha_bar)) a sampling schedule's smallest level may fall below the
# smallest level the model was trained on: 1e-3 is one unit of the network's time input
# (diffusion.scaled_level), the spacing of adjacent integer timesteps of a T = 1000 model, well
# inside what the embedding interpolates; float32 rounding of the levels is about 1e-7.
LEVEL_SLACK = 1e-3


class ConfigError(ValueError):
    """A bad config value; the message is meant to be shown to the user as it is."""


def _fail(field: str, value, allowed: str):
    raise ConfigError(f"config.{field}={value!r} is invalid: expected {allowed}")


def _choice(config, field: str, allowed) -> None:
    value = _get(config, field)
    if value not in allowed:
        _fail(field, value, "one of " + ", ".join(map(repr, allowed)))


def _int(config, field: str, minimum: int) -> None:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field, value, f"an integer >= {minimum}")


def _float(config, field: str, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    value = _get(config, field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        _fail(field, value, f"a number in {left}{lo}, {hi}{right}")


def _get(config, field: str):
    node = config
    for part in field.split("."):
        if part not in node:
            raise ConfigError(f"config.{field} is missing")
        node = node[part]
    return node


def validate_config(config, *, num_devices: int | None = None, process_count: int = 1) -> None:
    """Raise ConfigError on the first bad field of an experiment config.

    With num_devices, also `check_devices(config, num_devices, process_count)`.
    """
    _int(config, "seed", 0)
    # Data.
    dataset = _get(config, "data.dataset")
    if not isinstance(dataset, str) or not dataset:
        _fail("data.dataset", dataset, "'digits', 'photos', 'folder:<path>' or a tfds dataset name")
    _int(config, "data.image_size", 1)
    _choice(config, "data.num_channels", (1, 3))
    if not isinstance(config.data.get("cache_in_memory", False), bool):
        _fail("data.cache_in_memory", config.data.cache_in_memory, "True or False")
    # Diffusion.
    _choice(config, "diffusion.schedule", schedules.SCHEDULES)
    _int(config, "diffusion.num_timesteps", 2)
    _choice(config, "diffusion.parameterization", diffusion.PARAMETERIZATIONS)
    for field in ("beta_start", "beta_end"):
        if config.diffusion.get(field) is not None:
            _float(config, f"diffusion.{field}", 0.0, 1.0, lo_open=True, hi_open=True)
    _check_schedule(config)
    _choice(config, "diffusion.var_type", diffusion.VAR_TYPES)
    _choice(config, "diffusion.loss_type", diffusion.LOSS_TYPES)
    try:
        diffusion.check_options(
            var_type=config.diffusion.var_type, loss_type=config.diffusion.loss_type
        )
    except ValueError as e:
        raise ConfigError(f"config.diffusion.loss_type: {e}") from None
    # Absent from the config.json of workdirs written before it existed: "timestep".
    noise_conditioning = config.diffusion.get("noise_conditioning", "timestep")
    if noise_conditioning not in diffusion.NOISE_CONDITIONINGS:
        _choice(config, "diffusion.noise_conditioning", diffusion.NOISE_CONDITIONINGS)
    try:
        diffusion.check_options(
            parameterization=config.diffusion.parameterization,
            var_type=config.diffusion.var_type,
            loss_type=config.diffusion.loss_type,
            noise_conditioning=noise_conditioning,
        )
    except ValueError as e:
        raise ConfigError(f"config.diffusion.noise_conditioning: {e}") from None
    _float(config, "diffusion.hybrid_lambda", 0.0, float("inf"))
    # Optimisation.
    _choice(config, "optim.optimizer", tuple(training.OPTIMIZERS))
    _float(config, "optim.lr", 0.0, 1.0, lo_open=True)
    _int(config, "optim.warmup_steps", 0)
    _choice(config, "optim.lr_schedule", tuple(training.LR_SCHEDULES))
    _float(config, "optim.grad_clip", 0.0, float("inf"))
    _float(config, "optim.ema_decay", 0.0, 1.0, hi_open=True)
    _float(config, "optim.beta1", 0.0, 1.0, hi_open=True)
    _float(config, "optim.beta2", 0.0, 1.0, hi_open=True)
    _float(config, "optim.eps", 0.0, 1.0, lo_open=True)
    # Training.
    for field in ("batch_size", "num_train_steps", "log_every", "checkpoint_every"):
        _int(config, f"training.{field}", 1)
    _int(config, "training.sample_every", 0)
    _int(config, "training.keep_checkpoints", 1)
    _int(config, "training.num_preview_samples", 1)
    _choice(config, "training.nan_policy", NAN_POLICIES)
    _check_objective(config)
    # Sampling.
    _choice(config, "sampling.sampler", samplers.SAMPLERS)
    _int(config, "sampling.steps", 1)
    sampling_timesteps = _check_sampling_schedule(config)
    limit = ("sampling.schedule", sampling_timesteps)
    if sampling_timesteps is None:
        limit = ("diffusion", config.diffusion.num_timesteps)
    if config.sampling.steps > limit[1]:
        _fail(
            "sampling.steps", config.sampling.steps, f"at most {limit[0]}.num_timesteps={limit[1]}"
        )
    _float(config, "sampling.eta", 0.0, 1.0)
    _int(config, "sampling.batch_size", 1)
    _check_conditioning(config)
    # Model: the model's own checks, with the resolved channels and size.
    from diffusion_jax import models

    try:
        models.create_model(training.model_config(config))
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
    # Multi-process settings: checked before joining, so a typo cannot leave peers waiting.
    _str(config, "distributed.coordinator_address")
    _int(config, "distributed.num_processes", 1)
    process_id = _get(config, "distributed.process_id")
    num_processes = config.distributed.num_processes
    if isinstance(process_id, bool) or not isinstance(process_id, int):
        _fail("distributed.process_id", process_id, f"an integer in [0, {num_processes - 1}]")
    if not 0 <= process_id < num_processes:
        _fail("distributed.process_id", process_id, f"an integer in [0, {num_processes - 1}]")
    for field in ("initialization_timeout", "heartbeat_timeout"):
        if field in config.distributed:
            _int(config, f"distributed.{field}", 1)
    if num_devices is not None:
        check_devices(config, num_devices=num_devices, process_count=process_count)


def check_devices(config, *, num_devices: int, process_count: int = 1) -> None:
    """The global batch must split evenly over the devices and the processes."""
    batch_size = config.training.batch_size
    if batch_size % num_devices:
        _fail(
            "training.batch_size",
            batch_size,
            f"a multiple of the {num_devices} devices JAX sees (the global batch is split evenly)",
        )
    if batch_size % process_count:
        _fail("training.batch_size", batch_size, f"a multiple of the {process_count} processes")


def _check_objective(config) -> None:
    """training.objective names an OBJECTIVES entry that trains config.model.name; a
    classifier's t_cutoff (0 = every t) lies in [0, T]."""
    objective = config.training.get("objective", "diffusion")
    if objective not in training.OBJECTIVES:
        allowed = "one of " + ", ".join(map(repr, training.OBJECTIVES))
        _fail("training.objective", objective, allowed)
    models = training.OBJECTIVES[objective].models
    name = config.model.get("name")
    if name not in models:
        _fail(
            "model.name",
            name,
            f"one of {', '.join(map(repr, models))} for training.objective={objective!r}",
        )
    if objective != "diffusion" and config.training.sample_every:
        _fail(
            "training.sample_every",
            config.training.sample_every,
            f"0 for training.objective={objective!r}: only a diffusion model draws samples",
        )
    if "t_cutoff" in config.training:
        _int(config, "training.t_cutoff", 0)
        if config.training.t_cutoff > config.diffusion.num_timesteps:
            _fail(
                "training.t_cutoff",
                config.training.t_cutoff,
                f"at most diffusion.num_timesteps={config.diffusion.num_timesteps} (0 = every t)",
            )


def _str(config, field: str) -> None:
    value = _get(config, field)
    if not isinstance(value, str):
        _fail(field, value, "a string")


def _betas(args, prefix: str, parameterization: str) -> np.ndarray:
    """The betas of schedule args (name, T, kwargs) from the schedules.*_schedule_args
    functions, whose fields sit under `prefix`; valid, and with alpha_bar > 0 at the last step
    for eps-prediction."""
    name, num_timesteps, kwargs = args
    try:
        betas = schedules.get_beta_schedule(name, num_timesteps, **kwargs)
    except ValueError as e:
        reason = str(e).split(";")[0]
        _fail(f"{prefix}num_timesteps", num_timesteps, f"a T {name!r} allows: {reason}")
    if parameterization == "eps" and np.float32(np.prod(1.0 - betas)) == 0.0:
        _fail(
            f"{prefix}num_timesteps",
            num_timesteps,
            f"a T whose {name!r} schedule keeps alpha_bar > 0 at the last step (here beta "
            "reaches 1, where eps-prediction cannot recover x0 and samples are NaN); use a larger "
            "T, another schedule, or parameterization 'v' or 'x0'",
        )
    return betas


def _check_schedule(config) -> np.ndarray:
    """The training schedule's betas, valid (see _betas)."""
    args = schedules.training_schedule_args(config)
    return _betas(args, "diffusion.", config.diffusion.parameterization)


def _check_sampling_schedule(config) -> int | None:
    """config.sampling.schedule, when it names one: a valid schedule, for a model conditioned
    on a continuous level, whose levels sqrt(alpha_bar) lie in the trained range. Returns its
    T (None: the chain runs on the training schedule).

    Training draws levels over [sqrt(alpha_bar_T), 1] of the training schedule
    (diffusion.sample_noise_level, up to sqrt(alpha_bar_0) = 1 at t = 0), so a sampling
    schedule's largest level sqrt(alpha_bar_1) < 1 is always inside it; its smallest,
    sqrt(alpha_bar_T), must not fall below the training one's by more than LEVEL_SLACK.
    """
    spec = config.sampling.get("schedule") or {}
    name = spec.get("name", "")
    if not name:
        return None
    if name not in schedules.SCHEDULES:
        _fail(
            "sampling.schedule.name",
            name,
            "'' (the training schedule) or one of " + ", ".join(map(repr, schedules.SCHEDULES)),
        )
    noise_conditioning = config.diffusion.get("noise_conditioning", "timestep")
    if not diffusion.is_continuous(noise_conditioning):
        _fail(
            "sampling.schedule.name",
            name,
            f"'' with diffusion.noise_conditioning={noise_conditioning!r}: a model conditioned "
            "on timesteps knows only its training schedule's steps (sample on fewer of them with "
            "sampling.steps); another schedule needs noise_conditioning 'sqrt_alpha_bar'",
        )
    _int(config, "sampling.schedule.num_timesteps", 1)
    for field in ("beta_start", "beta_end"):
        if spec.get(field) is not None:
            _float(config, f"sampling.schedule.{field}", 0.0, 1.0, lo_open=True, hi_open=True)
    args = schedules.sampling_schedule_args(config)
    betas = _betas(args, "sampling.schedule.", config.diffusion.parameterization)
    train = _check_schedule(config)
    lowest, trained = np.sqrt(np.prod(1.0 - betas)), np.sqrt(np.prod(1.0 - train))
    if lowest < trained - LEVEL_SLACK:
        _fail(
            "sampling.schedule",
            spec.to_dict() if hasattr(spec, "to_dict") else dict(spec),
            f"noise levels the model was trained on: its smallest sqrt(alpha_bar) is "
            f"{lowest:.3g}, below the training schedule's smallest {trained:.3g} (slack "
            f"{LEVEL_SLACK:g}); use fewer or smaller betas, or train to a higher noise level",
        )
    return args[1]


def _check_conditioning(config) -> None:
    """p_uncond in [0, 1] and guidance >= 0, both only for a class-conditional model; the
    degradation a DEGRADATIONS name (or "") that fits the image size, required by the
    regression objective and the refiner. Configs saved before these fields existed have none
    of them (read with .get)."""
    num_classes = config.model.get("num_classes", 0)
    p_uncond = config.get("conditioning", {}).get("p_uncond", 0.0)
    if "conditioning" in config and "p_uncond" in config.conditioning:
        _float(config, "conditioning.p_uncond", 0.0, 1.0)
    if p_uncond and not num_classes:
        _fail(
            "conditioning.p_uncond",
            p_uncond,
            "0 for an unconditional model (model.num_classes=0): it drops class labels",
        )
    guidance = config.sampling.get("guidance", 0.0)
    if "guidance" in config.sampling:
        _float(config, "sampling.guidance", 0.0, float("inf"))
    if guidance and not num_classes:
        _fail(
            "sampling.guidance",
            guidance,
            "0 for an unconditional model (model.num_classes=0): classifier-free guidance "
            "needs a class-conditional model",
        )
    name = degradations.configured(config)
    if name:
        try:
            degradations.check_config(name, config.conditioning, config.data.image_size)
        except ValueError as e:
            field = "conditioning.degradation" if name not in degradations.DEGRADATIONS else ""
            raise ConfigError(f"config.{field or 'conditioning'}: {e}") from None
    objective = config.training.get("objective", "diffusion")
    needs_image = objective == "regression" or config.model.get("name") == "refiner"
    if needs_image and not name:
        _fail(
            "conditioning.degradation",
            name,
            f"one of {', '.join(map(repr, degradations.DEGRADATIONS))}: "
            f"{'the regression objective' if objective == 'regression' else 'a refiner'} "
            "predicts the image from its conditioning image",
        )
    if name and objective == "classifier":
        _fail("conditioning.degradation", name, "'' for a noisy classifier (it sees x_t alone)")
