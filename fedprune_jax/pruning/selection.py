"""Exact weighted "prune the lowest" selection without sorting.

Given group scores spread over many arrays (layers), each group with an
integer weight (its number of entries), ``select_lowest`` marks the
lowest-scoring groups for pruning so that their total weight is ``need``
(to within half a group when the last group straddles ``need``).

Algorithm: a two-pass radix select on order-preserving 32-bit keys (16 bits
per pass, weighted histograms by scatter-add), which finds the exact
threshold key ``t`` in O(n) work; groups with key < t are pruned, and among
groups with key == t the ones with the lowest *global index* (layers in list
order, then row-major position) are pruned first.  This makes ties (e.g.
all-equal scores or already-pruned zeros) deterministic and reproducible.
Everything is jit-able; the only data-dependent branch is a ``lax.cond``
that runs a cumulative sum over the tied groups when ties must be split.

Weights are int32, so the total weight must stay below 2**30.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_BINS = 1 << 16


def sortable_key(x: jax.Array) -> jax.Array:
  """uint32 keys whose unsigned order equals the float order of ``x``.

  NaN is mapped to +inf (never pruned before a finite score); -0.0 == +0.0.
  """
  x = jnp.asarray(x, jnp.float32)
  x = jnp.where(jnp.isnan(x), jnp.inf, x)
  # Pure bit manipulation (float arithmetic would flush subnormals on CPU).
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  b = jnp.where(b == jnp.uint32(0x80000000), jnp.uint32(0), b)  # -0.0 -> +0.0
  neg = (b >> 31) == 1
  return jnp.where(neg, ~b, b | jnp.uint32(0x80000000))


def _weights_like(w, k):
  return jnp.ones(k.shape, jnp.int32) if w is None else jnp.asarray(w, jnp.int32)


def _hists(keys, weights, digit_fn) -> list[jax.Array]:
  """Per-array weighted histograms over ``_BINS`` bins (digit ``_BINS`` = dump).

  Independent scatters (summed by the caller as a balanced tree): a long
  chain of dependent scatters makes XLA's compiler recurse too deeply.
  """
  hs = []
  for k, w in zip(keys, weights):
    idx = digit_fn(k).astype(jnp.int32).ravel()
    upd = jnp.int32(1) if w is None else jnp.asarray(w, jnp.int32).ravel()
    hs.append(jnp.zeros(_BINS + 1, jnp.int32).at[idx].add(upd, mode="promise_in_bounds")[:_BINS])
  return hs


def _hist(keys, weights, digit_fn) -> jax.Array:
  return _tree_sum(_hists(keys, weights, digit_fn))


def _tree_sum(xs):
  xs = list(xs)
  while len(xs) > 1:
    xs = [xs[i] + xs[i + 1] if i + 1 < len(xs) else xs[i] for i in range(0, len(xs), 2)]
  return xs[0]


def find_threshold(keys: Sequence[jax.Array], weights: Sequence, need):
  """Smallest key ``t`` with W(key <= t) >= need.

  Returns (t, W(key < t), int32 [L] per-array weight with key == t).
  """
  hi = lambda k: k >> 16
  h1 = _hist(keys, weights, hi)
  c1 = jnp.cumsum(h1)
  b1 = jnp.minimum(jnp.searchsorted(c1, need, side="left"), _BINS - 1)
  below1 = c1[b1] - h1[b1]
  b1u = b1.astype(jnp.uint32)
  h2s = _hists(keys, weights, lambda k: jnp.where(hi(k) == b1u, k & jnp.uint32(0xFFFF), _BINS))
  h2 = _tree_sum(h2s)
  c2 = below1 + jnp.cumsum(h2)
  b2 = jnp.minimum(jnp.searchsorted(c2, need, side="left"), _BINS - 1)
  t = (b1u << 16) | b2.astype(jnp.uint32)
  return t, c2[b2] - h2[b2], jnp.stack([h[b2] for h in h2s])


SORT_MAX = 1 << 12  # "auto" sorts at most this many groups (radix measured faster above it on CPU)


def select_lowest(
  keys: Sequence[jax.Array], weights: Sequence, need, method: str = "auto"
) -> list[jax.Array]:
  """Prune masks (True = prune) over ``keys`` with total pruned weight ~ ``need``.

  ``method``: "radix" (O(n), the default for large inputs), "sort" (a stable
  argsort of all keys; cheaper to compile and faster for small inputs) or
  "auto" (sort when there are at most ``SORT_MAX`` groups).  Both give the
  identical mask.

  Args:
    keys: uint32 arrays from ``sortable_key`` (any shapes).
    weights: per-key int weights of the same shapes, or ``None`` for weight 1.
    need: int scalar (may be traced), clipped to [0, total weight].
  Returns:
    bool arrays shaped like ``keys``.  Exactly ``need`` units are pruned when
    all weights are 1; otherwise within half of the straddling group's weight.
  """
  keys = [jnp.asarray(k) for k in keys]
  weights = list(weights)
  total = sum(int(np.prod(k.shape)) if w is None else int(np.sum(w)) for k, w in zip(keys, weights))
  if total >= 2**30:
    raise ValueError(f"select_lowest: total weight {total} too large for int32")
  need = jnp.clip(jnp.round(jnp.asarray(need)).astype(jnp.int32), 0, total)
  if total == 0:
    return [jnp.zeros(k.shape, bool) for k in keys]
  count = sum(int(np.prod(k.shape)) for k in keys)
  if method not in ("auto", "radix", "sort"):
    raise ValueError(f"select_lowest: unknown method {method!r}")
  if method == "sort" or (method == "auto" and count <= SORT_MAX):
    return _select_by_sort(keys, weights, need)
  t, below, sums = find_threshold(keys, weights, need)
  need_eq = need - below

  # Tied groups (key == t) are pruned in global index order (layers in list
  # order, then position).  Layers whose ties all fit are pruned fully, layers
  # after the boundary not at all; only the one boundary layer needs a
  # cumulative sum, computed under a per-layer ``lax.cond`` so that the
  # common case (no split) costs one cheap reduction.
  offsets = jnp.cumsum(sums) - sums
  out = []
  for k, w, off, tot in zip(keys, weights, offsets, sums):
    size = int(np.prod(k.shape))
    boundary = (off < need_eq) & (need_eq < off + tot)

    def local_cut(k=k, w=w, off=off):
      e = jnp.where(k == t, _weights_like(w, k), 0).ravel()
      excl = off + jnp.cumsum(e) - e
      ok = (2 * excl + e <= 2 * need_eq) & (e > 0)
      return jnp.max(jnp.where(ok, jnp.arange(size, dtype=jnp.int32), -1)) + 1

    cut = jax.lax.cond(boundary, local_cut, lambda: jnp.int32(0))
    cut = jnp.where(off + tot <= need_eq, size, cut)
    pos = jax.lax.broadcasted_iota(jnp.int32, (size,), 0).reshape(k.shape)
    out.append(((k < t) | ((k == t) & (pos < cut))) & (need > 0))
  return out


def _select_by_sort(keys, weights, need) -> list[jax.Array]:
  flat = jnp.concatenate([k.ravel() for k in keys])
  w = jnp.concatenate([_weights_like(w, k).ravel() for k, w in zip(keys, weights)])
  order = jnp.argsort(flat, stable=True)  # ties: lower global index first
  ws = w[order]
  excl = jnp.cumsum(ws) - ws
  prune_sorted = (2 * excl + ws <= 2 * need) & (need > 0)
  prune = jnp.zeros(flat.shape, bool).at[order].set(prune_sorted)
  out, o = [], 0
  for k in keys:
    n = int(np.prod(k.shape))
    out.append(prune[o : o + n].reshape(k.shape))
    o += n
  return out


def clipped_threshold(
  keys: Sequence[jax.Array], weights: Sequence, need, lo: jax.Array, hi: jax.Array
) -> jax.Array:
  """Per-layer pruned weights for one global threshold with per-layer bounds.

  Finds the smallest key ``t`` such that ``sum_l clip(W_l(key <= t), lo_l,
  hi_l) >= need`` and returns int32 [L] per-layer needs that sum to ``need``:
  ``clip(W_l(key < t), lo_l, hi_l)`` plus the remainder given to the layers
  with ties at ``t`` in layer order.  ``lo``/``hi`` are int32 [L] bounds in
  weight units; ``need`` must lie in [sum(lo), sum(hi)] (it is clipped).
  """
  lo = jnp.asarray(lo, jnp.int32)
  hi = jnp.asarray(hi, jnp.int32)
  need = jnp.clip(jnp.round(jnp.asarray(need)).astype(jnp.int32), jnp.sum(lo), jnp.sum(hi))

  def hists(digit_fn):
    return jnp.stack(_hists(keys, weights, digit_fn))

  hi16 = lambda k: k >> 16
  h1 = hists(hi16)  # [L, BINS]
  c1 = jnp.cumsum(h1, axis=1)
  f1 = jnp.sum(jnp.clip(c1, lo[:, None], hi[:, None]), axis=0)
  b1 = jnp.minimum(jnp.searchsorted(f1, need, side="left"), _BINS - 1)
  base = c1[:, b1] - h1[:, b1]  # [L] weight below bin b1
  b1u = b1.astype(jnp.uint32)
  h2 = hists(lambda k: jnp.where(hi16(k) == b1u, k & jnp.uint32(0xFFFF), _BINS))
  c2 = base[:, None] + jnp.cumsum(h2, axis=1)
  f2 = jnp.sum(jnp.clip(c2, lo[:, None], hi[:, None]), axis=0)
  b2 = jnp.minimum(jnp.searchsorted(f2, need, side="left"), _BINS - 1)
  w_le = c2[:, b2]
  w_lt = w_le - h2[:, b2]
  n = jnp.clip(w_lt, lo, hi)
  cap = jnp.clip(w_le, lo, hi) - n
  rem = need - jnp.sum(n)
  before = jnp.cumsum(cap) - cap
  add = jnp.clip(rem - before, 0, cap)
  return n + add
