"""Open a workdir written by `diffusion_jax.train` (or by the diffusers importer): its config,
the model and schedule it describes, and the EMA parameters of its newest readable checkpoint.

Read-only, for the sample and evaluate CLIs: where a resuming train run moves an unreadable
checkpoint aside, this skips it with a warning and tries the next older one. Only the EMA
parameters and the step are read from the checkpoint, never the optimizer state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
from absl import logging
from ml_collections import config_dict

from diffusion_jax import checkpointing, models, parallel, schedules, training
from diffusion_jax.cli import UserError
from diffusion_jax.validation import ConfigError, validate_config

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class Workdir(NamedTuple):
    config: config_dict.ConfigDict
    model: Any  # a flax.linen Module
    schedule: schedules.Schedule
    params: dict  # the EMA parameters, replicated over the mesh
    step: int  # optimizer steps taken when the checkpoint was saved


def load_config(workdir) -> config_dict.ConfigDict:
    """The experiment config saved in `workdir`, checked like train checks its config."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"workdir {workdir} does not exist")
    path = workdir / CONFIG_FILE
    if not path.is_file():
        raise UserError(
            f"{path} not found: {workdir} is not a workdir written by diffusion_jax.train"
        )
    try:
        config = config_dict.ConfigDict(json.loads(path.read_text()))
        validate_config(config)
    except (json.JSONDecodeError, ConfigError) as e:
        raise UserError(f"{path}: {e}") from None
    return config


def load_workdir(workdir, *, config=None, mesh=None) -> Workdir:
    """Config, model, schedule and EMA params (replicated over `mesh`, default: all devices).

    `config` saves reading config.json again when the caller already has it from load_config.
    """
    config = load_config(workdir) if config is None else config
    mesh = parallel.make_mesh() if mesh is None else mesh
    model = models.create_model(training.model_config(config))
    params, step = _restore_ema_params(Path(workdir) / CHECKPOINT_DIR, model, config, mesh)
    return Workdir(config, model, training.make_schedule(config), params, step)


def _restore_ema_params(directory: Path, model, config, mesh) -> tuple[dict, int]:
    if not directory.is_dir():
        raise UserError(f"no checkpoint in {directory}: train first with diffusion_jax.train")
    optimizer, _ = training.make_optimizer(config)
    abstract = jax.eval_shape(
        lambda k: training.init_state(model, optimizer, config, k), jax.random.key(0)
    )
    repl = parallel.replicated(mesh)
    wanted = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
        {"step": abstract.step, "ema_params": abstract.ema_params},
    )
    ckpt = checkpointing.Checkpointer(directory)
    try:
        steps = ckpt.steps()
        if not steps:
            raise UserError(f"no checkpoint in {directory}: train first with diffusion_jax.train")
        problems = []
        for step in reversed(steps):
            try:
                fields, _ = ckpt.restore_fields(step, wanted)
                return fields["ema_params"], int(fields["step"])
            except Exception as e:  # noqa: BLE001 - any read failure means "unreadable"
                problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                logging.warning("checkpoint %s/%d cannot be read (%s)", directory, step, problem)
                problems.append(f"step {step}: {problem}")
    finally:
        ckpt.close()
    raise checkpointing.CheckpointError(
        f"no checkpoint in {directory} could be read with this workdir's config ("
        + "; ".join(problems)
        + ")"
    )
