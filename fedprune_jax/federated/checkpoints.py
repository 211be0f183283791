"""Round checkpoints: the whole ``ServerState`` plus the metrics so far, with orbax.

An orbax ``CheckpointManager`` in ``directory`` saves every ``every`` rounds (and when forced, at
the end), keeps the last ``keep``, and writes each checkpoint to a temporary directory that is
renamed when complete, so a run killed mid-save resumes from the previous complete one.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax

PyTree = Any


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
    """The latest ``(state, history)``, shaped like ``like``; None if there is none."""
    step = self._manager.latest_step()
    if step is None:
      return None
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
