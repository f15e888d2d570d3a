"""The embedded photo patches: 32x32 RGB patches of the two photographs scikit-learn ships.

`sklearn.datasets.load_sample_images()` holds china.jpg and flower.jpg (427 x 640 RGB, no
download). Each photo is first downscaled 2x by area averaging (its top 426 rows, 2x2 blocks,
mean rounded half up: what PIL's `Image.reduce(2)` computes) to 213 x 320, so that a 32x32 patch
holds a scene's detail rather than a few flat pixels. The split is fixed by geometry:

  test   a vertical strip of TEST_WIDTH = 64 columns of each downscaled photo, from
         x = TEST_X0 = 128 (the middle fifth: half the pagoda and the water in china, the
         flower's centre in flower; the right edge would be blurred background in flower),
         cut with stride TEST_STRIDE = 16 in both directions (neighbouring test patches
         overlap by half): 12 rows x 3 columns = 36 patches per photo
  train  the columns left and right of the strip (x < 128 and x >= 192), each cut with
         stride TRAIN_STRIDE = 8 from its first column; no train patch reaches into the
         strip: 23 rows x (13 + 13) columns = 598 patches per photo
  all    train followed by test

Patches are ordered by photo, then row, then column. The label is the photo's index (0 china,
1 flower), so `num_classes` is 2.
"""

import functools

import numpy as np
from PIL import Image

from diffusion_jax.data import images as images_lib
from diffusion_jax.data.arrays import ArraySource

PATCH = 32
DOWNSCALE = 2
TEST_X0 = 128
TEST_WIDTH = 64
TRAIN_STRIDE = 8
TEST_STRIDE = 16
SPLITS = ("train", "test", "all")
PHOTO_NAMES = ("china", "flower")
BILINEAR = Image.Resampling.BILINEAR


def area_downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (H // f, W // f, C): mean of f x f blocks, rounded half up.

    Trailing rows or columns that do not fill a block are dropped."""
    h, w = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    blocks = image[:h, :w].astype(np.int64).reshape(h // factor, factor, w // factor, factor, -1)
    area = factor * factor
    return ((blocks.sum(axis=(1, 3)) + area // 2) // area).astype(np.uint8)


@functools.cache
def downscaled_photos() -> tuple[np.ndarray, ...]:
    """The two photos, area-downscaled 2x: uint8 (213, 320, 3) each, read-only."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    by_name = {
        name.rsplit("/", 1)[-1].removesuffix(".jpg"): im
        for name, im in zip(bunch.filenames, bunch.images, strict=True)
    }
    photos = tuple(area_downscale(by_name[name], DOWNSCALE) for name in PHOTO_NAMES)
    for photo in photos:
        photo.flags.writeable = False
    return photos


def patch_corners(split: str, height: int, width: int) -> list[tuple[int, int]]:
    """(top, left) of every PATCH x PATCH patch of one photo in split 'train' or 'test'."""
    strip_end = TEST_X0 + TEST_WIDTH
    if split == "train":
        stride = TRAIN_STRIDE
        cols = [
            *range(0, TEST_X0 - PATCH + 1, stride),
            *range(strip_end, width - PATCH + 1, stride),
        ]
    else:
        stride = TEST_STRIDE
        cols = list(range(TEST_X0, strip_end - PATCH + 1, stride))
    return [(top, left) for top in range(0, height - PATCH + 1, stride) for left in cols]


def load_photo_patches(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return (patches uint8 (N, 32, 32, 3), labels int32 (N,) = photo index) of one split."""
    if split not in SPLITS:
        raise ValueError(f"photos split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        train, test = load_photo_patches("train"), load_photo_patches("test")
        return np.concatenate([train[0], test[0]]), np.concatenate([train[1], test[1]])
    patches, labels = [], []
    for index, photo in enumerate(downscaled_photos()):
        corners = patch_corners(split, *photo.shape[:2])
        patches += [photo[top : top + PATCH, left : left + PATCH] for top, left in corners]
        labels += [index] * len(corners)
    return np.stack(patches), np.asarray(labels, np.int32)


class PhotoPatchSource(ArraySource):
    """Random-access photo patches: source[i] -> {"image": uint8 (S, S, C), "label": int32}.

    Native patches are 32x32 RGB. For image_size != 32 every patch is resized once, at
    construction, with PIL's BILINEAR filter (antialiased when shrinking); num_channels=1
    converts to grayscale (PIL's 'L', ITU-R 601-2 luma).
    """

    def __init__(self, split: str = "train", *, image_size: int = PATCH, num_channels: int = 3):
        patches, labels = load_photo_patches(split)
        if image_size != PATCH or num_channels != 3:
            patches = np.stack(
                [
                    images_lib.fit(Image.fromarray(p), image_size, num_channels, BILINEAR)
                    for p in patches
                ]
            )
        super().__init__(patches, labels, num_classes=len(PHOTO_NAMES))
