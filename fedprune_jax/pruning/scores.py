"""Importance scores: pytrees of elementwise scores (higher = more important), and the ``Score``
units federated pruning selects by name (``pruning.score``).

Every function maps params-shaped pytrees to a scores pytree with the same structure; ``None``
leaves stay ``None``. Group-level aggregation (L1 / L2 / mean over a row, column or block) happens
in ``patterns.group_scores`` via the ``reduce`` argument of ``allocation.prune_mask``: e.g. column
L2 magnitude is ``prune_mask(magnitude(params), s, pattern="column", reduce="l2")``.

Elementwise functions:

* ``magnitude``: |w| (``reduce="sum"`` -> group L1, ``"l2"`` -> group L2).
* ``random_scores``: uniform [0, 1) from an explicit key (one draw split over the leaves in
  flatten order; reproducible).
* ``saliency``: |w * g| (first-order Taylor estimate of the loss change when w is removed, from a
  gradient ``g``).
* ``movement``: -w * g (signed; Sanh et al.'s movement score of one step: > 0 when the gradient
  step moves w away from zero).

A ``Score`` (one object per selectable score, ``REGISTRY`` by name) says how its scores are made,
as pure functions (optax-style):

* a *server* score computes ``server(params, key)`` from the server's dense params;
* a *client-data* score says what a client accumulates over its live local steps (``per_step``:
  ``(params_t, grads_t) -> term``, the client keeps the mean of the terms; ``params_t`` is the
  client's current reduced model, ``grads_t`` the gradient before masking), what it uploads at the
  end (``upload(step_mean, params_start, delta)``, ``delta = params_start - params_end``), and how
  the server turns the aggregate of the uploads into scores (``finish(params, aggregate)``, with
  the server's dense params; also applied by a client to its own upload, at its own params, when
  clients vote).

The registered scores:

========  =================================  ==========================  ==========================
name      client accumulates (mean/step)     client uploads              server scores
========  =================================  ==========================  ==========================
magnitude --                                 --                          |w|
random    --                                 --                          uniform [0, 1)
saliency  |g_t|                              mean |g_t|                  |w| * agg (dense w: can
                                                                         revive pruned weights)
update    --                                 |delta|                     agg
taylor    |w_t * g_t|                        mean |w_t g_t|              agg
movement  -w_t * g_t                         mean (-w_t g_t)             agg - min(agg) (order kept)
========  =================================  ==========================  ==========================

``taylor``, ``update`` and ``movement`` are zero at pruned coordinates (the client's weight there
is zero): they prune but cannot revive. ``movement`` is signed; the server shifts it by its
minimum (one constant over the whole tree, so every ranking is unchanged) so that kept weights
score above the zero a pruned weight gets in the pruning phase. Its per-step mean is Sanh et al.'s
``S = -sum_t w_t dL/dw_t`` divided by the client's live steps (independent of the local optimizer
and learning rate, unlike ``-w_start * delta``).

``update`` depends on the local optimizer: under a fresh Adam per round (the default clients),
each step moves an entry by about ``lr`` whatever its gradient's size, so ``|delta|`` measures
how consistent the gradient's sign was over the local steps, not how large the weight or the
gradient is. Measured on the paper's small setting (6 Adam steps, lr 2e-3, 4 clients from its
warm start; ``experiments/t2_update_probe.py``): Spearman 0.02 with ``|w|`` and -0.10 with the
mean ``|g|``, and its top 30 % overlaps magnitude's at chance (0.31); T2's ``update`` masks overlap
magnitude's as random's do (0.30). It measures the size of a change with SGD clients only.

To add a score: write its functions, one ``Score(...)`` line in ``REGISTRY``, and its name in
``fields.SERVER_SCORES`` or ``fields.CLIENT_SCORES`` (the config's allowed values;
``tests/test_scores.py`` checks the two agree). A client score whose ``finish`` is not entry by
entry, >= 0 and 0 at a pruned entry says ``zero_at_pruned=False`` (its votes are then taken on
the masked-dense model only; ``tests/test_scores.py`` checks the flag).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedprune_jax.errors import ConfigError

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
  """|w * g| per entry (equal, bit for bit, to |w| * |g|)."""
  return _map(lambda w, g: jnp.abs(w * g), params, grads)


def movement(params: PyTree, grads: PyTree) -> PyTree:
  """-w * g per entry (signed; > 0 when a gradient step moves w away from zero)."""
  return _map(lambda w, g: -(w * g), params, grads)


def shift_to_nonnegative(scores: PyTree) -> PyTree:
  """``scores - min(scores)`` (one minimum over every leaf), plus the smallest normal float so
  that the minimum itself stays > 0: the order within and across leaves is unchanged."""
  leaves = [x for x in jax.tree.leaves(scores) if x is not None]
  low = jnp.min(jnp.stack([jnp.min(x) for x in leaves]))
  return _map(lambda s: (s - low) + jnp.finfo(s.dtype).tiny, scores)


# --- the pluggable units -------------------------------------------------------------------------


def _abs_grad(params: PyTree, grads: PyTree) -> PyTree:
  del params
  return magnitude(grads)


def _step_mean(step_mean: PyTree, params_start: PyTree, delta: PyTree) -> PyTree:
  del params_start, delta
  return step_mean


def _abs_delta(step_mean: PyTree, params_start: PyTree, delta: PyTree) -> PyTree:
  del step_mean, params_start
  return magnitude(delta)


def _aggregate(params: PyTree, aggregate: PyTree) -> PyTree:
  del params
  return aggregate


def _shifted_aggregate(params: PyTree, aggregate: PyTree) -> PyTree:
  del params
  return shift_to_nonnegative(aggregate)


def _magnitude_server(params: PyTree, key: jax.Array) -> PyTree:
  del key
  return magnitude(params)


@dataclasses.dataclass(frozen=True)
class Score:
  """One importance score (frozen and hashable: its identity names the client programs that
  compute it, so module-level functions only).

  Attributes:
    name: its ``pruning.score`` name.
    server: ``(params, key) -> scores`` for a server score, else None.
    per_step: ``(params_t, grads_t) -> term``: what a client accumulates (the mean over its live
      local steps) for a client-data score, or None (nothing accumulated).
    upload: ``(step_mean, params_start, delta) -> upload`` (``step_mean`` None without
      ``per_step``): what a client sends for a client-data score, or None (a server score).
    finish: ``(params, aggregate) -> scores``: the server's scores from the aggregated uploads.
    zero_at_pruned: ``finish`` is entry by entry, >= 0, and exactly 0 at an entry whose weight
      and upload are 0 (a pruned one: a client's weight there is 0 and frozen): a client's
      vote then never goes to a pruned entry, and a client training the compacted model votes as
      on the dense one (``mask_policy.local_vote``). False for ``movement`` (its ``finish``
      shifts by the whole tree's minimum, so a pruned entry's score depends on the others).
  """

  name: str
  server: Callable[[PyTree, jax.Array], PyTree] | None = None
  per_step: Callable[[PyTree, PyTree], PyTree] | None = None
  upload: Callable[[PyTree | None, PyTree, PyTree], PyTree] | None = None
  finish: Callable[[PyTree, PyTree], PyTree] = _aggregate
  zero_at_pruned: bool = True

  @property
  def from_clients(self) -> bool:
    """The score is computed from the clients' data."""
    return self.upload is not None


REGISTRY: dict[str, Score] = {
  s.name: s
  for s in (
    Score("magnitude", server=_magnitude_server),
    Score("random", server=random_scores),
    Score("saliency", per_step=_abs_grad, upload=_step_mean, finish=saliency),
    Score("update", upload=_abs_delta),
    Score("taylor", per_step=saliency, upload=_step_mean),
    Score(
      "movement",
      per_step=movement,
      upload=_step_mean,
      finish=_shifted_aggregate,
      zero_at_pruned=False,
    ),
  )
}


def get_score(name: str) -> Score:
  """The registered score ``name`` (a ``ConfigError`` naming ``pruning.score`` otherwise)."""
  if name not in REGISTRY:
    raise ConfigError(
      f"unknown config field pruning.score={name!r}; known: {', '.join(sorted(REGISTRY))}"
    )
  return REGISTRY[name]
