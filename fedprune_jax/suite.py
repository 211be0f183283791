"""The paper's experiments as a resumable, cached suite of runs (``fedprune experiment``).

An experiment (``fedprune_jax.experiments_def``: arms, comparisons, seeds and warm start / split
replicates, defined per table in ``experiments/configs/t1_pattern.py`` ...) is run by
``run_experiment``: every (arm, split, seed) as a federated job (``job.run``) or a centralized
baseline (``job.run_baseline``). This module is the scheduler; ``suite_runs`` expands an
experiment into its runs and their keys, ``suite_index`` writes the records and indexes:

* runs are content-addressed: ``RUNS/runs/<key>/`` where ``key`` hashes the run's resolved
  config (``suite_runs``), so a run shared by several tables (the dense reference, the default
  pruning arm) is computed once, and a finished run is never redone; a changed config is a new
  run;
* a killed run resumes from its round checkpoints (``job.run``); the suite goes on from the first
  run that is not complete (``workdir.incomplete``: completion marker, ``results.json`` and
  final checkpoint all present and readable); a missing file of a dependency is an error;
* a failed run is recorded (``error`` in the index) and the suite goes on with the next one;
* ``RUNS/<experiment>.json`` indexes the experiment's runs (``suite_index``), rewritten
  atomically after each run, so ``fedprune report`` can render partial tables while the suite is
  still running;
* runs that share a warm start that is not on disk yet wait for the one run that trains it.

Seeds are the outer loop, splits the next: a table is complete for seed 0 before seed 1 starts
(``run_experiments``: ``fedprune experiment all`` runs every experiment for seed 0, then for seed
1, ...).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import functools
import json
import pathlib
import sys
import time
import traceback
from typing import Callable, Sequence

import ml_collections

from fedprune_jax import suite_index
from fedprune_jax.federated.checkpoints import saved_rounds
from fedprune_jax.suite_archive import archive as archive_runs
from fedprune_jax.suite_archive import restore
from fedprune_jax import workers as workers_lib
from fedprune_jax.errors import ConfigError  # noqa: F401  (``suite.ConfigError``)
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
from fedprune_jax.suite_runs import (  # noqa: F401  (``suite.expand`` ...)
  RunSpec,
  check_corpora,
  check_experiment,
  check_needs,
  expand,
  materialize,
  warm_start_key,
  warm_start_path,
)

Log = Callable[[str], None]


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def time_left(ran: int, left: int, elapsed_s: float) -> str:
  """What is left of a call, at its own pace so far: ``ran`` runs took ``elapsed_s`` seconds of
  wall time with every worker busy (``run_experiment``: their run seconds over the workers),
  ``left`` runs are not finished yet."""
  if left == 0:
    return "none left"
  if ran == 0:
    return f"{left} left"
  pace = elapsed_s / ran
  eta = pace * left
  eta_text = f"{eta / 3600:.1f} h" if eta >= 5400 else f"{eta / 60:.0f} min"
  return f"{left} left, about {eta_text} at {pace / 60:.1f} min a run so far"


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
  archive: str | pathlib.Path | None = None,
  log: Log = _stderr,
) -> dict:
  """Runs (or resumes) every run of ``experiment``; returns its index.

  Runs are started comparison by comparison (``Experiment.start_ranks``), each seed-major, as
  ``pool`` has room: a run waits for the arms it starts from (``From``), not for the runs
  before it.

  Args:
    runner: ``runner(kind, cfg) -> results`` (default: ``job.run`` / ``job.run_baseline``).
    pool: where runs execute (default: this process, one after the other, with ``runner``);
      a pool's own runner is used instead of ``runner``.
    archive: a ``suite_archive`` directory (e.g. in git): its finished runs of the experiment
      are restored into ``runs_dir`` first, and every run is archived there as it finishes.
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
  index_path = suite_index.index_path(runs_dir, experiment.name, quick)
  if archive is not None and (restored := restore(archive, runs_dir, {s.dirname for s in specs})):
    log(f"{experiment.name}: {restored} finished run(s) restored from {archive}")
  entries = [suite_index.entry(spec, runs_dir) for spec in specs]
  check_corpora([s for s, e in zip(specs, entries) if e["state"] == "done"], runs_dir)
  key_of = {(s.seed, s.split, s.arm.name): s.key for s in specs}
  state_of = {s.key: e["state"] for s, e in zip(specs, entries)}  # shared runs: one state
  rank = experiment.start_ranks()

  def start_order(i: int) -> tuple[int, int]:
    return rank[specs[i].arm.name], i

  waiting = sorted((i for i, spec in enumerate(specs) if spec.seed in wanted), key=start_order)
  tags = {
    i: f"[{experiment.name}{' quick' if quick else ''} {n + 1}/{len(waiting)}]"
    for n, i in enumerate(waiting)
  }
  running: dict[concurrent.futures.Future, int] = {}
  # a run whose warm start is not on disk yet trains it: the others that share it wait for it
  warm_start_of = functools.partial(warm_start_path, runs_dir=runs_dir)
  training = set()  # warm starts that a running run is training
  start = time.monotonic()
  # the pace: runs this call ran from the start and their seconds (not the cached ones, nor
  # those resumed from a killed attempt's checkpoint, which finish early, nor failed ones)
  ran, ran_seconds = 0, 0.0
  resumed = set()  # runs that started from a killed attempt's round checkpoint: not the pace
  retried = set()  # runs whose worker died under them once: started again, not a second time

  def needs_states(spec: RunSpec) -> list[str]:  # the states of the arms a run starts from
    return [state_of[key_of[(spec.seed, spec.split, a)]] for a in spec.arm.needs]

  def left(finished_key: str) -> int:
    """Distinct runs (an arm shared by two cells runs once) still to run or running, besides the
    one that just finished; those whose dependency failed will not run."""
    keys = {specs[i].key for i in waiting if "failed" not in needs_states(specs[i])} | {
      specs[i].key for i in running.values()
    }
    return sum(state_of[k] != "done" for k in keys - {finished_key})

  def finish(i: int, future: concurrent.futures.Future) -> None:
    nonlocal ran, ran_seconds
    spec, entry, tag = specs[i], entries[i], tags[i]
    error = future.exception()
    training.discard(warm_start_of(spec))  # if it is still not on disk, the next run trains it
    if error is not None and workers_lib.worker_died(error) and i not in retried:
      # the OS ended its worker (out of memory, a signal), and with it every run of that pool:
      # each runs again once, from its last round checkpoint, in a new pool
      retried.add(i)
      state_of[spec.key] = "pending"
      entry.update(state="pending")
      bisect.insort(waiting, i, key=start_order)
      log(
        f"{tag} {spec.arm.name} seed {spec.seed}: its worker process died ({error}); again, alone"
      )
      return
    if error is not None:
      twice = i in retried and workers_lib.worker_died(error)
      died = "its worker process died twice (killed by the OS: out of memory?): " * twice
      entry.update(state="failed", error=f"{died}{type(error).__name__}: {error}")
    else:
      suite_index.record_seconds(runs_dir / spec.dirname, future.result())
      entry.update(suite_index.entry(spec, runs_dir))
    state_of[spec.key] = entry["state"]
    if error is None and i not in resumed:
      ran, ran_seconds = ran + 1, ran_seconds + future.result()
    pace = time_left(ran, left(spec.key), ran_seconds / pool.workers)
    if error is not None:
      log(
        f"{tag} {spec.arm.name} seed {spec.seed}: FAILED ({pace})\n"
        + "".join(traceback.format_exception(error))
      )
    else:
      log(f"{tag} {spec.arm.name} seed {spec.seed}: done in {future.result():.0f} s; {pace}")
    suite_index.write_index(index_path, experiment, quick, entries)
    if archive is not None:
      archive_runs(runs_dir, archive)

  try:
    while waiting or running:
      for i in list(waiting):
        # a run started again after its worker died runs alone, and nothing starts beside it:
        # if it dies again, it is that run that kills its worker, not a run beside it
        alone = i in retried or any(j in retried for j in running.values())
        if len(running) >= pool.workers or (running and alone):
          break
        spec, entry = specs[i], entries[i]
        needs = needs_states(spec)
        if state_of[spec.key] == "done":
          waiting.remove(i)
          entry.update(suite_index.entry(spec, runs_dir))
          log(f"{tags[i]} {spec.arm.name} seed {spec.seed}: cached ({spec.dirname})")
        elif "failed" in needs:
          waiting.remove(i)
          blocked = spec.arm.needs[needs.index("failed")]
          entry.update(state="failed", error=f"needs arm {blocked!r}, which failed")
          state_of[spec.key] = "failed"
          suite_index.write_index(index_path, experiment, quick, entries)
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
          if saved_rounds(runs_dir / spec.dirname / "rounds"):
            resumed.add(i)
          log(f"{tags[i]} {spec.arm.name} seed {spec.seed}: running in {runs_dir / spec.dirname}")
          running[_submit(pool, spec, runs_dir)] = i
      if not running:
        if waiting:  # cannot happen: an arm's needs start no later than it (start_ranks)
          raise RuntimeError(f"runs {[specs[i].arm.name for i in waiting]} wait on no run")
      else:
        done, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
        for future in done:
          finish(running.pop(future), future)
  finally:
    if own_pool:
      pool.close()
  suite_index.write_index(
    index_path, experiment, quick, entries, time.monotonic() - start, pool.workers
  )
  if archive is not None:
    archive_runs(runs_dir, archive)
  return json.loads(index_path.read_text(encoding="utf-8"))


def run_experiments(
  names: Sequence[str],
  runs_dir: str | pathlib.Path,
  *,
  setting: str = "small",
  quick: bool = False,
  seeds: Sequence[int] | None = None,
  data_root: str | None = None,
  overrides: Sequence[str] = (),
  workers: int = 1,
  archive: str | pathlib.Path | None = None,
  log: Log = _stderr,
) -> dict[str, int]:
  """Runs (resumes) several experiments seed-major on one pool of ``workers``; returns the number
  of failed runs of each experiment (``fedprune experiment``).

  Every run's config (and, outside the embedded corpus, the corpus) is checked before any run.
  The small setting's embedded corpus is synthesized under ``data_root`` (default ``data``) if
  absent, unless ``overrides`` set ``data.root``. ``seeds``: default the experiments' own seeds
  (``quick``: the first); given, each experiment runs them all (claim arms only for a seed
  outside its ``seeds``).
  """
  experiments = [load_experiment(n, setting) for n in names]
  explicit = seeds is not None

  def own_seeds(e: Experiment) -> tuple[int, ...]:  # every arm's seeds, then the claims' extra
    return e.seeds[:1] if quick else e.all_seeds

  if not explicit:
    seeds = sorted({s for e in experiments for s in own_seeds(e)})
  base = experiments[0].base
  root_set = any(o.startswith("data.root=") for o in overrides)
  embedded = "synth_vocab_size" in base.data and not root_set
  for experiment in experiments:  # every run's config (and the corpus) checked before any run
    check_experiment(
      experiment,
      runs_dir,
      quick=quick,
      seeds=[s for s in seeds if s in own_seeds(experiment) or explicit],
      data_root=data_root,
      overrides=overrides,
      check_data=not embedded,
    )
  if embedded:
    from fedprune_jax import task  # pylint: disable=g-import-not-at-top

    data_root = str(task.embedded_corpus(base.data, data_root or "data"))
  # seed-major: every table gets its first seed before any gets a second (one table: all its
  # seeds in one call, so workers never wait for a seed to finish)
  seed_groups = [seeds] if len(experiments) == 1 else [[s] for s in seeds]
  failed = {}  # of the latest index of each experiment (it covers every seed)
  runner = functools.partial(default_runner, progress=workers == 1)
  start = time.monotonic()
  with workers_lib.RunPool(runner, workers) as pool:
    for group in seed_groups:
      for experiment in experiments:
        group_seeds = [s for s in group if s in own_seeds(experiment) or explicit]
        if not group_seeds:
          continue
        index = run_experiment(
          experiment,
          runs_dir,
          quick=quick,
          seeds=group_seeds,
          data_root=data_root,
          overrides=overrides,
          pool=pool,
          archive=archive,
          log=log,
        )
        failed[experiment.name] = sum(r["state"] == "failed" for r in index["runs"])
  log(f"{', '.join(names)}: {(time.monotonic() - start) / 60:.1f} min with {workers} worker(s)")
  return failed


def _submit(pool: workers_lib.RunPool, spec: RunSpec, runs_dir: pathlib.Path):
  """Starts one run (its config errors come back through the future, like run errors)."""
  try:
    cfg = materialize(spec, runs_dir)
    check_needs(spec, runs_dir)
    suite_index.write_record(runs_dir, spec)
  except Exception as e:  # pylint: disable=broad-except  (one run never kills the suite)
    future = concurrent.futures.Future()
    future.set_exception(e)
    return future
  return pool.submit(spec.arm.kind, cfg)


def default_runner(kind: str, cfg: ml_collections.ConfigDict, progress: bool = True) -> dict:
  """``job.run_baseline`` for baseline arms, ``job.run`` for federated ones."""
  from fedprune_jax import job  # pylint: disable=g-import-not-at-top

  if kind == BASELINE:
    return job.run_baseline(cfg, progress=progress)
  return job.run(cfg, progress=progress)
