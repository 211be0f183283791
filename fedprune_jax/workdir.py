"""A run's workdir belongs to one config, one process at a time, and says when it is finished.

Three small records beside a run's outputs (``job``, ``train.centralized``)::

  workdir/config.json   the resolved config the run was started with (also ``fedprune eval``'s)
  workdir/.lock         held (``fcntl.flock``) by the process running in the workdir; holds its pid
  workdir/done.json     the completion marker: written last, atomically, after the final
                        checkpoint and ``results.json``

``claim`` is the entry of every run: it refuses a second concurrent run on the workdir (the lock
of a dead process is free: the kernel drops ``flock`` locks with their process), refuses a config
that differs from the one the workdir's existing run state was made with (the error names the
differing fields and suggests ``--fresh``), and removes the previous completion marker, so a run
in progress is never mistaken for a finished one.

Fields that do not change what a run computes are not compared (``IGNORED_FIELDS``): where things
are written or cached, how often progress is checkpointed or logged, and ``rounds``, which a
rerun may raise to extend a finished run (its checkpoints resume bit-identically).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import shutil
from typing import Any, Callable, Iterator, Mapping

from fedprune_jax import fields, io_utils
from fedprune_jax.errors import ConfigError, InputError

CONFIG, LOCK, MARKER = "config.json", ".lock", "done.json"
# a finished run's slim copy (``suite_archive``): stands in for the final checkpoint it dropped
ARCHIVED = "archived.json"

# Dotted config fields that a rerun may change without changing the run's result.
IGNORED_FIELDS = frozenset(
  {
    "workdir",  # where the run is (a moved workdir is the same run)
    "data.cache_dir",  # where the feature cache is (its files are fingerprinted themselves)
    "rounds",  # a rerun with more rounds extends the run from its last checkpoint
    "checkpoint_every",  # checkpoints resume bit-identically, wherever they are
    "keep_checkpoints",
    "train.log_every",  # how often the loss is logged
    "warm_start.eval_every",  # dev WER of the warm start, logged to its history only
    "warm_start.train_if_missing",  # where the warm start comes from, not what it is
  }
)

# A field absent from an older workdir's config.json (added to the configs since) stands for its
# library default in ``fields.FIELDS``. These were added after suite runs were cached (the suite
# leaves them out of run keys while they hold their defaults).
ADDED_DEFAULTS = {
  path: fields.FIELDS[path].default
  for path in ("pruning.mask_path", "warm_start.train_if_missing", "data.skip_unalignable")
}

# What a run leaves in its workdir; ``--fresh`` removes these (a warm start cached in the
# workdir is kept: its own record says what it was trained with).
RUN_STATE = (
  "rounds",
  "metrics.jsonl",
  "tensorboard",
  "results.json",
  "checkpoint",
  "mask.npz",
  MARKER,
)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a.b.c": leaf}`` of a nested mapping; a section that is None stays one leaf."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def as_json(config: Any) -> dict[str, Any]:
  """A config (ConfigDict or mapping) as the JSON ``config.json`` holds (tuples become lists)."""
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(raw, default=str))


def differences(
  saved: Mapping[str, Any], current: Mapping[str, Any], ignored=IGNORED_FIELDS
) -> list[str]:
  """The dotted fields whose values differ between two configs (sorted), ``ignored`` left out.

  A field present in one config only differs (e.g. ``pruning`` set vs ``pruning=None``).
  """
  a, b = flatten(as_json(saved)), flatten(as_json(current))
  changed = {k for k in set(a) | set(b) if _value(a, k) != _value(b, k)}
  return sorted(k for k in changed if k not in ignored)


_ABSENT = object()


def _value(flat: Mapping[str, Any], key: str) -> Any:
  """A flattened config's value of ``key``; an absent added field has its default, unless its
  whole section is absent or None (``pruning=None``)."""
  if key in flat:
    return flat[key]
  section = key.rsplit(".", 1)[0] if "." in key else None
  if section is not None and not any(k.startswith(section + ".") for k in flat):
    return _ABSENT
  spec = fields.FIELDS.get(key)
  if spec is not None and spec.default is not fields.NO_DEFAULT:
    return spec.default
  return _ABSENT


def describe_differences(saved: Mapping[str, Any], current: Mapping[str, Any], fields) -> str:
  a, b = flatten(as_json(saved)), flatten(as_json(current))
  shown = [f"{k} ({_show(a.get(k, _ABSENT))} -> {_show(b.get(k, _ABSENT))})" for k in fields[:6]]
  more = f" and {len(fields) - 6} more" if len(fields) > 6 else ""
  return ", ".join(shown) + more


def _show(value: Any) -> str:
  return "absent" if value is _ABSENT else repr(value)


def has_run_state(workdir: pathlib.Path) -> bool:
  """Whether a run left anything in ``workdir`` that a rerun would continue from or report."""
  return any((workdir / name).exists() for name in RUN_STATE)


def check_config(workdir: pathlib.Path, config: Any) -> None:
  """Raises ConfigError if ``workdir`` holds run state of a different config (naming the fields).

  A ``config.json`` that does not parse is an error too when there is run state to continue.
  """
  path = workdir / CONFIG
  if not path.exists() or not has_run_state(workdir):
    return
  try:
    saved = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise ConfigError(
      f"{path}: unreadable run config ({e}); rerun with --fresh to start this workdir over"
    ) from e
  fields = differences(saved, config)
  if fields:
    raise ConfigError(
      f"workdir {str(workdir)!r} holds a run of another config: "
      f"{describe_differences(saved, config, fields)}; rerun with --fresh to start it over with "
      "this config, or use another --workdir"
    )


def clear(workdir: pathlib.Path) -> None:
  """Removes the run state (``--fresh``)."""
  for name in RUN_STATE:
    target = workdir / name
    if target.is_dir():
      shutil.rmtree(target)
    elif target.exists():
      target.unlink()


@contextlib.contextmanager
def lock(workdir: pathlib.Path) -> Iterator[None]:
  """Holds ``workdir/.lock`` exclusively; InputError if another live process holds it."""
  import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)

  path = workdir / LOCK
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
      raise InputError(
        f"workdir {str(workdir)!r} is in use by a run in process {holder} (lock file {path}); "
        "wait for it to finish or stop it"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


@contextlib.contextmanager
def claim(config: Any, fresh: bool = False) -> Iterator[pathlib.Path]:
  """Enters a run in ``config.workdir``: lock, config check (or ``fresh`` start), config record.

  Yields the workdir; the lock is released when the block ends (however it ends).
  """
  workdir = io_utils.ensure_writable_dir(config.workdir, "workdir")
  with lock(workdir):
    if fresh:
      clear(workdir)
    check_config(workdir, config)
    (workdir / MARKER).unlink(missing_ok=True)
    io_utils.write_json_atomic(workdir / CONFIG, as_json(config))
    yield workdir


def claimed(run: Callable[..., Any]) -> Callable[..., Any]:
  """Decorates ``run(cfg, ...)`` to run inside ``claim(cfg, fresh)``; adds the ``fresh`` keyword."""

  @functools.wraps(run)
  def wrapper(cfg, *args, fresh: bool = False, **kwargs):
    with claim(cfg, fresh=fresh):
      return run(cfg, *args, **kwargs)

  return wrapper


def mark_done(workdir: pathlib.Path) -> None:
  """Writes the completion marker (last, after the checkpoint and ``results.json``): it records
  the digest of the ``results.json`` it vouches for."""
  _crash_point("before_marker")
  io_utils.write_json_atomic(
    workdir / MARKER, {"results_sha256": io_utils.file_sha256(workdir / "results.json")}
  )


def incomplete(workdir: pathlib.Path) -> str | None:
  """Why ``workdir`` is not a finished run (None if it is): the completion marker, ``results.json``
  (with its final metrics) and the final checkpoint must all be present and parse; an archived
  run (``suite_archive``) has ``archived.json`` vouching for the same results instead of the
  checkpoint."""
  marker = _read_json(workdir / MARKER)
  if marker is None:
    return f"no completion marker {MARKER}"
  results = _read_json(workdir / "results.json")
  if not isinstance(results, dict) or not {"final", "train"} <= set(results):
    return "results.json is missing or unreadable"
  if marker.get("results_sha256") != io_utils.file_sha256(workdir / "results.json"):
    return "results.json is not the one the completion marker recorded"
  archived = _read_json(workdir / ARCHIVED)
  if isinstance(archived, dict) and archived.get("results_sha256") == marker["results_sha256"]:
    return None  # finished, its checkpoint dropped on purpose
  checkpoint = workdir / "checkpoint"
  if (
    not (checkpoint / "_CHECKPOINT_METADATA").is_file()
    or _read_json(checkpoint / "_CHECKPOINT_METADATA") is None
  ):
    return "the final checkpoint is missing or incomplete"
  return None


def _read_json(path: pathlib.Path) -> Any:
  """The parsed JSON of ``path``, or None if it is absent or does not parse."""
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None


def _crash_point(name: str) -> None:
  """Test hook: ``FEDPRUNE_TEST_KILL_AT=name`` makes the process SIGKILL itself here, so a test
  can kill a run at a deterministic point (e.g. between its checkpoint and its marker)."""
  if os.environ.get("FEDPRUNE_TEST_KILL_AT") == name:
    import signal  # pylint: disable=g-import-not-at-top

    os.kill(os.getpid(), signal.SIGKILL)
