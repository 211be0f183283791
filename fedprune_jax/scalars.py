"""TensorBoard scalars beside the JSONL metric logs (optional: the ``tensorboard`` extra).

``open_sink(logdir)`` returns a ``ScalarSink`` that writes every numeric field of a metrics
record as a scalar at a given step, or None when ``logdir`` is None or ``tensorboardX`` is not
installed (the JSONL log is the record; TensorBoard is a view of it). Used by the centralized
trainer's ``io_utils.JsonlLogger`` and by the federated round driver (``federated/rounds.py``),
next to the line that writes the round's ``metrics.jsonl`` row.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Mapping

# tensorboardX names an event file by the second it was opened and the host, and opens it with
# "wb": two writers opened in one directory within one second (a run's round-0 evaluation, then
# its rounds) would write one file, the second truncating the first's scalars. A suffix of the
# process and a per-process count keeps every sink's file its own.
_SINKS = itertools.count()


class ScalarSink:
  """TensorBoard event files in ``logdir``: ``write(record, step)`` adds one scalar per numeric
  (non-bool) field of ``record`` except those named in ``skip``, then flushes."""

  def __init__(self, logdir: str | os.PathLike, writer_cls: Any):
    suffix = f".{os.getpid()}.{next(_SINKS):06d}"
    self._writer = writer_cls(str(logdir), filename_suffix=suffix)

  def write(self, record: Mapping[str, Any], step: int, skip: tuple[str, ...] = ()) -> None:
    for key, value in record.items():
      if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._writer.add_scalar(key, value, step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def open_sink(logdir: str | os.PathLike | None) -> ScalarSink | None:
  """A sink writing to ``logdir``; None if ``logdir`` is None or tensorboardX is missing."""
  if logdir is None:
    return None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return ScalarSink(logdir, SummaryWriter)
