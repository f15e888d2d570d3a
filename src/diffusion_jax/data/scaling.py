"""Pixel scaling, the one place it happens: uint8 [0, 255] <-> float32 [-1, 1]."""

import jax
import jax.numpy as jnp
import numpy as np


def to_model_range(images):
    """uint8 [0, 255] -> float32 [-1, 1]: x / 127.5 - 1 (works on numpy or jax arrays)."""
    xp = jnp if isinstance(images, jax.Array) else np
    return xp.asarray(images, dtype=xp.float32) / 127.5 - 1.0


def to_uint8(x) -> np.ndarray:
    """float [-1, 1] -> uint8: clip, (x + 1) * 127.5, round. Returns numpy."""
    x = np.asarray(x, dtype=np.float32)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
