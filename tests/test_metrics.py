"""FID / IS maths against closed forms, and the digits classifier used as their feature net."""

import math
import warnings

import jax
import numpy as np
import pytest
from scipy import linalg

from diffusion_jax.data import load_digits
from diffusion_jax.metrics import (
    digits_classifier,
    digits_features,
    digits_logits,
    feature_statistics,
    fid,
    frechet_distance,
    get_digits_classifier,
    inception_score,
    load_statistics,
    nearest_neighbour_distances,
    save_statistics,
)
from diffusion_jax.metrics.cache import default_cache_dir


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# --- Frechet distance ---------------------------------------------------------------------


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_commuting_closed_form():
    # Same eigenvectors Q: sqrt(sigma1 sigma2) = Q diag(sqrt(a b)) Q^T.
    rng = np.random.default_rng(1)
    q = _random_orthogonal(rng, 8)
    a, b = rng.uniform(0.1, 4.0, size=8), rng.uniform(0.1, 4.0, size=8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_frechet_distance_random_spd_matches_symmetric_form():
    # Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2): the second is symmetric, so eigh computes it.
    rng = np.random.default_rng(2)
    d = 20
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(3).normal(size=(200, 16)) @ np.diag(np.arange(1, 17))
    mu, sigma = feature_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_singular_covariances():
    rng = np.random.default_rng(4)
    low_rank = rng.normal(size=(10, 3))
    sigma = low_rank @ low_rank.T  # rank 3 of 10
    mu = rng.normal(size=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        got = frechet_distance(mu, sigma, mu, sigma)
    assert np.isfinite(got) and abs(got) < 1e-5 * np.trace(sigma)


def test_frechet_distance_eps_offset_when_sqrtm_is_not_finite(monkeypatch):
    # pytorch-fid's fallback: a non-finite sqrtm is retried with eps added to both diagonals.
    rng = np.random.default_rng(5)
    s1, s2 = _random_spd(rng, 5), _random_spd(rng, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    eps = 1e-2
    offset = eps * np.eye(5)
    expected = frechet_distance(mu1, s1 + offset, mu2, s2 + offset)
    expected -= 2 * 5 * eps  # the offset enters the traces of sigma1, sigma2 but not there
    real_sqrtm = linalg.sqrtm
    calls = []

    def flaky_sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.linalg, "sqrtm", flaky_sqrtm)
    got = frechet_distance(mu1, s1, mu2, s2, eps=eps)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_rejects_bad_inputs():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="one length"):
        frechet_distance(mu, sigma, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        frechet_distance(mu, sigma, mu, np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, sigma, np.array([0.0, np.nan, 0.0]), sigma)


def test_feature_statistics_matches_numpy_and_checks_sample_count():
    features = np.random.default_rng(6).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = feature_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(axis=0))
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError, match="singular; at least 9 samples"):
        feature_statistics(np.ones((8, 8)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_statistics(np.ones((1, 1)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        feature_statistics(np.ones(10))
    with pytest.raises(ValueError, match="NaN"):
        feature_statistics(np.full((10, 2), np.nan))


def test_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    mu, sigma = rng.normal(size=3), _random_spd(rng, 3)
    save_statistics(tmp_path / "ref.npz", mu, sigma)
    mu2, sigma2 = load_statistics(tmp_path / "ref.npz")
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # The reference count, for result names, rides along and leaves (mu, sigma) unchanged.
    save_statistics(tmp_path / "counted.npz", mu, sigma, num_examples=500)
    np.testing.assert_array_equal(load_statistics(tmp_path / "counted.npz")[0], mu)
    with np.load(tmp_path / "counted.npz", allow_pickle=False) as f:
        assert int(f["num_examples"]) == 500
    np.savez(tmp_path / "other.npz", mean=mu)
    with pytest.raises(ValueError, match=r"no \['mu', 'sigma'\]"):
        load_statistics(tmp_path / "other.npz")


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DIFFUSION_JAX_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "diffusion_jax")


# --- Inception Score ----------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.full((100, 7), 1 / 7))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("num_classes,num_splits", [(10, 10), (4, 1)])
def test_inception_score_of_confident_balanced_predictions_is_num_classes(num_classes, num_splits):
    labels = np.arange(20 * num_classes) % num_classes  # every split holds each class equally
    one_hot = np.eye(num_classes)[labels]
    mean, std = inception_score(one_hot, num_splits)
    assert mean == pytest.approx(num_classes, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    mean, _ = inception_score(50.0 * one_hot, num_splits, from_logits=True)
    assert mean == pytest.approx(num_classes, rel=1e-9)


def test_inception_score_of_unbalanced_soft_predictions_matches_its_definition():
    """IS = exp(E_x KL(p(y|x) || p(y))) per split, written out with loops in float64. With
    unbalanced classes and soft, varied predictions the per-image KLs differ, so exp(E[KL])
    and E[exp(KL)] differ (here by 7-10%) and the test tells them apart."""
    rng = np.random.default_rng(0)
    num_classes, n, num_splits = 6, 300, 3
    labels = rng.choice(num_classes, size=n, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    logits = rng.normal(scale=1.5, size=(n, num_classes))
    logits[np.arange(n), labels] += rng.uniform(0.0, 4.0, size=n)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    want = []
    for split in range(num_splits):
        part = probs[split * n // num_splits : (split + 1) * n // num_splits]
        marginal = [sum(row[k] for row in part) / len(part) for k in range(num_classes)]
        kls = [sum(p * math.log(p / m) for p, m in zip(row, marginal, strict=True)) for row in part]
        want.append(math.exp(sum(kls) / len(kls)))
    mean, std = inception_score(probs, num_splits)
    # Both in float64 over 100-row splits: agreement to ~1e-14; 1e-10 leaves room.
    assert mean == pytest.approx(np.mean(want), rel=1e-10)
    assert std == pytest.approx(np.std(want), rel=1e-8)
    mean, _ = inception_score(logits, num_splits, from_logits=True)
    assert mean == pytest.approx(np.mean(want), rel=1e-10)


def test_inception_score_rejects_bad_inputs():
    with pytest.raises(ValueError, match="from_logits=True"):
        inception_score(np.random.default_rng(0).normal(size=(20, 3)), 2)
    with pytest.raises(ValueError, match="num_splits"):
        inception_score(np.full((5, 2), 0.5), num_splits=10)
    with pytest.raises(ValueError, match=r"\(N, num_classes\)"):
        inception_score(np.full(10, 0.1))


# --- Digits classifier ------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("digits_cache")
    return cache, get_digits_classifier(cache)


def test_digits_classifier_accuracy(digits_cache):
    _, variables = digits_cache
    images, labels = load_digits("test")
    logits = digits_logits(variables, images)
    assert logits.shape == (len(images), digits_classifier.NUM_CLASSES)
    accuracy = np.mean(logits.argmax(axis=1) == labels)
    assert accuracy > 0.95, accuracy


def test_digits_classifier_cache_is_reused(digits_cache):
    cache, trained = digits_cache
    path = cache / digits_classifier.CACHE_FILENAME
    mtime = path.stat().st_mtime_ns
    reloaded = get_digits_classifier(cache)
    assert path.stat().st_mtime_ns == mtime
    assert jax.tree.structure(reloaded) == jax.tree.structure(trained)
    for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(a, b)


def test_digits_fid_separates_real_from_noise(digits_cache):
    _, variables = digits_cache
    train, _ = load_digits("train")
    test, _ = load_digits("test")
    noise = np.random.default_rng(0).integers(0, 256, size=test.shape, dtype=np.uint8)
    stats = {
        name: feature_statistics(digits_features(variables, images))
        for name, images in (("train", train), ("test", test), ("noise", noise))
    }
    assert stats["train"][0].shape == (digits_classifier.FEATURE_DIM,)
    real_vs_real = frechet_distance(*stats["train"], *stats["test"])
    real_vs_noise = frechet_distance(*stats["train"], *stats["noise"])
    assert 0 < real_vs_real < 0.05 * real_vs_noise, (real_vs_real, real_vs_noise)


def test_digits_inputs_are_checked(digits_cache):
    _, variables = digits_cache
    with pytest.raises(ValueError, match=r"uint8 digits images \(N, 8, 8, 1\)"):
        digits_features(variables, np.zeros((2, 8, 8, 1), np.float32))


def test_nearest_neighbour_distances_match_scipy_in_any_chunking():
    """Distances in [0, 1] intensity units (uint8 / 255), the same for every chunk size and for
    float input; a shape mismatch is refused."""
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (37, 4, 4, 2), dtype=np.uint8)
    refs = rng.integers(0, 256, (53, 4, 4, 2), dtype=np.uint8)
    want = cdist(x.reshape(37, -1) / 255.0, refs.reshape(53, -1) / 255.0).min(1)
    for chunk in (1, 8, 256):
        got = nearest_neighbour_distances(x, refs, chunk=chunk)
        np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(nearest_neighbour_distances(x / 255.0, refs / 255.0), want)
    with pytest.raises(ValueError, match="differ"):
        nearest_neighbour_distances(x, refs[:, :2])
