"""A class-conditional digits model end to end: train, resume exactly, sample with labels and
guidance, evaluate class accuracy and bits/dim; bad input as one error line before compiling."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_harness import (
    assert_states_equal,
    checkpoint_steps,
    load_state,
    losses,
    tiny_config,
    train_in_process,
)

from diffusion_jax import metrics, sample
from diffusion_jax.cli import UserError
from diffusion_jax.data.digits import load_digits
from diffusion_jax.evaluate import evaluate_class_accuracy, evaluate_nll

CONDITIONAL = {
    "model.num_classes": 10,
    "conditioning.p_uncond": 0.1,
    "sampling.guidance": 1.0,
    "training.num_train_steps": 8,
    "sampling.batch_size": 16,
}

# Each test here trains or samples a conditional run through the CLIs: the slow stage.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """8 steps in one run, with a preview grid of 20 samples (2 per class) at step 8."""
    path = tmp_path_factory.mktemp("cond") / "run"
    preview = {"training.sample_every": 8, "training.num_preview_samples": 20}
    train_in_process(tiny_config({**CONDITIONAL, **preview}), path)
    return path


def _count_compiles():
    events = []

    def listener(event, duration, **kwargs):
        if "compile" in event:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events, lambda: jax.monitoring.unregister_event_duration_listener(listener)


def test_conditional_run_resumes_exactly_and_previews_a_row_per_class(tmp_path, workdir):
    assert (workdir / "samples" / "step_000008.png").is_file()
    resumed = tmp_path / "resumed"
    train_in_process(tiny_config({**CONDITIONAL, "training.num_train_steps": 5}), resumed)
    train_in_process(tiny_config(CONDITIONAL), resumed)
    assert checkpoint_steps(resumed) == [5, 8]
    state = load_state(resumed)
    assert int(state["step"]) == 8
    assert_states_equal(state, load_state(workdir))  # label dropout included
    assert losses(resumed) == losses(workdir)
    assert "class_embedding" in state["params"]


def test_sample_cli_labels_guidance_and_npz_labels(workdir, tmp_path):
    out = tmp_path / "three.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_jax.sample", f"--workdir={workdir}",
         "--num_samples=16", f"--output={out}", "--labels=3", "--guidance=2.5"],
        capture_output=True, text=True, timeout=300, env=os.environ,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["guidance"] == 2.5 and record["labels"] == "3"
    with np.load(out) as f:
        assert f["images"].shape == (16, 8, 8, 1)
        np.testing.assert_array_equal(f["labels"], np.full(16, 3))
    cycled = sample.run(workdir, 16, tmp_path / "cycled.npz", labels="0,1,2")
    default = sample.run(workdir, 16, tmp_path / "default.npz")
    assert default["guidance"] == 1.0  # config.sampling.guidance
    with np.load(cycled["output"]) as a, np.load(default["output"]) as b:
        np.testing.assert_array_equal(a["labels"], np.arange(16) % 3)
        np.testing.assert_array_equal(b["labels"], np.arange(16) % 10)
        # Samples 0..2 have the same classes (and seed, guidance) in both: the same images.
        np.testing.assert_array_equal(a["images"][:3], b["images"][:3])


def test_sample_bad_labels_and_guidance_fail_before_compiling(workdir, tmp_path):
    unconditional = tmp_path / "uncond"
    unconditional.mkdir()
    config = json.loads((workdir / "config.json").read_text())
    config["model"]["num_classes"] = 0
    config["conditioning"]["p_uncond"] = 0.0
    config["sampling"]["guidance"] = 0.0
    (unconditional / "config.json").write_text(json.dumps(config))
    out = tmp_path / "x.npz"
    cases = [
        (workdir, dict(labels="10"), r"--labels=10: label 10 is outside this model's classes 0..9"),
        (workdir, dict(labels="1,-1"), "label -1 is outside"),
        (workdir, dict(labels="a"), "expected a class or comma-separated classes in 0..9"),
        (workdir, dict(guidance=-1.0), r"--guidance=-1.0: expected a number >= 0"),
        (unconditional, dict(labels="1"), "--labels=1: this workdir's model is unconditional"),
        (unconditional, dict(guidance=1.0), "--guidance=1.0: this workdir's model is uncond"),
    ]
    compiles, stop = _count_compiles()
    try:
        for wd, kwargs, message in cases:
            with pytest.raises(UserError, match=message):
                sample.run(wd, 4, out, **kwargs)
    finally:
        stop()
    assert not compiles, compiles
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_jax.sample", f"--workdir={workdir}",
         "--num_samples=4", f"--output={out}", "--labels=12"],
        capture_output=True, text=True, timeout=300, env=os.environ,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: --labels=12: label 12 is outside this model's classes 0..9"
    )
    assert not out.exists()


def test_class_accuracy_counts_agreement_with_the_digits_classifier(workdir, cache_dir, tmp_path):
    images, _ = load_digits("test")
    images = images[:100]
    predicted = np.argmax(metrics.digits_logits(metrics.get_digits_classifier(), images), -1)
    labels = np.where(np.arange(100) < 37, predicted, (predicted + 1) % 10).astype(np.int32)
    np.savez(tmp_path / "s.npz", images=images, labels=labels)
    record = evaluate_class_accuracy(workdir, samples=tmp_path / "s.npz")
    assert record["value"] == pytest.approx(0.37, abs=1e-12)
    assert record["num_samples"] == 100
    np.savez(tmp_path / "nolabels.npz", images=images)
    with pytest.raises(UserError, match="has no 'labels' array"):
        evaluate_class_accuracy(workdir, samples=tmp_path / "nolabels.npz")
    np.savez(tmp_path / "big.npz", images=np.zeros((4, 16, 16, 1), np.uint8), labels=np.zeros(4))
    with pytest.raises(UserError, match=r"takes uint8 digits of shape \(N, 8, 8, 1\)"):
        evaluate_class_accuracy(workdir, samples=tmp_path / "big.npz")
    np.savez(tmp_path / "short.npz", images=images, labels=labels[:50])
    with pytest.raises(UserError, match=r"expected integers of shape \(100,\)"):
        evaluate_class_accuracy(workdir, samples=tmp_path / "short.npz")


def test_bits_per_dim_of_a_conditional_model(workdir):
    record = evaluate_nll(workdir, num_samples=8, batch_size=8)
    assert np.isfinite(record["total_bpd"]) and record["total_bpd"] > 0
