"""The studies' sample cache (experiments/study_common.sample_images): a second request for the
same checkpoint step, options, variance, count and seed reads the first one's images and
seconds back; any difference in those draws afresh."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from train_harness import REPO

from diffusion_jax import sample
from diffusion_jax.config import load_config
from diffusion_jax.workdir import Workdir


@pytest.fixture
def study_common(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import study_common

    yield study_common
    sys.modules.pop("study_common", None)


def test_sample_images_reads_back_what_it_drew(study_common, monkeypatch, tmp_path):
    calls = []

    def fake_sample_workdir(wd, num_samples, options, *, seed=0):
        calls.append((wd.config.diffusion.var_type, num_samples, dict(options), seed))
        rng = np.random.default_rng(len(calls))
        return rng.integers(0, 256, (num_samples, 8, 8, 1), dtype=np.uint8)

    monkeypatch.setattr(sample, "sample_workdir", fake_sample_workdir)
    wd = Workdir(
        load_config(f"{REPO / 'configs' / 'ddpm_digits.py'}:short"), None, None, None, step=2000
    )
    cache = tmp_path / "study_samples"

    def draw(wd=wd, n=4, **options):
        return study_common.sample_images(wd, n, cache_dir=cache, **options)

    first, seconds = draw(sampler="ddpm", steps=10)
    again, seconds_again = draw(sampler="ddpm", steps=10, batch_size=2)  # same images
    assert len(calls) == 1 and seconds_again == seconds
    np.testing.assert_array_equal(again, first)
    assert [p.name for p in cache.iterdir()] == [next(cache.iterdir()).name]  # no partial file

    draw(sampler="ddpm", steps=20)
    draw(sampler="ddpm", steps=10, var_type="fixed_small")
    draw(sampler="ddpm", steps=10, seed=1)
    draw(n=5, sampler="ddpm", steps=10)
    draw(wd=wd._replace(step=1000), sampler="ddpm", steps=10)
    draw(sampler="ddim", steps=10, eta=0.0)
    draw(sampler="ddim", steps=10, eta=1.0)
    assert len(calls) == 8 and len(list(cache.iterdir())) == 8
    assert calls[2][0] == "fixed_small" and calls[3][3] == 1 and calls[4][1] == 5

    uncached, _ = study_common.sample_images(wd, 4, sampler="ddpm", steps=10)
    assert len(calls) == 9 and not np.array_equal(uncached, first)
