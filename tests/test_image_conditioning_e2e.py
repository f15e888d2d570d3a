"""Image-conditioned workdirs through the CLIs as a user runs them: train (SR3-style "sr" on the
8x8 digits, its regression baseline, a predict-and-refine deblurrer), write observations with
the degrade CLI, sample them with `--condition` (several samples per observation) and score
the samples with evaluate's psnr; bad condition files fail as one error line before compiling."""

import json

import numpy as np
import pytest
from train_harness import run_module, tiny_config, train_in_process

# Each test trains or samples through the CLIs: the slow stage.
pytestmark = pytest.mark.slow

KINDS = {
    "sr": {"conditioning.degradation": "sr", "diffusion.noise_conditioning": "sqrt_alpha_bar"},
    "regression": {"conditioning.degradation": "sr", "training.objective": "regression"},
    "refine": {
        "conditioning.degradation": "blur",
        "conditioning.blur_sigma": 1.0,
        "model.name": "refiner",
    },
}


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_conditioning")
    paths = {}
    for kind, overrides in KINDS.items():
        config = tiny_config({**overrides, "training.num_train_steps": 4})
        if kind == "refine":
            config.model.update(predictor_ch=16, predictor_ch_mult=(1,))
        paths[kind] = root / kind
        train_in_process(config, paths[kind])
    return paths


def _record(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind, observed", [("sr", 4), ("regression", 4), ("refine", 8)])
def test_degrade_sample_and_score_with_the_clis(workdirs, tmp_path, kind, observed):
    workdir = workdirs[kind]
    obs, clean = tmp_path / "obs.npz", tmp_path / "clean.npz"
    made = _record(
        run_module(
            "degrade",
            f"--workdir={workdir}",
            f"--output={obs}",
            f"--reference={clean}",
            "--num_examples=5",
        )
    )
    assert made["num_examples"] == 5 and (tmp_path / "obs.png").is_file()
    with np.load(obs) as f:
        assert f["images"].shape == (5, observed, observed, 1) and f["images"].dtype == np.uint8
    out = tmp_path / "out.npz"
    record = _record(
        run_module(
            "sample",
            f"--workdir={workdir}",
            f"--condition={obs}",
            f"--output={out}",
            "--num_samples=10",
            "--steps=3",
        )
    )
    assert record["condition"] == str(obs.resolve())
    with np.load(out) as f:
        assert f["images"].shape == (10, 8, 8, 1)
        np.testing.assert_array_equal(f["reference_index"], np.repeat(np.arange(5), 2))
        samples = f["images"]
    if kind == "regression":  # deterministic: both samples of an observation are the same
        np.testing.assert_array_equal(samples[0::2], samples[1::2])
    if kind == "refine":  # the predictor alone: deterministic, and not the refined samples
        alone = tmp_path / "alone.npz"
        _record(
            run_module(
                "sample",
                f"--workdir={workdir}",
                f"--condition={obs}",
                f"--output={alone}",
                "--num_samples=10",
                "--predictor_only",
            )
        )
        with np.load(alone) as f:
            np.testing.assert_array_equal(f["images"][0::2], f["images"][1::2])
            assert not np.array_equal(f["images"], samples)
    scored = _record(
        run_module("evaluate", "--metric=psnr", f"--samples={out}", f"--reference={clean}")
    )
    assert scored["samples_per_reference"] == 2 and np.isfinite(scored["value"])
    assert scored["mean_of_k"] is not None


def test_bad_condition_input_is_one_error_line(workdirs, tmp_path):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((3, 8, 8, 1), np.uint8))  # high-res, not low-res
    out = tmp_path / "out.npz"
    cases = [
        (
            ("sample", f"--workdir={workdirs['sr']}", f"--condition={wrong}", f"--output={out}"),
            "(N, 4, 4, 1)",
        ),
        (
            ("sample", f"--workdir={workdirs['sr']}", f"--output={out}", "--num_samples=4"),
            "give --condition",
        ),
    ]
    cases += [
        (("evaluate", f"--workdir={workdirs['refine']}", "--metric=nll"), "bits/dim is the bound"),
        (("evaluate", f"--workdir={workdirs['sr']}", "--metric=fid"), "sample --condition"),
    ]
    for args, needle in cases:
        result = run_module(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and needle in lines[-1], lines[-1]
        assert not out.exists()
