"""Sparsity allocation: scores pytree + target sparsity -> mask pytree.

``prune_mask`` is the one entry point.  It

1. picks the prunable leaves (non-None, path included and not excluded; see
   ``masks.DEFAULT_INCLUDE`` / ``DEFAULT_EXCLUDE``),
2. aggregates elementwise scores into groups of each leaf's pattern
   (``patterns.Block``; ``patterns.NM`` leaves get their fixed N:M mask and
   are left out of the allocation),
3. decides how many entries each layer loses (the allocation),
4. prunes the lowest-scoring groups (``selection.select_lowest``: exact,
   ties broken by index) and broadcasts group masks back to param shapes.

Allocations (``sparsity`` is the fraction of prunable entries removed):

* ``Uniform()``: every layer at ``sparsity``.
* ``Global(normalize)``: one threshold over all layers' group scores, each
  layer's scores first divided by its mean |score| (``normalize="mean"``),
  its max |score| (``"max"``) or left raw (``"none"``).
* ``Adaptive(floor, ceil, normalize)``: the global ranking, with each layer's
  sparsity clipped to [floor, ceil]; the common threshold is re-solved under
  the clipping, so the global target is still met exactly (when feasible).
* ``ERK(scale)``: Erdos-Renyi-Kernel densities, density_l proportional to
  sum(shape_l) / prod(shape_l) (layers that would exceed density 1 stay
  dense and the rest is re-solved), then per-layer selection.

All of it is jit-able with ``sparsity`` traced; the configuration arguments
are static (hashable dataclasses / strings / tuples).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from fedprune_jax.pruning import masks as masks_lib
from fedprune_jax.pruning.spec import (  # noqa: F401  (re-exported)
  ERK,
  Adaptive,
  Allocation,
  Global,
  Uniform,
  parse_allocation,
)
from fedprune_jax.pruning import patterns as pat
from fedprune_jax.pruning import selection

PyTree = Any


PatternSpec = Union[str, pat.Pattern, Sequence[tuple[str, Union[str, pat.Pattern]]]]

_NORMALIZE = ("none", "mean", "max")


def pattern_for(path: str, pattern: PatternSpec) -> pat.Pattern:
  """Resolves a pattern spec (one pattern, or ``((regex, pattern), ...)``)."""
  if isinstance(pattern, (str, pat.Block, pat.NM)):
    return pat.parse_pattern(pattern)
  for regex, p in pattern:
    if masks_lib.matches(path, (regex,)):
      return pat.parse_pattern(p)
  return pat.UNSTRUCTURED


@dataclasses.dataclass
class _Layer:
  path: str
  shape: tuple[int, ...]
  pattern: pat.Pattern
  scores: jax.Array | None = None  # group scores [gh, gw] (Block only)
  sizes: np.ndarray | None = None  # group sizes [gh, gw]; None = all 1
  numel: int = 0


def _normalize(g: jax.Array, how: str) -> jax.Array:
  if how == "none":
    return g
  a = jnp.abs(g)
  d = jnp.mean(a) if how == "mean" else jnp.max(a)
  return g / jnp.maximum(d, jnp.finfo(jnp.float32).tiny)


def erk_densities(shapes: Sequence[tuple[int, ...]], density, scale: float = 1.0) -> jax.Array:
  """ERK densities float32 [L] with sum(d_l * n_l) == density * sum(n_l).

  raw_l = (sum(shape_l) / prod(shape_l)) ** scale; d_l = min(eps * raw_l, 1)
  with eps solved exactly (layers hitting 1 are kept dense).
  """
  n = np.array([math.prod(s) for s in shapes], np.float64)
  raw = np.array([sum(s) / math.prod(s) for s in shapes], np.float64) ** scale
  order = np.argsort(-raw, kind="stable")  # densest first
  n_o, raw_o = n[order], raw[order]
  dense_n = np.concatenate([[0.0], np.cumsum(n_o)])  # k densest kept dense
  rest_rn = np.concatenate([np.cumsum((raw_o * n_o)[::-1])[::-1], [0.0]])
  target = jnp.asarray(density, jnp.float32) * n.sum()
  eps = (target - dense_n) / np.maximum(rest_rn, 1e-30)  # [L+1]
  raw_next = np.concatenate([raw_o, [0.0]])  # largest non-dense raw
  ok = eps * raw_next <= 1.0 + 1e-6
  k = jnp.argmax(ok)  # fewest dense layers
  d_o = jnp.where(jnp.arange(len(n)) < k, 1.0, jnp.clip(eps[k] * raw_o, 0.0, 1.0))
  inv = np.argsort(order)
  return d_o[inv].astype(jnp.float32)


def prune_mask(
  scores: PyTree,
  sparsity,
  *,
  pattern: PatternSpec = "unstructured",
  allocation: str | Allocation = "global",
  reduce: str = "sum",
  include: Sequence[str] = masks_lib.DEFAULT_INCLUDE,
  exclude: Sequence[str] = masks_lib.DEFAULT_EXCLUDE,
  method: str = "auto",
) -> PyTree:
  """Mask (True = keep) pruning ``sparsity`` of the prunable entries.

  Args:
    scores: pytree with the params' structure; float arrays of elementwise
      importance (higher = more important) or ``None`` for leaves that are
      never pruned.  Any score source works (magnitude, client-supplied ...).
    sparsity: float scalar in [0, 1] (may be traced, e.g. from a schedule).
    pattern: one pattern (``"column"``, ``patterns.Block(4, 4)``, ``"2:4"``)
      or ``((path_regex, pattern), ...)`` (first match; unmatched ->
      unstructured).
    allocation: ``"uniform" | "global" | "adaptive" | "erk"`` or an object.
    reduce: group score reduction, see ``patterns.group_scores``.
    include, exclude: path patterns selecting prunable leaves (exclusions).
    method: group selection algorithm, see ``selection.select_lowest``.
  Returns:
    mask pytree: bool arrays for prunable leaves, ``None`` elsewhere.
  """
  if not isinstance(pattern, (str, pat.Block, pat.NM)):
    pattern = tuple((str(r), pat.parse_pattern(p)) for r, p in pattern)
  else:
    pattern = pat.parse_pattern(pattern)
  return _prune_mask_jit(
    scores,
    jnp.asarray(sparsity, jnp.float32),
    pattern,
    parse_allocation(allocation),
    reduce,
    tuple(include),
    tuple(exclude),
    method,
  )


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _prune_mask_jit(scores, sparsity, pattern, alloc, reduce, include, exclude, method):
  flat = masks_lib.flatten_with_paths(scores)
  layers: list[_Layer] = []
  out: dict[str, jax.Array] = {}
  for path, s in flat:
    if not masks_lib.is_prunable(path, s, include, exclude):
      continue
    shape = tuple(np.shape(s))
    p = pattern_for(path, pattern)
    if isinstance(p, pat.NM):
      out[path] = pat.nm_mask(s, p, path)
      continue
    g = pat.group_scores(s, p, reduce)
    sizes = pat.group_sizes(shape, p)
    if np.all(sizes == 1):
      sizes = None
    layers.append(_Layer(path, shape, p, g, sizes, math.prod(shape)))

  if layers:
    prune = _allocate(layers, sparsity, alloc, method)
    for layer, gm in zip(layers, prune):
      out[layer.path] = pat.expand_groups(~gm, layer.shape, layer.pattern)
  return masks_lib.map_with_paths(lambda p, _: out.get(p), scores)


def _allocate(
  layers: list[_Layer], s: jax.Array, alloc: Allocation, method: str
) -> list[jax.Array]:
  """Group prune masks (True = prune) per layer."""
  numel = np.array([l.numel for l in layers], np.int64)
  if isinstance(alloc, Uniform):
    needs = [jnp.round(s * n) for n in numel]
    return _per_layer(layers, needs, method)
  if isinstance(alloc, ERK):
    d = erk_densities([l.shape for l in layers], 1.0 - s, alloc.scale)
    needs = [jnp.round((1.0 - d[i]) * numel[i]) for i in range(len(layers))]
    return _per_layer(layers, needs, method)
  norm = alloc.normalize
  if norm not in _NORMALIZE:
    raise ValueError(f"normalize must be one of {_NORMALIZE}, got {norm!r}")
  keys = [selection.sortable_key(_normalize(l.scores, norm)) for l in layers]
  weights = [l.sizes for l in layers]
  need = jnp.round(s * numel.sum())
  if isinstance(alloc, Global):
    return selection.select_lowest(keys, weights, need, method)
  if isinstance(alloc, Adaptive):
    lo, hi = [], []
    for l, n in zip(layers, numel):
      f, c = alloc.floor, alloc.ceil
      for regex, bf, bc in alloc.bounds:
        if masks_lib.matches(l.path, (regex,)):
          f, c = bf, bc
          break
      if not 0.0 <= f <= c <= 1.0:
        raise ValueError(f"{l.path}: adaptive bounds need 0 <= floor <= ceil <= 1, got {f}, {c}")
      lo.append(int(math.ceil(f * n - 1e-9)))
      hi.append(int(math.floor(c * n + 1e-9)))
    needs = selection.clipped_threshold(keys, weights, need, np.array(lo), np.array(hi))
    return _per_layer(layers, [needs[i] for i in range(len(layers))], method, keys)
  raise TypeError(f"unknown allocation {alloc!r}")


def _per_layer(layers, needs, method, keys=None) -> list[jax.Array]:
  out = []
  for i, (l, need) in enumerate(zip(layers, needs)):
    k = keys[i] if keys is not None else selection.sortable_key(l.scores)
    out.append(selection.select_lowest([k], [l.sizes], need, method)[0])
  return out
