"""What the command lines share: user errors as one line (exit 2), quiet libraries, and XLA's
compilation cache.

Each CLI module defines its absl flags in `define_flags()`, called only under its
`__main__` guard, so that tests and other modules can import its functions (and train.py's
flags) in one process without duplicate-flag errors.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import os
import sys
from pathlib import Path

import jax
from absl import flags, logging

from diffusion_jax.checkpointing import CheckpointError
from diffusion_jax.metrics.cache import default_cache_dir
from diffusion_jax.validation import ConfigError


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


USER_ERRORS = (UserError, ConfigError, CheckpointError)


@contextlib.contextmanager
def user_errors():
    """Turn a user error raised inside into `error: <one line>` on stderr and exit code 2."""
    try:
        yield
    except USER_ERRORS as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)


def require_flags(*names: str) -> None:
    """Raise UserError naming the first of `names` left unset (absl would exit 1, not 2)."""
    for name in names:
        if flags.FLAGS[name].value is None:
            raise UserError(f"--{name} is required")


class _QuietLibraries(pylogging.Filter):
    """Drop orbax's INFO chatter (a dozen lines per checkpoint) from the console."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def quiet_libraries() -> None:
    logger = logging.get_absl_logger()
    if not any(isinstance(f, _QuietLibraries) for f in logger.filters):
        logger.addFilter(_QuietLibraries())


COMPILATION_CACHE_MAX_BYTES = 2**30


def use_compilation_cache() -> Path | None:
    """Keep XLA's compiled programs between runs; returns the directory (None: no cache).

    A restarted or resumed DDPM CIFAR-10 job then logged its first step after 17-18 s instead of
    54 here (experiments/PERFORMANCE.md, "Compilation cache"). JAX_COMPILATION_CACHE_DIR
    decides when it is set (empty: no cache); else the cache is `default_cache_dir()/xla`
    ($DIFFUSION_JAX_CACHE, else ~/.cache/diffusion_jax), of at most COMPILATION_CACHE_MAX_BYTES
    (JAX removes the least recently used programs; JAX_COMPILATION_CACHE_MAX_SIZE overrides).
    Call it before anything compiles. The cache is trusted code: keep it where only you write.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        path = os.environ["JAX_COMPILATION_CACHE_DIR"]
        return Path(path) if path else None
    path = default_cache_dir() / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logging.warning("no XLA compilation cache at %s (%s): every run compiles afresh", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    return path
