"""What the suite writes beside its runs, and reads back: each run's ``suite.json`` record and
each experiment's index.

``RUNS/runs/<key>/suite.json`` names the run (experiment, arm, seed, key) and, once finished, the
wall seconds of the attempt that finished it. ``RUNS/<experiment>.json`` indexes the experiment's
runs (arm, seed, split, key, wall seconds, state) with the table's titles and comparisons; the
scheduler (``suite.run_experiment``) rewrites it atomically after each run, so ``fedprune report``
can render partial tables while the suite is still running.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from fedprune_jax import io_utils
from fedprune_jax import workdir as workdir_lib
from fedprune_jax.errors import InputError
from fedprune_jax.experiments_def import EXPERIMENTS, Experiment
from fedprune_jax.suite_runs import RunSpec


def index_path(runs_dir: pathlib.Path, experiment: str, quick: bool) -> pathlib.Path:
  """``RUNS/<experiment>.json`` (``<experiment>_quick.json`` for ``--quick``)."""
  return runs_dir / f"{experiment}{'_quick' if quick else ''}.json"


def write_record(runs_dir: pathlib.Path, spec: RunSpec) -> None:
  """Creates the run's workdir with its ``suite.json`` (the run's names) before it starts."""
  workdir = runs_dir / spec.dirname
  workdir.mkdir(parents=True, exist_ok=True)
  io_utils.write_json_atomic(
    workdir / "suite.json",
    {"experiment": spec.experiment, "arm": spec.arm.name, "seed": spec.seed, "key": spec.key},
  )


def read_record(workdir: pathlib.Path) -> dict:
  """``suite.json`` of a run ({} if absent or unreadable: it is rewritten when the run starts)."""
  try:
    record = json.loads((workdir / "suite.json").read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return {}
  return record if isinstance(record, dict) else {}


def record_seconds(workdir: pathlib.Path, seconds: float) -> None:
  """The wall time of the attempt that finished the run, in ``suite.json`` (earlier attempts
  killed mid-run cannot record theirs)."""
  io_utils.write_json_atomic(workdir / "suite.json", {**read_record(workdir), "seconds": seconds})


def entry(spec: RunSpec, runs_dir: pathlib.Path) -> dict:
  """The run's row of the index; ``state`` is ``done`` when its workdir holds a finished run."""
  workdir = runs_dir / spec.dirname
  row = {
    "arm": spec.arm.name,
    "seed": spec.seed,
    "split": spec.split,
    "key": spec.key,
    "kind": spec.arm.kind,
    "row": spec.arm.row,
    "col": spec.arm.col,
    "report": spec.arm.report,
    "dir": spec.dirname,
    "state": "pending" if workdir_lib.incomplete(workdir) else "done",
  }
  if (workdir / "suite.json").exists():
    row["seconds"] = read_record(workdir).get("seconds")
  return row


def write_index(
  path: pathlib.Path,
  experiment: Experiment,
  quick: bool,
  entries: list,
  wall_seconds: float | None = None,
  workers: int | None = None,
) -> None:
  """Rewrites the index; the last call of a ``run_experiment`` adds its wall time and workers."""
  last = {}
  if wall_seconds is not None:
    last = {"last_invocation": {"wall_seconds": wall_seconds, "workers": workers}}
  io_utils.write_json_atomic(
    path,
    {
      **last,
      "experiment": experiment.name,
      "title": experiment.title,
      "question": experiment.question,
      "quick": quick,
      "row_title": experiment.row_title,
      "col_title": experiment.col_title,
      "comparisons": [dataclasses.asdict(c) for c in experiment.comparisons],
      "reference": experiment.reference,
      "notes": list(experiment.notes),
      "figures": list(experiment.figures),
      "runs": entries,
    },
  )


def load_indexes(runs_dir: pathlib.Path) -> list[dict]:
  """The experiment indexes in ``runs_dir`` (sorted by name).

  Other ``*.json`` files are skipped; InputError names an index (a file named after an
  experiment, ``t1_pattern[_quick].json``) that does not parse or lacks its fields.
  """
  return [index for _, index in index_files(runs_dir)]


def index_files(runs_dir: pathlib.Path) -> list[tuple[pathlib.Path, dict]]:
  """``(path, index)`` of every experiment index in ``runs_dir``, sorted by name (as
  ``load_indexes``, with the files they were read from)."""
  found = [(path, read_index(path)) for path in sorted(runs_dir.glob("*.json"))]
  return [(path, index) for path, index in found if index is not None]


def read_index(path: pathlib.Path) -> dict | None:
  """The experiment index in ``path``, or None if ``path`` is another JSON file; InputError if it
  is named after an experiment but does not parse or lacks its fields."""
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    data, problem = None, f"does not parse ({e})"
  else:
    problem = "is not an experiment index (no 'experiment' and 'runs')"
  if _is_index(data):
    return data
  if path.stem.removesuffix("_quick") in EXPERIMENTS:
    raise InputError(
      f"{path}: experiment index {problem}; delete it and rerun `fedprune experiment` to rewrite it"
    )
  return None


def _is_index(data: Any) -> bool:
  return (
    isinstance(data, dict)
    and isinstance(data.get("experiment"), str)
    and isinstance(data.get("runs"), list)
    and all(isinstance(r, dict) and {"arm", "seed", "dir", "state"} <= set(r) for r in data["runs"])
  )
