"""Test setup: 8 emulated CPU devices, set before JAX initialises, and a compilation cache.

The XLA compilation cache is a fresh directory per test session, shared through the
environment with the subprocesses that tests start: the end-to-end tests compile the same tiny
train step in many processes, and a cache hit turns tens of seconds of compiling into one.
"""

import os
import shutil
import tempfile

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
