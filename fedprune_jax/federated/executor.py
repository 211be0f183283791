"""Cohort executors: run the client update for a cohort, return the mean delta.

Three interchangeable executors, all returning ``(mean_delta, metrics)`` for
``(params, store, client_ids, round_key, mask)``:

* ``ChunkedExecutor`` (the engine): clients are grouped by shape bucket and
  cut into chunks of C; a jitted chunk step vmaps the client update over the
  chunk and adds the weighted delta sum to a params-sized carry. The host
  feeds one chunk at a time (at most two in flight), so peak memory does not
  grow with the cohort. The last chunk is filled with padding clients of
  weight 0. With a ``mesh`` the chunk's client axis is sharded over the mesh
  axis ``clients`` (jit + NamedSharding; XLA inserts the cross-device sum), and
  in a multi-process run each process feeds only its own rows.
* ``DrjaxExecutor``: the whole cohort of a bucket at once with DrJAX
  primitives (``broadcast`` / ``map_fn`` / ``reduce_sum``); memory grows with
  the cohort.
* ``SequentialExecutor``: a Python loop over a per-client jitted update; the
  reference the others are tested against.

Client keys are ``fold_in(round_key, client_id)`` with ``round_key =
fold_in(seed_key, round)``: independent of cohort order, chunking and
devices. Client weights are the example counts (``weighting='num_examples'``)
or 1 (``'uniform'``).
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, NamedTuple

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import numpy as np

from fedprune_jax.federated import multihost
from fedprune_jax.federated.client import ClientOutput
from fedprune_jax.federated.client_data import ClientStore
from fedprune_jax.federated.server import weighted_mean_delta

PyTree = Any
ClientUpdate = Callable[..., ClientOutput]


class Accumulator(NamedTuple):
  """Running sums over the clients seen so far (a params-sized pytree).

  Attributes:
    delta_sum: sum_c w_c * delta_c.
    weight_sum: sum_c w_c.
    loss_sum: sum_c w_c * loss_c.
    num_clients: number of real (non-padding) clients that succeeded.
    num_examples: sum of those clients' example counts.
    num_failed: real clients dropped because their loss or delta was not
      finite (they contribute nothing; the round goes on without them).
  """

  delta_sum: PyTree
  weight_sum: jax.Array
  loss_sum: jax.Array
  num_clients: jax.Array
  num_examples: jax.Array
  num_failed: jax.Array


def zero_accumulator(params: PyTree) -> Accumulator:
  z = jnp.zeros((), jnp.float32)
  return Accumulator(jax.tree_util.tree_map(jnp.zeros_like, params), z, z, z, z, z)


def _weights(out: ClientOutput, valid: jax.Array, weighting: str) -> jax.Array:
  if weighting == "num_examples":
    w = out.num_examples
  elif weighting == "uniform":
    w = jnp.ones_like(out.num_examples)
  else:
    raise ValueError(f"weighting must be 'num_examples' or 'uniform', got {weighting!r}")
  return w * valid


class Contributions(NamedTuple):
  """Per-client terms of the aggregate, each float32[C].

  Attributes:
    weight: aggregation weight (0 for padding and failed clients).
    succeeded: 1 for real clients that succeeded.
    failed: 1 for real clients that failed (``metrics['failed']``).
  """

  weight: jax.Array
  succeeded: jax.Array
  failed: jax.Array


def contributions(
  out: ClientOutput, valid: jax.Array, weighting: str = "num_examples"
) -> Contributions:
  """What each of ``[C]`` clients counts for (valid: float32[C]).

  A failed client's delta and loss are already 0 (client.py), so giving it
  weight 0 removes it from every sum.
  """
  failed = valid * out.metrics["failed"]
  succeeded = valid - failed
  return Contributions(
    weight=_weights(out, succeeded, weighting), succeeded=succeeded, failed=failed
  )


def accumulate(
  acc: Accumulator, out: ClientOutput, valid: jax.Array, weighting: str = "num_examples"
) -> Accumulator:
  """Adds a ``[C]``-stacked ClientOutput to ``acc`` (valid: float32[C])."""
  c = contributions(out, valid, weighting)
  delta_sum = jax.tree_util.tree_map(
    lambda s, d: s + jnp.tensordot(c.weight.astype(d.dtype), d, axes=1), acc.delta_sum, out.delta
  )
  return Accumulator(
    delta_sum=delta_sum,
    weight_sum=acc.weight_sum + c.weight.sum(),
    loss_sum=acc.loss_sum + jnp.sum(c.weight * out.metrics["loss"]),
    num_clients=acc.num_clients + c.succeeded.sum(),
    num_examples=acc.num_examples + jnp.sum(c.succeeded * out.num_examples),
    num_failed=acc.num_failed + c.failed.sum(),
  )


def finalize(acc: Accumulator) -> tuple[PyTree, dict[str, float]]:
  """Mean delta and host metrics from the final accumulator."""
  acc = multihost.fetch(acc)
  mean = weighted_mean_delta(acc.delta_sum, acc.weight_sum)
  return mean, {
    "train_loss": float(acc.loss_sum / max(float(acc.weight_sum), 1e-12)),
    "num_clients": float(acc.num_clients),
    "num_examples": float(acc.num_examples),
    "num_failed_clients": float(acc.num_failed),
    "weight_sum": float(acc.weight_sum),
  }


def plan_chunks(
  bucket_of: np.ndarray, client_ids: np.ndarray, chunk_size: int
) -> list[tuple[int, np.ndarray]]:
  """Cuts a cohort into same-bucket chunks of exactly ``chunk_size`` ids.

  Args:
    bucket_of: int[n] bucket of each cohort client.
    client_ids: int[n] the cohort.
    chunk_size: C.

  Returns:
    [(bucket, int64[C] ids)], buckets ascending, cohort order kept within a
    bucket; the last chunk of a bucket is filled with -1 (padding clients).
  """
  client_ids = np.asarray(client_ids, np.int64)
  bucket_of = np.asarray(bucket_of, np.int64)
  plan = []
  for b in np.unique(bucket_of):
    ids = client_ids[bucket_of == b]
    for i in range(0, len(ids), chunk_size):
      chunk = np.full(chunk_size, -1, np.int64)
      part = ids[i : i + chunk_size]
      chunk[: len(part)] = part
      plan.append((int(b), chunk))
  return plan


def _client_keys(round_key: jax.Array, ids: jax.Array) -> jax.Array:
  return jax.vmap(lambda c: jax.random.fold_in(round_key, c))(jnp.maximum(ids, 0))


class ChunkedExecutor:
  """vmap over chunks of C clients, a host loop over chunks, optional mesh."""

  def __init__(
    self,
    client_update: ClientUpdate,
    chunk_size: int,
    mesh: jax.sharding.Mesh | None = None,
    weighting: str = "num_examples",
    max_in_flight: int = 2,
    device_loop: bool = False,
    vmap_size: int | None = None,
  ):
    """Args:
    client_update: from ``client.make_client_update``.
    chunk_size: C clients per vmapped step (a multiple of the mesh size).
    mesh: optional 1-D mesh with axis ``clients`` (``multihost``).
    weighting: ``num_examples`` or ``uniform``.
    max_in_flight: chunks dispatched ahead of the device (host memory bound).
    device_loop: instead of the host loop, stack all chunks of a bucket and
      ``lax.scan`` over them in one jitted call (less dispatch overhead for
      small models; host memory then grows with the cohort; single process).
    vmap_size: clients vectorised together inside a chunk (default: all C).
      Smaller values run the chunk as ``lax.map(..., batch_size=vmap_size)``
      (a scan over groups of vmapped clients): vmap over per-client weights
      turns convolutions into grouped convolutions, which XLA:CPU runs
      slower than a sequence of plain ones; 1 = one client at a time, still
      one dispatch per chunk and on-device accumulation. Meant for one
      device: with a mesh, keep the default (the scan would run over the
      sharded client axis).
    """
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if mesh is not None and chunk_size % mesh.devices.size:
      raise ValueError(
        f"chunk_size {chunk_size} must be a multiple of the number of devices {mesh.devices.size}"
      )
    self.client_update = client_update
    self.chunk_size = chunk_size
    self.mesh = mesh
    self.weighting = weighting
    self.max_in_flight = max_in_flight

    if vmap_size is not None and not 1 <= vmap_size <= chunk_size:
      raise ValueError(f"vmap_size must be in [1, chunk_size={chunk_size}], got {vmap_size}")
    self.vmap_size = vmap_size

    def chunk_step(acc, params, mask, data, ids, round_key):
      keys = _client_keys(round_key, ids)
      if vmap_size is None or vmap_size == chunk_size:
        out = jax.vmap(client_update, in_axes=(None, 0, 0, None))(params, data, keys, mask)
      else:
        out = jax.lax.map(
          lambda x: client_update(params, x[0], x[1], mask), (data, keys), batch_size=vmap_size
        )
      return accumulate(acc, out, (ids >= 0).astype(jnp.float32), weighting)

    self._chunk_step = jax.jit(chunk_step)
    self.device_loop = device_loop

    def scan_chunks(acc, params, mask, data, ids, round_key):
      body = lambda a, x: (chunk_step(a, params, mask, x[0], x[1], round_key), None)
      return jax.lax.scan(body, acc, (data, ids))[0]

    self._scan_chunks = jax.jit(scan_chunks)

  def _rows(self) -> slice:
    if self.mesh is None or jax.process_count() == 1:
      return slice(0, self.chunk_size)
    return multihost.local_rows(self.mesh, self.chunk_size)

  def __call__(
    self,
    params: PyTree,
    store: ClientStore,
    client_ids: np.ndarray,
    round_key: jax.Array,
    mask: PyTree | None = None,
  ) -> tuple[PyTree, dict[str, float]]:
    """Runs the cohort; returns (mean delta, metrics dict)."""
    client_ids = np.asarray(client_ids, np.int64)
    plan = plan_chunks(store.bucket_of(client_ids), client_ids, self.chunk_size)
    acc = zero_accumulator(params)
    if self.mesh is not None:
      params, mask, acc, round_key = multihost.put_replicated(
        (params, mask, acc, round_key), self.mesh
      )
    if self.device_loop:
      return self._run_device_loop(params, store, plan, round_key, mask, acc)
    rows = self._rows()
    in_flight = collections.deque()
    for _, ids in plan:
      local_ids = ids[rows]
      if np.all(local_ids < 0):
        # every row of this process is padding: feed a zero-weight copy of a
        # real client so the store can still resolve the bucket
        local_data = store.get(ids)
        local_data = {k: v[rows] for k, v in local_data.items()}
      else:
        local_data = store.get(local_ids)
      if self.mesh is not None:
        data, ids_dev = multihost.put_client_sharded(
          (local_data, local_ids), self.mesh, self.chunk_size
        )
      else:
        data, ids_dev = local_data, ids
      acc = self._chunk_step(acc, params, mask, data, ids_dev, round_key)
      # bound the host->device queue: wait for chunk i-1 once i is queued
      in_flight.append(acc.weight_sum)
      if len(in_flight) >= self.max_in_flight:
        in_flight.popleft().block_until_ready()
    return finalize(acc)

  def _run_device_loop(self, params, store, plan, round_key, mask, acc):
    if jax.process_count() > 1:
      raise ValueError("device_loop=True supports a single process only")
    for b in sorted({b for b, _ in plan}):
      ids = np.stack([c for bb, c in plan if bb == b])  # [n_chunks, C]
      chunks = [store.get(c) for c in ids]
      data = {k: np.stack([c[k] for c in chunks]) for k in chunks[0]}
      if self.mesh is not None:
        sharding = jax.sharding.NamedSharding(
          self.mesh, jax.sharding.PartitionSpec(None, multihost.CLIENTS)
        )
        data, ids = jax.device_put((data, ids), sharding)
      acc = self._scan_chunks(acc, params, mask, data, ids, round_key)
    return finalize(acc)


class SequentialExecutor:
  """Reference: one jitted client update per client, summed in cohort order."""

  def __init__(self, client_update: ClientUpdate, weighting: str = "num_examples"):
    self.weighting = weighting
    self.update = jax.jit(client_update)

    def add(acc, out, cid):
      one = lambda x: jnp.asarray(x)[None]
      return accumulate(
        acc, jax.tree_util.tree_map(one, out), jnp.ones((1,), jnp.float32), weighting
      )

    self._add = jax.jit(add)

  def __call__(self, params, store, client_ids, round_key, mask=None):
    acc = zero_accumulator(params)
    for cid in np.asarray(client_ids, np.int64):
      data = {k: v[0] for k, v in store.get(np.array([cid])).items()}
      out = self.update(params, data, jax.random.fold_in(round_key, cid), mask)
      acc = self._add(acc, out, cid)
    return finalize(acc)


class DrjaxExecutor:
  """Whole-cohort ``drjax.map_fn`` per bucket (memory grows with the cohort)."""

  def __init__(self, client_update: ClientUpdate, weighting: str = "num_examples"):
    self.client_update = client_update
    self.weighting = weighting
    self._cache = {}

  def _program(self, n: int):
    if n in self._cache:
      return self._cache[n]
    import drjax  # pylint: disable=g-import-not-at-top

    update, weighting = self.client_update, self.weighting

    @jax.jit
    @drjax.program(placements={"clients": n})
    def run(params, mask, data, ids, round_key):
      placed = drjax.broadcast(params)
      keys = drjax.map_fn(lambda i: jax.random.fold_in(round_key, i), ids)
      out = drjax.map_fn(lambda p, d, k: update(p, d, k, mask), (placed, data, keys))
      c = contributions(out, jnp.ones_like(out.num_examples), weighting)
      weighted = drjax.map_fn(
        lambda d, wi: jax.tree_util.tree_map(lambda x: x * wi, d), (out.delta, c.weight)
      )
      return Accumulator(
        delta_sum=drjax.reduce_sum(weighted),
        weight_sum=drjax.reduce_sum(c.weight),
        loss_sum=drjax.reduce_sum(c.weight * out.metrics["loss"]),
        num_clients=drjax.reduce_sum(c.succeeded),
        num_examples=drjax.reduce_sum(c.succeeded * out.num_examples),
        num_failed=drjax.reduce_sum(c.failed),
      )

    self._cache[n] = run
    return run

  def __call__(self, params, store, client_ids, round_key, mask=None):
    client_ids = np.asarray(client_ids, np.int64)
    bucket_of = store.bucket_of(client_ids)
    total = None
    for b in np.unique(bucket_of):
      ids = client_ids[bucket_of == b]
      # DrJAX logs a warning per primitive when no 'clients' mesh is set
      verbosity = absl_logging.get_verbosity()
      absl_logging.set_verbosity(absl_logging.ERROR)
      try:
        acc = self._program(len(ids))(params, mask, store.get(ids), ids, round_key)
      finally:
        absl_logging.set_verbosity(verbosity)
      total = acc if total is None else jax.tree_util.tree_map(jnp.add, total, acc)
    return finalize(total)


def timed(executor, *args, **kwargs):
  """Runs an executor; returns (mean_delta, metrics with 'seconds')."""
  t0 = time.perf_counter()
  mean, metrics = executor(*args, **kwargs)
  jax.block_until_ready(mean)
  metrics = dict(metrics, seconds=time.perf_counter() - t0)
  return mean, metrics
