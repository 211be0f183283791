"""Atomic file writes, JSONL metric logs and pytree digests."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from fedprune_jax import scalars
from fedprune_jax.errors import InputError


def _umask() -> int:
  """The process umask, read without changing it where /proc allows (os.umask both sets and gets)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path in the target's directory; renames it onto ``path`` on success.

  A crash or exception leaves the previous file (if any) untouched and no partial file behind.
  The file gets the usual mode of a new file (0666 less the umask), not mkstemp's 0600.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  tmp_path = pathlib.Path(tmp)
  try:
    yield tmp_path
    os.chmod(tmp_path, 0o666 & ~_umask())
    os.replace(tmp_path, path)
  finally:
    if tmp_path.exists():
      tmp_path.unlink()


@contextlib.contextmanager
def stderr_held(
  drop_if: "Callable[[BaseException], bool]",
  late_noise: "Callable[[BaseException], bool] | None" = None,
) -> Iterator[None]:
  """Holds what Python writes to ``sys.stderr`` (any thread) during the block; replays it after,
  unless the block raised an exception for which ``drop_if`` is true.

  orbax's background writers print tracebacks of their closed event loop when a save fails on
  a full disk; the failure itself is reported as one line by the CLI. Some of those writers end
  after the block has raised (tensorstore's threads report the closed loop as unraisable
  exceptions, whenever their writes complete): after a dropped failure, the unraisable
  exceptions for which ``late_noise`` is true are dropped for the rest of the process, the
  others still go to the hook that was there.
  """
  real, held = sys.stderr, io.StringIO()
  sys.stderr = held
  try:
    yield
  except BaseException as e:
    dropped = drop_if(e)
    if dropped and late_noise is not None:
      _drop_unraisable(late_noise)
    sys.stderr = real
    if not dropped:
      real.write(held.getvalue())
    raise
  sys.stderr = real
  real.write(held.getvalue())


def _drop_unraisable(noise: "Callable[[BaseException], bool]") -> None:
  """Chains a ``sys.unraisablehook`` that drops the unraisable exceptions ``noise`` selects."""
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    if unraisable.exc_value is None or not noise(unraisable.exc_value):
      previous(unraisable)

  sys.unraisablehook = hook


def closed_event_loop(error: BaseException) -> bool:
  """asyncio's ``RuntimeError: Event loop is closed``, what a background writer raises when it
  finishes after its loop ended."""
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def orbax_read_noise(error: BaseException) -> bool:
  """What orbax leaves behind, unraisable, after a restore failed: the closed event loop of its
  reader threads, and the read errors of its coroutines garbage-collected unfinished."""
  return closed_event_loop(error) or str(error).startswith(
    "Encountered error while reading array index"
  )


# the RuntimeWarning of orbax's reader coroutines that a failed restore leaves unawaited
_ORBAX_UNAWAITED = r"coroutine '_read_array_index\w*' was never awaited"


@contextlib.contextmanager
def quiet_failed_restore() -> Iterator[None]:
  """Around an orbax restore whose failure the caller reports in one line: on a failure, what
  orbax printed is dropped, and so is its late noise for the rest of the process (the
  unraisable ``orbax_read_noise`` and the RuntimeWarning of its unawaited reader coroutines);
  on success, what it printed is replayed."""
  try:
    with stderr_held(drop_if=lambda e: True, late_noise=orbax_read_noise):
      yield
  except Exception:
    warnings.filterwarnings("ignore", message=_ORBAX_UNAWAITED, category=RuntimeWarning)
    raise


def ensure_writable_dir(path: str | os.PathLike, what: str = "output directory") -> pathlib.Path:
  """Creates ``path`` if needed and proves it writable; raises InputError naming it otherwise.

  Checked before any work starts, so a bad ``--workdir`` fails in milliseconds rather than after
  training, at the first checkpoint.
  """
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise InputError(f"{what} {str(path)!r} exists and is not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise InputError(f"{what} {str(path)!r} is not writable: {e.strerror or e}") from e
  return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  with atomic_path(path) as tmp:
    tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_to_json) + "\n")


def save_npz_atomic(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes ``arrays`` to an .npz file atomically and durably (fsync before the rename)."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())


def _to_json(value: Any) -> Any:
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if hasattr(value, "tolist"):  # jax arrays
    return value.tolist()
  return str(value)


class JsonlLogger:
  """Appends one JSON object per line; each line is flushed so a killed run keeps its log.

  With ``tensorboard_dir`` and the optional ``tensorboardX`` package installed (extra
  ``[tensorboard]``), numeric fields are also written as TensorBoard scalars, indexed by the
  record's ``step_key`` field.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    tensorboard_dir: str | os.PathLike | None = None,
    step_key: str = "step",
  ):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")
    self._step_key = step_key
    self._tb = scalars.open_sink(tensorboard_dir)

  def log(self, **record: Any) -> None:
    record.setdefault("time", time.time())
    self._file.write(json.dumps(record, sort_keys=True, default=_to_json) + "\n")
    self._file.flush()
    if self._tb is not None and self._step_key in record:
      self._tb.write(record, int(record[self._step_key]), skip=(self._step_key, "time"))

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self) -> "JsonlLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Reads a JSONL file; a truncated last line (killed writer) is ignored."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return records


def file_sha256(path: str | os.PathLike) -> str | None:
  """sha256 of a file's bytes, or None if it cannot be read."""
  try:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
  except OSError:
    return None


def tree_sha256(tree: Any) -> str:
  """sha256 of a pytree's arrays (flatten order, raw bytes); None leaves are skipped."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()
