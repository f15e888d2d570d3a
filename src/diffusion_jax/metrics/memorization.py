"""Memorisation check: the distance from each image to its nearest neighbour in a reference set
(the training data), in pixel space, in float64 NumPy on the host.

A model that copies its training data puts samples closer to training images than held-out real
images are; comparing the samples' mean nearest-neighbour distance with the test split's makes
that visible (Carlini et al. 2023 use the same nearest-neighbour test, with a stricter
threshold, to extract memorised training images).
"""

from __future__ import annotations

import numpy as np

CHUNK = 256  # images per distance matrix: (CHUNK, num_refs) float64


def nearest_neighbour_distances(images, references, chunk: int = CHUNK) -> np.ndarray:
    """(N,) Euclidean distance from each of `images` (N, ...) to its nearest of `references`
    (M, ...), both uint8 in [0, 255] or floats of one range, measured in units of [0, 1]
    intensity per pixel for uint8 (divided by 255)."""
    x = _flat(images)
    refs = _flat(references)
    if x.shape[1] != refs.shape[1]:
        raise ValueError(f"images {np.shape(images)} and references {np.shape(references)} differ")
    ref_sq = np.sum(refs**2, axis=1)
    out = []
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        sq = np.sum(part**2, axis=1)[:, None] - 2.0 * part @ refs.T + ref_sq[None, :]
        out.append(np.sqrt(np.maximum(sq.min(axis=1), 0.0)))
    return np.concatenate(out) if out else np.zeros((0,))


def _flat(images) -> np.ndarray:
    images = np.asarray(images)
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    return images.reshape(len(images), -1).astype(np.float64) / scale
