"""Centralized training end to end: corpus -> features -> Conformer -> CTC -> WER, via the CLI."""

from __future__ import annotations

import json

import jax
import numpy as np

from conftest import MICRO_MODEL
from fedprune_jax import cli
from fedprune_jax import config as config_lib
from fedprune_jax.io_utils import read_jsonl
from fedprune_jax import task
from fedprune_jax.pruning.masks import apply_mask
from fedprune_jax.train import centralized


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


def test_masked_train_step_keeps_pruned_weights_zero(tiny_corpus):
  cfg = config_lib.load_config("tiny_centralized", _overrides(tiny_corpus, "/tmp/unused"))
  model = task.make_model(cfg)
  params = model.init(jax.random.key(0))
  kernel = params["encoder"]["block_0"]["ffn1"]["dense_in"]["kernel"]
  keep = (np.arange(kernel.size).reshape(kernel.shape) % 2).astype(np.float32)
  mask = jax.tree_util.tree_map(lambda _: None, params)
  mask["encoder"]["block_0"]["ffn1"]["dense_in"]["kernel"] = keep
  optimizer = task.make_optimizer(cfg.optim, 10)
  step = centralized.make_train_step(model, optimizer, specaug=dict(cfg.specaug))
  fs = task.load_split(cfg, "train")
  from fedprune_jax import evaluation as evaluate  # pylint: disable=g-import-not-at-top

  ((_, batch),) = evaluate.eval_batches(fs, batch_size=16, num_buckets=1)[:1]
  params = apply_mask(params, mask)
  opt_state = optimizer.init(params)
  before = np.asarray(params["encoder"]["block_0"]["ffn1"]["dense_in"]["kernel"]).copy()
  for i in range(3):
    params, opt_state, _ = step(params, opt_state, batch, jax.random.key(i), mask)
  after = np.asarray(params["encoder"]["block_0"]["ffn1"]["dense_in"]["kernel"])
  assert np.all(after[keep == 0] == 0.0)
  assert not np.allclose(after[keep == 1], before[keep == 1])
