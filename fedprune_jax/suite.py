"""The paper's experiments as a resumable, cached suite of runs (``fedprune experiment``).

An experiment (``fedprune_jax.experiments_def``: arms, comparisons, seeds and warm start / split
replicates, defined per table in ``experiments/configs/t1_pattern.py`` ...) is run by
``run_experiment``: every (arm, split, seed) as a federated job (``job.run``) or a centralized
baseline (``job.run_baseline``):

* runs are content-addressed: ``RUNS/runs/<key>/`` where ``key`` hashes the run's resolved
  config (paths written relative to RUNS, the workdir left out), so a run shared by several tables
  (the dense reference, the default pruning arm) is computed once, and a finished run is never
  redone; a changed config is a new run;
* a killed run resumes from its round checkpoints (``job.run``); the suite goes on from the first
  run that is not complete (``workdir.incomplete``: completion marker, ``results.json`` and
  final checkpoint all present and readable); a missing file of a dependency is an error;
* a failed run is recorded (``error`` in the index) and the suite goes on with the next one;
* ``RUNS/<experiment>.json`` indexes the experiment's runs (arm, seed, key, wall seconds,
  state), rewritten atomically after each run, so ``fedprune report`` can render partial tables
  while the suite is still running.

Seeds are the outer loop, splits the next: a table is complete for seed 0 before seed 1 starts (``fedprune
experiment all`` runs every experiment for seed 0, then for seed 1, ...).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import functools
import hashlib
import json
import pathlib
import sys
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from fedprune_jax import config as config_lib
from fedprune_jax import io_utils
from fedprune_jax import workdir as workdir_lib
from fedprune_jax import workers as workers_lib
from fedprune_jax.errors import ConfigError, InputError
from fedprune_jax.experiments_def import (  # noqa: F401  (the suite's names for experiment files)
  BASELINE,
  EXPERIMENTS,
  FEDERATED,
  PAPER_REPLICATES,
  QUICK,
  Arm,
  Comparison,
  Experiment,
  From,
  load_experiment,
  one_factor,
  setting_config,
)

# --- one run's config and key ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One (arm, split, seed) of an experiment, resolved."""

  experiment: str
  arm: Arm
  seed: int
  config: ml_collections.ConfigDict  # paths relative to RUNS (the key is computed from it)
  key: str
  split: int = 0

  @property
  def dirname(self) -> str:
    return f"runs/{self.key}"


def _set(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = cfg
  for p in parents:
    if p not in node:
      raise ConfigError(f"experiment override {dotted!r}: the config has no section {p!r}")
    node = node[p]
  if isinstance(node, ml_collections.ConfigDict):
    with node.unlocked():
      node[leaf] = value
  else:
    raise ConfigError(f"experiment override {dotted!r}: {'.'.join(parents)} is not a section")


# Fields added after runs were cached, left out of the key while they hold these values (or
# always, for ``warm_start.train_if_missing``: where a warm start comes from, not what it is), so
# finished runs keep their keys.
_KEY_OMITTED = {**workdir_lib.ADDED_DEFAULTS, "warm_start.train_if_missing": None}


def _key_config(config: Mapping[str, Any]) -> dict:
  config = copy.deepcopy(dict(config))
  for dotted, default in _KEY_OMITTED.items():
    section, leaf = dotted.split(".")
    node = config.get(section)
    if isinstance(node, dict) and leaf in node and (default is None or node[leaf] == default):
      del node[leaf]
  return config


def _key_of(config: Mapping[str, Any], kind: str) -> str:
  config = _key_config(config)
  blob = json.dumps({"kind": kind, "config": config}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warm_start_key(cfg: ml_collections.ConfigDict) -> str:
  """What the shared warm start depends on: corpus, split, model, loss and its own fields."""
  d = cfg.to_dict()
  ignored = ("path", "eval_every", "train_if_missing")
  ws = {k: v for k, v in d.get("warm_start", {}).items() if k not in ignored}
  data = {k: d["data"].get(k) for k in ("root", "source", "train_split", "server_speakers")}
  if d["data"].get("server_accents"):  # absent or empty: the key of the earlier warm starts
    data["server_accents"] = list(d["data"]["server_accents"])
  data["split_seed"] = d["data"].get("split_seed")
  data["num_buckets"] = d["data"].get("num_buckets")
  return _key_of({"ws": ws, "data": data, "model": d["model"], "specaug": d.get("specaug")}, "ws")


def expand(
  experiment: Experiment,
  *,
  quick: bool = False,
  seeds: Sequence[int] | None = None,
  splits: Sequence[int] | None = None,
  data_root: str | None = None,
  overrides: Sequence[str] = (),
) -> list[RunSpec]:
  """The experiment's runs in execution order (seed-major, then split, arms in order).

  A seed outside ``experiment.seeds`` runs the claim arms only (``Experiment.runs_seed``). A
  run's config: the setting's, then ``--quick``'s ``QUICK`` fields, then the split replicate
  (``data.split_seed`` and ``warm_start.seed``), then the user's ``overrides`` (``key=value``),
  then the seed, then the arm's overrides. Default seeds and splits: all (``--quick``: the first).
  """
  if seeds is None:
    seeds = experiment.seeds[:1] if quick else experiment.all_seeds
  if splits is None:
    splits = experiment.splits[: 1 if quick else None]
  specs: list[RunSpec] = []
  for seed in seeds:
    for split in splits:
      keys: dict[str, str] = {}
      for arm in experiment.arms:
        if not experiment.runs_seed(arm, seed):
          continue
        cfg = _run_config(experiment, arm, seed, split, keys, quick, data_root, overrides)
        key = _key_of(cfg.to_dict(), arm.kind)
        keys[arm.name] = key
        specs.append(RunSpec(experiment.name, arm, seed, cfg, key, split))
  return specs


def _run_config(experiment, arm, seed, split, keys, quick, data_root, overrides):
  """One run's config (``expand``); ``keys``: the run keys of the replicate's earlier arms."""
  cfg = experiment.base.copy_and_resolve_references()
  if data_root:
    cfg.data.root = str(pathlib.Path(data_root).absolute())
  if quick:
    for k, v in {**QUICK, **experiment.quick}.items():
      _set(cfg, k, copy.deepcopy(v))  # never a shared ConfigDict that --set would mutate
  if "split_seed" in cfg.data:
    cfg.data.split_seed = split
  if cfg.get("warm_start") and "seed" in cfg.warm_start:
    cfg.warm_start.seed = split
  config_lib.apply_overrides(cfg, overrides, source="--set")
  cfg.seed = seed
  derived = {}
  for k, v in arm.overrides.items():
    if isinstance(v, From):
      _set(cfg, k, f"runs/{keys[v.arm]}/{v.file}")
    elif callable(v):
      derived[k] = v
    else:
      _set(cfg, k, v)
  for k, fn in derived.items():  # functions of the arm's other fields
    _set(cfg, k, fn(cfg))
  if cfg.get("warm_start") and cfg.warm_start.steps and not cfg.warm_start.get("path"):
    cfg.warm_start.path = f"warm_start/{warm_start_key(cfg)}"
    cfg.warm_start.train_if_missing = True  # the first run that needs it trains it
  cfg.workdir = ""
  return cfg


def materialize(spec: RunSpec, runs_dir: pathlib.Path) -> ml_collections.ConfigDict:
  """The spec's config with RUNS-relative paths made absolute and the workdir set; validated."""
  from fedprune_jax import validation  # pylint: disable=g-import-not-at-top

  cfg = spec.config.copy_and_resolve_references()
  cfg.workdir = str(runs_dir / spec.dirname)
  if cfg.get("warm_start") and cfg.warm_start.get("path"):
    cfg.warm_start.path = _under(runs_dir, cfg.warm_start.path)
  if cfg.get("pruning") and cfg.pruning.get("mask_path"):
    cfg.pruning.mask_path = _under(runs_dir, cfg.pruning.mask_path)
  validation.validate(cfg)
  return cfg


def check_experiment(
  experiment: Experiment,
  runs_dir: str | pathlib.Path,
  *,
  quick: bool = False,
  seeds: Sequence[int] | None = None,
  data_root: str | None = None,
  overrides: Sequence[str] = (),
  check_data: bool = True,
) -> None:
  """Every run's config validated (and with ``check_data`` the corpus's train split found)
  before any run starts, so a bad ``--set``, seed or data root is one error, not a failed run
  each."""
  runs_dir = pathlib.Path(runs_dir).absolute()
  specs = expand(experiment, quick=quick, seeds=seeds, data_root=data_root, overrides=overrides)
  for spec in specs:
    cfg = materialize(spec, runs_dir)
  if check_data and specs and cfg.data.get("source", "librispeech_dir") == "librispeech_dir":
    root = pathlib.Path(cfg.data.root)
    for split in cfg.data.train_split.split("+"):
      if not (root / split).is_dir():
        raise ConfigError(
          f"data.root={str(root)!r} has no split directory {split!r} (the {experiment.name} "
          "runs read it; pass the corpus root with --data)"
        )


def _under(runs_dir: pathlib.Path, path: str) -> str:
  p = pathlib.Path(path)
  return str(p if p.is_absolute() else runs_dir / p)


# --- running --------------------------------------------------------------------------------------


def _index_path(runs_dir: pathlib.Path, experiment: str, quick: bool) -> pathlib.Path:
  return runs_dir / f"{experiment}{'_quick' if quick else ''}.json"


def run_experiment(
  experiment: Experiment,
  runs_dir: str | pathlib.Path,
  *,
  quick: bool = False,
  seeds: Sequence[int] | None = None,
  data_root: str | None = None,
  overrides: Sequence[str] = (),
  progress: bool = True,
  runner: Callable[[str, ml_collections.ConfigDict], dict] | None = None,
  pool: workers_lib.RunPool | None = None,
  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict:
  """Runs (or resumes) every run of ``experiment``; returns its index.

  Runs are started in order (seed-major) as ``pool`` has room: a run waits for the arms it
  starts from (``From``), not for the runs before it.

  Args:
    runner: ``runner(kind, cfg) -> results`` (default: ``job.run`` / ``job.run_baseline``).
    pool: where runs execute (default: this process, one after the other, with ``runner``);
      a pool's own runner is used instead of ``runner``.
  """
  runs_dir = pathlib.Path(runs_dir).absolute()
  runs_dir.mkdir(parents=True, exist_ok=True)
  own_pool = pool is None
  if own_pool:
    pool = workers_lib.RunPool(runner or functools.partial(default_runner, progress=progress))
  default = experiment.seeds[:1] if quick else experiment.all_seeds
  wanted = tuple(seeds) if seeds is not None else default
  # the index covers the experiment's seeds (and any asked for), runs only the wanted ones
  indexed = tuple(dict.fromkeys(default + wanted))
  specs = expand(experiment, quick=quick, seeds=indexed, data_root=data_root, overrides=overrides)
  index_path = _index_path(runs_dir, experiment.name, quick)
  entries = [_entry(spec, runs_dir) for spec in specs]
  key_of = {(s.seed, s.split, s.arm.name): s.key for s in specs}
  state_of = {s.key: e["state"] for s, e in zip(specs, entries)}  # shared runs: one state
  waiting = [i for i, spec in enumerate(specs) if spec.seed in wanted]
  tags = {
    i: f"[{experiment.name}{' quick' if quick else ''} {n + 1}/{len(waiting)}]"
    for n, i in enumerate(waiting)
  }
  running: dict[concurrent.futures.Future, int] = {}
  # a run whose warm start is not on disk yet trains it: the others that share it wait for it
  warm_start_of = functools.partial(_warm_start_path, runs_dir=runs_dir)
  training = set()  # warm starts that a running run is training
  start = time.monotonic()

  def finish(i: int, future: concurrent.futures.Future) -> None:
    spec, entry, tag = specs[i], entries[i], tags[i]
    error = future.exception()
    if error is not None:
      entry.update(state="failed", error=f"{type(error).__name__}: {error}")
      log(
        f"{tag} {spec.arm.name} seed {spec.seed}: FAILED\n"
        + "".join(traceback.format_exception(error))
      )
    else:
      _record_seconds(runs_dir / spec.dirname, future.result())
      entry.update(_entry(spec, runs_dir))
      log(f"{tag} {spec.arm.name} seed {spec.seed}: done in {future.result():.0f} s")
    state_of[spec.key] = entry["state"]
    training.discard(warm_start_of(spec))  # if it is still not on disk, the next run trains it
    _write_index(index_path, experiment, quick, entries)

  try:
    while waiting or running:
      for i in list(waiting):
        if len(running) >= pool.workers:
          break
        spec, entry = specs[i], entries[i]
        needs = [state_of[key_of[(spec.seed, spec.split, a)]] for a in spec.arm.needs]
        if state_of[spec.key] == "done":
          waiting.remove(i)
          entry.update(_entry(spec, runs_dir))
          log(f"{tags[i]} {spec.arm.name} seed {spec.seed}: cached ({spec.dirname})")
        elif "failed" in needs:
          waiting.remove(i)
          blocked = spec.arm.needs[needs.index("failed")]
          entry.update(state="failed", error=f"needs arm {blocked!r}, which failed")
          state_of[spec.key] = "failed"
          _write_index(index_path, experiment, quick, entries)
        elif (
          all(n == "done" for n in needs)
          and state_of[spec.key] != "running"
          and warm_start_of(spec) not in training
        ):
          waiting.remove(i)
          warm_start = warm_start_of(spec)
          if warm_start and not pathlib.Path(warm_start).exists():
            training.add(warm_start)
          state_of[spec.key] = "running"  # an arm shared by two cells runs once
          log(f"{tags[i]} {spec.arm.name} seed {spec.seed}: running in {runs_dir / spec.dirname}")
          running[_submit(pool, spec, runs_dir)] = i
      if not running:
        if waiting:  # cannot happen: an arm's needs come before it in its seed
          raise RuntimeError(f"runs {[specs[i].arm.name for i in waiting]} wait on no run")
      else:
        done, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
        for future in done:
          finish(running.pop(future), future)
  finally:
    if own_pool:
      pool.close()
  _write_index(index_path, experiment, quick, entries, time.monotonic() - start, pool.workers)
  return json.loads(index_path.read_text(encoding="utf-8"))


def _warm_start_path(spec: RunSpec, runs_dir: pathlib.Path) -> str | None:
  path = spec.config.get("warm_start", {}).get("path")
  return _under(runs_dir, path) if path else None


def _submit(pool: workers_lib.RunPool, spec: RunSpec, runs_dir: pathlib.Path):
  """Starts one run (its config errors come back through the future, like run errors)."""
  try:
    cfg = materialize(spec, runs_dir)
    _check_needs(spec, runs_dir)
    workdir = runs_dir / spec.dirname
    workdir.mkdir(parents=True, exist_ok=True)
    io_utils.write_json_atomic(
      workdir / "suite.json",
      {"experiment": spec.experiment, "arm": spec.arm.name, "seed": spec.seed, "key": spec.key},
    )
  except Exception as e:  # pylint: disable=broad-except  (one run never kills the suite)
    future = concurrent.futures.Future()
    future.set_exception(e)
    return future
  return pool.submit(spec.arm.kind, cfg)


def _check_needs(spec: RunSpec, runs_dir: pathlib.Path) -> None:
  """InputError naming the run if a file it starts from (``From``) is missing: a finished
  dependency's artefact is never silently replaced (e.g. by training a new warm start)."""
  for field, value in spec.arm.overrides.items():
    if isinstance(value, From):
      path = runs_dir / _get(spec.config, field)
      if not path.exists():
        raise InputError(
          f"run {spec.dirname} ({spec.experiment} arm {spec.arm.name!r} seed {spec.seed}) needs "
          f"{path} ({field}) of arm {value.arm!r}, which is missing; remove that run's directory "
          "to redo it"
        )


def _get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def _read_record(workdir: pathlib.Path) -> dict:
  """``suite.json`` of a run ({} if absent or unreadable: it is rewritten when the run starts)."""
  try:
    record = json.loads((workdir / "suite.json").read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return {}
  return record if isinstance(record, dict) else {}


def _record_seconds(workdir: pathlib.Path, seconds: float) -> None:
  """The wall time of the attempt that finished the run, in ``suite.json`` (earlier attempts
  killed mid-run cannot record theirs)."""
  io_utils.write_json_atomic(workdir / "suite.json", {**_read_record(workdir), "seconds": seconds})


def _entry(spec: RunSpec, runs_dir: pathlib.Path) -> dict:
  workdir = runs_dir / spec.dirname
  entry = {
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
    entry["seconds"] = _read_record(workdir).get("seconds")
  return entry


def _write_index(
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


def default_runner(kind: str, cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
  """``job.run_baseline`` for baseline arms, ``job.run`` for federated ones."""
  from fedprune_jax import job  # pylint: disable=g-import-not-at-top

  if kind == BASELINE:
    return job.run_baseline(cfg, progress=progress)
  return job.run(cfg, progress=progress)
