"""The paper's experiment suite: run keys and sharing, caching and resume, failure isolation, the
report's numbers, one real quick table (T6: centralized baseline, a frozen server-chosen mask and
federated pruning), the full setting's LibriSpeech wiring, and joined splits."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import pathlib
import re
import shutil

import pytest

from conftest import MICRO_MODEL, fake_results, toy_experiment, write_finished_run
from fedprune_jax import cli, report, suite
from fedprune_jax import statistics as st
from fedprune_jax.errors import InputError

# Shrinks the setting to the tiny test corpus (6 speakers: 4 train, 1 dev, 1 test).
TEST_SETS = [
  "data.server_speakers=1",
  "data.batch_size=2",
  "data.num_buckets=1",
  "data.segments=1",
  "data.eval_batch_size=4",
  "cohort_size=3",
  "warm_start.steps=3",
  "warm_start.batch_size=4",
  "baseline.batch_size=2",
  "baseline.steps_per_round=2",
  *(f"model.overrides.{k}={v!r}" for k, v in MICRO_MODEL.items()),
]


def test_keys_are_shared_across_tables_and_follow_the_config():
  t1 = {(s.arm.name, s.split, s.seed): s for s in suite.expand(suite.load_experiment("t1_pattern"))}
  t2 = {(s.arm.name, s.split, s.seed): s for s in suite.expand(suite.load_experiment("t2_score"))}
  t5 = {
    (s.arm.name, s.split, s.seed): s for s in suite.expand(suite.load_experiment("t5_refinement"))
  }
  # 19 arms x 3 seeds x 2 splits, and the claims' arms (and the reference) 2 more seeds
  claim_arms = {"dense", "unstructured@0.5", "unstructured@0.8"}
  claim_arms |= {f"{p}@{s}" for p in ("row", "column") for s in (0.5, 0.7)}
  claim_arms |= {"half_row@0.5", "half_column@0.5"}
  assert len(t1) == 19 * 3 * 2 + len(claim_arms) * 2 * 2 == len({s.key for s in t1.values()})
  assert {a for a, _, seed in t1 if seed == 4} == claim_arms
  # the dense reference and the shared default arms are one run each
  assert t1[("dense", 1, 1)].key == t2[("dense", 1, 1)].key
  assert t1[("unstructured@0.7", 0, 2)].key == t5[("server", 0, 2)].key
  assert t2[("magnitude", 1, 2)].key == t5[("none", 1, 2)].key
  assert t1[("dense", 0, 0)].key != t1[("dense", 0, 1)].key  # seeds differ
  assert t1[("dense", 0, 0)].key != t1[("dense", 1, 0)].key  # splits differ
  # one warm start per split, for every run and seed
  for split in (0, 1):
    paths = {s.config.warm_start.path for k, s in t1.items() if k[1] == split}
    assert len(paths) == 1
    assert {
      (s.config.data.split_seed, s.config.warm_start.seed) for k, s in t1.items() if k[1] == split
    } == {(split, split)}
  # --quick: one seed, QUICK's fields, then the user's overrides
  quick = suite.expand(suite.load_experiment("t1_pattern"), quick=True, overrides=["rounds=3"])
  assert {(s.split, s.seed) for s in quick} == {(0, 0)} and len(quick) == 19
  assert quick[0].config.rounds == 3 and quick[0].config.cohort_size == suite.QUICK["cohort_size"]
  # a --set into a QUICK section changes that run only, not QUICK itself
  t6 = suite.load_experiment("t6_data")
  (a, *_) = suite.expand(t6, quick=True, overrides=["model.overrides.d_model=48"])
  (b, *_) = suite.expand(t6, quick=True)
  assert a.config.model.overrides.d_model == 48 and b.config.model.overrides.d_model == 32


def test_step_schedule_reaches_the_target_within_the_pruning_phase():
  from fedprune_jax.algorithms import build

  for quick in (False, True):
    specs = suite.expand(suite.load_experiment("t3_schedule"), quick=quick, seeds=[0], splits=[0])
    (step,) = [s for s in specs if s.arm.name == "step"]
    p = step.config.pruning
    policy = build.policy_from_config(build.resolve_pruning(p))  # raises if it ends too late
    assert policy.schedule.end_step < p.pruning_rounds
    assert float(policy.target(p.pruning_rounds - 1)) == pytest.approx(0.7)


def test_bad_experiments_are_rejected():
  with pytest.raises(suite.ConfigError, match="repeat"):
    toy_experiment((suite.Arm("a"), suite.Arm("a")))
  with pytest.raises(suite.ConfigError, match="must come before"):
    toy_experiment(
      (suite.Arm("b", {"pruning.mask_path": suite.From("a", "mask.npz")}), suite.Arm("a"))
    )
  with pytest.raises(suite.ConfigError, match="unknown arm"):
    toy_experiment((suite.Arm("a"),), comparisons=(suite.Comparison("x", "a", "zzz"),))
  with pytest.raises(suite.ConfigError, match="not an experiment"):
    suite.load_experiment("paper_small")


def test_cache_resume_and_failure_isolation(tmp_path):
  """A finished run is never redone, a failed run does not stop the suite, an arm that starts
  from a failed arm is skipped, and a rerun only does what is missing."""
  arms = (
    suite.Arm("dense", {"pruning": None}, row="dense"),
    suite.Arm("broken", {"pruning.target_sparsity": 0.6}, kind=suite.BASELINE, row="b"),
    suite.Arm("after", {"pruning.mask_path": suite.From("broken", "mask.npz")}, row="c"),
    suite.Arm("pruned", {"pruning.target_sparsity": 0.5}, row="p"),
  )
  experiment = toy_experiment(arms, seeds=(0, 1))
  calls = []

  def runner(kind, cfg):
    calls.append((kind, cfg.seed, cfg.get("pruning") and cfg.pruning.target_sparsity))
    if kind == suite.BASELINE and cfg.seed == 1:
      raise RuntimeError("boom")
    out = pathlib.Path(cfg.workdir)
    write_finished_run(out, fake_results(0.5 - 0.1 * cfg.seed))
    return {}

  lines = []
  index = suite.run_experiment(experiment, tmp_path, runner=runner, log=lines.append)
  states = {(r["arm"], r["seed"]): r["state"] for r in index["runs"]}
  assert states[("broken", 1)] == "failed" and states[("after", 1)] == "failed"
  assert "boom" in next(
    r["error"] for r in index["runs"] if r["arm"] == "broken" and r["seed"] == 1
  )
  assert "needs arm 'broken'" in next(
    r["error"] for r in index["runs"] if r["arm"] == "after" and r["seed"] == 1
  )
  assert states[("pruned", 1)] == "done"  # after the failures
  assert len(calls) == 7  # 8 runs, one skipped because what it starts from failed
  # the frozen-mask arm was given its dependency's mask path (absolute, under RUNS)
  assert all(r["seconds"] >= 0 for r in index["runs"] if r["state"] == "done")
  # what is left after each run, one worker in seed-major order: the skipped run ("after" of
  # seed 1) stops counting when the run it starts from fails
  assert _runs_left(lines) == [7, 6, 5, 4, 3, 1, 0]

  # rerun: the finished runs are cached; only the failed ones run again
  calls.clear()
  key = next(r["dir"] for r in index["runs"] if r["arm"] == "pruned" and r["seed"] == 0)
  (tmp_path / key / "results.json").unlink()  # as if killed before it finished
  lines.clear()
  suite.run_experiment(experiment, tmp_path, runner=runner, log=lines.append)
  assert sorted(calls) == sorted([(suite.BASELINE, 1, 0.6), (suite.FEDERATED, 0, 0.5)])
  assert _runs_left(lines) == [2, 0]  # the cached runs are not left to do
  # running one seed keeps the other seed's entries in the index
  calls.clear()
  index = suite.run_experiment(experiment, tmp_path, seeds=[1], runner=runner, log=lambda s: None)
  assert len(index["runs"]) == 8 and {c[1] for c in calls} == {1}
  assert sum(r["state"] == "done" for r in index["runs"] if r["seed"] == 0) == 4


def test_runs_start_comparison_by_comparison(tmp_path):
  """The first comparison's arms (with the reference and what they start from) run every
  replicate first, then the next comparison's, then the arms no comparison reads: a suite cut
  short has whole comparisons (seed-major, it had a few replicates of every arm)."""
  arms = (
    suite.Arm("dense", {"pruning": None}, row="dense"),
    suite.Arm("extra", {"pruning.target_sparsity": 0.8}, row="e"),
    suite.Arm("a", {"pruning.target_sparsity": 0.5}, row="a"),
    suite.Arm("central", {"pruning.target_sparsity": 0.6}, kind=suite.BASELINE, row="c"),
    suite.Arm("after", {"pruning.mask_path": suite.From("central", "mask.npz")}, row="f"),
    suite.Arm("b", {"pruning.target_sparsity": 0.7}, row="b"),
  )
  comparisons = (suite.Comparison("b - a", "b", "a"), suite.Comparison("after - a", "after", "a"))
  experiment = toy_experiment(arms, seeds=(0, 1), comparisons=comparisons)
  assert experiment.start_ranks() == {
    "dense": 0,
    "a": 0,
    "b": 0,
    "central": 1,
    "after": 1,
    "extra": 2,
  }
  order = []
  name = {None: "dense", 0.8: "extra", 0.5: "a", 0.6: "central", 0.7: "b"}

  def runner(kind, cfg):
    p = cfg.pruning
    order.append(("after" if p and p.mask_path else name[p and p.target_sparsity], cfg.seed))
    write_finished_run(pathlib.Path(cfg.workdir), fake_results(0.5))
    return {}

  suite.run_experiment(experiment, tmp_path, runner=runner, log=lambda s: None)
  assert order == [
    ("dense", 0), ("a", 0), ("b", 0), ("dense", 1), ("a", 1), ("b", 1),
    ("central", 0), ("after", 0), ("central", 1), ("after", 1),
    ("extra", 0), ("extra", 1),
  ]  # fmt: skip


def _runs_left(lines: list[str]) -> list[int]:
  """The runs left that each finished (or failed) run's log line states."""
  pattern = re.compile(r": (?:done in \d+ s; |FAILED \()(none|\d+) left")
  found = [pattern.search(line) for line in lines]
  return [0 if m[1] == "none" else int(m[1]) for m in found if m]


def test_a_resumed_run_does_not_set_the_pace(tmp_path):
  """A run that resumes a killed attempt finishes early: counted in the pace, it would make the
  rest look minutes away. The first line after it has no pace; the next fresh run sets one."""
  experiment = toy_experiment(
    (suite.Arm("dense", {"pruning": None}, row="dense"),), seeds=(0, 1, 2)
  )
  first, *_ = suite.expand(experiment)
  (tmp_path / first.dirname / "rounds" / "10").mkdir(parents=True)  # a killed attempt's checkpoint

  def runner(kind, cfg):
    write_finished_run(cfg.workdir, fake_results(0.3))
    return {}

  lines = []
  suite.run_experiment(experiment, tmp_path, runner=runner, log=lines.append)
  done = [line for line in lines if ": done in " in line]
  assert len(done) == 3 and done[0].endswith("; 2 left") and done[1].endswith("a run so far")


def test_the_pace_is_the_fresh_runs_seconds_over_the_workers(tmp_path, monkeypatch):
  """After a restart, the runs resumed from a killed attempt take their workers' time while
  the first fresh runs start: the pace is the fresh runs' own seconds per run over the workers
  (240 s a run, 2 workers: 2.0 min a run), not the call's wall time since it started."""
  experiment = toy_experiment(
    (suite.Arm("dense", {"pruning": None}, row="dense"),), seeds=(0, 1, 2, 3, 4)
  )
  specs = suite.expand(experiment)
  for spec in specs[:2]:  # two killed attempts with a round checkpoint each
    (tmp_path / spec.dirname / "rounds" / "10").mkdir(parents=True)
  resumed = {str(tmp_path / spec.dirname) for spec in specs[:2]}

  def runner(kind, cfg):
    write_finished_run(cfg.workdir, fake_results(0.3))

  pool = ScriptedPool(runner, 2, seconds=lambda cfg: 30.0 if cfg.workdir in resumed else 240.0)
  monkeypatch.setattr(suite.concurrent.futures, "wait", pool.wait)
  lines = []
  suite.run_experiment(experiment, tmp_path, pool=pool, log=lines.append)
  done = [line.split("; ", 1)[1] for line in lines if ": done in " in line]
  assert done == [
    "4 left",
    "3 left",
    "2 left, about 4 min at 2.0 min a run so far",
    "1 left, about 2 min at 2.0 min a run so far",
    "none left",
  ]


def test_time_left_is_the_pace_so_far_times_the_runs_left():
  assert suite.time_left(4, 6, 1200.0) == "6 left, about 30 min at 5.0 min a run so far"
  assert suite.time_left(10, 30, 1800.0) == "30 left, about 1.5 h at 3.0 min a run so far"
  assert suite.time_left(0, 3, 10.0) == "3 left"  # no pace before the first run
  assert suite.time_left(5, 0, 900.0) == "none left"


class ScriptedPool:
  """A pool of ``workers`` slots in this process whose runs finish only when the scheduler waits,
  oldest first: the scheduling rule is exercised without processes, clocks or the OS."""

  def __init__(self, runner, workers: int, seconds=lambda cfg: 0.0):
    self.runner, self.workers, self.seconds = runner, workers, seconds  # seconds: a run's time
    self.pending: list = []  # (future, kind, config) in submission order
    self.events: list = []  # ("start" | "end", arm, seed, runs in flight after the event)

  def _label(self, cfg):
    meta = json.loads((pathlib.Path(cfg.workdir) / "suite.json").read_text())
    return meta["arm"], meta["seed"]

  def submit(self, kind, cfg):
    future = concurrent.futures.Future()
    self.pending.append((future, kind, cfg))
    self.events.append(("start", *self._label(cfg), len(self.pending)))
    return future

  def wait(self, futures, return_when):
    assert return_when == "FIRST_COMPLETED"
    future, kind, cfg = self.pending.pop(0)
    assert future in futures
    try:
      self.runner(kind, cfg)
      future.set_result(self.seconds(cfg))
    except Exception as e:  # pylint: disable=broad-except
      future.set_exception(e)
    self.events.append(("end", *self._label(cfg), len(self.pending)))
    return {future}, set(futures) - {future}

  def close(self):
    pass


def warm_start_runner(kind, cfg):
  """A fake run: trains the warm start (a directory) if absent; the baseline of seed 1 fails."""
  warm = pathlib.Path(cfg.warm_start.path)
  trained = not warm.exists()
  warm.mkdir(parents=True, exist_ok=True)
  if kind == suite.BASELINE and cfg.seed == 1:
    raise RuntimeError("boom")
  record = {**fake_results(0.5), "trained_warm_start": trained}
  write_finished_run(cfg.workdir, record)
  return {}


def where_runner(kind, cfg):
  """A picklable fake run for worker processes: writes its process id and CPU cores."""
  import os

  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  pathlib.Path(cfg.out).write_text(json.dumps({"pid": os.getpid(), "cores": cores}))


def test_core_groups_deal_cores_round_robin():
  from fedprune_jax import workers

  assert workers.core_groups(3, [0, 1, 2, 3, 4]) == [[0, 3], [1, 4], [2]]
  assert workers.core_groups(1, [5, 7]) == [[5, 7]]
  with pytest.raises(InputError, match="--workers 3: each worker needs a CPU core"):
    workers.core_groups(3, [0, 1])
  with pytest.raises(InputError, match="must be >= 1"):
    workers.core_groups(0, [0, 1])


def test_runs_go_side_by_side_in_dependency_order(tmp_path, monkeypatch):
  """With room for two runs: the run that trains the shared warm start runs alone (trained
  once), then two runs at a time, never more; an arm starts only after the arm it starts from
  has finished; a failure marks its dependents failed, as with one worker."""
  arms = (
    suite.Arm("dense", {"pruning": None}, row="dense"),
    suite.Arm("central", {"pruning.target_sparsity": 0.6}, kind=suite.BASELINE, row="b"),
    suite.Arm("after", {"pruning.mask_path": suite.From("central", "mask.npz")}, row="c"),
    suite.Arm("p5", {"pruning.target_sparsity": 0.5}, row="p"),
    suite.Arm("p7", {"pruning.target_sparsity": 0.7}, row="q"),
  )
  pool = ScriptedPool(warm_start_runner, workers=2)
  monkeypatch.setattr(suite.concurrent.futures, "wait", pool.wait)
  index = suite.run_experiment(toy_experiment(arms, seeds=(0, 1)), tmp_path, pool=pool, log=print)
  runs = {(r["arm"], r["seed"]): r for r in index["runs"]}
  assert index["last_invocation"]["workers"] == 2
  assert runs[("central", 1)]["state"] == "failed" and "boom" in runs[("central", 1)]["error"]
  assert "needs arm 'central'" in runs[("after", 1)]["error"]
  done = {k for k, r in runs.items() if r["state"] == "done"}
  assert len(done) == 8
  trained = [
    k
    for k in done
    if json.loads((tmp_path / runs[k]["dir"] / "results.json").read_text())["trained_warm_start"]
  ]
  assert trained == [("dense", 0)]  # the first run, and only it
  # (event, arm, seed, runs in flight after it): the warm-start run alone, then two at a time
  # in seed-major order, except that `after` waits for `central` (and p5 does not wait for it)
  assert pool.events == [
    ("start", "dense", 0, 1),
    ("end", "dense", 0, 0),
    ("start", "central", 0, 1),
    ("start", "p5", 0, 2),
    ("end", "central", 0, 1),
    ("start", "after", 0, 2),
    ("end", "p5", 0, 1),
    ("start", "p7", 0, 2),
    ("end", "after", 0, 1),
    ("start", "dense", 1, 2),
    ("end", "p7", 0, 1),
    ("start", "central", 1, 2),
    ("end", "dense", 1, 1),
    ("start", "p5", 1, 2),
    ("end", "central", 1, 1),  # failed: `after` of seed 1 never starts
    ("start", "p7", 1, 2),
    ("end", "p5", 1, 1),
    ("end", "p7", 1, 0),
  ]


def test_worker_pool_runs_in_processes_pinned_to_their_cores(tmp_path):
  """``RunPool(workers=2)`` executes runs in worker processes (not this one), each pinned to one
  of ``core_groups(2)``; more workers than cores is an error."""
  from fedprune_jax import workers

  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs 2 CPU cores")
  with workers.RunPool(where_runner, workers=2) as pool:
    futures = [
      pool.submit("federated", workers.ml_collections.ConfigDict({"out": str(tmp_path / f"{i}")}))
      for i in range(4)
    ]
    for f in futures:
      f.result()
  groups = workers.core_groups(2)
  for i in range(4):
    record = json.loads((tmp_path / f"{i}").read_text())
    assert record["pid"] != os.getpid() and record["cores"] in groups
  with pytest.raises(InputError, match="workers"):
    workers.RunPool(where_runner, workers=len(os.sched_getaffinity(0)) + 1)


PARENT_SCRIPT = """
import os, pathlib, sys, time
from fedprune_jax import workers

def sleeper(kind, cfg):
  pathlib.Path(cfg["pid_file"]).write_text(str(os.getpid()))
  time.sleep(120)

if __name__ == "__main__":
  pool = workers.RunPool(sleeper, workers=2)
  pool.submit("federated", workers.ml_collections.ConfigDict({"pid_file": sys.argv[1]}))
  time.sleep(120)
"""


def test_a_killed_suite_leaves_no_worker_running(tmp_path):
  """SIGKILL of the suite's process ends its workers (and the runs they were writing)."""
  import signal
  import subprocess
  import sys
  import time

  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs 2 CPU cores")
  script, pid_file = tmp_path / "parent.py", tmp_path / "worker.pid"
  script.write_text(PARENT_SCRIPT)
  parent = subprocess.Popen([sys.executable, str(script), str(pid_file)])
  try:
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
      assert time.time() < deadline and parent.poll() is None, "the worker never started"
      time.sleep(0.1)
    worker = int(pid_file.read_text())
    os.kill(worker, 0)  # running
  finally:
    parent.send_signal(signal.SIGKILL)
    parent.wait()
  deadline = time.time() + 10
  while time.time() < deadline:
    try:
      os.kill(worker, 0)
    except ProcessLookupError:
      return
    time.sleep(0.2)
  os.kill(worker, signal.SIGKILL)
  pytest.fail("the worker outlived its killed parent by 10 s")


def test_report_numbers_against_hand_computed_values(tmp_path):
  """Means, sample stds and paired differences in the markdown equal hand computation; the
  figures are written as PNG files."""
  wers = {  # arm -> per-seed test WER
    "dense": [0.30, 0.32, 0.34],
    "row@0.5": [0.40, 0.41, 0.45],
    "column@0.5": [0.36, 0.38, 0.39],
  }
  runs = []
  for arm, values in wers.items():
    for seed, wer in enumerate(values):
      d = tmp_path / "runs" / f"{arm}-{seed}"
      d.mkdir(parents=True)
      sparsity = 0.0 if arm == "dense" else 0.5
      results = fake_results(wer, sparsity)
      results["train"].update(last_bytes_down_masked=2e6, last_bytes_up=1.9e6)
      results["train"]["warm_start_dev_wer"] = 0.5
      results["history"] = [
        {"client_flops_per_step_sparse": 4e9, "client_flops_per_step_dense": 8e9}
      ]
      if (arm, seed) == ("dense", 2):  # one run from an accelerator; the others predate the field
        results["environment"] = {"platform": "gpu", "device_kind": "NVIDIA H200"}
      write_finished_run(d, results)
      pattern = arm.split("@")[0]
      runs.append(
        dict(
          arm=arm,
          seed=seed,
          dir=f"runs/{arm}-{seed}",
          state="done",
          row=pattern,
          col="" if arm == "dense" else "50%",
          report=True,
          seconds=10.0 + seed,
        )
      )
  index = dict(
    experiment="t1_pattern",
    title="T1",
    question="q",
    quick=False,
    row_title="pattern",
    col_title="sparsity",
    figures=["wer_vs_sparsity", "cost_vs_sparsity"],
    runs=runs,
    comparisons=[dict(claim="column - row", a="column@0.5", b="row@0.5", metric="test_wer")],
  )
  (tmp_path / "t1_pattern.json").write_text(json.dumps(index))
  text = report.render(tmp_path)
  # row@0.5: mean 0.42, sample std sqrt(((-.02)^2 + (-.01)^2 + .03^2) / 2) = 0.0264575
  assert "| row | 42.0 ± 2.6 |" in text
  assert "| column | 37.7 ± 1.5 |" in text
  # paired column - row: (-.04, -.03, -.06): mean -0.04333, std 0.015275, t = -4.914; two-sided
  # p with 2 degrees of freedom = 1 - |t| / sqrt(t^2 + 2) = 0.0390 (one comparison: Holm = raw);
  # TOST at 1 point: the lower test's t = (mean + .01) / se = -3.780, p = 1/2 + 3.780 /
  # (2 sqrt(3.780^2 + 2)) = 0.968; no per-speaker errors, so no bootstrap interval
  assert "| column - row | -4.3 ± 1.5 | - | 3 | 0.039 | 0.968 (±1.0) | column@0.5 lower |" in text
  # the gate: dense dev WER 32.0%, its warm start 50.0%: passes
  assert "improvement 18.0 points" in text and "passes (a), (b)" in text
  assert (
    "9 runs done; their wall time adds up to 1.6 min; ran on cpu and gpu (NVIDIA H200)." in text
  )
  for fig in ("wer_vs_sparsity", "cost_vs_sparsity"):
    png = tmp_path / "report" / f"t1_pattern_{fig}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
  assert (tmp_path / "report" / "report.md").read_text() == text
  index["last_invocation"] = {"wall_seconds": 54.0, "workers": 2}
  (tmp_path / "t1_pattern.json").write_text(json.dumps(index))
  latest = "the latest `fedprune experiment` of this table took 0.9 min with 2 workers"
  assert f"adds up to 1.6 min; {latest}; ran on cpu and gpu" in report.render(tmp_path)


def test_paired_differences():
  arms = {
    "a": {"seeds": {0: {"m": 1.0}, 1: {"m": 2.0}, 2: {"m": 3.0}}},
    "b": {"seeds": {0: {"m": 1.1}, 1: {"m": 1.9}, 2: {"m": 3.0}}},
  }
  p = report.paired(arms, "a", "b", "m", 0.01)
  assert p["p"] == pytest.approx(1.0) and p["n"] == 3  # diffs (-.1, .1, 0): t = 0
  # 2 seeds: t = 9.0 (diffs .08, .10): two-sided p with 1 degree of freedom = 1 - 2 atan(9) / pi
  arms2 = {
    "a": {"seeds": {0: {"m": 0.18}, 1: {"m": 0.2}}},
    "b": {"seeds": {0: {"m": 0.1}, 1: {"m": 0.1}}},
  }
  assert report.paired(arms2, "a", "b", "m", 0.01)["p"] == pytest.approx(
    1 - 2 * math.atan(9.0) / math.pi
  )
  arms["b"]["seeds"] = {0: {"m": 1.0}}
  assert math.isnan(report.paired(arms, "a", "b", "m", 0.01)["p"])
  assert math.isnan(st.mean_std([])[0])
  assert st.mean_std([0.2, 0.4]) == pytest.approx((0.3, 0.1414214, 2))  # sample std: / (n - 1)
  assert report._fmt([0.5]) == "50.0" and report._fmt([]) == "-"  # one seed: no ± shown
  assert report._fmt([0.2, 0.4]) == "30.0 ± 14.1"


def test_quick_t6_end_to_end(tiny_corpus, tmp_path, capsys):
  """The real quick pipeline of T6 on the test corpus: the server's speaker drawn from one accent,
  centralized pruning on it, federated pruning with magnitude and with the clients' saliency,
  pooled centralized pruning; then the report. A second invocation is all cache hits."""
  from fedprune_jax.data import synth  # pylint: disable=g-import-not-at-top

  accents = synth.speaker_accents(tiny_corpus)
  train = sorted(p.name for p in (tiny_corpus / "train").iterdir())
  accent = accents[train[-1]]
  runs = tmp_path / "paper"
  argv = [
    "experiment",
    "t6_data",
    "--quick",
    "--runs",
    str(runs),
    "--set",
    f"data.root={tiny_corpus}",
    "--set",
    f'data.server_accents=["{accent}"]',
  ]
  for s in TEST_SETS:
    argv += ["--set", s]
  assert cli.main(argv) == 0
  index = json.loads((runs / "t6_data_quick.json").read_text())
  assert [r["state"] for r in index["runs"]] == ["done"] * 5
  by_arm = {
    r["arm"]: json.loads((runs / r["dir"] / "results.json").read_text()) for r in index["runs"]
  }
  server = by_arm["central_server"]["train"]
  assert server["speakers"] == 1
  for arm in ("federated", "federated_saliency"):
    assert by_arm[arm]["train"]["mask_sha256"] != server["mask_sha256"]
    assert by_arm[arm]["train"]["sparsity"] == pytest.approx(0.7, abs=0.01)
  assert by_arm["central_pooled"]["train"]["algorithm"] == "centralized_pooled"
  assert by_arm["dense"]["train"]["algorithm"] == "fedavg"
  # the warm start's dev WER is recorded for the regime gate
  assert 0.0 <= by_arm["dense"]["train"]["warm_start_dev_wer"] <= 2.0
  # per-speaker word errors of test add up to the test WER
  test = by_arm["dense"]["final"]["test"]
  edits, words = (sum(x) for x in zip(*test["speakers"].values()))
  assert edits / words == pytest.approx(test["wer"])
  # one warm start, trained once, shared by every arm
  assert len({by_arm[a]["train"]["warm_start"] for a in by_arm}) == 1
  assert cli.main(["report", str(runs)]) == 0
  text = capsys.readouterr().out
  assert "T6: federated vs centralized pruning" in text and "(quick)" in text
  assert "5 runs done" in text and "Regime gate:" in text
  # again: every run is cached
  calls = []
  suite.run_experiment(
    suite.load_experiment("t6_data"),
    runs,
    quick=True,
    overrides=TEST_SETS + [f"data.root={tiny_corpus}", f'data.server_accents=["{accent}"]'],
    runner=lambda kind, cfg: calls.append(kind),
    log=lambda s: None,
  )
  assert calls == []


def _librispeech_layout(corpus: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
  """The synthetic corpus renamed to LibriSpeech's split names, train split in three parts."""
  train = sorted(p for p in (corpus / "train").iterdir() if p.is_dir())
  parts = {
    "train-clean-100": train[:2],
    "train-clean-360": train[2:3],
    "train-other-500": train[3:],
  }
  for split, speakers in parts.items():
    for spk in speakers:
      shutil.copytree(spk, root / split / spk.name)
  shutil.copytree(corpus / "dev", root / "dev-clean")
  shutil.copytree(corpus / "test", root / "test-clean")
  return root


def test_full_setting_wiring_on_a_librispeech_layout(tiny_corpus, tmp_path):
  """paper_full reads train-960 as three joined LibriSpeech splits and evaluates on dev-clean /
  test-clean; one quick dense arm runs through the real job (with the micro model)."""
  root = _librispeech_layout(tiny_corpus, tmp_path / "LibriSpeech")
  experiment = suite.load_experiment("t1_pattern", setting="full")
  base = experiment.base
  assert base.model.preset == "l" and base.data.dev_split == "dev-clean"
  experiment = suite.Experiment(
    **{**experiment.__dict__, "arms": experiment.arms[:1], "comparisons": (), "figures": ()}
  )
  sets = TEST_SETS + ["engine.chunk_size=1", "data.max_steps=2", "rounds=1"]
  index = suite.run_experiment(
    experiment, tmp_path / "runs", quick=True, data_root=str(root), overrides=sets, progress=False
  )
  (entry,) = index["runs"]
  assert entry["state"] == "done", entry.get("error")
  results = json.loads((tmp_path / "runs" / entry["dir"] / "results.json").read_text())
  assert results["train"]["num_clients"] == 3  # 4 train speakers over 3 splits, 1 server-side
  assert results["final"]["test"]["num_utterances"] == 4


def test_run_experiments_runs_the_claims_seeds_by_default(tmp_path, monkeypatch):
  """`fedprune experiment all` without --seeds: every table's seeds, seed-major, and the claims'
  extra seeds for the tables that have them (the claims' arms run 5 seeds, not 3)."""
  calls = []

  def fake_run_experiment(experiment, runs_dir, *, seeds, **kw):
    calls.append((experiment.name, tuple(seeds)))
    return {"runs": []}

  monkeypatch.setattr(suite, "run_experiment", fake_run_experiment)
  monkeypatch.setattr(suite, "check_experiment", lambda *a, **kw: None)
  names = ["t3_schedule", "t6_data"]
  root = ["data.root=" + str(tmp_path)]  # not the embedded corpus: nothing synthesized
  suite.run_experiments(names, tmp_path, overrides=root, log=lambda line: None)
  t3, t6 = (suite.load_experiment(n) for n in names)
  assert t3.claim_seeds == (0, 1, 2, 3, 4) and t6.claim_seeds == (0, 1, 2, 3, 4)
  assert calls == [(n, (s,)) for s in range(5) for n in names]
  expanded = suite.expand(t3, seeds=[3])
  assert expanded and {s.arm.name for s in expanded} == t3.claim_arms
  calls.clear()  # --quick: the first seed only
  suite.run_experiments(names, tmp_path, quick=True, overrides=root, log=lambda line: None)
  assert calls == [(n, (0,)) for n in names]


def dying_runner(kind, cfg):
  """A picklable fake run for worker processes that, by its target sparsity, kills its own worker
  with SIGKILL (as the kernel's out-of-memory killer does): 0.5 on its first attempt only, 0.6 on
  every attempt; the others finish."""
  import signal

  attempts = pathlib.Path(cfg.workdir + ".attempts")
  attempts.write_text(str(int(attempts.read_text() if attempts.exists() else 0) + 1))
  sparsity = cfg.pruning.target_sparsity
  if sparsity == 0.6 or (sparsity == 0.5 and attempts.read_text() == "1"):
    os.kill(os.getpid(), signal.SIGKILL)
  write_finished_run(cfg.workdir, fake_results(0.3, sparsity))


def test_a_run_whose_worker_dies_runs_again_alone_and_the_suite_goes_on(tmp_path):
  """A worker killed by the OS breaks its pool and fails every run in flight (it used to end the
  whole suite): the suite starts a new pool and runs each of them again, alone, so a run that
  kills its worker every time fails by itself ("died twice") and the others finish."""
  from fedprune_jax import workers

  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs 2 CPU cores")
  arms = tuple(
    suite.Arm(name, {"pruning.target_sparsity": s}, row=name)
    for name, s in (("ok1", 0.3), ("dies", 0.5), ("always", 0.6), ("ok2", 0.7))
  )
  experiment = toy_experiment(arms, seeds=(0,))
  lines = []
  with workers.RunPool(dying_runner, workers=2) as pool:
    index = suite.run_experiment(experiment, tmp_path, pool=pool, log=lines.append)
    assert pool.restarts >= 2  # after each arm that killed its worker beside another run
  state = {r["arm"]: r for r in index["runs"]}
  assert {a: r["state"] for a, r in state.items()} == {
    "ok1": "done",
    "dies": "done",
    "always": "failed",
    "ok2": "done",
  }
  assert state["always"]["error"].startswith("its worker process died twice"), state["always"]
  attempts = {a: (tmp_path / (r["dir"] + ".attempts")).read_text() for a, r in state.items()}
  assert attempts["dies"] == "2" and attempts["always"] == "2", attempts
  assert any("always seed 0: its worker process died" in line for line in lines), lines


def test_a_worker_over_its_memory_budget_releases_its_programs_after_a_run(monkeypatch):
  """``timed_run``: under its budget a process keeps its shared programs for the next run; over
  it after returning freed memory, it releases them (a suite worker kept growing to 11.8 GB);
  the budget is a 1 / (3 x workers) share of the machine's memory."""
  from fedprune_jax import programs, workers

  monkeypatch.setattr(programs, "_cache", type(programs._cache)())
  if os.path.exists("/proc/self/statm"):  # the real measurement and release, once
    assert programs.resident_bytes() > 10**7
  programs.release()
  resident = {"bytes": 100}
  monkeypatch.setattr(programs, "resident_bytes", lambda: resident["bytes"])
  trims = []

  def trim():  # what the run freed goes back: 100 -> 80 bytes
    trims.append(True)
    resident["bytes"] = 80

  monkeypatch.setattr(programs, "return_free_memory", trim)

  def runner(kind, cfg):
    programs.shared(("program", cfg.arm), object)
    resident["bytes"] = 100

  cfg = {"arm": "a"}
  workers.timed_run(runner, "federated", cfg, budget=None)
  workers.timed_run(runner, "federated", cfg, budget=200)
  assert programs.stats()["entries"] == 1 and not trims  # under the budget: kept, no trim
  workers.timed_run(runner, "federated", cfg, budget=90)
  assert programs.stats()["entries"] == 1 and len(trims) == 1  # fits once the freed memory went
  workers.timed_run(runner, "federated", cfg, budget=50)
  assert programs.stats()["entries"] == 0 and len(trims) == 3  # released (and trimmed again)
  total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  assert workers.memory_budget(2) == total // 6 and workers.memory_budget(1) == total // 3
