"""Any TensorFlow Datasets image dataset, read by random access without TensorFlow.

`tfds.data_source(name, split=..., download=False)` reads data prepared once in the
array_record format (see `diffusion_jax.data.prepare`; an unprepared dataset is prepared on
first use). Images are converted explicitly to
RGB or L, centre-cropped to a square and resized with PIL's BICUBIC filter when their size
differs from image_size (see `images.prepare_array`); images already of the requested shape
pass through untouched. Labels come from the feature `label_key` ("label" by default) when
the dataset has it, else every label is 0 (e.g. lsun).
"""

import difflib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from diffusion_jax.data import images as images_lib
from diffusion_jax.data import prepare as prepare_lib

BICUBIC = Image.Resampling.BICUBIC
ALLOWED = "'digits', 'folder:<path>' (or 'folder' with data.data_dir), or a tfds dataset name"


def open_data_source(name: str, split: str, data_dir: str | None):
    """tfds.data_source of a prepared dataset, preparing it first when it is not.

    A dataset met for the first time is downloaded and prepared as array_record (as tfds users
    expect; progress is logged); if that fails (no network, no TensorFlow for a builder that
    needs it) the error says so and gives the command that prepares it elsewhere. Checking
    `is_prepared` first also avoids tfds' own messages for that case, which mislead: a KeyError
    "splits is empty" without a data_dir, a TFRECORD format error with one.
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name.split("/")[0], known, n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}: expected {ALLOWED}.{hint}") from e
    if not builder.is_prepared():
        try:
            prepare_lib.prepare(name, data_dir)
        except prepare_lib.PrepareError as e:
            raise RuntimeError(
                f"tfds dataset {name!r} is not prepared (nothing at {builder.data_dir}) and "
                f"preparing it here failed: {e}. Prepare it once where that works: "
                f"{prepare_lib.prepare_command(name, data_dir)}"
            ) from e
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError as e:
        # Prepared, but not in a format random access reads (tfds' default, tfrecord).
        raise RuntimeError(
            f"tfds dataset {name!r} at {builder.data_dir} is prepared in the "
            f"{builder.info.file_format.value} format, which random access cannot read. "
            f"Prepare it in array_record format into another data_dir (or delete that "
            f"one first): {prepare_lib.prepare_command(name, data_dir)}"
        ) from e


class TfdsSource:
    """Random-access tfds split: source[i] -> {"image": uint8 (S, S, C), "label": int32}."""

    def __init__(
        self,
        name: str,
        split: str,
        *,
        image_size: int,
        num_channels: int,
        data_dir: str | None = None,
        label_key: str = "label",
    ):
        self.name = name
        self._source = open_data_source(name, split, data_dir)
        if len(self._source) == 0:
            raise ValueError(f"tfds dataset {name!r} split {split!r} is empty")
        features = self._source.dataset_info.features
        if "image" not in features:
            raise ValueError(
                f"tfds dataset {name!r} has no 'image' feature (features: {list(features)})"
            )
        self._label_key = label_key if label_key in features else None
        # A ClassLabel feature knows its class count; another label feature does not (None).
        self.num_classes = (
            getattr(features[label_key], "num_classes", None) if self._label_key else 1
        )
        self.image_size, self.num_channels = image_size, num_channels

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[index]
        image = images_lib.prepare_array(
            record["image"], self.image_size, self.num_channels, BICUBIC
        )
        label = record[self._label_key] if self._label_key else 0
        return {"image": image, "label": np.int32(label)}
