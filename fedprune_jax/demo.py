"""``fedprune demo``: dense federated training and federated pruning from one warm start.

The demo config (``experiments/configs/demo.py``) on the embedded corpus, synthesized under the
data directory if absent; both runs write under one workdir (``dense/``, ``pruned/``) and share
the warm start that the first trains (``warm_start/``).
"""

from __future__ import annotations

import pathlib
import sys
from typing import Sequence

import ml_collections

from fedprune_jax import config as config_lib
from fedprune_jax import io_utils
from fedprune_jax import job
from fedprune_jax import task

RUNS = ("dense", "pruned")


def dense_pruning(pruning: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The pruned run's pruning section at 0% sparsity: every mask keeps everything, so the run is
  dense federated training (the same numbers as ``pruning=None``'s FedAvg, tested) that shares the
  pruned run's masked client program instead of compiling FedAvg's own (``make demo`` compiles one
  client program, not two)."""
  dense = pruning.copy_and_resolve_references()
  dense.target_sparsity = 0.0
  dense.initial_sparsity = 0.0
  return dense


def run(
  workdir: str, data_dir: str, overrides: Sequence[str] = (), *, fresh: bool = False
) -> dict[str, dict]:
  """The results (``job.run``) of the dense and the pruned run, by name (``RUNS``)."""
  cfg = config_lib.load_config("demo", overrides)
  io_utils.ensure_writable_dir(workdir, "--workdir")
  cfg.data.root = str(task.embedded_corpus(cfg.data, data_dir))
  workdir = pathlib.Path(workdir)
  cfg.warm_start.path = str(workdir / "warm_start")
  cfg.warm_start.train_if_missing = True  # the first run trains it, the second reuses it
  results = {}
  for name in RUNS:
    run_cfg = cfg.copy_and_resolve_references()
    run_cfg.workdir = str(workdir / name)
    if name == "dense":  # an all-kept mask: FedAvg's numbers, the pruned run's client program
      run_cfg.pruning = dense_pruning(run_cfg.pruning)
    print(f"\n== {name}: {run_cfg.rounds} federated rounds ==", file=sys.stderr)
    results[name] = job.run(run_cfg, fresh=fresh)
  return results
