"""The embedded default dataset: scikit-learn's 1,797 8x8 handwritten digits.

The pixel values ship inside scikit-learn's package (no download). They are integers in
0..16; we map them to uint8 0..255 by round(v * 255 / 16). The split is fixed: a seeded
permutation (seed 0) puts 1,497 images in "train" and 300 in "test".
"""

import functools

import numpy as np
from PIL import Image

from diffusion_jax.data import images as images_lib
from diffusion_jax.data.arrays import ArraySource

BILINEAR = Image.Resampling.BILINEAR

NUM_TEST = 300
SPLITS = ("train", "test", "all")


@functools.cache
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits, parsed from scikit-learn's file once per process (about a second)."""
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int32)


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 8, 8, 1), labels int32 (N,)) for split 'train' | 'test' | 'all'."""
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
    images, labels = _all_digits()
    if split == "all":
        return images.copy(), labels.copy()
    order = np.random.default_rng(0).permutation(len(images))
    idx = order[NUM_TEST:] if split == "train" else order[:NUM_TEST]
    idx = np.sort(idx)
    return images[idx], labels[idx]


class DigitsSource(ArraySource):
    """Random-access digits: source[i] -> {"image": uint8 (S, S, C), "label": int32}.

    Native images are 8x8 grayscale. For image_size != 8 every image is resized once, at
    construction, with PIL's BILINEAR filter. num_channels=3 replicates the gray channel into
    R, G and B (the digits have no colour); num_channels=1 keeps it.
    """

    def __init__(self, split: str = "train", *, image_size: int = 8, num_channels: int = 1):
        images, labels = load_digits(split)
        if image_size != 8 or num_channels != 1:
            images = np.stack(
                [
                    images_lib.fit(Image.fromarray(im[..., 0]), image_size, num_channels, BILINEAR)
                    for im in images
                ]
            )
        super().__init__(images, labels, num_classes=10)
