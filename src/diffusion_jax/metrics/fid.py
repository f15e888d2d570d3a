"""Frechet distance between feature Gaussians (FID) and the Inception Score, in float64 numpy.

The formulas follow pytorch-fid (Seitzinger et al.) and the original Inception Score code
(Salimans et al. 2016): `frechet_distance` is pytorch-fid's `calculate_frechet_distance`,
including its eps offset on the diagonals when the covariance product is singular, and
`inception_score` splits the predictions into `num_splits` consecutive chunks.
"""

import numpy as np
from absl import logging
from scipy import linalg, special

from diffusion_jax.metrics.cache import save_tree


def _check_finite(name: str, array: np.ndarray) -> None:
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf values")


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64.

    Same as pytorch-fid: `np.mean(f, axis=0)` and `np.cov(f, rowvar=False)`. The covariance of
    N samples has rank at most N - 1, so at least D + 1 samples are required.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {features.shape}")
    n, d = features.shape
    if n < 2 or n <= d:
        raise ValueError(
            f"got {n} samples of {d}-dimensional features: the covariance of N samples has "
            f"rank at most N - 1, so it would be singular; at least {max(d + 1, 2)} samples "
            f"are needed (FID is usually computed from 10,000 or more)"
        )
    _check_finite("features", features)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)). If the matrix square root
    is not finite (singular product), `eps` is added to both diagonals, as in pytorch-fid.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"covariances must have shape ({d}, {d}) to match the means, "
            f"got {sigma1.shape} and {sigma2.shape}"
        )
    for name, array in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        _check_finite(name, array)

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        logging.warning("FID: singular product; adding %g to the covariance diagonals", eps)
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrt(sigma1 sigma2) has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g}: are both covariances positive semi-definite?"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(
    probs_or_logits, num_splits: int = 10, *, from_logits: bool = False
) -> tuple[float, float]:
    """Mean and std over `num_splits` consecutive chunks of exp(E_x KL(p(y|x) || p(y))).

    Rows are class probabilities (N, K), or logits if `from_logits=True` (softmax in float64).
    Uniform predictions give 1; confident predictions spread evenly over K classes give K.
    """
    x = np.asarray(probs_or_logits, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"predictions must have shape (N, num_classes), got {x.shape}")
    _check_finite("predictions", x)
    n = x.shape[0]
    if num_splits < 1 or n < num_splits:
        raise ValueError(f"need 1 <= num_splits <= N, got num_splits={num_splits} and N={n}")
    if from_logits:
        probs = special.softmax(x, axis=1)
    else:
        if np.any(x < 0) or not np.allclose(x.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError(
                "rows are not probability vectors (non-negative, summing to 1); "
                "pass from_logits=True for logits"
            )
        probs = x
    scores = []
    for i in range(num_splits):
        part = probs[i * n // num_splits : (i + 1) * n // num_splits]
        marginal = part.mean(axis=0, keepdims=True)
        kl = special.rel_entr(part, marginal).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def save_statistics(path, mu, sigma, *, num_examples: int | None = None) -> None:
    """Save reference statistics as .npz with arrays `mu` (D,) and `sigma` (D, D), and, when
    given, `num_examples` (a scalar: how many examples they summarise, for reporting)."""
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    tree = {"mu": mu, "sigma": sigma}
    if num_examples is not None:
        tree["num_examples"] = np.int64(num_examples)
    save_tree(path, tree)


def load_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    """Load (mu, sigma) saved by `save_statistics` (or pytorch-fid's .npz of the same keys)."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise ValueError(f"{path} has no {sorted(missing)} (found {sorted(data.files)})")
        return data["mu"], data["sigma"]
