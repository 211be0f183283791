"""Per-client cost accounting of a federated round: bytes down/up, FLOPs, training memory.

Byte counts assume float32 values (4 bytes) and a server that knows the mask:

* ``bytes_down_dense``: the whole model, ``4 * n``;
* ``bytes_down_masked``: kept values + non-prunable values + a 1-bit-per-entry bitmap of the
  prunable entries, ``4 * (kept + other) + ceil(prunable / 8)``;
* ``bytes_down_compact`` (``units`` pattern only, where the kept model is a smaller dense model):
  ``4 * (kept + other)``;
* ``bytes_up``: the client's delta at the kept coordinates, ``4 * (kept + other)`` (the server
  knows the mask), plus ``4 * prunable`` for client-data scores on rounds that upload them.

FLOPs per local step: ``client_flops_per_step_dense`` is the analytic train-step FLOPs of the
dense model on the largest client batch ``[B, T]`` (what a masked-dense client executes);
``client_flops_per_step_sparse`` scales it by the kept fraction of the weights (what sparse
kernels, or the compacted model of the ``units`` pattern, would execute; an estimate that ignores
attention-score products and elementwise work).

Training memory is not estimated here: the round driver records the measured
``client_train_memory_bytes`` of the client program actually run (XLA's memory analysis, see
``executor.ChunkedExecutor``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

from fedprune_jax import pruning
from fedprune_jax.algorithms.mask_policy import MaskPolicy
from fedprune_jax.algorithms.fedprune import PruningState

PyTree = Any


def _counts(params: PyTree, mask: PyTree) -> tuple[int, int, int]:
  """(total, prunable, kept) entries."""
  total = sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(params))
  return total, pruning.count_total(mask), int(pruning.count_kept(mask))


def make_round_costs(
  policy: MaskPolicy,
  dense_flops_per_step: float,
) -> Callable[[PruningState], dict]:
  """``round_costs(state) -> {name: float}`` for the round that starts from ``state``.

  Args:
    policy: the mask policy (whether this round's clients upload scores; the pattern).
    dense_flops_per_step: analytic train FLOPs of one local step of the dense model.
  """
  units = policy.pattern == "units"

  def round_costs(state: PruningState) -> dict:
    total, prunable, kept = _counts(state.params, state.mask)
    other = total - prunable
    live = kept + other
    keep_frac = live / max(total, 1)
    nxt = int(state.round) + 1
    uploads_scores = bool(policy.should_update(nxt) & policy.scores_from_clients(nxt))
    out = {
      "bytes_down_dense": 4.0 * total,
      "bytes_down_masked": 4.0 * live + math.ceil(prunable / 8),
      "bytes_up": 4.0 * live + (4.0 * prunable if uploads_scores else 0.0),
      "client_flops_per_step_dense": float(dense_flops_per_step),
      "client_flops_per_step_sparse": float(dense_flops_per_step) * keep_frac,
      "nonzero_params": float(live),
    }
    if units:
      out["bytes_down_compact"] = 4.0 * live
    return out

  return round_costs


def totals(history: list[dict]) -> dict[str, float]:
  """Sums over rounds of the per-client bytes times the clients of each round."""
  out = {}
  for key in ("bytes_down_dense", "bytes_down_masked", "bytes_down_compact", "bytes_up"):
    if any(key in h for h in history):
      out[f"total_{key}"] = float(sum(h.get(key, 0.0) * h["num_clients"] for h in history))
  return out
