"""Sample-quality metrics: FID and Inception Score."""

from diffusion_jax.metrics.fid import (
    feature_statistics,
    frechet_distance,
    inception_score,
    load_statistics,
    save_statistics,
)

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "load_statistics",
    "save_statistics",
]
