"""The sweep CLI: points from products and zips, names, the printed commands (parsed back by
ml_collections into the same config), every committed sweep valid, and an end-to-end sweep
that trains, evaluates, skips what is done and resumes what is not."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags
from train_harness import REPO, TINY, run_module

from diffusion_jax import sweep as sweep_lib
from diffusion_jax.sweep import Sweep, point_name, product, zipped

CONFIG_FILE = REPO / "configs" / "ddpm_digits.py"
SWEEP_FILES = sorted((REPO / "experiments" / "sweeps").glob("[!_]*.py"))  # _x.py: shared parts


def write_sweep(path: Path, points: str, extra: str = "") -> Path:
    lines = [
        "from diffusion_jax.sweep import product, zipped",
        f"CONFIG = {str(CONFIG_FILE)!r}",
        extra,
        "def get_points():",
        f"    return {points}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_product_and_zip():
    points = product({"a": [1, 2], "b": ["x", "y"]}, zipped({"c": [0, 1], "d": [5, 6]}))
    assert len(points) == 8
    assert points[0] == {"a": 1, "b": "x", "c": 0, "d": 5}
    assert points[1] == {"a": 1, "b": "x", "c": 1, "d": 6}  # the last axis varies fastest
    assert points[-1] == {"a": 2, "b": "y", "c": 1, "d": 6}
    assert product() == [{}]
    with pytest.raises(ValueError, match="differ in length"):
        zipped({"c": [0, 1], "d": [5]})
    with pytest.raises(ValueError, match="twice"):
        product({"a": [1]}, {"a": [2]})


def test_point_names():
    assert point_name({"diffusion.parameterization": "v", "seed": 0}) == "parameterization=v,seed=0"
    # Two fields that end alike keep their full names; tuples read as the flag spells them.
    name = point_name({"model.dropout": 0.1, "other.dropout": 0.2, "model.ch_mult": (1, 2)})
    assert name == "model.dropout=0.1,other.dropout=0.2,ch_mult=1-2"


def test_evaluation_columns():
    assert sweep_lib.evaluation_columns({"metric": "fid,is", "num_samples": 10}) == ["fid", "is"]
    assert sweep_lib.evaluation_columns({"metric": "fid,is", "name": "a"}) == ["a_fid", "a_is"]
    assert sweep_lib.evaluation_columns({"metric": "nll", "name": "bpd"}) == ["bpd"]
    assert sweep_lib.evaluation_columns({"metric": "fid", "steps": 5}) == ["fid[steps=5]"]


def test_printed_commands_parse_back_to_the_points_config(tmp_path, monkeypatch):
    path = write_sweep(
        tmp_path / "s.py",
        'product({"model.ch_mult": [(1, 2), (1, 2, 2)], "data.random_flip": [True, False]}, '
        '{"optim.lr": [3e-4], "diffusion.schedule": ["cosine"], "diffusion.beta_end": [0.01]})',
    )
    sweep = Sweep(path)
    assert len(sweep.points) == 4
    for i in range(len(sweep.points)):
        argv = sweep.train_command(i, tmp_path / "root")
        assert argv[:3] == ["python", "-m", "diffusion_jax.train"]
        assert f"--workdir={tmp_path / 'root' / sweep.names[i]}" in argv
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
        args = ["train", *(a for a in argv[3:] if not a.startswith("--workdir="))]
        monkeypatch.setattr("sys.argv", args)  # where ml_collections reads the overrides
        values(args)
        assert values.config.to_dict() == sweep.config_of(i).to_dict()


def test_bad_sweeps_are_refused_by_point(tmp_path):
    bad = Sweep(write_sweep(tmp_path / "bad.py", 'product({"diffusion.schedule": ["nope"]})'))
    with pytest.raises(ValueError, match="sweep point schedule=nope"):
        bad.config_of(0)
    with pytest.raises(ValueError, match="no config field"):
        Sweep(write_sweep(tmp_path / "typo.py", 'product({"model.chh": [1]})')).config_of(0)
    with pytest.raises(ValueError, match="repeats a point"):
        Sweep(write_sweep(tmp_path / "rep.py", '[{"seed": 1}, {"seed": 1}]'))
    with pytest.raises(ValueError, match="does not exist"):
        Sweep(tmp_path / "missing.py")
    result = run_module("sweep", f"--sweep={tmp_path / 'bad.py'}", "--print_only")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: sweep point schedule=nope")


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("quick", [False, True])
def test_every_committed_sweep_point_is_valid(path, quick):
    sweep = Sweep(path, quick=quick)
    for i in range(len(sweep.points)):
        sweep.config_of(i)
    for evaluation in sweep.evaluations:
        assert set(evaluation["metric"].split(",")) <= {"nll", "fid", "fd", "is", "class_accuracy"}


def test_print_only_prints_a_command_per_point(tmp_path):
    path = write_sweep(tmp_path / "s.py", 'product({"seed": [0, 1, 2]})')
    result = run_module("sweep", f"--sweep={path}", f"--workdir_root={tmp_path}", "--print_only")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == [
        f"python -m diffusion_jax.train --config={CONFIG_FILE} "
        f"--workdir={tmp_path}/seed={s} --config.seed={s}"
        for s in range(3)
    ]
    assert not list(tmp_path.glob("seed=*"))  # nothing ran


@pytest.mark.slow
@pytest.mark.parametrize("in_process", [False, True], ids=["subprocesses", "in_process"])
def test_sweep_trains_evaluates_skips_and_resumes(tmp_path, in_process):
    quick = {"config": dict(TINY, **{"training.num_train_steps": 8}), "evaluate": {}}
    path = write_sweep(
        tmp_path / "s.py",
        'product({"diffusion.parameterization": ["eps", "v"]})',
        extra=f"QUICK = {quick!r}\n"
        'EVALUATE = [{"metric": "nll", "num_samples": 8, "batch_size": 8, "name": "bpd"}]',
    )
    root = tmp_path / "root"
    # Point v is trained half-way beforehand, as an interrupted sweep leaves it.
    sweep = Sweep(path, quick=True)
    argv = sweep.train_command(1, root)[3:] + ["--config.training.num_train_steps=4"]
    assert run_module("train", *argv).returncode == 0
    assert sweep_lib.latest_checkpoint_step(root / "parameterization=v") == 4

    log: list[str] = []
    rows = sweep_lib.run_sweep(sweep, root, log=log.append, in_process=in_process)
    assert any("parameterization=eps: training from step 0 of 8" in m for m in log)
    assert sum("in this process: " in m for m in log) == (4 if in_process else 0)
    assert any("parameterization=v: training from step 4 of 8" in m for m in log)
    assert [r["status"] for r in rows] == ["done", "done"]
    with open(root / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["point"] for r in table] == ["parameterization=eps", "parameterization=v"]
    for r, name in zip(table, ["eps", "v"], strict=True):
        assert r["parameterization"] == name and r["step"] == "8"
        bpd = json.loads((root / r["point"] / "eval" / "nll_test.json").read_text())["total_bpd"]
        assert float(r["bpd"]) == pytest.approx(bpd, rel=1e-5)
        assert float(r["loss"]) > 0 and float(r["train_seconds"]) > 0
    assert (root / "results.md").read_text().count("\n") == 4  # header, rule, two rows

    log.clear()
    assert sweep_lib.run_sweep(sweep, root, log=log.append, in_process=in_process) == rows
    assert not any("diffusion_jax.train" in m or "diffusion_jax.evaluate" in m for m in log)
    assert sum("(recorded)" in m for m in log) == 2


@pytest.mark.slow
@pytest.mark.parametrize("in_process", [False, True], ids=["subprocesses", "in_process"])
def test_ctrl_c_stops_the_sweep_after_the_point_saves(tmp_path, in_process):
    """SIGINT to the sweep's process group (Ctrl-C): the training point saves a checkpoint and
    stops (the train CLI exits and the sweep waits for it, or train() returns in the sweep's
    process), and the sweep exits 130 without starting the next point."""
    quick = {"config": dict(TINY, **{"training.num_train_steps": 100000}), "evaluate": {}}
    path = write_sweep(tmp_path / "s.py", 'product({"seed": [0, 1]})', extra=f"QUICK = {quick!r}")
    root = tmp_path / "root"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffusion_jax.sweep",
            f"--sweep={path}",
            "--quick",
            f"--workdir_root={root}",
            *(["--in_process"] if in_process else []),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while sweep_lib.latest_checkpoint_step(root / "seed=0") is None:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "sweep interrupted: the same command resumes it" in err
    assert "stopped by SIGINT" in err  # the train loop saved on the way out
    assert sweep_lib.latest_checkpoint_step(root / "seed=0") >= 4
    assert not (root / "seed=1").exists()
