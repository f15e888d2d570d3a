"""End to end: sample and evaluate a workdir trained in-process for a few steps, and import a
diffusers UNet2DModel as a workdir. Each CLI runs as a subprocess, as a user runs it, once to
succeed and (sample, evaluate) once to fail with exit code 2; the other cases call the
functions behind the flags, since JAX start-up costs seconds per process."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_harness import run_module, train_in_process

import diffusion_jax
from diffusion_jax import checkpointing, data, evaluate, metrics, sample
from diffusion_jax.cli import UserError
from diffusion_jax.config import load_config
from diffusion_jax.evaluate import evaluate_nll, evaluate_samples
from diffusion_jax.interop.diffusers import import_to_workdir, load_unet2d
from diffusion_jax.workdir import load_config as load_saved_config
from diffusion_jax.workdir import load_workdir

# T = 25: the linear schedule scales beta_T = 0.02 * 1000 / T, which reaches 1 (alpha_bar_T = 0,
# infinite x_0 predictions) at T = 20.
NUM_TIMESTEPS = 25


def tiny_config():
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "ddpm_digits.py")
    config = load_config(f"{path}:short")
    config.model.update(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=8)
    config.diffusion.num_timesteps = NUM_TIMESTEPS
    config.training.update(batch_size=8, num_train_steps=3, sample_every=0, checkpoint_every=3)
    config.sampling.update(steps=4, batch_size=8)
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train_in_process(tiny_config(), path)
    return path


def run_cli(module, *args):
    return run_module(module, *args, timeout=120)


def load_images(path):
    with np.load(path, allow_pickle=False) as f:
        return f["images"]


def load_provenance(path):
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["provenance"]))


@pytest.fixture(scope="module")
def cli_samples(workdir, tmp_path_factory):
    """72 samples (more than the digits features' 64 dimensions, for FID) from the CLI."""
    out = tmp_path_factory.mktemp("samples") / "cli.npz"
    proc = run_cli("sample", f"--workdir={workdir}", "--num_samples=72", f"--output={out}")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_sample_cli_writes_images_and_same_seed_gives_same_images(workdir, cli_samples, tmp_path):
    out, record = cli_samples
    assert record["num_samples"] == 72 and record["step"] == 3 and record["output"] == str(out)
    assert (record["sampler"], record["steps"], record["seed"]) == ("ddim", 4, 0)
    # How the samples were made travels with them, in the file and in the printed line.
    made = load_provenance(out)
    assert made == {k: record[k] for k in made}
    assert made == {
        "workdir": str(workdir.resolve()),
        "step": 3,
        "params": "ema",
        "num_samples": 72,
        "seed": 0,
        "sampler": "ddim",
        "steps": 4,
        "eta": 0.0,
        "batch_size": 8,
        "diffusion_jax_version": diffusion_jax.__version__,
    }
    images = load_images(out)
    assert images.dtype == np.uint8 and images.shape == (72, 8, 8, 1)
    assert out.with_suffix(".png").is_file()

    # Sample i depends only on (seed, i): fewer samples are a prefix.
    again = sample.run(workdir, 12, tmp_path / "again.npz", seed=0)
    np.testing.assert_array_equal(load_images(again["output"]), images[:12])
    other = sample.run(workdir, 12, tmp_path / "other.npz", seed=1)
    assert not np.array_equal(load_images(other["output"]), images[:12])


def test_sample_errors(workdir, tmp_path):
    out = tmp_path / "x.npz"
    with pytest.raises(UserError, match="does not exist"):
        sample.run(tmp_path / "missing", 4, out)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(workdir / "config.json", bare)
    with pytest.raises(UserError, match="no checkpoint in"):
        sample.run(bare, 4, out)
    (bare / "checkpoints" / "7").mkdir(parents=True)  # an unreadable checkpoint is skipped
    with pytest.raises(checkpointing.CheckpointError, match="could be read"):
        sample.run(bare, 4, out)
    assert (bare / "checkpoints" / "7").is_dir()  # ... and left where it is
    with pytest.raises(UserError, match=f"--steps=26: expected 1 to {NUM_TIMESTEPS}"):
        sample.run(workdir, 4, out, steps=NUM_TIMESTEPS + 1)
    with pytest.raises(UserError, match=r"--eta=1.5: expected a number in \[0, 1\]"):
        sample.run(workdir, 4, out, eta=1.5)
    with pytest.raises(UserError, match="--output=.*ending in .npz"):
        sample.run(workdir, 4, tmp_path / "x.png")
    # An output path that cannot be written fails before sampling (which it once lost).
    (tmp_path / "a_file").write_text("")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sample, "sample_workdir", lambda *a, **k: pytest.fail("sampled"))
        with pytest.raises(UserError, match="a_file/x.npz: cannot write there"):
            sample.run(workdir, 4, tmp_path / "a_file" / "x.npz")
        (tmp_path / "d.npz").mkdir()
        with pytest.raises(UserError, match="is a directory"):
            sample.run(workdir, 4, tmp_path / "d.npz")
    proc = run_cli(
        "sample", f"--workdir={workdir}", "--num_samples=4", f"--output={out}", "--sampler=plms"
    )
    assert proc.returncode == 2
    want = "expected one of ddpm, ddim, dpm_solver++2m, sde_dpm_solver++2m"
    assert proc.stderr.strip() == f"error: --sampler='plms': {want}"
    assert not out.exists()


def test_evaluate_nll_parts_sum_to_total(workdir):
    record = evaluate_nll(workdir, split="test", num_samples=10, batch_size=8)
    parts = ("total_bpd", "prior_bpd", "decoder_bpd", "terms_bpd")
    assert all(np.isfinite(record[k]) and record[k] >= 0 for k in parts)
    np.testing.assert_allclose(
        record["prior_bpd"] + record["terms_bpd"], record["total_bpd"], rtol=1e-6
    )
    assert record["decoder_bpd"] <= record["terms_bpd"]
    assert record["num_examples"] == 10 and record["step"] == 3
    assert (
        record["name"]
        == f"nll@10 examples of digits test, bits/dim of the {NUM_TIMESTEPS}-step bound"
    )
    saved = json.loads((workdir / "eval" / "nll_test.json").read_text())
    assert saved == record


def test_evaluate_fid_and_is_on_digits(workdir, cache_dir, cli_samples):
    proc = run_cli(
        "evaluate", f"--workdir={workdir}", "--metric=fid", f"--samples={cli_samples[0]}"
    )
    assert proc.returncode == 0, proc.stderr
    fid = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fid["metric"] == "fid" and fid["num_samples"] == 72 and fid["value"] > 0
    assert fid["feature_network"].startswith("digits_classifier")
    num_refs = len(data.create_source(tiny_config().data, "train"))
    want = f"fid@72 samples vs digits train ({num_refs} refs), digits-classifier features"
    assert fid["name"] == want
    # The samples file's provenance, and the results log beside the workdir's other results.
    assert fid["samples"] == str(cli_samples[0])
    assert fid["provenance"] == load_provenance(cli_samples[0])
    assert (fid["sampler"], fid["steps"], fid["seed"], fid["step"]) == ("ddim", 4, 0, 3)
    assert list((cache_dir / "fid_stats").glob("*.npz"))  # reference statistics, cached

    score = evaluate_samples(workdir, "is", num_samples=100)  # sampled from the checkpoint
    assert score["metric"] == "is" and 1.0 < score["value"] <= 10.0 and score["std"] >= 0
    assert (score["sampler"], score["steps"], score["num_samples"]) == ("ddim", 4, 100)
    assert score["name"] == "is@100 samples (10 splits), digits-classifier class probabilities"
    assert score["provenance"]["params"] == "ema" and score["samples"] is None
    results = (workdir / "eval" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["name"] for line in results[-2:]] == [want, score["name"]]


def test_digits_yardstick_compares_equal_sizes_and_recomputes_independently(
    workdir, cache_dir, tmp_path
):
    """fd against all 1,797 digits: the digits themselves score 0. The floor (m of one random
    half vs the other half) and the samples' matched FD (m samples vs the same other half), and
    data_is (IS of as many random real digits as there are samples), recomputed here from the
    features and logits for two sample counts; a half of the real digits scores about the
    floor."""
    real = np.stack([e["image"] for e in data.create_source(tiny_config().data, "all")])
    assert len(real) == 1797
    np.savez(tmp_path / "real.npz", images=real)
    record = evaluate_samples(workdir, "fd", samples=tmp_path / "real.npz")
    assert record["name"].startswith("fd@1797 samples vs digits all (1797 refs)")
    assert abs(record["value"]) < 1e-6
    network = evaluate.feature_network(tiny_config(), "fd")
    features, logits = network.features(real), network.logits(real)

    def fd(x, y):
        return metrics.frechet_distance(
            x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
        )

    rng = np.random.default_rng(7)
    fake = rng.permutation(len(real))[:1000]
    for samples in (real[fake[:300]], real[fake]):  # m = 300 and m = 899
        n = len(samples)
        np.savez(tmp_path / "s.npz", images=samples)
        got = evaluate_samples(workdir, "fd", samples=tmp_path / "s.npz")
        m = min(n, 899)
        floors, matched = [], []
        for seed in range(evaluate.FLOOR_PARTITIONS):  # the halvings the docstring describes
            order = np.random.default_rng(seed).permutation(len(real))
            a, b = order[:899], order[899:]
            floors.append(fd(features[a[:m]], features[b]))
            pick = np.random.default_rng(seed).permutation(n)[:m]
            matched.append(fd(network.features(samples)[pick], features[b]))
        assert got["floor"] == pytest.approx(np.mean(floors), rel=1e-6)
        # float32 features leave ~1e-7 of each floor's value in rounding, so the std (which is
        # small for this test's classifier) is compared to that absolute precision.
        assert got["floor_std"] == pytest.approx(np.std(floors), abs=1e-6 * np.mean(floors))
        # The samples' float32 features come from another feature-network call; this test's
        # FD is a small difference of traces, which amplifies their rounding to ~1e-6.
        assert got["matched"] == pytest.approx(np.mean(matched), rel=1e-4)
        assert got["ratio_to_floor"] == pytest.approx(got["matched"] / got["floor"])
        assert f"FD of {m} real digits vs 898 others" in got["floor_name"]
        draws = [
            metrics.inception_score(
                logits[np.random.default_rng(seed).permutation(len(real))[:n]],
                evaluate.IS_SPLITS,
                from_logits=True,
            )[0]
            for seed in range(evaluate.FLOOR_PARTITIONS)
        ]
        score = evaluate_samples(workdir, "is", samples=tmp_path / "s.npz")
        assert score["data_is"] == pytest.approx(np.mean(draws), rel=1e-9)
        assert score["ratio_to_data"] == pytest.approx(score["value"] / score["data_is"])

    # Real digits as samples: they overlap the held-out halves, so they score at most about the
    # floor (the floor's std over halvings is about a fifth of it).
    assert got["ratio_to_floor"] < 1.2

    score = evaluate_samples(workdir, "is", samples=tmp_path / "real.npz")
    want, _ = metrics.inception_score(logits, evaluate.IS_SPLITS, from_logits=True)
    assert score["value"] == pytest.approx(want)


def test_memorization_is_zero_for_copies_and_one_for_the_test_split(workdir, tmp_path):
    """--metric=memorization: training images themselves are all near copies at distance 0;
    the test split scores its own mean nearest-training distance (ratio 1), recomputed here by
    brute force."""
    config = tiny_config()
    train = np.stack([e["image"] for e in data.create_source(config.data, "train")])
    test = np.stack([e["image"] for e in data.create_source(config.data, "test")])
    np.savez(tmp_path / "copies.npz", images=train[:200])
    copies = evaluate_samples(workdir, "memorization", samples=tmp_path / "copies.npz")
    # The expanded |a|^2 - 2ab + |b|^2 leaves ~1e-8 of rounding; one grey level is 1/255.
    assert copies["value"] < 1e-6 and copies["ratio_to_held_out"] < 1e-6
    assert copies["near_copy_fraction"] == 1.0
    np.savez(tmp_path / "test.npz", images=test)
    record = evaluate_samples(workdir, "memorization", samples=tmp_path / "test.npz")
    gaps = test.reshape(len(test), 1, -1) / 255.0 - train.reshape(1, len(train), -1) / 255.0
    want = np.sqrt((gaps**2).sum(-1)).min(1).mean()
    assert record["value"] == pytest.approx(want, rel=1e-9)
    assert record["held_out"] == pytest.approx(want, rel=1e-9)
    assert record["ratio_to_held_out"] == pytest.approx(1.0)
    assert record["near_copy_fraction"] == 0.0  # none is nearer than the nearest test image


def test_several_metrics_score_one_sampling(workdir, cache_dir):
    """--metric=fid,fd,is: one sampling scored by each, the same records as one metric at a
    time (the samples depend only on the seed)."""
    together = evaluate.evaluate_sample_metrics(workdir, ["fid", "fd", "is"], num_samples=100)
    for record in together:
        alone = evaluate_samples(workdir, record["metric"], num_samples=100)
        assert record["value"] == pytest.approx(alone["value"], rel=1e-6)
        assert record["name"] == alone["name"] and record["provenance"] == alone["provenance"]
    proc = run_cli("evaluate", f"--workdir={workdir}", "--metric=fid,nll")
    assert proc.returncode == 2
    assert "several metrics are scores of one set of images" in proc.stderr
    with pytest.raises(UserError, match="each at most once"):
        evaluate.evaluate_sample_metrics(workdir, ["fid", "fid"], num_samples=100)


def test_evaluate_errors(workdir, cache_dir, tmp_path):
    with pytest.raises(UserError, match="FID needs more samples than feature dimensions"):
        evaluate_samples(workdir, "fid", num_samples=64)
    with pytest.raises(UserError, match="the Inception Score needs at least 100 samples"):
        evaluate_samples(workdir, "is", num_samples=99)
    for bad, problem in [
        (np.zeros((80, 8, 8, 1), np.float32), "images are float32; expected uint8"),
        (np.zeros((80, 16, 16, 1), np.uint8), r"shape \(80, 16, 16, 1\); expected \(N, 8, 8, 1\)"),
    ]:
        np.savez(tmp_path / "bad.npz", images=bad)
        with pytest.raises(UserError, match=problem):
            evaluate_samples(workdir, "fid", samples=tmp_path / "bad.npz")
    with pytest.raises(UserError, match="no such file"):
        evaluate_samples(workdir, "is", samples=tmp_path / "missing.npz")
    with pytest.raises(UserError, match="not both"):
        evaluate_samples(workdir, "is", samples=tmp_path / "bad.npz", num_samples=100)
    with pytest.raises(UserError, match="digits split must be one of"):
        evaluate_nll(workdir, split="validation")
    proc = run_cli("evaluate", f"--workdir={workdir}", "--metric=bpd")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: --metric='bpd': expected one of nll, fid, fd, is, memorization, psnr, ssim, "
        "perceptual, class_accuracy"
    )


@pytest.mark.interop
@pytest.mark.slow
def test_diffusers_import_gives_a_workdir_that_samples(cache_dir, tmp_path):
    import diffusers
    import torch

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        block_out_channels=(16, 32),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        norm_eps=1e-6,
        freq_shift=1,
        flip_sin_to_cos=False,
        attention_head_dim=8,
    )
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    workdir = tmp_path / "imported"
    proc = run_cli("interop.diffusers", f"--input={tmp_path / 'unet'}", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["dataset"] == "cifar10"

    wd = load_workdir(workdir)
    _, params = load_unet2d(tmp_path / "unet")
    assert wd.step == 0
    assert jax.tree.structure(wd.params) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(wd.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want)
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["downsample_padding"] == "symmetric"
    assert config["model"]["num_head_channels"] == 8
    assert config["diffusion"]["num_timesteps"] == 1000 and config["data"]["dataset"] == "cifar10"

    out = sample.run(workdir, 2, tmp_path / "s.npz", steps=2, batch_size=8)
    images = load_images(out["output"])
    assert images.dtype == np.uint8 and images.shape == (2, 8, 8, 3)

    with pytest.raises(UserError, match="already holds a run"):
        import_to_workdir(tmp_path / "unet", workdir)
    with pytest.raises(UserError, match="--metric=is is unavailable for 'cifar10'"):
        evaluate_samples(workdir, "is", num_samples=100)


CACHE_PROBE = """
import jax, jax.numpy as jnp
from diffusion_jax import cli
path = cli.use_compilation_cache()
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
print(path, jax.config.jax_compilation_cache_max_size)
"""


def _probe_cache(env_changes: dict):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(env_changes, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run(
        [sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split(), proc.stderr


def test_clis_keep_compiled_programs_in_the_user_cache(tmp_path):
    (path, max_size), _ = _probe_cache({"DIFFUSION_JAX_CACHE": str(tmp_path)})
    assert path == str(tmp_path / "xla") and int(max_size) == 2**30
    assert any((tmp_path / "xla").iterdir()), "nothing was written to the cache"

    # JAX_COMPILATION_CACHE_DIR decides when set; empty turns the cache off.
    other = tmp_path / "other"
    off = {"DIFFUSION_JAX_CACHE": str(other), "JAX_COMPILATION_CACHE_DIR": ""}
    (path, _), _ = _probe_cache(off)
    assert path == "None" and not other.exists()

    # A cache directory that cannot be made: a warning, and no cache.
    (tmp_path / "a_file").write_text("")
    (path, _), stderr = _probe_cache({"DIFFUSION_JAX_CACHE": str(tmp_path / "a_file")})
    assert path == "None" and "no XLA compilation cache" in stderr


@pytest.mark.slow
def test_sample_with_classifier_guidance(workdir, tmp_path):
    """--classifier_workdir guides the unconditional tiny model towards the classifier's classes
    (cycled, written as `labels`); scale 0 is the unguided chain up to float rounding (the
    classifier compiled into the chain changes XLA's fusion of the denoiser: at most one uint8
    level), a large scale moves the samples; the scale is in the provenance."""
    from test_classifier import _classifier_workdir

    clf = tmp_path / "clf"
    _classifier_workdir(clf, **{"diffusion.num_timesteps": NUM_TIMESTEPS, "sampling.steps": 4})
    sample.run(workdir, 6, tmp_path / "plain.npz")
    zero = sample.run(
        workdir, 6, tmp_path / "zero.npz", classifier_workdir=clf, classifier_scale=0.0
    )
    strong = sample.run(
        workdir, 6, tmp_path / "strong.npz", classifier_workdir=clf, classifier_scale=1e4
    )
    assert zero["classifier_scale"] == 0.0 and strong["classifier_scale"] == 1e4
    assert strong["classifier_workdir"] == str(clf.resolve())
    base = load_images(tmp_path / "plain.npz").astype(int)
    assert np.max(np.abs(load_images(tmp_path / "zero.npz").astype(int) - base)) <= 1
    assert np.max(np.abs(load_images(tmp_path / "strong.npz").astype(int) - base)) > 10
    with np.load(tmp_path / "strong.npz") as f:
        np.testing.assert_array_equal(f["labels"], [0, 1, 0, 1, 0, 1])
    assert "labels" not in np.load(tmp_path / "plain.npz").files


def test_classifier_guidance_errors(workdir, tmp_path):
    from test_classifier import _classifier_workdir

    with pytest.raises(UserError, match="give the classifier's --classifier_workdir"):
        sample.run(workdir, 2, tmp_path / "a.npz", classifier_scale=2.0)
    clf = tmp_path / "clf"
    _classifier_workdir(clf)  # T = 1000, the model's is NUM_TIMESTEPS
    with pytest.raises(UserError, match="trained with config.diffusion.num_timesteps=1000"):
        sample.run(workdir, 2, tmp_path / "b.npz", classifier_workdir=clf)
    with pytest.raises(UserError, match="label 2 is outside this model's classes 0..1"):
        sample.parse_labels("2", load_saved_config(workdir), 4, load_saved_config(clf))
    proc = run_cli(
        "sample",
        f"--workdir={workdir}",
        "--num_samples=2",
        f"--output={tmp_path / 'c.npz'}",
        "--classifier_scale=3",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: --classifier_scale=3.0: give the classifier's --classifier_workdir"
    )
