"""Data layer: sources (digits, tfds, image folders) and the deterministic batch pipeline."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import constants as tfds_constants

from diffusion_jax import data
from diffusion_jax.config import load_config
from diffusion_jax.data import images as images_lib

ROOT = Path(__file__).resolve().parent.parent


def digits_config(**overrides):
    return {"dataset": "digits", "image_size": 8, "num_channels": 1, **overrides}


# --- digits -------------------------------------------------------------------------------


def test_digits_shapes_dtype_range():
    for split, n in (("train", 1497), ("test", 300)):
        images, labels = data.load_digits(split)
        assert images.shape == (n, 8, 8, 1) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int32
        assert images.min() == 0 and images.max() == 255
        assert set(np.unique(labels)) == set(range(10))
    source = data.create_source(digits_config(), split="train")
    assert len(source) == 1497 and source.num_classes == 10
    example = source[0]
    assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8
    assert example["label"].dtype == np.int32


def test_digits_split_is_fixed_and_partitions_all():
    train, train_labels = data.load_digits("train")
    again, _ = data.load_digits("train")
    np.testing.assert_array_equal(train, again)
    test, test_labels = data.load_digits("test")
    everything, all_labels = data.load_digits("all")

    def rows(images, labels):
        return sorted(im.tobytes() + bytes([lab]) for im, lab in zip(images, labels, strict=True))

    assert rows(np.concatenate([train, test]), np.concatenate([train_labels, test_labels])) == (
        rows(everything, all_labels)
    )


def test_digits_resize_and_replicate_channels():
    native = data.create_source(digits_config(), split="test")
    big = data.create_source(digits_config(image_size=16, num_channels=3), split="test")
    image = big[5]["image"]
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    expected = Image.fromarray(native[5]["image"][..., 0]).resize((16, 16), Image.BILINEAR)
    np.testing.assert_array_equal(image[..., 0], np.asarray(expected))
    assert big[5]["label"] == native[5]["label"]


# --- image conversions -------------------------------------------------------------------


def test_convert_channels_handles_transparency_palette_and_16_bit():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = (255, 0, 0, 0)  # transparent red -> white background
    rgba[:, 2:] = (0, 0, 255, 255)  # opaque blue
    rgb = np.asarray(images_lib.convert_channels(Image.fromarray(rgba), 3))
    assert (rgb[:, :2] == 255).all() and (rgb[:, 2:] == (0, 0, 255)).all()

    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    assert (np.asarray(images_lib.convert_channels(palette, 3))[:, :2] == 255).all()

    gray_alpha = np.stack([np.full((4, 4), 7, np.uint8), np.full((4, 4), 255, np.uint8)], -1)
    opaque_gray = images_lib.convert_channels(Image.fromarray(gray_alpha, mode="LA"), 1)
    assert opaque_gray.mode == "L" and (np.asarray(opaque_gray) == 7).all()

    sixteen = Image.fromarray(np.array([[0, 65535], [32896, 257]], np.uint16))
    assert sixteen.mode == "I;16"
    gray = np.asarray(images_lib.convert_channels(sixteen, 1))
    np.testing.assert_array_equal(gray, [[0, 255], [128, 1]])


def test_fit_center_crops_then_resizes():
    wide = np.zeros((4, 8), np.uint8)
    wide[:, 2:6] = 200  # the centred 4x4 square
    out = images_lib.fit(Image.fromarray(wide), 4, 3, Image.BICUBIC)
    assert out.shape == (4, 4, 3) and (out == 200).all()
    small = images_lib.prepare_array(wide, 2, 1, Image.BICUBIC)
    assert small.shape == (2, 2, 1) and (small == 200).all()
    same = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    assert images_lib.prepare_array(same, 2, 3, Image.BICUBIC) is same


# --- batch pipeline ----------------------------------------------------------------------


class IdSource:
    """n random (asymmetric) 4x4 images; "id" says which example a batch row came from."""

    def __init__(self, n):
        rng = np.random.default_rng(123)
        self.images = rng.integers(0, 256, size=(n, 4, 4, 1), dtype=np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": np.int32(i % 3), "id": np.int32(i)}


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_batches_shapes_and_dtypes():
    source = data.create_source(digits_config(), split="test")
    batch = next(data.create_batches(source, global_batch_size=32, seed=0, random_flip=True))
    assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32


def test_same_seed_same_batches_other_seed_other_batches():
    source = IdSource(40)
    kwargs = dict(global_batch_size=8, random_flip=True, num_threads=2)
    first = take(data.create_batches(source, seed=3, **kwargs), 6)
    again = take(data.create_batches(source, seed=3, **kwargs), 6)
    assert_batches_equal(first, again)
    other = take(data.create_batches(source, seed=4, **kwargs), 6)
    ids = [b["id"].tolist() for b in first]
    assert ids != [b["id"].tolist() for b in other]


def test_resume_at_step_equals_continuing():
    source = IdSource(30)
    kwargs = dict(global_batch_size=8, seed=7, random_flip=True)
    fresh = take(data.create_batches(source, **kwargs), 12)
    resumed = take(data.create_batches(source, start_step=5, **kwargs), 7)
    assert_batches_equal(fresh[5:], resumed)
    by_index = data.create_batch_dataset(source, **kwargs)
    assert_batches_equal(fresh[9:10], [by_index[9]])


def test_hosts_split_each_global_batch():
    source = IdSource(50)
    kwargs = dict(global_batch_size=8, seed=1, random_flip=True)
    single = take(data.create_batches(source, **kwargs), 9)
    hosts = [
        take(data.create_batches(source, process_index=p, process_count=2, **kwargs), 9)
        for p in range(2)
    ]
    for step, whole in enumerate(single):
        local = [hosts[p][step] for p in range(2)]
        assert all(b["image"].shape == (4, 4, 4, 1) for b in local)
        assert not set(local[0]["id"].tolist()) & set(local[1]["id"].tolist())
        assert sorted(np.concatenate([b["id"] for b in local]).tolist()) == sorted(
            whole["id"].tolist()
        )
        # Stronger: concatenated in process order they are the global batch, flips included.
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), whole[key])


def test_random_flip_is_horizontal_for_about_half():
    source = IdSource(64)
    flipped = 0
    batches = take(data.create_batches(source, global_batch_size=64, seed=0, random_flip=True), 4)
    for batch in batches:
        for image, i in zip(batch["image"], batch["id"], strict=True):
            original = source.images[i]
            if np.array_equal(image, original[:, ::-1]):
                flipped += 1
            else:
                np.testing.assert_array_equal(image, original)
    assert 0.35 < flipped / 256 < 0.65
    plain = next(data.create_batches(source, global_batch_size=64, seed=0))
    np.testing.assert_array_equal(plain["image"], source.images[plain["id"]])


def test_every_example_once_per_epoch_reshuffled():
    n, batch_size = 50, 8  # batches straddle epochs: 50 is not a multiple of 8
    batches = take(data.create_batches(IdSource(n), global_batch_size=batch_size, seed=5), 20)
    stream = np.concatenate([b["id"] for b in batches])
    epochs = [stream[e * n : (e + 1) * n] for e in range(len(stream) // n)]
    assert len(epochs) == 3
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(global_batch_size=9, process_count=2), "not divisible by process_count"),
        (dict(global_batch_size=64), "larger than the dataset"),
        (dict(global_batch_size=0), "global_batch_size must be an int >= 1"),
        (dict(global_batch_size=8, process_index=2, process_count=2), "must be < process_count"),
        (dict(global_batch_size=8, start_step=-1), "start_step must be an int >= 0"),
        (dict(global_batch_size=8, seed=-1), "seed must be an int >= 0"),
    ],
)
def test_batch_errors(kwargs, message):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        data.create_batches(IdSource(40), **kwargs)


# --- image folders -----------------------------------------------------------------------


def write_folder(root, *, classes=True):
    """PNG, JPEG, RGBA and grayscale images, a truncated PNG and a non-image .png."""
    rng = np.random.default_rng(0)
    cats, dogs = (root / "cats", root / "dogs") if classes else (root, root)
    for d in {cats, dogs}:
        d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(cats / "a.png")
    Image.fromarray(np.full((16, 16, 3), (200, 30, 30), np.uint8)).save(cats / "b.jpg", quality=95)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (255, 0, 0, 0)
    rgba[:, 8:] = (0, 0, 255, 255)
    Image.fromarray(rgba).save(cats / "c.png")
    Image.fromarray(np.full((10, 8), 90, np.uint8)).save(dogs / "d.png")
    truncated = dogs / "e_truncated.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    (dogs / "f_garbage.PNG").write_bytes(b"this is not an image")
    (dogs / "notes.txt").write_text("ignored")


def folder_config(root, **overrides):
    return {"dataset": f"folder:{root}", "image_size": 8, "num_channels": 3, **overrides}


def test_folder_decodes_labels_and_skips_corrupt(tmp_path, caplog):
    write_folder(tmp_path)
    with caplog.at_level("WARNING"):
        source = data.create_source(folder_config(tmp_path))
    assert [f.name for f in source.files] == ["a.png", "b.jpg", "c.png", "d.png"]
    assert source.num_skipped == 2
    assert sorted(f.split("/")[-1] for f in source.skipped_files) == [
        "e_truncated.png",
        "f_garbage.PNG",
    ]
    assert "skipped 2 corrupt or unreadable of 6 files" in caplog.text
    assert source.class_names == ["cats", "dogs"] and source.num_classes == 2
    examples = [source[i] for i in range(len(source))]
    assert [int(e["label"]) for e in examples] == [0, 0, 0, 1]
    for e in examples:
        assert e["image"].shape == (8, 8, 3) and e["image"].dtype == np.uint8
        assert e["label"].dtype == np.int32
    assert np.abs(examples[1]["image"].astype(int) - (200, 30, 30)).max() <= 4  # JPEG
    rgba = examples[2]["image"]
    assert (rgba[:, :2] == 255).all() and (rgba[:, 6:] == (0, 0, 255)).all()
    gray = examples[3]["image"]  # 10x8 -> centre 8x8 crop, no resize
    assert (gray == 90).all()

    mono = data.create_source(folder_config(tmp_path, num_channels=1, image_size=16))
    assert mono[0]["image"].shape == (16, 16, 1)  # 12x20 -> centre 12x12 -> upsampled
    assert (mono[2]["image"][:, 8:] == 29).all()  # opaque blue as luma: 0.114 * 255

    batch = next(data.create_batches(source, global_batch_size=4, seed=0, random_flip=True))
    assert batch["image"].shape == (4, 8, 8, 3)
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 1]


def test_folder_on_corrupt_error_names_the_file(tmp_path):
    write_folder(tmp_path)
    with pytest.raises(ValueError, match=r"corrupt or unreadable image .*e_truncated\.png"):
        data.create_source(folder_config(tmp_path, on_corrupt="error"))
    with pytest.raises(ValueError, match="on_corrupt must be one of"):
        data.create_source(folder_config(tmp_path, on_corrupt="ignore"))


def test_flat_folder_labels_zero_and_folder_from_data_dir(tmp_path):
    write_folder(tmp_path, classes=False)
    source = data.create_source(
        {"dataset": "folder", "data_dir": str(tmp_path), "image_size": 8, "num_channels": 3}
    )
    assert len(source) == 4 and source.class_names == [] and source.num_classes == 1
    assert [int(source[i]["label"]) for i in range(4)] == [0, 0, 0, 0]


def test_folder_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.create_source(folder_config(tmp_path / "missing"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="has no .png/.jpg/.jpeg files"):
        data.create_source(folder_config(tmp_path / "empty"))
    mixed = tmp_path / "mixed"
    write_folder(mixed)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / "top.png")
    with pytest.raises(ValueError, match="mixes images at its top level"):
        data.create_source(folder_config(mixed))
    with pytest.raises(ValueError, match="needs a path"):
        data.create_source({"dataset": "folder", "image_size": 8, "num_channels": 3})
    with pytest.raises(ValueError, match="single split"):
        data.create_source(folder_config(mixed), split="test")


def test_folder_read_error_surfaces_in_next_naming_the_file(tmp_path):
    write_folder(tmp_path)
    source = data.create_source(folder_config(tmp_path))
    (tmp_path / "cats" / "a.png").write_bytes(b"gone bad after the scan")
    batches = data.create_batches(source, global_batch_size=4, seed=0, num_threads=2)
    with pytest.raises(RuntimeError, match=r"a\.png"):
        next(batches)


# --- tfds --------------------------------------------------------------------------------


class TinyShapes(tfds.core.GeneratorBasedBuilder):
    """Six 12x10 RGB images, labels 0/1: a real array_record dataset prepared offline."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(12, 10, 3)),
            "label": tfds.features.ClassLabel(num_classes=2),
        }
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6)}

    def _generate_examples(self, n):
        for i in range(n):
            image = Image.fromarray(np.full((12, 10, 3), 10 * i, np.uint8))
            yield i, {"image": image, "label": i % 2}


def test_tfds_mock_cifar10_through_the_pipeline():
    with tfds.testing.mock_data(num_examples=20):
        source = data.create_source({"dataset": "cifar10", "image_size": 32, "num_channels": 3})
        assert len(source) == 20 and source.num_classes == 10
        example = source[0]
        assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
        assert example["label"].dtype == np.int32 and 0 <= example["label"] < 10
        batch = next(data.create_batches(source, global_batch_size=8, seed=0, random_flip=True))
        assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].dtype == np.int32

        gray = data.create_source({"dataset": "cifar10", "image_size": 16, "num_channels": 1})
        assert gray[0]["image"].shape == (16, 16, 1)
        lsun = data.create_source(
            {"dataset": "lsun/church_outdoor", "image_size": 8, "num_channels": 3}
        )
        assert lsun[0]["image"].shape == (8, 8, 3) and lsun[0]["label"] == 0
        assert lsun.num_classes == 1

        # configs/ddpm_cifar.py reads the split into memory once.
        cached = data.create_source(load_config(str(ROOT / "configs" / "ddpm_cifar.py")).data)
        assert isinstance(cached, data.InMemorySource)
        assert_sources_equal(source, cached)


def test_tfds_unprepared_dataset_is_prepared_on_first_use(tmp_path, caplog):
    config = {"dataset": "tiny_shapes", "image_size": 8, "num_channels": 3}
    config["data_dir"] = str(tmp_path)
    with caplog.at_level(logging.INFO):
        source = data.create_source(config)
    assert "preparing tiny_shapes at" in caplog.text
    assert (tmp_path / "tiny_shapes" / "1.0.0" / "dataset_info.json").exists()
    assert len(source) == 6 and source.num_classes == 2
    assert [int(source[i]["label"]) for i in range(6)] == [0, 1, 0, 1, 0, 1]
    assert source[3]["image"].shape == (8, 8, 3) and (source[3]["image"] == 30).all()
    from diffusion_jax.data import prepare

    assert prepare.prepare("tiny_shapes", str(tmp_path)).startswith(str(tmp_path))

    # Files prepared in another format (tfrecord) get their own message.
    info_path = tmp_path / "tiny_shapes" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    with pytest.raises(RuntimeError, match="prepared in the tfrecord format"):
        data.create_source(config)


def _no_network(self, *args, **kwargs):
    raise requests.exceptions.ConnectionError("Failed to resolve 'www.cs.toronto.edu'")


@pytest.mark.parametrize("with_data_dir", [True, False])
def test_tfds_download_failure_names_the_prepare_command(tmp_path, monkeypatch, with_data_dir):
    """CIFAR-10 with no network: tfds' own errors were a KeyError "splits is empty" (default
    data_dir missing) or a TFRECORD format error (empty data_dir); now one clear message."""
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _no_network)
    # tfds reads its default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets) at import.
    monkeypatch.setattr(tfds_constants, "DATA_DIR", str(tmp_path / "default"))
    data_dir = str(tmp_path / "given") if with_data_dir else None
    config = {"dataset": "cifar10", "image_size": 32, "num_channels": 3, "data_dir": data_dir}
    with pytest.raises(RuntimeError) as info:
        data.create_source(config)
    message = str(info.value)
    where = tmp_path / ("given" if with_data_dir else "default") / "cifar10"
    assert f"'cifar10' is not prepared (nothing at {where}" in message
    assert "ConnectionError: Failed to resolve 'www.cs.toronto.edu'" in message
    flag = f" --data_dir={data_dir}" if with_data_dir else ""
    assert message.endswith(f"python -m diffusion_jax.data.prepare --dataset=cifar10{flag}")


def test_unknown_tfds_name_suggests_close_ones():
    config = {"dataset": "cifar_10", "image_size": 32, "num_channels": 3}
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar_10'.*'digits'.*'cifar10'"):
        data.create_source(config)


# --- in-memory cache -----------------------------------------------------------------------


def assert_sources_equal(a, b):
    assert len(a) == len(b) and a.num_classes == b.num_classes
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["image"].dtype == y["image"].dtype == np.uint8
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["label"] == y["label"] and np.asarray(y["label"]).dtype == np.int32


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_in_memory_source_serves_the_sources_examples_and_batches(tmp_path, threads):
    write_folder(tmp_path)
    folder = data.create_source(folder_config(tmp_path))
    cached = data.InMemorySource(folder, threads=threads)
    assert_sources_equal(folder, cached)
    assert not cached[0]["image"].flags.writeable
    kwargs = dict(global_batch_size=3, seed=5, start_step=2, random_flip=True)
    assert_batches_equal(
        take(data.create_batches(folder, **kwargs), 4),
        take(data.create_batches(cached, **kwargs), 4),
    )
    digits = digits_config(image_size=12, num_channels=3)
    assert_sources_equal(
        data.create_source(digits, split="test"),
        data.create_source({**digits, "cache_in_memory": True}, split="test"),
    )


def test_tfds_source_cached(tmp_path):
    from diffusion_jax.data import prepare

    prepare.prepare("tiny_shapes", str(tmp_path))
    config = {"dataset": "tiny_shapes", "image_size": 8, "num_channels": 3}
    config["data_dir"] = str(tmp_path)
    cached = data.create_source({**config, "cache_in_memory": True})
    assert isinstance(cached, data.InMemorySource)
    assert_sources_equal(data.create_source(config), cached)


def test_in_memory_source_errors(monkeypatch):
    from diffusion_jax.data import cache

    class Broken:
        num_classes = 1

        def __len__(self):
            return 50

        def __getitem__(self, i):
            if i == 37:
                raise RuntimeError("example 37 is unreadable")
            return {"image": np.zeros((4, 4, 1), np.uint8), "label": 0}

    with pytest.raises(RuntimeError, match="example 37 is unreadable"):
        data.InMemorySource(Broken(), threads=2)

    class Ragged(Broken):
        def __getitem__(self, i):
            return {"image": np.zeros((4, 4, 1) if i < 20 else (1, 1, 1), np.uint8), "label": 0}

    with pytest.raises(ValueError, match=r"example 20 has an image of shape \(1, 1, 1\)"):
        data.InMemorySource(Ragged(), threads=1)
    assert 0 < cache.host_memory_bytes() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # The 1,497 training digits are 95,808 bytes: more than half of a 4,000-byte host.
    monkeypatch.setattr(cache, "host_memory_bytes", lambda: 4000)
    with pytest.raises(ValueError, match=r"cache_in_memory: the 1,497 decoded images take"):
        data.create_source(digits_config(cache_in_memory=True))


# --- config errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(image_size=0), "image_size must be a positive int"),
        (dict(image_size=-8), "image_size must be a positive int"),
        (dict(image_size=None), "image_size must be a positive int"),
        (dict(num_channels=2), r"num_channels must be one of \(1, 3\)"),
        (dict(num_channels=4), r"num_channels must be one of \(1, 3\)"),
        (dict(dataset=""), "data.dataset must be 'digits', 'photos', 'folder:<path>'"),
        (dict(cache_in_memory=1), "data.cache_in_memory must be True or False, got 1"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        data.create_source(digits_config(**overrides))


def test_digits_split_error():
    with pytest.raises(ValueError, match="digits split must be one of"):
        data.create_source(digits_config(), split="validation")
