"""One generic aggregation of client outputs, shared by every executor.

A client returns a ``ClientOutput`` whose ``update`` is any pytree of arrays (``{'delta': ...,
'step_mean': ...}``). Executors feed ``[C]``-stacked outputs of a chunk (or of a whole cohort, or
of one client) to ``accumulate`` and call ``finalize`` once at the end; the per-key reduction is
chosen by the algorithm:

* ``WeightedMean`` (default): ``sum_c w_c x_c / sum_c w_c``, a running sum (memory: one copy).
* ``TrimmedMean(trim)``: coordinate-wise trimmed mean (Yin et al., 2018) over the clients that
  succeeded, unweighted: the ``trim`` largest and ``trim`` smallest values of every coordinate
  are dropped. Exact and streaming: the state keeps the running sum plus the ``trim`` largest and
  smallest values seen so far (memory ``1 + 2 * trim`` copies, independent of the cohort).

Reducers are pairs of pure functions in the optax spirit: ``init(like)``, ``add(state, values,
weights)`` (values ``[C, ...]``, weights float32[C], 0 for padding or failed clients),
``merge(a, b)`` and ``result(state, weight_sum)``.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from fedprune_jax.federated import multihost

PyTree = Any


class WeightedMean(NamedTuple):
  """``sum_c w_c x_c / sum_c w_c`` (zero when no client had any weight)."""

  def init(self, like: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), like)

  def add(self, state: PyTree, values: PyTree, weights: jax.Array) -> PyTree:
    return jax.tree.map(
      lambda s, v: s + jnp.tensordot(weights.astype(v.dtype), v, axes=1), state, values
    )

  def merge(self, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)

  def result(self, state: PyTree, weight_sum: jax.Array) -> PyTree:
    denom = jnp.maximum(weight_sum, 1e-12)
    return jax.tree.map(lambda s: s / denom.astype(s.dtype), state)


class TrimmedMean(NamedTuple):
  """Coordinate-wise mean after dropping the ``trim`` largest and smallest client values.

  Unweighted over the clients with weight > 0. With ``2 * trim`` or fewer such clients nothing
  can be trimmed and the plain mean is returned.
  """

  trim: int

  def init(self, like: PyTree) -> dict:
    k = self.trim

    def one(x, fill):
      return jnp.full((k,) + tuple(x.shape), fill, x.dtype)

    return {
      "sum": jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), like),
      "count": jnp.zeros((), jnp.float32),
      "top": jax.tree.map(lambda x: one(x, -jnp.inf), like),
      "bottom": jax.tree.map(lambda x: one(x, jnp.inf), like),
    }

  def _keep_extremes(self, held: jax.Array, new: jax.Array, largest: bool) -> jax.Array:
    """The ``trim`` largest (or smallest) of ``held [k, ...]`` and ``new [n, ...]`` per entry."""
    both = jnp.concatenate([held, new], axis=0)
    flat = both.reshape(both.shape[0], -1).T  # [entries, k + n]
    top = jax.lax.top_k(flat if largest else -flat, self.trim)[0]
    return (top if largest else -top).T.reshape(held.shape)

  def add(self, state: dict, values: PyTree, weights: jax.Array) -> dict:
    live = weights > 0

    def masked(v, fill):
      return jnp.where(live.reshape((-1,) + (1,) * (v.ndim - 1)), v, fill)

    return {
      "sum": jax.tree.map(lambda s, v: s + jnp.sum(masked(v, 0), axis=0), state["sum"], values),
      "count": state["count"] + jnp.sum(live.astype(jnp.float32)),
      "top": jax.tree.map(
        lambda t, v: self._keep_extremes(t, masked(v, -jnp.inf), True), state["top"], values
      ),
      "bottom": jax.tree.map(
        lambda b, v: self._keep_extremes(b, masked(v, jnp.inf), False), state["bottom"], values
      ),
    }

  def merge(self, a: dict, b: dict) -> dict:
    return {
      "sum": jax.tree.map(jnp.add, a["sum"], b["sum"]),
      "count": a["count"] + b["count"],
      "top": jax.tree.map(lambda x, y: self._keep_extremes(x, y, True), a["top"], b["top"]),
      "bottom": jax.tree.map(
        lambda x, y: self._keep_extremes(x, y, False), a["bottom"], b["bottom"]
      ),
    }

  def result(self, state: dict, weight_sum: jax.Array) -> PyTree:
    del weight_sum  # unweighted
    n = state["count"]
    can_trim = n > 2 * self.trim

    def one(s, t, b):
      trimmed = (s - t.sum(0) - b.sum(0)) / jnp.maximum(n - 2 * self.trim, 1.0)
      return jnp.where(can_trim, trimmed, s / jnp.maximum(n, 1.0))

    finite = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)  # noqa: E731  (unfilled slots)
    return jax.tree.map(
      lambda s, t, b: one(s, finite(t), finite(b)), state["sum"], state["top"], state["bottom"]
    )


Reducer = WeightedMean | TrimmedMean


class Accumulator(NamedTuple):
  """Running reductions over the clients seen so far.

  Attributes:
    update: per top-level key of the clients' ``update`` dict, that key's reducer state.
    weight_sum: sum_c w_c.
    loss_sum: sum_c w_c * loss_c.
    num_clients: real (non-padding) clients that succeeded.
    num_examples: sum of those clients' example counts.
    num_failed: real clients whose ``metrics['failed']`` was 1 (they contribute nothing).
    metric_sums: per client metric other than ``loss``, its sum over the real clients (e.g.
      ``num_steps``, and the fault counts ``dropped``, ``straggler``, ``corrupt``, ``clipped``).
  """

  update: dict
  weight_sum: jax.Array
  loss_sum: jax.Array
  num_clients: jax.Array
  num_examples: jax.Array
  num_failed: jax.Array
  metric_sums: dict


class Aggregate(NamedTuple):
  """What the server update receives (device arrays).

  Attributes:
    update: the reduced client updates, ``{key: pytree}``.
    weight_sum: float32 scalar; 0 when no client succeeded (the server must then keep its state).
    num_clients: float32 scalar, clients that succeeded.
    num_examples: float32 scalar.
  """

  update: dict
  weight_sum: jax.Array
  num_clients: jax.Array
  num_examples: jax.Array


def _reducer(reducers: Mapping[str, Reducer], key: str) -> Reducer:
  return reducers.get(key, WeightedMean())


def zero_accumulator(
  update_like: Mapping[str, PyTree],
  reducers: Mapping[str, Reducer],
  metric_names: tuple[str, ...] = (),
):
  """The empty accumulator for client outputs shaped like ``update_like`` (no client axis) with
  per-client metrics ``metric_names``."""
  z = jnp.zeros((), jnp.float32)
  update = {k: _reducer(reducers, k).init(v) for k, v in update_like.items()}
  sums = {k: z for k in metric_names if k != "loss"}
  return Accumulator(update, z, z, z, z, z, sums)


class Contributions(NamedTuple):
  """Per-client terms of the aggregate, each float32[C].

  Attributes:
    weight: aggregation weight (0 for padding, failed and dropped-out clients).
    succeeded: 1 for real clients that succeeded.
    failed: 1 for real clients that failed (``metrics['failed']``).
  """

  weight: jax.Array
  succeeded: jax.Array
  failed: jax.Array


def contributions(out, valid: jax.Array, weighting: str = "num_examples") -> Contributions:
  """What each of ``[C]`` clients counts for (``out``: stacked ClientOutput, valid: float32[C]).

  A failed client's update and loss are already 0 (clients must zero them: ``0 * nan`` is nan),
  so giving it weight 0 removes it from every sum.
  """
  failed = valid * out.metrics["failed"]
  succeeded = valid - failed - valid * out.metrics.get("dropped", 0.0)
  if weighting == "num_examples":
    weight = out.num_examples * succeeded
  elif weighting == "uniform":
    weight = succeeded
  else:
    raise ValueError(f"weighting must be 'num_examples' or 'uniform', got {weighting!r}")
  return Contributions(weight=weight, succeeded=succeeded, failed=failed)


def accumulate(
  acc: Accumulator,
  out,
  valid: jax.Array,
  reducers: Mapping[str, Reducer],
  weighting: str = "num_examples",
) -> Accumulator:
  """Adds a ``[C]``-stacked ClientOutput to ``acc`` (valid: float32[C], 0 for padding)."""
  c = contributions(out, valid, weighting)
  update = {k: _reducer(reducers, k).add(acc.update[k], v, c.weight) for k, v in out.update.items()}
  return Accumulator(
    update=update,
    weight_sum=acc.weight_sum + c.weight.sum(),
    loss_sum=acc.loss_sum + jnp.sum(c.weight * out.metrics["loss"]),
    num_clients=acc.num_clients + c.succeeded.sum(),
    num_examples=acc.num_examples + jnp.sum(c.succeeded * out.num_examples),
    num_failed=acc.num_failed + c.failed.sum(),
    metric_sums={k: v + jnp.sum(valid * out.metrics[k]) for k, v in acc.metric_sums.items()},
  )


def merge(a: Accumulator, b: Accumulator, reducers: Mapping[str, Reducer]) -> Accumulator:
  """Two accumulators over disjoint client sets as one."""
  update = {k: _reducer(reducers, k).merge(a.update[k], b.update[k]) for k in a.update}
  sums = {k: a.metric_sums[k] + b.metric_sums[k] for k in a.metric_sums}
  return Accumulator(update, *(x + y for x, y in zip(a[1:6], b[1:6])), sums)


def finalize(
  acc: Accumulator, reducers: Mapping[str, Reducer]
) -> tuple[Aggregate, dict[str, float]]:
  """The aggregate for the server and host metrics, from the final accumulator."""
  acc = multihost.fetch(acc)
  update = {k: _reducer(reducers, k).result(v, acc.weight_sum) for k, v in acc.update.items()}
  weight_sum = float(acc.weight_sum)
  metrics = {
    "train_loss": float(acc.loss_sum / max(weight_sum, 1e-12)),
    "num_clients": float(acc.num_clients),
    "num_examples": float(acc.num_examples),
    "num_failed_clients": float(acc.num_failed),
    "weight_sum": weight_sum,
    **{f"sum_{k}": float(v) for k, v in acc.metric_sums.items()},
  }
  return Aggregate(update, acc.weight_sum, acc.num_clients, acc.num_examples), metrics
