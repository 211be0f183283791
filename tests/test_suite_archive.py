"""Slim copies of finished runs: the report reads them like the runs, a suite resumes from them,
and a different run under the same key is refused."""

from __future__ import annotations

import json
import pathlib

import pytest

from conftest import fake_results, toy_experiment, write_finished_run
from fedprune_jax import cli, report, suite, suite_archive
from fedprune_jax import workdir as workdir_lib
from fedprune_jax.errors import InputError

ARMS = (
  suite.Arm("dense", {"pruning": None}, row="dense"),
  suite.Arm("pruned", {"pruning.target_sparsity": 0.5}, row="pruned"),
  suite.Arm("after", {"pruning.mask_path": suite.From("pruned", "mask.npz")}, row="after"),
)


def _suite(runs: pathlib.Path, fail=lambda cfg: False) -> tuple[dict, list]:
  """Runs the toy experiment (seeds 0, 1) with a fake runner; the runs ``fail(cfg)`` fail."""
  calls = []

  def runner(kind, cfg):
    calls.append((pathlib.Path(cfg.workdir).name, cfg.seed))
    if fail(cfg):
      raise RuntimeError("killed")
    write_finished_run(cfg.workdir, fake_results(0.3 + 0.01 * len(calls)))
    return {}

  index = suite.run_experiment(
    toy_experiment(ARMS, seeds=(0, 1)), runs, runner=runner, log=lambda s: None
  )
  return index, calls


def test_archive_keeps_results_drops_checkpoints_and_renders_the_same_report(tmp_path):
  runs, archive = tmp_path / "runs", tmp_path / "archive"
  index, _ = _suite(runs, fail=lambda cfg: cfg.seed == 1)
  done = [r["dir"] for r in index["runs"] if r["state"] == "done"]
  assert len(done) == 3 and len(index["runs"]) == 6
  counts = suite_archive.archive(runs, archive)
  assert counts == {"copied": 3, "present": 0, "unfinished": 3}
  for d in done:
    kept = {p.name for p in (archive / d).iterdir()}
    present = {p.name for p in (runs / d).iterdir()}  # the fake runs have no config.json
    assert {"checkpoint", "mask.npz", "suite.json"} <= present
    assert kept == (present & set(suite_archive.KEPT)) | {workdir_lib.ARCHIVED}
    assert (archive / d / "results.json").read_bytes() == (runs / d / "results.json").read_bytes()
    assert workdir_lib.incomplete(archive / d) is None  # finished without its checkpoint
  assert not any((archive / r["dir"]).exists() for r in index["runs"] if r["state"] != "done")
  strip = lambda text: text.split("\n", 1)[1]  # the title names the directory
  assert strip(report.render(archive, tmp_path / "r1")) == strip(
    report.render(runs, tmp_path / "r2")
  )
  # archiving again (or from the archive itself) changes nothing
  assert suite_archive.archive(runs, archive) == {"copied": 0, "present": 3, "unfinished": 3}
  assert suite_archive.archive(archive, archive)["present"] == 3


def test_a_suite_resumes_from_an_archive_on_another_machine(tmp_path):
  """The archive put into an empty runs directory: its runs are not redone, the others run, and
  an arm that starts from an archived run's mask stops with one clear error."""
  starts_from_a_mask = lambda cfg: bool(cfg.get("pruning") and cfg.pruning.get("mask_path"))
  index, _ = _suite(tmp_path / "old", fail=lambda cfg: cfg.seed == 1 or starts_from_a_mask(cfg))
  suite_archive.archive(tmp_path / "old", tmp_path / "archive")
  new = tmp_path / "new"
  assert cli.main(["archive", str(tmp_path / "archive"), "--out", str(new)]) == 0
  index, calls = _suite(new)
  # seed 1 runs in full; of seed 0 only "after", which failed before, is left, and it needs the
  # archived "pruned" run's mask.npz, which an archive does not keep
  assert sorted(seed for _, seed in calls) == [1, 1, 1]
  (after0,) = [r for r in index["runs"] if r["arm"] == "after" and r["seed"] == 0]
  assert after0["state"] == "failed" and "mask.npz" in after0["error"]
  assert "which is missing" in after0["error"]
  assert sum(r["state"] == "done" for r in index["runs"]) == 5


def test_a_different_run_under_the_same_key_is_refused(tmp_path):
  _suite(tmp_path / "a")
  suite_archive.archive(tmp_path / "a", tmp_path / "archive")
  index, _ = _suite(tmp_path / "b")
  other = tmp_path / "b" / index["runs"][0]["dir"]
  write_finished_run(other, fake_results(0.99))  # e.g. the same config run on another platform
  with pytest.raises(InputError, match="different results") as e:
    suite_archive.archive(tmp_path / "b", tmp_path / "archive")
  assert str(other / "results.json") in str(e.value)


def test_an_archived_run_whose_results_changed_is_not_finished(tmp_path):
  run = tmp_path / "runs" / "x"
  write_finished_run(run, fake_results(0.3))
  out = tmp_path / "archive" / "x"
  assert suite_archive._archive_run(run, out) == "copied"
  (out / "results.json").write_text(json.dumps(fake_results(0.1)))  # edited by hand
  assert "not the one the completion marker recorded" in workdir_lib.incomplete(out)


def test_archive_without_an_index_is_one_error(tmp_path, capsys):
  assert cli.main(["archive", str(tmp_path), "--out", str(tmp_path / "a")]) != 0
  assert "no experiment index" in capsys.readouterr().err


def test_the_suite_archives_each_run_as_it_finishes_and_restores_them(tmp_path):
  """``run_experiment(archive=...)``: each run is in the archive before the next one starts (so
  a lost machine loses only the runs in flight), and a new machine's suite restores them."""
  archive = tmp_path / "archive"
  archived_before = []

  def runner(kind, cfg):
    archived_before.append(len(list((archive / "runs").glob("*/archived.json"))))
    write_finished_run(cfg.workdir, fake_results(0.3))
    return {}

  experiment = toy_experiment(ARMS, seeds=(0, 1))
  log = []
  suite.run_experiment(experiment, tmp_path / "a", runner=runner, archive=archive, log=log.append)
  assert archived_before == [0, 1, 2, 3, 4, 5]
  assert (archive / "toy.json").exists()
  calls = []
  index = suite.run_experiment(
    experiment,
    tmp_path / "b",
    runner=lambda kind, cfg: calls.append(cfg.seed),
    archive=archive,
    log=log.append,
  )
  assert calls == [] and all(r["state"] == "done" for r in index["runs"])
  assert sum("toy: 6 finished run(s) restored from" in line for line in log) == 1
