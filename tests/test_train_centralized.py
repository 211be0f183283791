"""Centralized training end to end: corpus -> features -> Conformer -> CTC -> WER, via the CLI."""

from __future__ import annotations

import json

import numpy as np

from conftest import MICRO_MODEL
from fedprune_jax import cli
from fedprune_jax import config as config_lib
from fedprune_jax.io_utils import read_jsonl
from fedprune_jax import task


def _overrides(corpus, workdir, steps=40):
  sets = [
    f"data.root={corpus}",
    f"workdir={workdir}",
    f"train.steps={steps}",
    "train.eval_every=20",
    "train.log_every=10",
    "data.batch_size=4",
    "data.num_buckets=1",
    "data.eval_batch_size=8",
    "optim.warmup_steps=5",
    "optim.peak_lr=3e-3",
  ]
  sets += [f"model.overrides.{k}={v!r}" for k, v in MICRO_MODEL.items()]
  return sets


def test_train_cli_lowers_loss_and_writes_results_and_checkpoint(tiny_corpus, tmp_path, capsys):
  workdir = tmp_path / "run"
  argv = ["train", "--config", "tiny_centralized"]
  for s in _overrides(tiny_corpus, workdir):
    argv += ["--set", s]
  assert cli.main(argv) == 0
  printed = json.loads(capsys.readouterr().out)
  assert set(printed) == {"dev", "test"}
  records = read_jsonl(workdir / "metrics.jsonl")
  train_losses = [r["train_loss"] for r in records if "train_loss" in r]
  assert len(train_losses) == 4
  assert train_losses[-1] < 0.8 * train_losses[0], train_losses  # it learns
  dev_records = [r for r in records if "dev_wer" in r]
  assert [r["step"] for r in dev_records][:2] == [20, 40]
  result = json.loads((workdir / "results.json").read_text())
  assert result["train"]["steps"] == 40
  assert set(result["final"]) == {"dev", "test"}
  for split in ("dev", "test"):
    assert result["final"][split]["num_utterances"] == 4
    assert 0.0 <= result["final"][split]["cer"] <= result["final"][split]["wer"] + 1.0

  # The checkpoint restores to exactly the params that produced the final numbers.
  cfg = config_lib.load_config("tiny_centralized", _overrides(tiny_corpus, workdir))
  metrics = task.evaluate_checkpoint(cfg, str(workdir / "checkpoint"))
  for split in ("dev", "test"):
    np.testing.assert_allclose(metrics[split]["loss"], result["final"][split]["loss"], rtol=1e-5)
    assert metrics[split]["wer"] == result["final"][split]["wer"]
