"""Sample-quality metrics: FID and Inception Score, with a small digits classifier as the
feature network for the embedded 8x8 digits."""

from diffusion_jax.metrics.digits_classifier import (
    digits_features,
    digits_logits,
    get_digits_classifier,
)
from diffusion_jax.metrics.fid import (
    feature_statistics,
    frechet_distance,
    inception_score,
    load_statistics,
    save_statistics,
)

__all__ = [
    "digits_features",
    "digits_logits",
    "feature_statistics",
    "frechet_distance",
    "get_digits_classifier",
    "inception_score",
    "load_statistics",
    "save_statistics",
]
