"""Sample grids as PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) into one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = img
    return grid


def save_grid(images: np.ndarray, path, ncols: int | None = None, min_cell: int = 32) -> Path:
    """Write a PNG grid; images smaller than `min_cell` pixels are enlarged (nearest)."""
    images = np.asarray(images)
    scale = max(1, math.ceil(min_cell / images.shape[1]))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = make_grid(images, ncols)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if grid.shape[-1] == 1 else "RGB"
    Image.fromarray(grid[..., 0] if mode == "L" else grid, mode=mode).save(path)
    return path


def save_class_grid(images: np.ndarray, labels: np.ndarray, path, min_cell: int = 32) -> Path:
    """A PNG grid of a class-conditional model's samples: when every class present has as many
    images, one row per class (classes in increasing order, samples in their order); else
    `save_grid`'s layout."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2 or len(set(counts.tolist())) != 1:
        return save_grid(images, path, min_cell=min_cell)
    order = np.argsort(labels, kind="stable")
    return save_grid(np.asarray(images)[order], path, ncols=int(counts[0]), min_cell=min_cell)
