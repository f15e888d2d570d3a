"""The benchmark scripts run end to end on the digits config and report sane rows.

No timing is asserted (speed is reported as ratios by the scripts, never tested); what is
asserted: every number is finite and positive, the FLOP count matches between rows, the
PyTorch peer ran, and the sampler did not recompile when only its step count changed. The GPU
check script runs too, with the CPU standing in for the accelerator.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("diffusers")
pytestmark = pytest.mark.perf


def run_script(script, tmp_path, *args):
    """Run experiments/<script> with args and --json; (its stdout, the JSON's rows)."""
    out = tmp_path / f"{script}.json"
    cmd = [sys.executable, str(ROOT / "experiments" / script), *args, f"--json={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())["rows"]


def run_bench(script, tmp_path, *args):
    common = ("--config=configs/ddpm_digits.py:short", "--repeats=1", "--vs-diffusers")
    stdout, rows = run_script(script, tmp_path, *common, *args)
    assert "matmul ceiling" in stdout and "ours/torch" in stdout
    return rows


def positive(row, *keys):
    for k in keys:
        assert math.isfinite(row[k]) and row[k] > 0, (k, row)


def test_bench_train_reports_ours_and_the_peer(tmp_path):
    rows = run_bench("bench_train.py", tmp_path, "--batch-sizes=8,16")
    assert [r["batch"] for r in rows] == [8, 16]
    for r in rows:
        positive(
            r, "images/s", "GFLOP/step", "GFLOP/s", "of_matmul", "torch_images/s", "ours/torch"
        )
    # the step's FLOPs grow with the batch (forward and backward are per image)
    assert 1.5 < rows[1]["GFLOP/step"] / rows[0]["GFLOP/step"] < 2.5


def test_bench_sample_does_not_recompile_for_a_new_step_count(tmp_path):
    rows = run_bench("bench_sample.py", tmp_path, "--batch-sizes=8", "--steps=2")
    (r,) = rows
    positive(r, "images/s", "GFLOP/s", "of_matmul", "torch_images/s", "ours/torch")
    assert r["recompiled"] is False


def test_gpu_check_runs_and_compares_against_the_cpu():
    """experiments/gpu_check.py, run here with the CPU as its "accelerator": the same program
    agrees exactly; Winograd (float32 default precision) and bfloat16 differ within bounds."""
    cmd = [sys.executable, str(ROOT / "experiments" / "gpu_check.py"), "--batch=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("cpu ")]
    assert [ln.split()[1] for ln in lines] == ["f32_highest", "f32_default", "bf16_mixed"]
    assert all(ln.endswith("ok") for ln in lines)
    assert "rel. grad diff 0.00e+00" in lines[0]  # the CPU against itself, the same program
    assert "rel. grad diff 0.00e+00" not in lines[2]  # bfloat16 does change the gradient


def test_bench_input_reads_a_synthetic_tfds_set_with_and_without_the_cache(tmp_path):
    args = ("--synthetic-tfds=40", f"--data-dir={tmp_path}", "--set=training.batch_size=8")
    stdout, rows = run_script("bench_input.py", tmp_path, *args, "--threads=0,2", "--seconds=0.2")
    assert "synthetic_cifar, 40 examples, batch 8, random_flip=True" in stdout
    assert [r["threads"] for r in rows] == [0, 2]
    for r in rows:
        positive(r, "read_img_s", "cached_img_s", "cached/read")
