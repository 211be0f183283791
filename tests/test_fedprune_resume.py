"""Checkpoint and resume: a run SIGKILLed in the middle of a round and run again ends
bit-identical to an uninterrupted run; the log has every round exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import read_scalars

SCRIPT = textwrap.dedent(
  """
  import json, os, signal, sys
  import jax, numpy as np
  from fedprune_jax.algorithms import build
  from fedprune_jax import io_utils
  from fedprune_jax.federated import client_data, rounds, toy

  workdir, kill_at = sys.argv[1], int(sys.argv[2])

  class Store(client_data.SyntheticClientStore):
    calls = 0
    def get(self, ids):
      Store.calls += 1
      if Store.calls == kill_at:  # inside a round: after some chunks of it ran
        os.kill(os.getpid(), signal.SIGKILL)
      return super().get(ids)

  store = Store(12, batch_size=3, min_examples=2, max_examples=7, num_frames=5, feature_dim=4,
                label_len=2, num_classes=3, seed=0)
  cfg = {
    "seed": 5, "rounds": 8, "cohort_size": 6, "checkpoint_every": 2,
    "checkpoint_dir": os.path.join(workdir, "rounds"),
    "log_path": os.path.join(workdir, "metrics.jsonl"),
    "tensorboard_dir": os.path.join(workdir, "tensorboard"),
    "client": {"learning_rate": 0.3}, "server": {"optimizer": "fedadam", "learning_rate": 0.05},
    "engine": {"chunk_size": 2},
    "pruning": {"target_sparsity": 0.5, "pruning_rounds": 4, "refining_rounds": 2,
                "update_every": 1, "score": "saliency", "refinement": "client"},
  }
  params = toy.init_params(jax.random.key(0), 4, 3, hidden=6)
  state, history = build.run_federated(cfg, toy.make_loss_fn(), params, store, progress=False)
  timing = rounds.PROCESS_METRICS
  out = {
    "params_sha256": io_utils.tree_sha256(state.params),
    "mask_sha256": io_utils.tree_sha256(state.mask),
    "history": [{k: v for k, v in h.items() if k not in timing} for h in history],
  }
  with open(os.path.join(workdir, "out.json"), "w") as f:
    json.dump(out, f)
  """
)


def _run(script, workdir, kill_at):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, str(script), str(workdir), str(kill_at)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_sigkill_mid_round_then_resume_is_bit_identical(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(SCRIPT)
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  straight.mkdir()
  killed.mkdir()
  assert _run(script, straight, 0).returncode == 0
  # a round reads the store 4 times (one shape probe + 3 chunks of 2 of the 6 clients): read 22
  # is the second chunk of round 5, after the checkpoint of round 4
  first = _run(script, killed, 22)
  assert first.returncode == -9, first.stderr[-2000:]
  assert not (killed / "out.json").exists()
  rounds_saved = sorted(int(p.name) for p in (killed / "rounds").iterdir() if p.name.isdigit())
  assert rounds_saved and max(rounds_saved) == 4  # checkpoints every 2 rounds
  resumed = _run(script, killed, 0)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  a = json.loads((straight / "out.json").read_text())
  b = json.loads((killed / "out.json").read_text())
  assert a["params_sha256"] == b["params_sha256"]
  assert a["mask_sha256"] == b["mask_sha256"]
  assert a["history"] == b["history"]
  log = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in log] == list(range(8))
  _tensorboard_matches_the_log(straight)


def _tensorboard_matches_the_log(workdir):
  """Every numeric field of every round's metrics.jsonl row is a TensorBoard scalar at step
  round + 1 (float32 in the event file), among them the pruning phase and sparsity."""
  pytest.importorskip("tensorboardX")
  scalars = read_scalars(workdir / "tensorboard")
  log = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {"sparsity", "phase", "target_sparsity", "train_loss"} <= set(scalars)
  for row in log:
    for key, value in row.items():
      if key != "round" and isinstance(value, (int, float)):
        assert scalars[key][row["round"] + 1] == pytest.approx(value, rel=1e-6, abs=1e-30), key
