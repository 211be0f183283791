"""Errors for bad input that the CLI reports as one line (``fedprune: error: ...``, exit 2).

``config.ConfigError`` (config files, overrides, field values) and ``data.records.CorpusError``
(corpus files) predate this module; ``InputError`` covers the rest: command-line arguments and
output locations.  ``environment_failure`` finds the operating-system error (disk full,
read-only or missing path) behind a library's exception, so that it too becomes one line.
"""

from __future__ import annotations

import errno
import os
import re

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


class ConfigError(ValueError):
  """A config file, an override or a config value is invalid; the message names it."""


class InputError(ValueError):
  """A command-line argument or an output location is unusable; the message names it."""


# TensorStore (orbax's storage layer) raises ValueError("... [os_error_code='28']").
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)'?")


def environment_failure(exc: BaseException) -> str | None:
  """One line for the operating-system error behind ``exc`` (its cause/context chain), or None.

  Recognises OSError (with an environmental errno, or a path error raised with a message only)
  and TensorStore's errors, which carry the errno in their message only.
  """
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and (
      exc.errno in ENVIRONMENT_ERRNOS or isinstance(exc, _PATH_ERRORS)
    ):
      return describe_os_error(exc)
    code = _OS_ERROR_CODE.search(str(exc))
    if code and int(code.group(1)) in ENVIRONMENT_ERRNOS:
      return f"{os.strerror(int(code.group(1)))}: {' '.join(str(exc).split())}"
    exc = exc.__cause__ or exc.__context__
  return None


def describe_os_error(exc: OSError) -> str:
  """``"PATH: No space left on device"`` (or the bare reason when no path is attached)."""
  if exc.strerror is None:
    return str(exc)
  return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
