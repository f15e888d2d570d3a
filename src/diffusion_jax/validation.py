"""Checks of a whole experiment config at the CLI boundary, before anything compiles.

Each failure is one ConfigError whose message names the field, the value and what is allowed.
`validate_config` uses numpy and plain Python only, so it runs before JAX starts a backend (and
before a multi-process run joins its peers); `check_devices` needs the device count.
"""

from __future__ import annotations

import numpy as np

from diffusion_jax import diffusion, samplers, schedules, training

NAN_POLICIES = ("stop", "skip")


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
        _fail("data.dataset", dataset, "'digits', 'folder:<path>' or a tfds dataset name")
    _int(config, "data.image_size", 1)
    _choice(config, "data.num_channels", (1, 3))
    if not isinstance(config.data.get("cache_in_memory", False), bool):
        _fail("data.cache_in_memory", config.data.cache_in_memory, "True or False")
    # Diffusion.
    _choice(config, "diffusion.schedule", schedules.SCHEDULES)
    _int(config, "diffusion.num_timesteps", 2)
    _choice(config, "diffusion.parameterization", diffusion.PARAMETERIZATIONS)
    _check_schedule(config.diffusion)
    _choice(config, "diffusion.var_type", diffusion.VAR_TYPES)
    _choice(config, "diffusion.loss_type", diffusion.LOSS_TYPES)
    try:
        diffusion.check_options(
            var_type=config.diffusion.var_type, loss_type=config.diffusion.loss_type
        )
    except ValueError as e:
        raise ConfigError(f"config.diffusion.loss_type: {e}") from None
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
    # Sampling.
    _choice(config, "sampling.sampler", samplers.SAMPLERS)
    _int(config, "sampling.steps", 1)
    if config.sampling.steps > config.diffusion.num_timesteps:
        _fail(
            "sampling.steps",
            config.sampling.steps,
            f"at most diffusion.num_timesteps={config.diffusion.num_timesteps}",
        )
    _float(config, "sampling.eta", 0.0, 1.0)
    _int(config, "sampling.batch_size", 1)
    # Model: the model's own checks, with the resolved channels and size.
    from diffusion_jax import models

    try:
        models.create_model(training.model_config(config))
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
    _check_unconditional(config.model)
    _check_conditioning(config)
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


def _str(config, field: str) -> None:
    value = _get(config, field)
    if not isinstance(value, str):
        _fail(field, value, "a string")


def _check_schedule(d) -> None:
    """The betas must be valid, and eps-prediction needs alpha_bar > 0 at the last step."""
    try:
        betas = schedules.get_beta_schedule(d.schedule, d.num_timesteps)
    except ValueError as e:
        reason = str(e).split(";")[0]
        _fail("diffusion.num_timesteps", d.num_timesteps, f"a T {d.schedule!r} allows: {reason}")
    if d.parameterization == "eps" and np.float32(np.prod(1.0 - betas)) == 0.0:
        _fail(
            "diffusion.num_timesteps",
            d.num_timesteps,
            f"a T whose {d.schedule!r} schedule keeps alpha_bar > 0 at the last step (here beta "
            "reaches 1, where eps-prediction cannot recover x0 and samples are NaN); use a larger "
            "T, another schedule, or parameterization 'v' or 'x0'",
        )


# What conditioning needs that the train step does not feed yet: its batches hold images and
# labels only.
_CONDITIONING = {
    "cond_channels": "image conditioning needs conditioning images",
}


def _check_conditioning(config) -> None:
    """p_uncond in [0, 1] and guidance >= 0; both only for a class-conditional model. Configs
    saved before these fields existed have neither (read with .get)."""
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


def _check_unconditional(model) -> None:
    for field, needs in _CONDITIONING.items():
        value = model.get(field, 0)
        if value:
            _fail(
                f"model.{field}",
                value,
                f"0: {needs}, which the train step does not feed to the model yet",
            )
