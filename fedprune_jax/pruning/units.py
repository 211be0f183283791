"""Conformer structural units: attention heads, FFN hidden units, conv groups.

A *unit* is a set of param entries that only make sense together; pruning a
unit removes all of them, which is what lets ``compaction`` build a smaller
dense model.  Per Conformer block ``block_{i}`` (naming in
docs/architecture.md):

* ``mhsa`` head h (Dh = head dim): columns ``h*Dh:(h+1)*Dh`` of
  query/key/value/pos kernels and of query/key/value biases, the same rows of
  ``out/kernel``, row h of ``pos_bias_u`` / ``pos_bias_v``;
* ``ffn1`` / ``ffn2`` hidden unit j: ``dense_in`` column j and bias j,
  ``dense_out`` row j;
* ``conv`` group g (one GroupNorm group, channels ``c`` in
  ``g*Cg:(g+1)*Cg``, Cg = d_model / conv_groups): ``pointwise_in`` columns c
  and c + C (the GLU pair) and those bias entries, depthwise kernel/bias
  channel c, group-norm scale/bias c, ``pointwise_out`` row c.

Unit counts are read from the param shapes (so compacted params work too);
only the channels per conv group must be given (``channels_per_group`` or a
``ConformerConfig``).

A *unit mask* is ``{"block_i": {"mhsa": bool[H_i], "ffn1": bool[F1_i],
"ffn2": bool[F2_i], "conv": bool[G_i]}}`` (True = keep).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedprune_jax.pruning import allocation as alloc_lib
from fedprune_jax.pruning import selection

PyTree = Any
KINDS = ("mhsa", "ffn1", "ffn2", "conv")
_QKVP = ("query", "key", "value", "pos")


def _cpg(cfg_or_cpg) -> int:
  if isinstance(cfg_or_cpg, (int, np.integer)):
    return int(cfg_or_cpg)
  return int(cfg_or_cpg.d_model // cfg_or_cpg.conv_groups)


def blocks(params: PyTree) -> list[str]:
  """``["block_0", "block_1", ...]`` in numeric order."""
  enc = params["encoder"]
  names = [k for k in enc if re.fullmatch(r"block_\d+", k)]
  return sorted(names, key=lambda k: int(k.split("_")[1]))


def _members(blk: dict, kind: str, cpg: int):
  """[(path within block, fn(array) -> per-unit view [U, ...])].

  The views use only ``reshape``/``transpose`` methods, so they work on numpy
  arrays (host-side compaction) and jax arrays alike.
  """
  out = []
  if kind == "mhsa":
    m = blk["mhsa"]
    h, dh = m["pos_bias_u"].shape
    for name in _QKVP:
      out.append(
        (("mhsa", name, "kernel"), lambda x: x.reshape(x.shape[0], h, dh).transpose(1, 0, 2))
      )
      if name != "pos" and "bias" in m[name]:
        out.append((("mhsa", name, "bias"), lambda x: x.reshape(h, dh)))
    out.append((("mhsa", "out", "kernel"), lambda x: x.reshape(h, dh, x.shape[-1])))
    for name in ("pos_bias_u", "pos_bias_v"):
      out.append((("mhsa", name), lambda x: x))
  elif kind in ("ffn1", "ffn2"):
    out += [
      ((kind, "dense_in", "kernel"), lambda x: x.T),
      ((kind, "dense_in", "bias"), lambda x: x),
      ((kind, "dense_out", "kernel"), lambda x: x),
    ]
  elif kind == "conv":
    c = blk["conv"]["depthwise"]["kernel"].shape[-1]
    g = c // cpg
    out += [
      (
        ("conv", "pointwise_in", "kernel"),
        lambda x: x.reshape(x.shape[0], 2, g, cpg).transpose(2, 0, 1, 3),
      ),
      (("conv", "pointwise_in", "bias"), lambda x: x.reshape(2, g, cpg).transpose(1, 0, 2)),
      (("conv", "depthwise", "kernel"), lambda x: _front(x.reshape(*x.shape[:-1], g, cpg), -2)),
      (("conv", "depthwise", "bias"), lambda x: x.reshape(g, cpg)),
      (("conv", "group_norm", "scale"), lambda x: x.reshape(g, cpg)),
      (("conv", "group_norm", "bias"), lambda x: x.reshape(g, cpg)),
      (("conv", "pointwise_out", "kernel"), lambda x: x.reshape(g, cpg, x.shape[-1])),
    ]
  else:
    raise ValueError(f"unknown unit kind {kind!r}; expected one of {KINDS}")
  return [(p, v) for p, v in out if _get(blk, p) is not None]


def _front(x, axis):
  """Moves ``axis`` to the front (works for numpy and jax arrays)."""
  axis %= x.ndim
  return x.transpose((axis,) + tuple(i for i in range(x.ndim) if i != axis))


def _get(tree, path):
  for k in path:
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def num_units(params: PyTree, cfg_or_cpg) -> dict[str, dict[str, int]]:
  """``{block: {kind: number of units}}`` read from the param shapes."""
  cpg = _cpg(cfg_or_cpg)
  enc = params["encoder"]
  out = {}
  for b in blocks(params):
    blk = enc[b]
    out[b] = {
      "mhsa": int(blk["mhsa"]["pos_bias_u"].shape[0]),
      "ffn1": int(blk["ffn1"]["dense_in"]["kernel"].shape[1]),
      "ffn2": int(blk["ffn2"]["dense_in"]["kernel"].shape[1]),
      "conv": int(blk["conv"]["depthwise"]["kernel"].shape[-1] // cpg),
    }
  return out


def unit_sizes(params: PyTree, cfg_or_cpg) -> dict[str, dict[str, int]]:
  """Params owned by one unit, ``{block: {kind: count}}``."""
  cpg = _cpg(cfg_or_cpg)
  out = {}
  for b in blocks(params):
    blk = params["encoder"][b]
    out[b] = {
      k: int(
        sum(
          np.prod(view(_get(blk, p)).shape[1:]) if view(_get(blk, p)).ndim > 1 else 1
          for p, view in _members(blk, k, cpg)
        )
      )
      for k in KINDS
    }
  return out


def unit_scores(
  params: PyTree, cfg_or_cpg, scores: PyTree | None = None, reduce: str = "l2sq"
) -> dict[str, dict[str, jax.Array]]:
  """Per-unit importance ``{block: {kind: float32[U]}}``.

  Args:
    params: Conformer params.
    cfg_or_cpg: ``ConformerConfig`` or channels per conv group.
    scores: elementwise scores with the params' structure (default |w|).
    reduce: "l2sq" (sum of squared member scores) or "mean" (mean member
      score).
  """
  if reduce not in ("l2sq", "mean"):
    raise ValueError(f"unit reduce must be 'l2sq' or 'mean', got {reduce!r}")
  cpg = _cpg(cfg_or_cpg)
  scores = jax.tree.map(jnp.abs, params) if scores is None else scores
  out = {}
  for b in blocks(params):
    blk, sblk = params["encoder"][b], scores["encoder"][b]
    out[b] = {}
    for kind in KINDS:
      total, count = 0.0, 0
      for path, view in _members(blk, kind, cpg):
        s = _get(sblk, path)
        if s is None:
          raise ValueError(f"scores missing encoder/{b}/{'/'.join(path)}")
        v = view(jnp.asarray(s, jnp.float32))
        v = v * v if reduce == "l2sq" else v
        total = total + v.reshape(v.shape[0], -1).sum(axis=1)
        count += int(np.prod(v.shape[1:]))
      out[b][kind] = total / count if reduce == "mean" else total
  return out


def unit_mask(
  params: PyTree,
  cfg_or_cpg,
  sparsity,
  *,
  scores: PyTree | None = None,
  reduce: str = "l2sq",
  allocation: str | alloc_lib.Allocation = "uniform",
  kinds: tuple[str, ...] = KINDS,
  min_keep: int = 1,
  method: str = "auto",
) -> dict[str, dict[str, jax.Array]]:
  """Unit mask removing ``sparsity`` of the units' params.

  ``allocation``: "uniform" (every (block, kind) loses round(s * U) units),
  "global" (one threshold over unit scores normalised by their (block, kind)
  mean, weighted by the params each unit owns) or ``Adaptive(floor, ceil)``.
  Each (block, kind) keeps at least ``min_keep`` units.  Kinds not in
  ``kinds`` stay fully kept.  Ties prune the lower unit index first.
  """
  return _unit_mask_jit(
    params,
    scores,
    jnp.asarray(sparsity, jnp.float32),
    _cpg(cfg_or_cpg),
    reduce,
    alloc_lib.parse_allocation(allocation),
    tuple(kinds),
    int(min_keep),
    method,
  )


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def _unit_mask_jit(params, scores, s, cfg_or_cpg, reduce, alloc, kinds, min_keep, method):
  us = unit_scores(params, cfg_or_cpg, scores, reduce)
  sizes = unit_sizes(params, cfg_or_cpg)
  out = {b: {k: jnp.ones(us[b][k].shape, bool) for k in KINDS} for b in us}
  entries = [(b, k) for b in us for k in kinds]
  if not entries:
    return out
  n = np.array([us[b][k].shape[0] for b, k in entries])
  w = np.array([sizes[b][k] for b, k in entries])
  cap = np.maximum(n - min_keep, 0)
  if isinstance(alloc, alloc_lib.Uniform):
    for (b, k), ni, ci in zip(entries, n, cap):
      need = jnp.minimum(jnp.round(s * ni), ci)
      key = selection.sortable_key(us[b][k])
      out[b][k] = ~selection.select_lowest([key], [None], need, method)[0]
    return out
  if isinstance(alloc, alloc_lib.Global):
    floor, ceil, norm = 0.0, 1.0, alloc.normalize
  elif isinstance(alloc, alloc_lib.Adaptive):
    floor, ceil, norm = alloc.floor, alloc.ceil, alloc.normalize
  else:
    raise ValueError(f"unit allocation must be uniform, global or adaptive, got {alloc!r}")
  keys = [selection.sortable_key(alloc_lib._normalize(us[b][k], norm)) for b, k in entries]
  wts = [np.full(ni, wi, np.int32) for ni, wi in zip(n, w)]
  lo = np.minimum(np.ceil(floor * n - 1e-9), cap) * w
  hi = np.minimum(np.floor(ceil * n + 1e-9), cap) * w
  needs = selection.clipped_threshold(
    keys, wts, jnp.round(s * np.sum(n * w)), lo.astype(np.int32), hi.astype(np.int32)
  )
  for i, (b, k) in enumerate(entries):
    out[b][k] = ~selection.select_lowest([keys[i]], [wts[i]], needs[i], method)[0]
  return out


def expand_unit_mask(params: PyTree, cfg_or_cpg, umask) -> PyTree:
  """Params-shaped mask (True = keep) for every unit member; None elsewhere."""
  return _expand_jit(params, _cpg(cfg_or_cpg), umask)


@functools.partial(jax.jit, static_argnums=1)
def _expand_jit(params, cpg, umask):
  flat = {}
  for b in blocks(params):
    blk = params["encoder"][b]
    for kind in KINDS:
      keep = jnp.asarray(umask[b][kind], bool)
      for path, view in _members(blk, kind, cpg):
        x = _get(blk, path)
        # Broadcast keep[U] through the inverse of the per-unit view.
        idx = view(jnp.arange(x.size).reshape(x.shape))
        full = (
          jnp.zeros(x.size, bool)
          .at[idx.reshape(idx.shape[0], -1)]
          .set(keep[:, None])
          .reshape(x.shape)
        )
        flat[("encoder", b) + path] = full

  def build(tree, prefix=()):
    if isinstance(tree, dict):
      return {k: build(v, prefix + (k,)) for k, v in tree.items()}
    return flat.get(prefix)

  return build(params)


def kept_indices(umask) -> dict[str, dict[str, np.ndarray]]:
  """Host-side sorted kept unit indices per (block, kind)."""
  return {b: {k: np.flatnonzero(np.asarray(v)) for k, v in d.items()} for b, d in umask.items()}
