"""Test setup: 8 emulated CPU devices, set before JAX initialises, and a compilation cache.

The XLA compilation cache is a fresh directory per test session, shared through the
environment with the subprocesses that tests start: the end-to-end tests compile the same tiny
train step in many processes, and a cache hit turns tens of seconds of compiling into one.
"""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="diffusion_jax-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    # Every program, also the hundred small slices orbax compiles to save a replicated state.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_sessionfinish(session, exitstatus):
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A fresh metrics cache for the requesting module, holding an untrained digits classifier:
    tests that use it check the plumbing, not the scores, and training it (test_metrics does)
    takes ~10 s."""
    import jax
    import numpy as np

    from diffusion_jax.metrics import digits_classifier
    from diffusion_jax.metrics.cache import save_tree

    path = tmp_path_factory.mktemp("cache")
    x = jax.ShapeDtypeStruct((1, *digits_classifier.IMAGE_SHAPE), np.float32)
    shapes = jax.eval_shape(digits_classifier.DigitsCNN().init, jax.random.key(0), x)
    rng = np.random.default_rng(0)
    weights = jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32), shapes)
    save_tree(path / digits_classifier.CACHE_FILENAME, weights)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFUSION_JAX_CACHE", str(path))
        yield path
