"""Process hygiene of the corpus writer's worker pool.

* ``exit_with_parent``: a pool initializer; the worker exits within a poll interval of the main
  process's death (a ``kill -9`` runs no cleanup, and a worker, whose parent is the forkserver,
  would otherwise keep rendering or block forever as an orphan).
* ``remove_stale_tmp_dirs``: temporary build directories are named ``.NAME.tmp-HOST_PID-RANDOM``;
  those of a dead writer on this host are removed, those of a live writer (a concurrent build) or
  of another host (shared file systems) are kept.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path


def _process_alive(pid: int, started: float | None = None) -> bool:
  """Whether ``pid`` runs (not a zombie) and, given ``started``, is the same process."""
  import psutil  # pylint: disable=import-outside-toplevel

  try:
    proc = psutil.Process(pid)
    if proc.status() == psutil.STATUS_ZOMBIE:
      return False
    return started is None or proc.create_time() == started
  except psutil.Error:
    return False


def exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
  """Worker initializer: exit as soon as the main process is gone.

  A ``kill -9`` of ``corpus synth`` runs no cleanup, and a pool worker
  (whose parent is the forkserver, not the main process) would otherwise
  render its queue to the end, or block forever, as an orphan.
  """
  import psutil  # pylint: disable=import-outside-toplevel

  try:
    started = psutil.Process(parent_pid).create_time()
  except psutil.Error:
    os._exit(1)  # pylint: disable=protected-access

  def watch():
    while _process_alive(parent_pid, started):
      time.sleep(poll_s)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def owner_tag(pid: int) -> str:
  """``HOST_PID`` of a temporary directory's writer (hosts may share a file system)."""
  host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())
  return f"{host}_{pid}"


def remove_stale_tmp_dirs(out_dir: Path) -> list[Path]:
  """Deletes temporary build directories of ``out_dir`` left by killed writers on this host.

  A directory whose writer still runs (a concurrent build) is kept.
  """
  host_prefix = owner_tag(0).rsplit("_", 1)[0] + "_"
  removed = []
  for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
    owner = tmp.name[len(f".{out_dir.name}.tmp-") :].rsplit("-", 1)[0]
    if not owner.startswith(host_prefix):
      continue
    pid = owner[len(host_prefix) :]
    if pid.isdigit() and not _process_alive(int(pid)):
      shutil.rmtree(tmp, ignore_errors=True)
      removed.append(tmp)
  return removed
