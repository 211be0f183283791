"""`fedprune federated --config fedprune_tiny` and `fedprune baseline` end to end on a synthetic
corpus: warm start on server-side speakers, pruning to the target, costs in the log, resume
without duplicated log lines, `fedprune eval` from the run's saved config."""

from __future__ import annotations

import json

import jax

import numpy as np

from conftest import MICRO_MODEL
from fedprune_jax import cli, task
from fedprune_jax.algorithms import build
from fedprune_jax.data import corpus_identity
from fedprune_jax import speaker_split
from fedprune_jax.io_utils import read_jsonl


def _argv(command, corpus, workdir, rounds, extra=()):
  sets = [
    f"data.root={corpus}",
    f"workdir={workdir}",
    f"rounds={rounds}",
    "eval_every=2",
    "cohort_size=3",
    "data.batch_size=2",
    "data.num_buckets=1",
    "data.max_steps=2",
    "data.server_speakers=1",
    "data.eval_batch_size=4",
    "warm_start.steps=4",
    "warm_start.batch_size=4",
    "warm_start.eval_every=2",
    "checkpoint_every=2",
    "engine.chunk_size=3",
    "data.segments=2",
    "pruning.target_sparsity=0.5",
    "pruning.pruning_rounds=3",
    "pruning.update_every=1",
    "pruning.refining_rounds=1",
    "pruning.refine_every=1",
    "baseline.steps_per_round=2",
    "baseline.batch_size=2",
    *extra,
  ]
  sets += [f"model.overrides.{k}={v!r}" for k, v in MICRO_MODEL.items()]
  argv = [command, "--config", "fedprune_tiny"]
  for s in sets:
    argv += ["--set", s]
  return argv


def test_federated_pruning_job_resume_eval_and_baseline(tiny_corpus, tmp_path, capsys):
  workdir = tmp_path / "fp"
  assert cli.main(_argv("federated", tiny_corpus, workdir, 4)) == 0
  capsys.readouterr()
  result = json.loads((workdir / "results.json").read_text())
  t = result["train"]
  assert t["algorithm"] == "fedprune" and t["rounds"] == 4 and t["server_speakers"] == 1
  assert t["num_clients"] == 3  # 4 train speakers, one held by the server
  assert abs(t["sparsity"] - 0.5) < 0.01
  assert (workdir / "mask.npz").exists()
  assert len(t["params_sha256"]) == 64 and len(t["mask_sha256"]) == 64
  # where it ran (the tests force the CPU platform: JAX_PLATFORMS=cpu)
  env = result["environment"]
  assert env["platform"] == "cpu" and env["device_count"] == jax.device_count()
  assert env["jax"] == jax.__version__
  # the corpus it read, and its warm start trained on (the suite checks cached runs against it)
  data = task.load_run_config(workdir).data
  corpus = corpus_identity.identity(
    str(tiny_corpus), [data.train_split, data.dev_split, data.test_split]
  )
  assert result["corpus"] == corpus
  assert json.loads((workdir / "warm_start.json").read_text())["corpus"] == corpus
  # the warm start logged dev metrics every 2 of its 4 steps
  ws_history = json.loads((workdir / "warm_start.json").read_text())["history"]
  assert [h["step"] for h in ws_history if "dev_wer" in h] == [2, 4]
  log = read_jsonl(workdir / "metrics.jsonl")
  rounds_ = [r for r in log if "round" in r]
  assert [r["round"] for r in rounds_] == [0, 1, 2, 3]
  # the polynomial schedule over rounds 0..2, the mask then held at the target
  policy = build.policy_from_config(build.resolve_pruning(task.load_run_config(workdir).pruning))
  for r in rounds_:
    assert abs(r["sparsity"] - float(policy.target(min(r["round"], 2)))) < 0.01
    # kept values (4 bytes each) + a bitmap of at most 1/32 of the dense bytes
    nonzero = r["nonzero_params"]
    assert 4 * nonzero < r["bytes_down_masked"] <= 4 * nonzero + r["bytes_down_dense"] / 32 + 1
    assert r["bytes_up"] == 4 * nonzero  # the kept delta; magnitude scores upload nothing
    assert r["client_train_memory_bytes"] > 0
  assert rounds_[-1]["bytes_down_masked"] < 0.6 * rounds_[-1]["bytes_down_dense"]
  assert t["total_bytes_down_masked"] == sum(
    r["bytes_down_masked"] * r["num_clients"] for r in rounds_
  )

  # the same command with more rounds resumes from the checkpoint of round 4: no duplicates
  assert cli.main(_argv("federated", tiny_corpus, workdir, 6)) == 0
  capsys.readouterr()
  log = read_jsonl(workdir / "metrics.jsonl")
  assert [r["round"] for r in log if "round" in r] == list(range(6))
  assert sum("rounds_completed" in r for r in log) == 1  # the start eval, once

  # eval reads the model of the run's saved config (no overrides repeated)
  assert cli.main(["eval", "--checkpoint", str(workdir / "checkpoint"), "--splits", "dev"]) == 0
  printed = json.loads(capsys.readouterr().out)
  final = json.loads((workdir / "results.json").read_text())["final"]
  np.testing.assert_allclose(printed["dev"]["wer"], final["dev"]["wer"])
  np.testing.assert_allclose(printed["dev"]["loss"], final["dev"]["loss"], rtol=1e-5)

  # the centralized baseline: the same policy object, keyed by steps, from the same warm start
  base = tmp_path / "base"
  extra = [f"warm_start.path={workdir / 'warm_start'}"]
  assert cli.main(_argv("baseline", tiny_corpus, base, 4, extra)) == 0
  b = json.loads((base / "results.json").read_text())["train"]
  assert b["algorithm"] == "centralized_server" and b["steps"] == 8 and b["steps_per_round"] == 2
  assert abs(b["sparsity"] - 0.5) < 0.01
  assert b["warm_start"] == str(workdir / "warm_start")
  # it ran on the round driver: per-round records, evaluations, round checkpoints
  base_log = read_jsonl(base / "metrics.jsonl")
  base_rounds = [r for r in base_log if "round" in r]
  assert [r["round"] for r in base_rounds] == [0, 1, 2, 3]
  assert [r["client_path"] for r in base_rounds] == ["server"] * 4
  assert [r["sum_num_steps"] for r in base_rounds] == [2.0] * 4
  assert ["eval_dev_wer" in r for r in base_rounds] == [False, True, False, True]
  assert (base / "rounds").is_dir() and (base / "mask.npz").exists()
  assert b["rounds"] == 4 and b["algorithm"] == "centralized_server"
  saved = task.load_run_config(base)
  assert build.policy_from_config(build.resolve_pruning(saved.pruning)) == policy


def test_speaker_split_is_seeded_disjoint_and_checked():
  class FS:
    def speaker_indices(self):
      return {s: np.array([i]) for i, s in enumerate("abcdefgh")}

  server, clients = speaker_split.split_speakers(FS(), 3, seed=0)
  assert len(server) == 3 and not set(server) & set(clients)
  assert sorted(server + clients) == list("abcdefgh")
  assert speaker_split.split_speakers(FS(), 3, seed=0) == (server, clients)
  try:
    speaker_split.split_speakers(FS(), 8, seed=0)
  except ValueError as e:
    assert "data.server_speakers" in str(e)
  else:
    raise AssertionError("expected a ValueError")
