"""Where derived weights live (converted Inception, trained digits classifier), and how they are
stored: flat .npz files read with allow_pickle=False, written atomically.

The cache directory is `$DIFFUSION_JAX_CACHE` if set, else `~/.cache/diffusion_jax`.
"""

import os
from pathlib import Path

import numpy as np
from flax import traverse_util

CACHE_ENV = "DIFFUSION_JAX_CACHE"


def default_cache_dir() -> Path:
    """`$DIFFUSION_JAX_CACHE`, else `~/.cache/diffusion_jax` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffusion_jax"


def save_tree(path, tree) -> Path:
    """Save a nested dict of arrays as a flat .npz ('a/b/c' keys); atomic rename at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(tree, sep="/")
    arrays = {key: np.asarray(value) for key, value in flat.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_tree(path) -> dict:
    """Load a .npz written by `save_tree` back into a nested dict of numpy arrays."""
    with np.load(path, allow_pickle=False) as data:
        flat = {key: data[key] for key in data.files}
    return traverse_util.unflatten_dict(flat, sep="/")
