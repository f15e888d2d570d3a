"""evaluate --metric=psnr|ssim: pairing samples with references (row by row or through
reference_index), single-sample and mean-of-k scores, results.jsonl, and one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion_jax import metrics
from diffusion_jax.cli import UserError
from diffusion_jax.evaluate import evaluate_image_quality


def _save(path, images, **extra):
    np.savez(path, images=images, **extra)
    return path


@pytest.fixture
def refs():
    return np.random.default_rng(0).integers(20, 236, (4, 16, 16, 3), dtype=np.uint8)


def test_row_by_row_pairs_and_results_file(tmp_path, refs):
    rng = np.random.default_rng(1)
    out = np.clip(refs.astype(int) + rng.integers(-9, 10, refs.shape), 0, 255).astype(np.uint8)
    samples, reference = _save(tmp_path / "out.npz", out), _save(tmp_path / "hr.npz", refs)
    for metric in ("psnr", "ssim"):
        record = evaluate_image_quality(metric, samples=samples, reference=reference)
        want = getattr(metrics, metric)(out, refs)
        np.testing.assert_allclose(record["per_image"], want, rtol=1e-12)
        assert record["value"] == pytest.approx(want.mean()) and record["std"] == pytest.approx(
            want.std()
        )
        assert record["mean_of_k"] is None and record["samples_per_reference"] == 1
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["metric"] for line in lines] == ["psnr", "ssim"]


def test_k_samples_per_reference_through_reference_index(tmp_path, refs):
    # Two samples per reference, ref + d and ref - d, shuffled: each single sample has
    # MSE d^2 (PSNR 20 log10(255 / d)); their mean is the reference (PSNR inf, SSIM 1).
    d = 12
    out = np.concatenate([refs + d, refs - d])
    index = np.concatenate([np.arange(4), np.arange(4)])
    order = np.random.default_rng(2).permutation(8)
    samples = _save(tmp_path / "out.npz", out[order], reference_index=index[order])
    reference = _save(tmp_path / "hr.npz", refs)
    psnr = evaluate_image_quality("psnr", samples=samples, reference=reference, workdir=tmp_path)
    np.testing.assert_allclose(psnr["per_image"], 20 * np.log10(255 / d), rtol=1e-12)
    assert psnr["samples_per_reference"] == 2 and psnr["num_samples"] == 8
    assert psnr["mean_of_k"]["per_image"] == [np.inf] * 4
    ssim = evaluate_image_quality("ssim", samples=samples, reference=reference)
    np.testing.assert_allclose(ssim["mean_of_k"]["per_image"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(
        ssim["per_image"], metrics.ssim(out[order], refs[index[order]]), rtol=1e-12
    )
    assert (tmp_path / "eval" / "results.jsonl").is_file()  # with a workdir: W/eval


def test_errors(tmp_path, refs):
    reference = _save(tmp_path / "hr.npz", refs)

    def check(match, samples, ref=reference):
        with pytest.raises(UserError, match=match):
            evaluate_image_quality("psnr", samples=samples, reference=ref)

    check("images are float32", _save(tmp_path / "f.npz", refs.astype(np.float32)))
    check("expected the same", _save(tmp_path / "s.npz", refs[:, :8]))
    check("must pair row by row", _save(tmp_path / "c.npz", refs[:3]))
    check("rows 0..4", _save(tmp_path / "i.npz", refs, reference_index=np.array([0, 1, 2, 4])))
    check("1 of the 4 references", _save(tmp_path / "m.npz", refs, reference_index=[0, 1, 2, 2]))
    check("no such file", tmp_path / "missing.npz")
    np.savez(tmp_path / "x.npz", a=np.arange(3))
    check("--reference=.*has no 'images'", reference, tmp_path / "x.npz")


def test_cli_prints_the_record_and_exits_2_on_bad_input(tmp_path, refs):
    samples, reference = _save(tmp_path / "out.npz", refs), _save(tmp_path / "hr.npz", refs)
    base = [sys.executable, "-m", "diffusion_jax.evaluate", "--metric=ssim"]
    kw = dict(capture_output=True, text=True, timeout=120, env=os.environ)
    ok = subprocess.run([*base, f"--samples={samples}", f"--reference={reference}"], **kw)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["value"] == pytest.approx(1.0)
    bad = _save(tmp_path / "bad.npz", refs[:2])
    fail = subprocess.run([*base, f"--samples={bad}", f"--reference={reference}"], **kw)
    assert fail.returncode == 2
    assert fail.stderr.strip().splitlines() == [
        f"error: --samples={bad} holds 2 images for 4 references; without a 'reference_index' "
        "array (the reference row of each sample) they must pair row by row"
    ]
