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
* client-supplied: any pytree of scores the caller builds (federated pruning aggregates
  clients' scores with the executor's reducers, ``federated/aggregation.py``).
"""

from __future__ import annotations

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
