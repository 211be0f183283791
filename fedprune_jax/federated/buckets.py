"""Bucket planning: which clients share one padded shape (one compilation).

``make_buckets`` groups clients by size into at most ``num_buckets`` shape buckets, by equal
padded cost (``'cost'``) or by greedily merging groups of equal shape (``'shape'``,
``shape_groups``).
"""

from __future__ import annotations

import numpy as np

from fedprune_jax.federated.packing import Bucket


def make_buckets(
  lengths: np.ndarray,
  batch_size: int,
  num_buckets: int,
  feature_dim: int,
  round_to: int = 1,
  max_steps: int | None = None,
  method: str = "cost",
) -> tuple[list[Bucket], np.ndarray]:
  """Groups clients by size into at most ``num_buckets`` shape buckets.

  Args:
    lengths: int[N, 3] per client: (#examples, max frames T, max labels L).
    batch_size: B.
    num_buckets: maximum number of buckets (compilations).
    feature_dim: F.
    round_to: T and L are rounded up to a multiple of this.
    max_steps: optional cap on S (clients beyond it must be truncated by the
      caller).
    method: ``'cost'``: clients sorted by padded cost S*B*T are cut into
      groups of equal total cost, each padded to its own maxima (S and T of a
      group may come from different clients). ``'shape'``: clients start in
      groups of identical (S, T) (after rounding), and the two groups whose
      union adds the fewest padded frame slots are merged until at most
      ``num_buckets`` remain (``shape_groups``; S and T are chosen jointly).

  Returns:
    (buckets, bucket_of) with bucket_of int[N] the bucket index per client.
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.ndim != 2 or lengths.shape[1] != 3 or len(lengths) == 0:
    raise ValueError(f"lengths must be int[N>0, 3], got {lengths.shape}")
  if num_buckets < 1:
    raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
  steps = np.maximum(1, -(-lengths[:, 0] // batch_size))
  if max_steps is not None:
    steps = np.minimum(steps, max_steps)
  frames = -(-np.maximum(lengths[:, 1], 1) // round_to) * round_to
  labels = -(-np.maximum(lengths[:, 2], 1) // round_to) * round_to
  if method == "cost":
    group = _cost_groups(steps * np.maximum(lengths[:, 1], 1), num_buckets)
  elif method == "shape":
    group = shape_groups(np.stack([steps, frames], 1), num_buckets)
  else:
    raise ValueError(f"method must be 'cost' or 'shape', got {method!r}")
  bucket_of = np.empty(len(lengths), np.int64)
  buckets: list[Bucket] = []
  for g in np.unique(group):
    members = np.flatnonzero(group == g)
    bucket = Bucket(
      num_steps=int(steps[members].max()),
      batch_size=batch_size,
      shapes={
        "features": (int(frames[members].max()), feature_dim),
        "labels": (int(labels[members].max()),),
      },
    )
    if bucket not in buckets:  # identical shapes share one compilation
      buckets.append(bucket)
    bucket_of[members] = buckets.index(bucket)
  return buckets, bucket_of


def _cost_groups(cost: np.ndarray, num_groups: int) -> np.ndarray:
  """int[N] group of each client: equal-total-cost cuts of the cost-sorted clients."""
  order = np.argsort(cost, kind="stable")
  cum = np.cumsum(cost[order]) / cost.sum()
  group = np.empty(len(cost), np.int64)
  group[order] = np.minimum((cum * num_groups - 1e-9).astype(np.int64), num_groups - 1)
  return group


def shape_groups(shapes: np.ndarray, num_groups: int) -> np.ndarray:
  """int[N] group of each client: groups of equal shape, greedily merged.

  Args:
    shapes: int[N, 2K] per client, K (steps S_k, frames T_k) pairs (one per scan segment); a
      group is padded to its column maxima and costs (#clients) * sum_k S_k * T_k frame slots.
    num_groups: at most this many groups come back; the pair of groups whose union adds the
      fewest slots is merged until then.
  """
  keys, group = np.unique(np.asarray(shapes, np.int64), axis=0, return_inverse=True)
  group = group.reshape(-1)
  maxima = keys.astype(np.float64)  # [G, 2K] padded shape per group
  count = np.bincount(group, minlength=len(keys)).astype(np.float64)
  alive = np.ones(len(keys), bool)
  slots = lambda m: (m[..., 0::2] * m[..., 1::2]).sum(-1)
  while alive.sum() > num_groups:
    idx = np.flatnonzero(alive)
    m, n = maxima[idx], count[idx]
    own = n * slots(m)
    joint = np.maximum(m[:, None, :], m[None, :, :])
    extra = (n[:, None] + n[None, :]) * slots(joint) - own[:, None] - own[None, :]
    extra[np.diag_indices(len(idx))] = np.inf
    i, j = np.unravel_index(np.argmin(extra), extra.shape)
    maxima[idx[i]], count[idx[i]] = joint[i, j], n[i] + n[j]
    alive[idx[j]] = False
    group[group == idx[j]] = idx[i]
  return group
