"""What the command lines share: user errors as one line (exit 2), absl flag parsing that reports
its errors the same way, the default workdir, SIGTERM / SIGINT as a stop request, quiet
libraries, and XLA's compilation cache.

Each CLI module defines its absl flags in `define_flags()`, called only under its
`__main__` guard, so that tests and other modules can import its functions (and train.py's
flags) in one process without duplicate-flag errors.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import os
import re
import signal
import sys
import threading
from pathlib import Path

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

from diffusion_jax.checkpointing import CheckpointError
from diffusion_jax.metrics.cache import default_cache_dir
from diffusion_jax.validation import ConfigError


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


USER_ERRORS = (UserError, ConfigError, CheckpointError)


def exit_with_error(message: str):
    """`error: <message on one line>` on stderr, exit code 2."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(2)


def one_line(error: BaseException) -> str:
    """The message of an error, on one line (ml_collections nests a KeyError's in others', and
    puts a config file's own error after the traceback it formats: only its last line is kept)."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    if "Traceback (most recent call last)" in text:
        head = text.split("Traceback (most recent call last)")[0].strip().rstrip(":")
        text = f"{head}: {text.strip().splitlines()[-1]}"
    return " ".join(text.split())


@contextlib.contextmanager
def user_errors():
    """Turn a user error raised inside into `error: <one line>` on stderr and exit code 2."""
    try:
        yield
    except USER_ERRORS as e:
        exit_with_error(str(e))


@contextlib.contextmanager
def peer_failures():
    """In a multi-process run, turn any other error into one `error:` line and exit 1 at once.

    A failed collective (gloo "Connection reset by peer", ...) surfaces as one of several
    exception types; JAX's exit-time shutdown would then wait for the lost process until
    heartbeat_timeout, and abort. Single-process runs keep their traceback.
    """
    try:
        yield
    except Exception as e:
        if isinstance(e, USER_ERRORS) or jax.process_count() == 1:
            raise
        logging.exception("process %d failed", jax.process_index())
        print(
            f"error: process {jax.process_index()} of {jax.process_count()} failed: "
            f"{type(e).__name__}: {one_line(e)}; in a multi-process run this usually means "
            "that another process died or hangs (see its log)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), with any error (unknown
    flag or config field, bad value) reported as one `error:` line naming the flag, exit 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        exit_with_error(one_line(e))
    except OSError as e:  # the config file did not load
        exit_with_error(f"--config: {one_line(e)}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections applying a --config.a.b=v override: a misspelt field, a wrong type.
        message = one_line(e)
        field = message.split()[0].strip("'\"") if message else ""
        culprit = next(
            (a for a in argv[1:] if a.startswith("--config.") and f".{field}" in a.split("=")[0]),
            "a --config override",
        )
        what = "no such config field" if isinstance(e, AttributeError | KeyError) else "bad value"
        exit_with_error(f"{culprit}: {what} ({message})")


def loaded_config(flag_name: str = "config"):
    """The config of an ml_collections config-file flag, or exit 2 with one line if its file
    does not load (ml_collections defers that error to the config's first use)."""
    config = flags.FLAGS[flag_name].value
    try:
        config.keys()
    except OSError as e:
        exit_with_error(f"--{flag_name}: {one_line(e)}")
    return config


def default_workdir(config_filename: str) -> Path:
    """runs/<config file stem>, and _<parameter> for a parameterised `configs/x.py:parameter`."""
    path, _, parameter = config_filename.partition(":")
    name = Path(path).stem + (f"_{parameter}" if parameter else "")
    return Path("runs") / re.sub(r"[^\w.-]", "_", name)


class StopRequest:
    """Set by SIGTERM / SIGINT; the train loop saves and exits at the next step boundary.

    A context manager: the handlers are installed on entry (from the main thread) and the
    previous ones restored on exit, so train() can be called in-process.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signal.Signals(signum).name
        logging.warning("%s received: saving a checkpoint and stopping", self.signal)

    def requested(self, step: int, every: int) -> bool:
        """True when any process was asked to stop (processes agree every `every` steps)."""
        if jax.process_count() == 1:
            return self.signal is not None
        if step % every:
            return False
        flags_ = multihost_utils.process_allgather(np.array(self.signal is not None))
        return bool(np.any(flags_))


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
