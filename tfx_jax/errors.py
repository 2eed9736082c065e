"""The user's mistakes, as the library's own exception types.

A run can fail because of what the user gave it (a config value, a data file, a
workdir) or because of a bug in this library. The scripts print the first kind
as one ``error: <message>`` line with exit code 2, since the message says what
to fix; the second kind keeps its traceback, so a bug is never reported as the
user's fault. Checks raise these types; nothing else is turned into a one-line
error (a ``ValueError`` from deep inside JAX is a bug until proven otherwise).

  UserError       the base: something the user can fix
  ConfigError     a config key's value, or a combination of values
  DataError       a dataset, data file or prompt that cannot be used as given
  WorkdirError    a workdir that cannot be used: locked, of another script, unwritable

A missing file is also a ``FileNotFoundError`` (:class:`DataNotFound`,
:class:`WorkdirNotFound`), and config and data errors are also ``ValueError`` subclasses,
so code that catches the built-in types keeps working. An ``OSError`` that is
the user's (an unwritable workdir, a missing data file) is turned into one of
these where it happens; any other ``OSError`` keeps its traceback.

:func:`require` (:func:`require_key` for one config key) is the one way to state
a check; :func:`say` the one way a run tells its user what it decided (one line on
stderr, flushed, process 0 only: stdout is kept for results, e.g. translations and
samples).
"""
from __future__ import annotations

import errno
import math
import sys

import jax


class UserError(Exception):
    """Something the user gave the run is wrong; the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config value (or combination of values) that cannot work."""


class DataError(UserError, ValueError):
    """Data that cannot be used as given: a missing, empty or malformed file or dataset."""


class WorkdirError(UserError):
    """A workdir that cannot be used: locked by another run, made by another script, unwritable."""


class DataNotFound(DataError, FileNotFoundError):
    """A data file, dataset or pretrained checkpoint the config names does not exist."""


class WorkdirNotFound(WorkdirError, FileNotFoundError):
    """The workdir lacks a file the command needs (no trained model, no tokenizer, ...)."""


def require(ok: bool, message: str, error: type[UserError] = ConfigError) -> None:
    """Raises ``error(message)`` unless ``ok``: the one way a check is written."""
    if not ok:
        raise error(message)


# OSError numbers that are the user's to fix: a full disk or quota, a read-only or
# unwritable file system (anything else, say EIO or EBADF, keeps its traceback).
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def require_key(config, key: str, ok: bool, expected: str,
                error: type[UserError] = ConfigError) -> None:
    """``require`` for one config key: ``config.KEY must be EXPECTED, got VALUE``."""
    require(ok, f"config.{key} must be {expected}, got {config[key]!r}", error)


def is_int(value) -> bool:
    """An int that is not a bool (a config's ``True`` is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def say(message: str) -> None:
    """Prints one line of what the run decided or did (stderr, process 0 only, flushed)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
