"""A folder of PNG / JPEG images as a random-access source.

Files: every *.png, *.jpg, *.jpeg (any case) under the root, recursively, in sorted order of
their path relative to the root, so every host sees the same list. Other files are ignored.

Labels: if every image lives in a first-level subfolder, the sorted subfolder names are the
classes (label = position in that list); if none does, every label is 0. A mix of both is
ambiguous and raises.

Pixels: decoded with PIL, converted explicitly to RGB or L (see `images.convert_channels`),
centre-cropped to a square and resized to image_size with PIL's BICUBIC filter.

Corrupt or unreadable files are found once, at construction, by decoding every file (so
len() is exact): with on_corrupt='skip' they are left out, counted in `num_skipped`, listed in
`skipped_files` and logged; with on_corrupt='error' the first one raises, naming the file.
"""

import os
from concurrent import futures
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image

from diffusion_jax.data import images as images_lib

EXTENSIONS = (".png", ".jpg", ".jpeg")
ON_CORRUPT = ("skip", "error")
BICUBIC = Image.Resampling.BICUBIC
# What PIL raises on broken files: OSError (truncated, unidentified), SyntaxError (bad PNG
# chunks), ValueError / EOFError (bad headers), DecompressionBombError (absurd sizes).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _decode_error(path: Path) -> str | None:
    """None if PIL fully decodes the file, else the reason it cannot."""
    try:
        with Image.open(path) as img:
            img.load()
    except _DECODE_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


class FolderSource:
    """Random-access image folder: source[i] -> {"image": uint8 (S, S, C), "label": int32}."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        image_size: int,
        num_channels: int,
        on_corrupt: str = "skip",
        scan_threads: int | None = None,
    ):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"data.on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        candidates = sorted(
            (p for p in self.root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not candidates:
            raise ValueError(
                f"image folder {str(self.root)!r} has no {'/'.join(EXTENSIONS)} files "
                "(searched recursively)"
            )
        self.class_names, labels = self._labels(candidates)

        workers = scan_threads or min(8, os.cpu_count() or 1)
        with futures.ThreadPoolExecutor(max_workers=workers) as pool:
            errors = list(pool.map(_decode_error, candidates))
        self.skipped_files = []
        keep = []
        for i, (path, error) in enumerate(zip(candidates, errors, strict=True)):
            if error is None:
                keep.append(i)
            elif on_corrupt == "error":
                raise ValueError(f"corrupt or unreadable image {str(path)!r} ({error})")
            else:
                self.skipped_files.append(str(path))
        if self.skipped_files:
            logging.warning(
                "Image folder %s: skipped %d corrupt or unreadable of %d files, e.g. %s",
                self.root,
                len(self.skipped_files),
                len(candidates),
                self.skipped_files[:3],
            )
        if not keep:
            raise ValueError(f"image folder {str(self.root)!r}: every image file is corrupt")
        self.files = [candidates[i] for i in keep]
        self._labels_arr = np.asarray([labels[i] for i in keep], dtype=np.int32)
        self._labels_arr.flags.writeable = False
        self.image_size, self.num_channels = image_size, num_channels
        logging.info(
            "Image folder %s: %d images, %d classes", self.root, len(self.files), self.num_classes
        )

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)

    @property
    def num_classes(self) -> int:
        return max(len(self.class_names), 1)

    def _labels(self, files: list[Path]) -> tuple[list[str], list[int]]:
        parts = [p.relative_to(self.root).parts for p in files]
        nested = [len(x) > 1 for x in parts]
        if not any(nested):
            return [], [0] * len(files)
        if not all(nested):
            top = next(p for p, n in zip(files, nested, strict=True) if not n)
            raise ValueError(
                f"image folder {str(self.root)!r} mixes images at its top level (e.g. "
                f"{top.name!r}) with class subfolders; use one layout: all images in "
                "first-level class subfolders, or none"
            )
        class_names = sorted({x[0] for x in parts})
        index = {name: i for i, name in enumerate(class_names)}
        return class_names, [index[x[0]] for x in parts]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                image = images_lib.fit(img, self.image_size, self.num_channels, BICUBIC)
        except _DECODE_ERRORS as e:
            raise RuntimeError(
                f"image {str(path)!r} decoded at construction but not now: {e}"
            ) from e
        return {"image": image, "label": self._labels_arr[index]}
