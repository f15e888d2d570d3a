"""A workdir's files: config.json, checkpoints/, metrics.jsonl and tensorboard/.

For train: the saved config.json, checked against SHAPE_FIELDS and INPUT_FIELDS and compared
field by field with a new config, writing it, and MetricsWriter. For the sample and evaluate
CLIs, read-only: the config, the model and schedule it describes, and the EMA parameters of the
newest readable checkpoint (where a resuming train run moves an unreadable checkpoint aside, this
skips it with a warning and tries the next older one; only the EMA parameters and the step are
read, never the optimizer state). `load_classifier` reads a noisy classifier's workdir for
classifier guidance, checked against the model it guides.
"""

from __future__ import annotations

import json
import math
import os
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
METRICS_FILE = "metrics.jsonl"

# Fields that fix the shapes of the parameters: a workdir trained with other values cannot be
# resumed with this config. Checked from config.json before anything compiles; the checkpoint's
# own state tree is compared too (checkpointing.Checkpointer.restore), which catches the rest.
SHAPE_FIELDS = (
    "model.name",
    "model.ch",
    "model.ch_mult",
    "model.num_res_blocks",
    "model.attn_resolutions",
    "model.num_heads",
    "model.num_classes",
    "model.resamp_with_conv",
    "data.image_size",
    "data.num_channels",
    "diffusion.var_type",
    "optim.optimizer",
)
# Fields that fix what the network's inputs mean (same shapes, other semantics), with the value a
# config.json written before the field existed implies.
INPUT_FIELDS = {"diffusion.noise_conditioning": "timestep"}


def saved_config(workdir) -> dict | None:
    """The config.json of `workdir` as a dict (None: there is none)."""
    path = Path(workdir) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _flatten(cfg: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def config_differences(saved: dict, config) -> list[str]:
    """`field: saved -> new` for each field where `config` differs from a saved config."""
    old, new = _flatten(saved), _flatten(json.loads(config.to_json()))
    return [
        f"{field}: {old.get(field)!r} -> {new.get(field)!r}"
        for field in sorted(old.keys() | new.keys())
        if old.get(field) != new.get(field)
    ]


def check_workdir_config(workdir, saved: dict | None, config) -> None:
    """Refuse to resume a workdir whose saved config has other parameter shapes or inputs."""
    if saved is None:
        return
    old, new = _flatten(saved), _flatten(json.loads(config.to_json()))
    defaults = dict.fromkeys(SHAPE_FIELDS) | INPUT_FIELDS
    for field, default in defaults.items():
        old.setdefault(field, default)
        new.setdefault(field, default)
        if old[field] != new[field]:
            raise UserError(
                f"workdir {workdir} was trained with config.{field}={old.get(field)!r} but this "
                f"config has {new.get(field)!r}: use a new --workdir, or pass "
                f"--config.{field}={old.get(field)!r}"
            )


def write_config(workdir, config) -> None:
    Path(workdir).mkdir(parents=True, exist_ok=True)
    _write_atomically(Path(workdir) / CONFIG_FILE, config.to_json(indent=2))


def _write_atomically(path: Path, text: str) -> None:
    """Readers (and a crash) see the old file or the new one, never a partial one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard events, process 0 only.

    Opened at `start_step` (the step the run resumes from), it first drops what a crashed run
    logged after that step, and any line cut short by the crash: those steps are logged again.
    Non-finite values are written as null (metrics.jsonl stays strict JSON).
    """

    def __init__(self, workdir, start_step: int):
        workdir = Path(workdir)
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            path = workdir / METRICS_FILE
            if path.exists():
                _write_atomically(path, "".join(_lines_until(path, start_step)))
            self._jsonl = open(path, "a")
            # purge_step: TensorBoard hides the events a crashed run wrote after start_step.
            self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {
            k: v if not isinstance(v, float) or math.isfinite(v) else None
            for k, v in metrics.items()
        }
        self._jsonl.write(json.dumps({"step": step, **record}, allow_nan=False) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _lines_until(path: Path, step: int) -> list[str]:
    """The complete lines of a metrics.jsonl that log steps <= step."""
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return kept


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
    if config.training.get("objective", "diffusion") not in ("diffusion", "regression"):
        raise UserError(
            f"workdir {workdir} holds a model trained with training.objective="
            f"{config.training.objective!r}, not a diffusion or regression model (a noisy "
            "classifier guides one: see load_classifier)"
        )
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


# What a classifier must share with the diffusion model it guides: the shape of x_t, and the
# schedule that says what x_t at t looks like (and which t the model and classifier are told).
CLASSIFIER_MATCH_FIELDS = (
    "data.image_size",
    "data.num_channels",
    "diffusion.schedule",
    "diffusion.num_timesteps",
)


def check_classifier(workdir, diffusion_config=None):
    """The config of the noisy classifier trained in `workdir` (training.objective
    "classifier"), checked against the diffusion model it is to guide (`diffusion_config`):
    the same CLASSIFIER_MATCH_FIELDS, its num_classes for a class-conditional model, and a
    timestep-conditioned model (the classifier sees the step, not a noise level). A mismatch is
    a UserError naming the field; nothing is read but config.json."""
    config = load_config(workdir)
    objective = config.training.get("objective", "diffusion")
    if objective != "classifier":
        raise UserError(
            f"classifier workdir {workdir} was trained with training.objective={objective!r}, "
            "not 'classifier' (configs/classifier_digits.py trains one)"
        )
    if diffusion_config is not None:
        theirs, ours = _flatten(config.to_dict()), _flatten(diffusion_config.to_dict())
        for field in CLASSIFIER_MATCH_FIELDS:
            if theirs.get(field) != ours.get(field):
                raise UserError(
                    f"classifier workdir {workdir} was trained with config.{field}="
                    f"{theirs.get(field)!r} but the diffusion model has {ours.get(field)!r}"
                )
        model_classes = diffusion_config.model.get("num_classes", 0)
        if model_classes and model_classes != config.model.num_classes:
            raise UserError(
                f"classifier workdir {workdir} has {config.model.num_classes} classes but the "
                f"diffusion model has model.num_classes={model_classes}"
            )
        conditioning = diffusion_config.diffusion.get("noise_conditioning", "timestep")
        if conditioning != "timestep":
            raise UserError(
                f"classifier guidance needs a timestep-conditioned model; this one has "
                f"diffusion.noise_conditioning={conditioning!r}"
            )
    return config


def load_classifier(workdir, diffusion_config=None, *, mesh=None):
    """A noisy classifier trained in `workdir` (training.objective "classifier"), for guidance:
    (apply_fn, params, config) with apply_fn(params, x_t, t) -> logits (B, num_classes), the
    EMA parameters replicated over `mesh` (default: all devices) and the classifier's config.
    With `diffusion_config` (the guided model's), `check_classifier` runs first, before any
    checkpoint is read or anything compiles.
    """
    config = check_classifier(workdir, diffusion_config)
    mesh = parallel.make_mesh() if mesh is None else mesh
    model = models.create_model(training.model_config(config))
    params, _ = _restore_ema_params(Path(workdir) / CHECKPOINT_DIR, model, config, mesh)

    def apply_fn(params, x_t, t):
        return model.apply({"params": params}, x_t, t, train=False)

    return apply_fn, params, config
