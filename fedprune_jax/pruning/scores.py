"""Importance scores: pytrees of elementwise scores (higher = more important).

Every function maps params-shaped pytrees to a scores pytree with the same
structure; ``None`` leaves stay ``None``.  Group-level aggregation (L1 / L2 /
mean over a row, column or block) happens in ``patterns.group_scores`` via the
``reduce`` argument of ``allocation.prune_mask``: e.g. column L2 magnitude is
``prune_mask(magnitude(params), s, pattern="column", reduce="l2")``.

Score kinds:

* ``magnitude``: |w| (``reduce="sum"`` -> group L1, ``"l2"`` -> group L2).
* ``random_scores``: uniform [0, 1) from an explicit key (one draw split
  over the leaves in flatten order; reproducible).
* ``saliency``: |w * g| (first-order Taylor estimate of the loss change when
  w is removed, from a gradient ``g``).
* ``taylor``: |w * delta| where ``delta`` is an accumulated update
  (w_after - w_before, e.g. a client's model delta).  Same ranking as
  saliency when delta ~ -lr * g.
* ``movement``: w * delta (signed): large when training pushes w away from
  zero, negative when it pulls w toward zero (movement pruning).
* client-supplied: any pytree of scores the caller builds; ``aggregate_scores``
  combines many (e.g. one per client) into their weighted mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _map(fn, *trees):
  return jax.tree.map(
    lambda x, *r: None if x is None else fn(x, *r), *trees, is_leaf=lambda x: x is None
  )


def magnitude(params: PyTree) -> PyTree:
  """|w| per entry."""
  return _map(jnp.abs, params)


def random_scores(params: PyTree, key: jax.Array) -> PyTree:
  """Uniform [0, 1) scores from one draw of ``key`` split over the leaves.

  One ``jax.random.uniform`` call of the total size (flatten order), so the
  result depends only on ``key`` and the params' structure and shapes, and
  compiles once instead of once per leaf.
  """
  leaves, treedef = jax.tree.flatten(params, is_leaf=lambda x: x is None)
  sizes = [0 if x is None else int(np.prod(jnp.shape(x))) for x in leaves]
  flat = jax.random.uniform(key, (max(sum(sizes), 1),), jnp.float32)
  out, o = [], 0
  for x, n in zip(leaves, sizes):
    out.append(None if x is None else flat[o : o + n].reshape(jnp.shape(x)))
    o += n
  return jax.tree.unflatten(treedef, out)


def saliency(params: PyTree, grads: PyTree) -> PyTree:
  """|w * g| per entry."""
  return _map(lambda w, g: jnp.abs(w * g), params, grads)


def taylor(params: PyTree, delta: PyTree) -> PyTree:
  """|w * delta| per entry (delta = accumulated update, after - before)."""
  return _map(lambda w, d: jnp.abs(w * d), params, delta)


def movement(params: PyTree, delta: PyTree) -> PyTree:
  """w * delta per entry (signed; > 0 when w moves away from zero)."""
  return _map(lambda w, d: w * d, params, delta)


def aggregate_scores(
  scores: Sequence[PyTree] | PyTree,
  weights: Sequence[float] | jax.Array | None = None,
  stacked: bool | None = None,
) -> PyTree:
  """Weighted mean of score pytrees.

  Args:
    scores: a list of score pytrees (one per client), or one pytree whose
      leaves carry a leading client axis [C, ...] (``stacked=True``; inferred
      when ``scores`` is not a list/tuple).
    weights: float [C] client weights (e.g. example counts); None = equal.
      Weights are normalised by their sum; all-zero weights give zeros.
  Returns:
    a score pytree without the client axis.
  """
  if stacked is None:
    stacked = not isinstance(scores, (list, tuple))
  if not stacked:
    if len(scores) == 0:
      raise ValueError("aggregate_scores: empty list of scores")
    scores = jax.tree.map(
      lambda *xs: None if xs[0] is None else jnp.stack(xs), *scores, is_leaf=lambda x: x is None
    )
  leaves = [x for x in jax.tree.leaves(scores)]
  if not leaves:
    return scores
  c = leaves[0].shape[0]
  w = jnp.ones((c,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  if w.shape != (c,):
    raise ValueError(f"aggregate_scores: weights shape {w.shape} != ({c},) clients")
  w = w / jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)
  return _map(lambda x: jnp.tensordot(w, x.astype(jnp.float32), axes=1), scores)
