"""What the sample, evaluate and import command lines share: user errors as one line, exit 2.

Each CLI module defines its absl flags in `define_flags()`, called only under its
`__main__` guard, so that tests and other modules can import its functions (and train.py's
flags) in one process without duplicate-flag errors.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import sys

from absl import flags, logging

from diffusion_jax.checkpointing import CheckpointError
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
