"""Every study's --quick smoke run (experiments/NAME.py): it runs, and writes its table (CSV and
Markdown, one row per point or setting, with finite scores) and its figure."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
from train_harness import REPO

# study -> (rows, score columns that must be finite numbers in every row)
STUDIES = {
    "parameterization": (5, ["FD", "IS", "test bits/dim"]),
    "losses": (3, ["FD", "IS", "test bits/dim"]),
    "schedules": (4, ["FD", "IS", "test bits/dim"]),
    "variance": (4, ["FD", "IS", "diversity"]),
    "ddim": (10, ["FD", "IS", "diversity"]),
    "one_step": (7, ["IS", "sharpness"]),
    "guidance": (8, ["accuracy", "FD"]),
    "digits_table": (5, ["FD", "FD / floor", "IS", "IS / data", "NN / test"]),
    "sr3_schedule": (9, ["PSNR", "SSIM"]),
    "perception_distortion": (4, ["PSNR", "SSIM", "perceptual"]),
}


@pytest.fixture(scope="module")
def studies_root(tmp_path_factory):
    """One root for the module: the one-checkpoint studies share its digits workdir."""
    return tmp_path_factory.mktemp("studies")


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES)
def test_quick_study(name, studies_root, cache_dir):
    root = studies_root / name
    if name == "perception_distortion":  # its perceptual distance needs the FID weights
        from diffusion_jax.metrics import convert_inception

        convert_inception.main([f"--output={cache_dir / 'inception_fid.npz'}"])
    result = subprocess.run(
        [sys.executable, f"experiments/{name}.py", "--quick", f"--workdir_root={root}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,  # a hang guard: parameterization trains 5 points on 2 shared cores
    )
    assert result.returncode == 0, result.stderr[-3000:]
    num_rows, columns = STUDIES[name]
    with open(root / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == num_rows
    for row in rows:
        for column in columns:
            assert math.isfinite(float(row[column])), (column, row)
    table = (root / f"{name}.md").read_text()
    assert table.count("\n|") == num_rows + 1 and "s wall on this machine" in table
    assert (root / f"{name}.png").stat().st_size > 1000
