"""Errors for bad input that the CLI reports as one line (``fedprune: error: ...``, exit 2).

``config.ConfigError`` (config files, overrides, field values) and ``data.records.CorpusError``
(corpus files) predate this module; ``InputError`` covers the rest: command-line arguments and
output locations.  ``environment_error`` finds the operating-system error (disk full, read-only
or missing path) behind a library's exception, so that it too becomes one line.
"""

from __future__ import annotations

import errno

# Failures of the machine or of a path the user named, not of the program.
ENVIRONMENT_ERRNOS = frozenset(
  {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.EIO,
  }
)


# Raised with a message only (no errno) by our code and by libraries.
_PATH_ERRORS = (
  FileNotFoundError,
  FileExistsError,
  PermissionError,
  IsADirectoryError,
  NotADirectoryError,
)


class InputError(ValueError):
  """A command-line argument or an output location is unusable; the message names it."""


def environment_error(exc: BaseException) -> OSError | None:
  """The first OSError with an environmental errno in ``exc``'s cause/context chain, or None."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and (
      exc.errno in ENVIRONMENT_ERRNOS or isinstance(exc, _PATH_ERRORS)
    ):
      return exc
    exc = exc.__cause__ or exc.__context__
  return None


def describe_os_error(exc: OSError) -> str:
  """``"PATH: No space left on device"`` (or the bare reason when no path is attached)."""
  if exc.strerror is None:
    return str(exc)
  return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
