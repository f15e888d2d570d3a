"""Every study's --quick smoke run, through the runner (`experiments/all.py --quick --jobs=2`):
each study runs, and writes its table (CSV and Markdown, one row per point or setting, with
finite scores) and its figure."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
from train_harness import REPO

pytestmark = pytest.mark.slow

# study -> (rows, score columns that must be finite numbers in every row)
STUDIES = {
    "parameterization": (5, ["FD", "IS", "test bits/dim"]),
    "losses": (3, ["FD", "IS", "test bits/dim"]),
    "schedules": (4, ["FD", "IS", "test bits/dim"]),
    "variance": (4, ["FD", "IS", "diversity"]),
    "ddim": (5, ["FD", "IS", "diversity"]),
    "one_step": (7, ["IS", "sharpness"]),
    "guidance": (4, ["accuracy", "FD"]),
    "digits_table": (5, ["FD", "FD / floor", "IS", "IS / data", "NN / test"]),
    "sr3_schedule": (9, ["PSNR", "SSIM"]),
    "perception_distortion": (4, ["PSNR", "SSIM", "perceptual"]),
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, cache_dir):
    """All the smoke runs, two at a time, on one device each as a user runs them (without the
    tests' emulated devices); returns (root, the runner's summary)."""
    from diffusion_jax.metrics import convert_inception

    # perception_distortion's perceptual distance needs the FID weights in the cache dir.
    convert_inception.main([f"--output={cache_dir / 'inception_fid.npz'}"])
    root = tmp_path_factory.mktemp("studies")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "experiments/all.py", "--quick", "--jobs=2", f"--workdir_root={root}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # a hang guard: about 4 minutes alone on 2 cores
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    return root, json.loads(lines[-1])


def test_the_runner_runs_every_study(quick_run):
    _, summary = quick_run
    assert sorted(summary["studies"]) == sorted(STUDIES)
    assert summary["jobs"] == 2 and summary["total_seconds"] > 0


@pytest.mark.parametrize("name", STUDIES)
def test_quick_study(name, quick_run):
    root, summary = quick_run
    out = root / f"{name}_quick"
    assert summary["studies"][name]["exit_code"] == 0, (root / f"{name}.log").read_text()[-3000:]
    num_rows, columns = STUDIES[name]
    with open(out / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == num_rows
    for row in rows:
        for column in columns:
            assert math.isfinite(float(row[column])), (column, row)
    table = (out / f"{name}.md").read_text()
    assert table.count("\n|") == num_rows + 1 and "s wall on this machine" in table
    assert (out / f"{name}.png").stat().st_size > 1000


def test_ddim_and_variance_draw_their_shared_chain_once(quick_run):
    """Both sample the shared checkpoint with DDPM at 10 steps (beta_t, seed 0): one file."""
    root, summary = quick_run
    assert summary["studies"]["ddim"]["exit_code"] == 0
    assert summary["studies"]["variance"]["exit_code"] == 0
    drawn = list((root / "digits_quick" / "base" / "study_samples").glob("*.npz"))
    assert len(drawn) == 5 + 4 - 1  # ddim's 5 settings, variance's 4, one in common
