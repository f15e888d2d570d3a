"""The train CLI end to end: what a workdir holds, resuming, exact resume, bad input.

The CLI runs in subprocesses (8 emulated devices, like the in-process runs, so both compile
the same program); the exact-resume and bad-config tables run in-process through train.train.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from train_harness import (
    BASE_VARIANT,
    assert_states_equal,
    checkpoint_steps,
    cli_command,
    cli_env,
    load_state,
    losses,
    read_metrics,
    reference_run,
    run_cli,
    tiny_config,
)

from diffusion_jax import cli, train
from diffusion_jax.validation import ConfigError

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "steps_per_sec", "examples_per_sec"}


@pytest.mark.slow
def test_cli_trains_then_resumes_with_more_steps(tmp_path):
    workdir = tmp_path / "run"
    first = run_cli(
        workdir,
        {"training.num_train_steps": 4, "training.checkpoint_every": 2, "training.sample_every": 4},
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((workdir / "config.json").read_text())["training"]["num_train_steps"] == 4
    assert checkpoint_steps(workdir) == [2, 4]
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert METRIC_KEYS <= row.keys()
        assert all(np.isfinite(row[k]) for k in METRIC_KEYS)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    with Image.open(workdir / "samples" / "step_000004.png") as grid:
        pixels = np.asarray(grid)
    assert pixels.std() > 0, "the preview grid is blank"
    assert "invalid value" not in first.stderr  # no NaN sample cast to uint8

    second = run_cli(workdir, {"training.num_train_steps": 6, "training.checkpoint_every": 2})
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 4" in second.stderr
    assert "new run" not in second.stderr
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]
    assert checkpoint_steps(workdir) == [4, 6]  # keep_checkpoints=2
    assert int(load_state(workdir)["step"]) == 6


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def test_interrupted_run_resumes_exactly(tmp_path, reference):
    """Train to 5 and stop; then to 12: the same state as one run to 12, bit for bit."""
    workdir = tmp_path / "run"
    train.train(tiny_config({"training.num_train_steps": 5}), workdir)
    assert checkpoint_steps(workdir) == [4, 5]
    train.train(tiny_config(), workdir)

    state = load_state(workdir)
    assert int(state["step"]) == 12
    assert_states_equal(state, load_state(reference))  # params, EMA, Adam moments, counters
    assert losses(workdir) == losses(reference)  # steps 6..12 came after the restart


def _count_compiles():
    """A listener counting JAX compilations (and its remover)."""
    events = []

    def listener(event, duration, **kwargs):
        if "compile" in event:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events, lambda: jax.monitoring.unregister_event_duration_listener(listener)


# (overrides, substrings the one-line message must contain: field, value, allowed range)
BAD_CONFIGS = [
    ({"diffusion.schedule": "cosinus"}, ["diffusion.schedule", "'cosinus'", "'cosine'"]),
    ({"diffusion.parameterization": "score"}, ["parameterization", "'score'", "'eps'"]),
    ({"diffusion.var_type": "learned"}, ["var_type", "'learned'", "'learned_range'"]),
    ({"diffusion.loss_type": "l1"}, ["loss_type", "'l1'", "'hybrid'"]),
    ({"optim.optimizer": "sgd"}, ["optim.optimizer", "'sgd'", "'adamw'"]),
    ({"optim.lr_schedule": "step"}, ["lr_schedule", "'step'", "'cosine'"]),
    ({"training.nan_policy": "ignore"}, ["nan_policy", "'ignore'", "'skip'"]),
    ({"sampling.sampler": "euler"}, ["sampling.sampler", "'euler'", "'ddim'"]),
    ({"diffusion.num_timesteps": 1}, ["num_timesteps", "=1 ", ">= 2"]),
    (
        {"diffusion.schedule": "linear", "diffusion.num_timesteps": 10},
        ["num_timesteps", "=10 ", "betas outside (0, 1)"],
    ),
    (
        {"diffusion.schedule": "linear", "diffusion.num_timesteps": 20},
        ["num_timesteps", "=20 ", "betas outside (0, 1)"],
    ),
    ({"diffusion.schedule": "jsd"}, ["num_timesteps", "alpha_bar > 0"]),
    ({"training.batch_size": 0}, ["training.batch_size", "=0 ", ">= 1"]),
    ({"training.batch_size": -8}, ["training.batch_size", "=-8 ", ">= 1"]),
    ({"training.batch_size": 12}, ["training.batch_size", "=12 ", "multiple of the 8 devices"]),
    ({"training.num_train_steps": 0}, ["num_train_steps", "=0 ", ">= 1"]),
    ({"training.log_every": 0}, ["log_every", "=0 ", ">= 1"]),
    ({"training.checkpoint_every": -1}, ["checkpoint_every", "=-1 ", ">= 1"]),
    ({"training.keep_checkpoints": 0}, ["keep_checkpoints", "=0 ", ">= 1"]),
    ({"training.sample_every": -5}, ["sample_every", "=-5 ", ">= 0"]),
    ({"data.image_size": 0}, ["data.image_size", "=0 ", ">= 1"]),
    ({"data.num_channels": 2}, ["num_channels", "=2 ", "1, 3"]),
    (
        {"data.image_size": 10, "model.ch_mult": (1, 2, 2)},
        ["image_size=10", "not divisible by", "4"],
    ),
    ({"model.attn_resolutions": (3,)}, ["attn_resolutions=(3,)", "never occur", "(8,)"]),
    ({"model.num_groups": 5}, ["ch=32", "num_groups=5", "divisible"]),
    ({"model.ch_mult": ()}, ["ch_mult=()", "non-empty"]),
    ({"model.dropout": 1.0}, ["dropout=1.0", "[0, 1)"]),
    ({"optim.ema_decay": 1.0}, ["ema_decay", "=1.0 ", "[0.0, 1.0)"]),
    ({"optim.ema_decay": -0.1}, ["ema_decay", "=-0.1 ", "[0.0, 1.0)"]),
    ({"optim.lr": 0.0}, ["optim.lr", "=0.0 ", "(0.0, 1.0]"]),
    ({"optim.lr": -1e-3}, ["optim.lr", "=-0.001 ", "(0.0, 1.0]"]),
    ({"optim.beta2": 1.0}, ["beta2", "=1.0 ", "[0.0, 1.0)"]),
    ({"optim.warmup_steps": -1}, ["warmup_steps", "=-1 ", ">= 0"]),
    ({"optim.grad_clip": -1.0}, ["grad_clip", "=-1.0 ", "[0.0, inf]"]),
    ({"seed": -1}, ["config.seed", "=-1 ", ">= 0"]),
    ({"sampling.steps": 41}, ["sampling.steps", "=41 ", "at most diffusion.num_timesteps=40"]),
    ({"sampling.steps": 0}, ["sampling.steps", "=0 ", ">= 1"]),
    ({"sampling.eta": -0.5}, ["sampling.eta", "=-0.5 ", "[0.0, 1.0]"]),
    ({"data.dataset": ""}, ["data.dataset", "''", "'digits'"]),
    ({"data.cache_in_memory": 1}, ["data.cache_in_memory", "=1 ", "True or False"]),
    ({"data.dataset": "folder:/no/such/dir"}, ["data.dataset", "/no/such/dir", "does not exist"]),
    ({"data.dataset": "no_such_dataset_xyz"}, ["data.dataset", "no_such_dataset_xyz", "unknown"]),
    ({"distributed.num_processes": 0}, ["num_processes", "=0 ", ">= 1"]),
    ({"distributed.process_id": 1}, ["process_id", "=1 ", "[0, 0]"]),
    ({"distributed.heartbeat_timeout": 0}, ["heartbeat_timeout", "=0 ", ">= 1"]),
    ({"model.num_classes": 7}, ["model.num_classes=7", "'digits' has 10 classes"]),
    ({"model.num_classes": -1}, ["num_classes=-1", ">= 0"]),
    ({"conditioning.p_uncond": 0.1}, ["conditioning.p_uncond", "=0.1 ", "unconditional"]),
    (
        {"model.num_classes": 10, "conditioning.p_uncond": 1.5},
        ["conditioning.p_uncond", "=1.5 ", "[0.0, 1.0]"],
    ),
    ({"sampling.guidance": 2.0}, ["sampling.guidance", "=2.0 ", "unconditional"]),
    (
        {"model.num_classes": 10, "sampling.guidance": -1.0},
        ["sampling.guidance", "=-1.0 ", "[0.0, inf]"],
    ),
    ({"conditioning.degradation": "jpeg"}, ["conditioning.degradation", "'jpeg'", "'sr'"]),
    ({"conditioning.degradation": "blur"}, ["conditioning.blur_sigma", "None"]),
    (
        {"conditioning.degradation": "sr", "conditioning.sr_factor": 3},
        ["conditioning.sr_factor=3", "image_size=8"],
    ),
    ({"training.objective": "regression"}, ["conditioning.degradation", "regression"]),
    ({"model.name": "refiner"}, ["conditioning.degradation", "refiner"]),
]


@pytest.mark.parametrize(
    "overrides, expected", BAD_CONFIGS, ids=[",".join(o) for o, _ in BAD_CONFIGS]
)
def test_bad_config_is_one_clear_error_before_any_compile(tmp_path, overrides, expected):
    compiles, stop_counting = _count_compiles()
    try:
        with pytest.raises((ConfigError, train.UserError)) as info:
            train.train(tiny_config(overrides), tmp_path / "run")
    finally:
        stop_counting()
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert not compiles, f"compiled before rejecting the config: {compiles}"
    assert not (tmp_path / "run").exists(), "a rejected run left a workdir behind"


def test_cli_without_workdir_trains_in_runs_named_after_the_config(tmp_path):
    command = [
        a for a in cli_command("unused", {"training.num_train_steps": 1}) if "--workdir" not in a
    ]
    result = subprocess.run(
        command, env=cli_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The config file's name and its variant (the harness trains configs/ddpm_digits.py:short).
    name = f"ddpm_digits_{BASE_VARIANT}"
    assert re.search(rf"workdir: runs/{name}$", result.stderr, re.MULTILINE), result.stderr
    assert checkpoint_steps(tmp_path / "runs" / name) == [1]


@pytest.mark.parametrize(
    "config_filename, workdir",
    [
        ("configs/ddpm_cifar.py", "runs/ddpm_cifar"),
        ("/abs/path/x.py:small", "runs/x_small"),
        ("configs/x.py:a,b/c", "runs/x_a_b_c"),
    ],
)
def test_default_workdir_is_runs_and_the_config_file_stem(config_filename, workdir):
    assert cli.default_workdir(config_filename) == Path(workdir)


def test_workdir_trained_with_other_shapes_is_refused(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(tiny_config({"model.ch": 64}).to_json())
    with pytest.raises(train.UserError, match=r"config\.model\.ch=64 but this config has 32"):
        train.train(tiny_config(), workdir)
    assert not (workdir / "checkpoints").exists()


# Through the real CLI: exit status 2, one `error:` line, no traceback. One of each path: a
# config value (checked after the backend starts, as it needs the device count), a misspelt
# field and a bad value (both while absl parses the flags); the file itself in the next test.
BAD_COMMAND_LINES = [
    ({"training.batch_size": 12}, r"training\.batch_size=12 .* multiple of the 8 devices"),
    ({"training.batchsize": 8}, r"--config\.training\.batchsize=8: no such config field"),
    ({"training.batch_size": "eight"}, r"--config\.training\.batch_size=eight.*invalid literal"),
]


@pytest.mark.parametrize("overrides, pattern", BAD_COMMAND_LINES, ids=lambda x: str(x)[:40])
def test_cli_rejects_bad_input_with_exit_2_and_one_line(tmp_path, overrides, pattern):
    result = run_cli(tmp_path / "run", overrides, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert result.stderr.rstrip().endswith(errors[0])
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_reports_a_missing_config_file_in_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusion_jax.train",
            "--config=configs/no_such_config.py",
            f"--workdir={tmp_path / 'run'}",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: --config:"), result.stderr
    assert "no_such_config.py" in result.stderr and "Traceback" not in result.stderr
