"""The `fedprune` command line: help everywhere, clear errors, small commands."""

from __future__ import annotations

import json
import os

import subprocess
import sys

import jax
import numpy as np
import pytest

from fedprune_jax import cli, demo, job, programs, task
from fedprune_jax import config as config_lib


@pytest.mark.parametrize(
  "argv",
  [
    [],
    ["corpus"],
    ["corpus", "synth"],
    ["corpus", "stats"],
    ["train"],
    ["eval"],
    ["federated"],
    ["presets"],
    ["fields"],
    ["demo"],
    ["bench"],
  ],
)
def test_help_everywhere(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv + ["--help"])
  assert exit_info.value.code == 0
  assert "usage: fedprune" in capsys.readouterr().out


def test_presets_prints_param_counts(capsys):
  assert cli.main(["presets"]) == 0
  out = capsys.readouterr().out
  rows = {
    line.split("|")[1].strip(): line
    for line in out.splitlines()
    if line.startswith("| ") and "M |" in line
  }
  assert set(rows) == {"tiny", "s", "m", "l"}
  assert "115.13M" in rows["l"]  # ~ Conformer L (Gulati et al. 2020: 118.8M with its decoder)


def test_corpus_stats_counts_speakers(tiny_corpus, capsys):
  assert cli.main(["corpus", "stats", str(tiny_corpus)]) == 0
  lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
  assert lines == {"dev": ["1", "4"], "test": ["1", "4"], "train": ["4", "16"]}


def test_corpus_synth_vocab_size(tmp_path, capsys):
  from fedprune_jax.data import librispeech, text  # pylint: disable=g-import-not-at-top

  out = tmp_path / "v20"
  argv = [
    "corpus",
    "synth",
    "--out",
    str(out),
    "--speakers",
    "3",
    "--utterances",
    "4",
    "--vocab-size",
    "20",
    "--workers",
    "1",
    "--quiet",
  ]
  assert cli.main(argv) == 0
  assert "corpus ready" in capsys.readouterr().out
  words = {
    w
    for split in ("train", "dev", "test")
    for u in librispeech.read_split(out / split)
    for w in u.text.split()
  }
  assert words and words <= set(text.build_vocabulary(20).words)


def test_bad_input_is_one_clear_line_and_exit_2(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "fedprune_jax.cli", "train", "--set", "train.stepz=1"],
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 2
  assert "has no field 'train.stepz'" in result.stderr
  assert "Traceback" not in result.stderr
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "fedprune_jax.cli",
      "train",
      "--data",
      str(tmp_path / "none"),
      "--workdir",
      str(tmp_path / "w"),
    ],
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 2
  assert "has no split directory 'train'" in result.stderr


def test_cli_does_not_import_tensorflow():
  code = "import sys; from fedprune_jax import cli; cli.build_parser(); print('tensorflow' in sys.modules)"
  assert (
    subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    == "False"
  )


def test_demo_synthesizes_and_prints_dense_vs_pruned(tmp_path, capsys, monkeypatch):
  from conftest import MICRO_MODEL  # pylint: disable=g-import-not-at-top

  programs.clear()  # count the demo's own programs below
  argv = ["demo", "--data", str(tmp_path / "data"), "--workdir", str(tmp_path / "run")]
  sets = [
    "data.synth_speakers=6",
    "data.synth_utterances=2",
    "data.synth_vocab_size=20",
    "data.server_speakers=1",
    "data.batch_size=2",
    "data.num_buckets=1",
    "data.max_steps=1",
    "warm_start.steps=2",
    "warm_start.batch_size=2",
    "rounds=3",
    "cohort_size=3",
    "engine.chunk_size=3",
    "data.segments=1",
    "pruning.pruning_rounds=2",
    "pruning.refining_rounds=0",
    "pruning.update_every=1",
  ]
  sets += [f"model.overrides.{k}={v!r}" for k, v in MICRO_MODEL.items()]
  for s in sets:
    argv += ["--set", s]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "| run | dev WER | test WER |" in out
  dense = next(line for line in out.splitlines() if line.startswith("| dense |"))
  pruned = next(line for line in out.splitlines() if line.startswith("| pruned |"))
  assert "| 0.0% |" in dense and "| 50.0% |" in pruned
  assert (tmp_path / "data" / "synth_v20" / "SPEAKERS.TXT").exists()
  results = {
    n: json.loads((tmp_path / "run" / n / "results.json").read_text()) for n in ("dense", "pruned")
  }
  # the dense run is federated pruning with an all-kept mask: one client program for both runs
  assert results["dense"]["train"]["algorithm"] == "fedprune"
  assert results["pruned"]["train"]["algorithm"] == "fedprune"
  assert results["dense"]["train"]["nonzero_params"] == results["dense"]["train"]["num_params"]
  for name, line in (("dense", dense), ("pruned", pruned)):  # the bytes the last round sent
    t = results[name]["train"]
    assert (
      f"| {t['last_bytes_down_sent'] / 1e6:.2f} MB | {t['last_bytes_up_sent'] / 1e6:.2f} MB |"
      in line
    )
  assert (
    results["dense"]["train"]["last_bytes_down_sent"] == 4 * results["dense"]["train"]["num_params"]
  )
  executors = [k for k in programs._cache if isinstance(k, tuple) and k[0] == "executor"]
  assert len(executors) == 1, executors
  # both runs start from the one warm start
  assert results["dense"]["train"]["warm_start"] == results["pruned"]["train"]["warm_start"]
  # ... and the all-kept dense run is FedAvg's: the same config with pruning=None, same params
  fedavg = config_lib.load_config("demo", sets)
  fedavg.data.root = str(tmp_path / "data" / "synth_v20")
  fedavg.warm_start.path = str(tmp_path / "run" / "warm_start")
  fedavg.workdir = str(tmp_path / "fedavg")
  fedavg.pruning = None
  walked = []  # a run's start lists its train split once (feature cache key and corpus identity)
  real_walk = os.walk
  monkeypatch.setattr(os, "walk", lambda d, *a, **k: walked.append(d) or real_walk(d, *a, **k))
  train = job.run(fedavg)["train"]
  monkeypatch.undo()
  assert [d for d in walked if os.path.basename(d) == "train"] == [fedavg.data.root + "/train"]
  assert train["algorithm"] == "fedavg"

  like = task.make_model(fedavg).init(jax.random.key(0))
  dense, ref = (
    task.restore_params(tmp_path / d / "checkpoint", like) for d in ("run/dense", "fedavg")
  )
  diff = np.concatenate(
    [np.abs(a - b).ravel() for a, b in zip(*map(jax.tree.leaves, (dense, ref)))]
  )
  # equal to float rounding, except where client Adam magnifies rounding noise: a gradient that is
  # analytically zero (the attention key bias, softmax is shift-invariant) is normalized to steps
  # of the learning rate's size (measured: 2 of 34 leaves, the key bias and the positional
  # projection, up to 1.3e-3)
  assert np.mean(diff <= 1e-6) >= 0.99, np.mean(diff <= 1e-6)  # measured: 99.8% of entries
  assert diff.max() <= 3 * fedavg.client.learning_rate * fedavg.rounds * fedavg.data.max_steps
  losses = [
    [json.loads(line)["train_loss"] for line in open(tmp_path / d / "metrics.jsonl")]
    for d in ("run/dense", "fedavg")
  ]
  np.testing.assert_allclose(*losses, rtol=1e-6)
  pruning = config_lib.load_config("demo").pruning
  assert demo.dense_pruning(pruning).target_sparsity == 0 and pruning.target_sparsity == 0.5
