"""Slim copies of a suite's finished runs, small enough to keep in git.

A suite's runs directory lives on one machine; when that machine is gone its results are gone
too (weeks of CPU time for the paper suite). ``archive(src, dst)`` copies what the report and a
resumed suite need of every finished run -- its record, results, config and completion marker --
without checkpoints, masks or ``metrics.jsonl``, and marks each copy with ``archived.json``.

* ``fedprune report DST`` renders the same tables from the archive as from ``src``.
* ``fedprune experiment ... --archive ARCHIVE`` restores the archive's finished runs of the
  experiment into RUNS before it starts (``restore``) and archives each run as it finishes, so
  only the runs in flight are lost with the machine. ``fedprune archive ARCHIVE --out RUNS``
  restores a whole archive. The suite counts restored runs finished (``workdir.incomplete``
  takes ``archived.json`` in place of the final checkpoint) and runs only the rest. A run that
  starts from an archived run's files (``From``) stops with the error of
  ``suite_runs.check_needs``; warm starts are not archived and are trained again where a pending
  run needs one.
* A finished run is never replaced by a different one: a key present in both with other results
  (e.g. the same config run on another platform) is an InputError naming both files.
"""

from __future__ import annotations

import pathlib
import shutil

from fedprune_jax import io_utils
from fedprune_jax import suite_index
from fedprune_jax import workdir as workdir_lib
from fedprune_jax.errors import InputError

# what an archived run keeps (those present): about 50 kB a run of the small setting; the
# checkpoints, mask and per-round ``metrics.jsonl`` (``results.json`` has the history) stay
KEPT = (workdir_lib.MARKER, "results.json", "suite.json", workdir_lib.CONFIG)


def archive(src: str | pathlib.Path, dst: str | pathlib.Path) -> dict[str, int]:
  """Copies the experiment indexes of ``src`` and the kept files of every finished run they list
  into ``dst`` (created if absent; an archive is a valid ``src`` too).

  Returns:
    ``{"copied": runs new in dst, "present": runs already there with the same results,
    "unfinished": runs of the indexes not finished in src}``.

  Raises:
    InputError: ``src`` has no experiment index, or a run finished in both has other results.
  """
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  found = suite_index.index_files(src)
  if not found:
    raise InputError(f"{src}: no experiment index (<experiment>.json) to archive")
  counts = {"copied": 0, "present": 0, "unfinished": 0}
  seen = set()
  for _, index in found:
    for entry in index["runs"]:
      if entry["dir"] in seen:
        continue
      seen.add(entry["dir"])
      counts[_archive_run(src / entry["dir"], dst / entry["dir"])] += 1
  for path, _ in found:  # last: an index never names a finished run that dst lacks
    io_utils.write_text_atomic(dst / path.name, path.read_text(encoding="utf-8"))
  return counts


def restore(archive_dir: str | pathlib.Path, runs_dir: pathlib.Path, dirs: set[str]) -> int:
  """Copies the finished runs of ``archive_dir`` among ``dirs`` (``runs/<key>``) that are not
  finished in ``runs_dir`` into it; returns how many. InputError if one is finished in both with
  other results."""
  archive_dir = pathlib.Path(archive_dir)
  outcomes = [_archive_run(archive_dir / d, runs_dir / d) for d in sorted(dirs)]
  return outcomes.count("copied")


def _archive_run(run: pathlib.Path, out: pathlib.Path) -> str:
  """Copies one finished run's kept files (``"copied"``), or says why not."""
  if workdir_lib.incomplete(run):
    return "unfinished"
  digest = io_utils.file_sha256(run / "results.json")
  if not workdir_lib.incomplete(out):
    if io_utils.file_sha256(out / "results.json") != digest:
      raise InputError(
        f"{run / 'results.json'} and {out / 'results.json'}: the same run (config key) with "
        "different results; remove one of them to keep the other"
      )
    return "present"
  if out.exists():  # an unfinished attempt in dst: the finished run replaces it
    shutil.rmtree(out)
  tmp = out.with_name(out.name + ".archiving")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  for name in KEPT:
    if (run / name).is_file():
      shutil.copy2(run / name, tmp / name)
  io_utils.write_json_atomic(tmp / workdir_lib.ARCHIVED, {"results_sha256": digest})
  tmp.rename(out)  # a run appears in dst whole or not at all
  return "copied"
