"""Round checkpoints: the whole ``ServerState`` plus the metrics so far, with orbax.

An orbax ``CheckpointManager`` in ``directory`` saves every ``every`` rounds (and when forced, at
the end), keeps the last ``keep``, and writes each checkpoint to a temporary directory that is
renamed when complete, so a run killed mid-save resumes from the previous complete one.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
from typing import Any

import jax

from fedprune_jax import io_utils
from fedprune_jax.errors import InputError

PyTree = Any


def saved_rounds(directory: str | os.PathLike) -> list[int]:
  """The rounds with a (complete-looking) checkpoint in ``directory``, ascending; orbax names a
  finished checkpoint by its step and an unfinished one ``<step>.orbax-checkpoint-tmp-*``."""
  path = pathlib.Path(directory)
  if not path.is_dir():
    return []
  return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def _first_line(exc: BaseException, limit: int = 160) -> str:
  text = " ".join(str(exc).split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


class RoundCheckpointer:
  """Save/restore ``(ServerState, history)`` by round number."""

  def __init__(self, directory: str | os.PathLike, every: int = 10, keep: int = 2):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    if every < 1 or keep < 1:
      raise ValueError(f"checkpoint_every and keep_checkpoints must be >= 1, got {every}, {keep}")
    self._ocp = ocp
    self.every = every
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
      ),
    )

  def latest_round(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, like: PyTree) -> tuple[PyTree, list[dict]] | None:
    """The newest ``(state, history)`` that restores, shaped like ``like``; None if none is saved.

    A checkpoint that does not restore (a truncated or deleted file) is reported on stderr and
    removed, and the one before it is tried; if none restores, InputError names the directory
    and suggests ``--fresh``.
    """
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        with io_utils.quiet_failed_restore():  # reported below in one line
          restored = self._restore_step(step, like)
      except Exception as e:  # pylint: disable=broad-except  (any orbax/JSON failure)
        failures.append(f"round {step}: {type(e).__name__}: {_first_line(e)}")
        continue
      if failures:
        print(
          f"fedprune: resuming from the checkpoint after round {step}: newer ones do not "
          f"restore ({'; '.join(failures)}); removed",
          file=sys.stderr,
        )
        for bad in self._manager.all_steps():
          if bad > step:
            shutil.rmtree(self.directory / str(bad), ignore_errors=True)
        self._manager.reload()
      return restored
    if failures:
      raise InputError(
        f"no round checkpoint in {self.directory} restores ({'; '.join(failures)}); "
        "rerun with --fresh to start over"
      )
    return None

  def _restore_step(self, step: int, like: PyTree) -> tuple[PyTree, list[dict]]:
    ocp = self._ocp
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()
      ),
    )
    return out.state, list(out.history["rounds"])

  def save(self, state: PyTree, history: list[dict], force: bool = False) -> bool:
    """Saves after a round when ``round % every == 0`` (or ``force``); True if it saved."""
    r = int(state.round)
    if not force and r % self.every:
      return False
    if self._manager.latest_step() == r:
      return False
    ocp = self._ocp
    self._manager.save(
      r,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), history=ocp.args.JsonSave({"rounds": history})
      ),
    )
    self._manager.wait_until_finished()
    return True

  def close(self) -> None:
    self._manager.close()
