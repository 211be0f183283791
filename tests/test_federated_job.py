"""`fedprune federated` end to end on the synthetic corpus: speakers are clients, the model learns."""

from __future__ import annotations

import json

from conftest import MICRO_MODEL
from fedprune_jax import cli
from fedprune_jax.io_utils import read_jsonl


def test_federated_rounds_lower_dev_loss_and_cer(tiny_corpus, tmp_path, capsys):
  workdir = tmp_path / "fed"
  sets = [f"data.root={tiny_corpus}", f"workdir={workdir}", "rounds=30", "eval_every=10", "cohort_size=4",
          "data.batch_size=2", "data.num_buckets=1", "data.max_steps=2", "client.optimizer='adam'",
          "client.learning_rate=3e-3", "server.optimizer='fedavg'", "server.learning_rate=1.0",
          "engine.chunk_size=2"]
  sets += [f"model.overrides.{k}={v!r}" for k, v in MICRO_MODEL.items()]
  argv = ["federated", "--config", "tiny_federated"]
  for s in sets:
    argv += ["--set", s]
  assert cli.main(argv) == 0
  printed = json.loads(capsys.readouterr().out)
  assert set(printed) == {"dev", "test"}

  records = read_jsonl(workdir / "metrics.jsonl")
  rounds = [r for r in records if "train_loss" in r]
  assert [r["round"] for r in rounds] == list(range(30))
  assert all(r["num_clients"] == 4 for r in rounds)
  evals = [r for r in records if "eval_dev_loss" in r]
  assert len(evals) == 4 and evals[0]["rounds_completed"] == 0
  # Dev speakers are unseen voices: their CTC loss must fall over the rounds (from the untrained
  # model's); train loss too.
  assert evals[-1]["eval_dev_loss"] < 0.8 * evals[0]["eval_dev_loss"], evals
  assert rounds[-1]["train_loss"] < 0.7 * rounds[0]["train_loss"]
  result = json.loads((workdir / "results.json").read_text())
  assert result["train"]["num_clients"] == 4
  assert result["final"]["dev"]["cer"] < 1.0
  assert (workdir / "checkpoint").is_dir()
