"""Helpers for the end-to-end and fault-injection tests of the train CLI.

A tiny digits config (8x8, one UNet level of width 32, T=40, batch 8) that trains a step in
milliseconds once compiled; its constant learning rate makes the compiled step independent of
num_train_steps, so runs of different lengths share one compiled program (and the session's
compilation cache, see conftest.py). Runs happen in-process (`train.train`) or through the real
CLI in a subprocess, with the same 8 emulated devices, so both compile the same program and
give bit-identical results.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from diffusion_jax.config import load_config, override

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs" / "ddpm_digits.py"
# The tests' base: the 2,000-step recipe (linear schedule, DDIM sampling), which the tests'
# expectations were written for; the default itself is checked by tests/test_configs.py and
# the digits_table study.
BASE_VARIANT = "short"

TINY = {
    "model.ch": 32,
    "model.ch_mult": (1,),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (),
    "model.num_groups": 8,
    "diffusion.num_timesteps": 40,
    "sampling.steps": 5,
    "training.batch_size": 8,
    "training.num_train_steps": 12,
    "training.log_every": 1,
    "training.checkpoint_every": 4,
    "training.sample_every": 0,
    "training.num_preview_samples": 8,
    "optim.lr_schedule": "constant",
    "optim.warmup_steps": 2,
}


def tiny_config(overrides: dict | None = None):
    """configs/ddpm_digits.py:short with TINY and then `overrides` ({"a.b": value}) applied. A value
    of another type than the field's replaces the field (ConfigDict would refuse it), so tests
    can hand validation the ill-typed values a config file not built on base_config may hold."""
    config = override(load_config(f"{CONFIG_FILE}:{BASE_VARIANT}"), TINY)
    for field, value in (overrides or {}).items():
        try:
            override(config, {field: value})
        except TypeError:
            *parents, name = field.split(".")
            node = config
            for part in parents:
                node = node[part]
            del node[name]
            node[name] = value
    return config


def _flag_value(value) -> str:
    if isinstance(value, tuple):
        return "(" + "".join(f"{v!r}," for v in value) + ")"
    return str(value)


def cli_command(workdir, overrides: dict | None = None) -> list[str]:
    """The train CLI command for the tiny config plus `overrides`, as --config.a.b=v flags."""
    flags = [f"--config.{k}={_flag_value(v)}" for k, v in {**TINY, **(overrides or {})}.items()]
    return [
        sys.executable,
        "-m",
        "diffusion_jax.train",
        f"--config={CONFIG_FILE}:{BASE_VARIANT}",
        f"--workdir={workdir}",
        *flags,
    ]


def cli_env(num_devices: int = 8) -> dict:
    """The test environment (compilation cache included) with src/ importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(workdir, overrides: dict | None = None, *, timeout: float = 300, env=None):
    """Run the train CLI to completion; CompletedProcess with text stdout / stderr."""
    return subprocess.run(
        cli_command(workdir, overrides),
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


class Run:
    """The train CLI in the background, stderr to a file, for killing at a chosen moment."""

    def __init__(self, workdir, overrides: dict | None = None, *, env: dict | None = None):
        self.workdir = Path(workdir)
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir.parent / f"{self.workdir.name}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cli_command(workdir, overrides),
            env=env or cli_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_until(self, condition, *, timeout: float = 300, poll: float = 0.02) -> None:
        """Poll condition() until true; fail if the process ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the run ended (exit {self.proc.returncode}) before the awaited moment:\n"
                    + self.log()[-3000:]
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting; log:\n{self.log()[-3000:]}")
            time.sleep(poll)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


_REFERENCE: dict = {}


def reference_run(tmp_path_factory) -> Path:
    """The workdir of one uninterrupted in-process run of the tiny config (12 steps).

    Made once per test session and shared: every fault-injection test must end where it does.
    """
    if "workdir" not in _REFERENCE:
        from diffusion_jax import train

        workdir = tmp_path_factory.mktemp("reference") / "run"
        train.train(tiny_config(), workdir)
        _REFERENCE["workdir"] = workdir
    return _REFERENCE["workdir"]


def read_metrics(workdir) -> list[dict]:
    """The complete lines of metrics.jsonl (none if there is none yet)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]


def losses(workdir) -> dict[int, float]:
    """Logged loss per step; fails if a step was logged twice."""
    rows = read_metrics(workdir)
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def checkpoint_steps(workdir) -> list[int]:
    directory = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def load_state(workdir, step: int | None = None) -> dict:
    """The TrainState saved in a checkpoint (default: the newest), as nested numpy arrays."""
    import jax
    import orbax.checkpoint as ocp

    step = checkpoint_steps(workdir)[-1] if step is None else step
    path = Path(workdir) / "checkpoints" / str(step) / "state"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sharding info not provided": numpy needs none
        with ocp.PyTreeCheckpointer() as ckptr:
            metadata = ckptr.metadata(path).item_metadata.tree
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
            state = ckptr.restore(path, restore_args=as_numpy)
    return jax.tree.map(np.asarray, state)


def assert_states_equal(actual: dict, expected: dict) -> None:
    """Every leaf bit-identical (params, EMA params, optimizer state, step, NaN counters)."""
    import jax

    flat_a = dict(jax.tree_util.tree_flatten_with_path(actual)[0])
    flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    assert flat_a.keys() == flat_e.keys()
    differ = [
        jax.tree_util.keystr(k)
        for k in flat_e
        if flat_a[k].dtype != flat_e[k].dtype or not np.array_equal(flat_a[k], flat_e[k])
    ]
    assert not differ, f"{len(differ)} of {len(flat_e)} leaves differ, e.g. {differ[:3]}"


def train_in_process(config, workdir) -> None:
    """train.train(config, workdir), then pytest's own SIGINT/SIGTERM handlers back (train
    installs its stop-request handlers for the loop)."""
    from diffusion_jax import train

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train.train(config, workdir)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def run_module(module, *args, timeout: float = 300):
    """`python -m diffusion_jax.<module> args...` as a user runs it; CompletedProcess, text."""
    return subprocess.run(
        [sys.executable, "-m", f"diffusion_jax.{module}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ,
    )
