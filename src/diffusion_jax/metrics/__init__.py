"""Sample-quality metrics: FID and Inception Score, with InceptionV3 (natural images) or a small
digits classifier (the embedded 8x8 digits) as the feature network; PSNR and SSIM against
reference images (`image_quality`), and a perceptual distance in InceptionV3's features
(`perceptual`); nearest-neighbour distances to the training data
(`memorization`).

The Inception weights are converted once with `python -m diffusion_jax.metrics.convert_inception`
(that module needs torch and is not imported here).
"""

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
from diffusion_jax.metrics.image_quality import psnr, ssim
from diffusion_jax.metrics.inception import (
    InceptionV3,
    inception_features,
    inception_logits,
    load_inception_params,
)
from diffusion_jax.metrics.memorization import nearest_neighbour_distances
from diffusion_jax.metrics.perceptual import perceptual_distance

__all__ = [
    "InceptionV3",
    "digits_features",
    "digits_logits",
    "feature_statistics",
    "frechet_distance",
    "get_digits_classifier",
    "inception_features",
    "inception_logits",
    "inception_score",
    "load_inception_params",
    "load_statistics",
    "nearest_neighbour_distances",
    "perceptual_distance",
    "psnr",
    "save_statistics",
    "ssim",
]
