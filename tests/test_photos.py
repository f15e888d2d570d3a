"""The embedded photo-patch source: geometry of the split, determinism, the contract."""

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from diffusion_jax import data
from diffusion_jax.data import photos


def test_downscale_is_pil_area_reduce_of_the_sklearn_photos():
    # Independent computation: PIL's Image.reduce(2) (2x2 box mean, rounded half up).
    bunch = load_sample_images()
    for name, photo in zip(photos.PHOTO_NAMES, photos.downscaled_photos(), strict=True):
        (raw,) = [im for f, im in zip(bunch.filenames, bunch.images, strict=True) if name in f]
        expected = np.asarray(Image.fromarray(raw[:426]).reduce(2))
        assert photo.shape == (213, 320, 3)
        np.testing.assert_array_equal(photo, expected)


def test_splits_shapes_labels_and_counts():
    train, train_labels = photos.load_photo_patches("train")
    test, test_labels = photos.load_photo_patches("test")
    every, every_labels = photos.load_photo_patches("all")
    # 23 rows x 26 columns (stride 8) per photo for train, 12 x 3 (stride 16) for test.
    assert train.shape == (2 * 23 * 26, 32, 32, 3) and test.shape == (2 * 12 * 3, 32, 32, 3)
    assert train.dtype == test.dtype == np.uint8
    assert train_labels.dtype == np.int32
    assert np.bincount(train_labels).tolist() == [598, 598]
    assert np.bincount(test_labels).tolist() == [36, 36]
    np.testing.assert_array_equal(every, np.concatenate([train, test]))
    np.testing.assert_array_equal(every_labels, np.concatenate([train_labels, test_labels]))
    # A real photograph: patches differ and hold detail.
    assert train.std() > 30 and len(np.unique(train.reshape(len(train), -1), axis=0)) == len(train)
    # The held-out strip is not flat background in either photo (flower's right edge is: mean
    # |horizontal difference| 1.1 to 1.7 grey levels there, against 7 to 11 in its strip).
    for photo in (0, 1):
        detail = np.abs(np.diff(test[test_labels == photo].astype(float), axis=2)).mean()
        assert detail > 5, (photo, detail)


def test_no_train_patch_overlaps_the_test_strip():
    for photo in photos.downscaled_photos():
        h, w = photo.shape[:2]
        x0, x1 = photos.TEST_X0, photos.TEST_X0 + photos.TEST_WIDTH
        train = photos.patch_corners("train", h, w)
        test = photos.patch_corners("test", h, w)
        covered_train = np.zeros((h, w), bool)
        for top, left in train:
            covered_train[top : top + 32, left : left + 32] = True
        covered_test = np.zeros((h, w), bool)
        for top, left in test:
            covered_test[top : top + 32, left : left + 32] = True
        assert not (covered_train & covered_test).any()
        assert not covered_train[:, x0:x1].any()
        assert covered_test[:, x0:x1].any(axis=0).all() and not covered_test[:, :x0].any()
        assert not covered_test[:, x1:].any()
        # Both train regions are used up to the strip and to the photo's right edge.
        assert covered_train[:, :x0].any(axis=0).all() and covered_train[:, x1:].any(axis=0).all()
    # The patches themselves: each train patch equals the photo at its corner, left of the strip.
    train, labels = photos.load_photo_patches("train")
    corners = photos.patch_corners("train", 213, 320)
    photo = photos.downscaled_photos()[1]
    top, left = corners[-1]
    np.testing.assert_array_equal(train[-1], photo[top : top + 32, left : left + 32])
    assert labels[-1] == 1


def test_source_is_deterministic_and_follows_the_contract():
    cfg = dict(dataset="photos", image_size=32, num_channels=3)
    a, b = data.create_source(cfg, "test"), data.create_source(cfg, "test")
    assert len(a) == 72 and a.num_classes == 2
    example = a[5]
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    assert example["label"].dtype == np.int32
    np.testing.assert_array_equal(a[40]["image"], b[40]["image"])
    assert not a[0]["image"].flags.writeable


def test_resize_and_gray():
    cfg = dict(dataset="photos", image_size=16, num_channels=1)
    small = data.create_source(cfg, "test")
    native = data.create_source(dict(cfg, image_size=32, num_channels=3), "test")
    assert small[3]["image"].shape == (16, 16, 1)
    expected = np.asarray(
        Image.fromarray(native[3]["image"]).convert("L").resize((16, 16), Image.Resampling.BILINEAR)
    )
    np.testing.assert_array_equal(small[3]["image"][..., 0], expected)


def test_split_error():
    with pytest.raises(ValueError, match="photos split must be one of"):
        data.create_source(dict(dataset="photos", image_size=32, num_channels=3), "valid")
