"""Cohort executors: run the client update for a cohort, return the aggregate.

Three interchangeable executors, all returning ``(Aggregate, metrics)`` for ``(client_input,
store, client_ids, round_key)``; ``client_input`` is what the algorithm broadcasts (params, or
params and mask, ...) and ``client_update(client_input, data, rng) -> ClientOutput`` the
algorithm's pure client function. Whatever pytree the clients return in ``update`` is reduced by
``aggregation`` (per key: weighted mean by default, or the algorithm's reducer), the same code in
every executor.

* ``ChunkedExecutor`` (the engine): clients are grouped by shape bucket and cut into chunks of
  C; a jitted chunk step vmaps the client update over the chunk and adds it to the accumulator.
  The host feeds one chunk at a time (at most two in flight), so peak memory does not grow with
  the cohort. The last chunk is filled with padding clients of weight 0. With a ``mesh`` the
  chunk's client axis is sharded over the mesh axis ``clients`` (jit + NamedSharding; XLA
  inserts the cross-device sum), and in a multi-process run each process feeds only its rows.
* ``DrjaxExecutor``: the whole cohort of a bucket at once with DrJAX primitives
  (``broadcast`` / ``map_fn``); memory grows with the cohort.
* ``SequentialExecutor``: a Python loop over a per-client jitted update; the reference the
  others are tested against.

Client keys are ``fold_in(round_key, client_id)`` with ``round_key = fold_in(seed_key, round)``:
independent of cohort order, chunking and devices. Client weights are the example counts
(``weighting='num_examples'``) or 1 (``'uniform'``).
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Mapping

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import numpy as np

from fedprune_jax.federated import aggregation as agg
from fedprune_jax.federated import multihost
from fedprune_jax.federated.client import ClientOutput
from fedprune_jax.federated.client_data import ClientStore

PyTree = Any
ClientUpdate = Callable[[PyTree, dict, jax.Array], ClientOutput]


class _UpdateShapes:
  """Shapes of one client's output (no client axis), traced once per input signature."""

  def __init__(self, client_update: ClientUpdate):
    self.client_update = client_update
    self._cache: dict = {}

  def __call__(self, client_input: PyTree, data: Mapping[str, np.ndarray]):
    """(update shapes, metric names) of one client's output."""
    one = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype), data)
    sig = (
      jax.tree.structure(client_input),
      tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(client_input)),
      jax.tree.structure(one),
      tuple((v.shape, v.dtype) for v in jax.tree.leaves(one)),
    )
    if sig not in self._cache:
      key = jax.random.key(0)
      out = jax.eval_shape(self.client_update, client_input, one, key)
      self._cache[sig] = (out.update, tuple(sorted(out.metrics)))
    return self._cache[sig]

  def zero_accumulator(self, client_input, data, reducers) -> agg.Accumulator:
    like, names = self(client_input, data)
    return agg.zero_accumulator(like, reducers, names)


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


class _Executor:
  """What every executor holds: the client update, the client weighting, the per-key reducers
  and the shapes of one client's output (for the zero accumulator)."""

  def __init__(
    self,
    client_update: ClientUpdate,
    weighting: str = "num_examples",
    reducers: Mapping[str, agg.Reducer] | None = None,
  ):
    self.client_update = client_update
    self.weighting = weighting
    self.reducers = dict(reducers or {})
    self._shapes = _UpdateShapes(client_update)
    self._setup()

  def _setup(self) -> None:
    """Builds what the executor's ``__call__`` uses (its jitted programs)."""

  def _accumulate(self, client_input: PyTree, groups, add) -> tuple[agg.Aggregate, dict]:
    """Folds ``acc = add(acc, data, ids)`` over ``groups`` of ``(ids, data)`` from the zero
    accumulator; returns the finalized aggregate."""
    acc = None
    for ids, data in groups:
      if acc is None:
        acc = self._shapes.zero_accumulator(client_input, data, self.reducers)
      acc = add(acc, data, ids)
    if acc is None:
      raise ValueError("empty cohort")
    return agg.finalize(acc, self.reducers)


class ChunkedExecutor(_Executor):
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
    reducers: Mapping[str, agg.Reducer] | None = None,
  ):
    """Args:
    client_update: ``(client_input, data, rng) -> ClientOutput``, pure.
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
    reducers: per key of the clients' ``update``, how it is aggregated (default: weighted mean).
    """
    if chunk_size < 1:
      raise ValueError(f"engine.chunk_size must be >= 1, got {chunk_size}")
    if mesh is not None and chunk_size % mesh.devices.size:
      raise ValueError(
        f"chunk_size {chunk_size} must be a multiple of the number of devices {mesh.devices.size}"
      )
    if vmap_size is not None and not 1 <= vmap_size <= chunk_size:
      raise ValueError(f"vmap_size must be in [1, chunk_size={chunk_size}], got {vmap_size}")
    super().__init__(client_update, weighting, reducers)
    self.chunk_size = chunk_size
    self.mesh = mesh
    self.max_in_flight = max_in_flight
    self.device_loop = device_loop
    reducers = self.reducers

    def chunk_step(acc, client_input, data, ids, round_key):
      keys = _client_keys(round_key, ids)
      if vmap_size is None or vmap_size == chunk_size:
        out = jax.vmap(client_update, in_axes=(None, 0, 0))(client_input, data, keys)
      else:
        out = jax.lax.map(
          lambda x: client_update(client_input, x[0], x[1]), (data, keys), batch_size=vmap_size
        )
      return agg.accumulate(acc, out, (ids >= 0).astype(jnp.float32), reducers, weighting)

    def scan_chunks(acc, client_input, data, ids, round_key):
      body = lambda a, x: (chunk_step(a, client_input, x[0], x[1], round_key), None)  # noqa: E731
      return jax.lax.scan(body, acc, (data, ids))[0]

    self._chunk_step = jax.jit(chunk_step)
    self._scan_chunks = jax.jit(scan_chunks)
    self._width = chunk_size if vmap_size is None else vmap_size
    self._memory: dict = {}
    self.last_costs: dict[str, float] = {}

  def _measure(self, args: tuple) -> None:
    """Sets ``last_costs`` from XLA's memory analysis of the chunk program these args run
    (compiled already by the call just made: ``lower().compile()`` is a cache hit)."""
    sig = tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(args[1:3]))
    if sig not in self._memory:
      try:
        stats = self._chunk_step.lower(*args).compile().memory_analysis()
      except Exception:  # pylint: disable=broad-except  (a backend without memory analysis)
        stats = None
      self._memory[sig] = stats
    stats = self._memory[sig]
    if stats is None:
      self.last_costs = {}
      return
    program = stats.argument_size_in_bytes + stats.output_size_in_bytes
    program += stats.temp_size_in_bytes - stats.alias_size_in_bytes
    received = sum(
      np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(args[1])
    )
    self.last_costs = {
      "client_program_memory_bytes": float(program),
      # one client's share of the program's temporaries (clients trained side by side) plus the
      # model it received
      "client_train_memory_bytes": float(stats.temp_size_in_bytes / self._width + received),
    }

  def _rows(self) -> slice:
    if self.mesh is None or jax.process_count() == 1:
      return slice(0, self.chunk_size)
    return multihost.local_rows(self.mesh, self.chunk_size)

  def __call__(
    self, client_input: PyTree, store: ClientStore, client_ids: np.ndarray, round_key: jax.Array
  ) -> tuple[agg.Aggregate, dict[str, float]]:
    """Runs the cohort; returns (aggregate, host metrics)."""
    client_ids = np.asarray(client_ids, np.int64)
    plan = plan_chunks(store.bucket_of(client_ids), client_ids, self.chunk_size)
    if not plan:
      raise ValueError("empty cohort")
    first = store.get(plan[0][1][:1])  # a real client
    acc = self._shapes.zero_accumulator(client_input, first, self.reducers)
    if self.mesh is not None:
      client_input, acc, round_key = multihost.put_replicated(
        (client_input, acc, round_key), self.mesh
      )
    else:
      # committed to one device whatever made them: jit keys its programs by the inputs'
      # placement, so a mask that is a jitted output in one run and a fresh array in another
      # would otherwise compile the same client program twice (make demo's two runs did)
      client_input, acc = jax.device_put((client_input, acc), jax.local_devices()[0])
    if self.device_loop:
      return self._run_device_loop(client_input, store, plan, round_key, acc)
    rows = self._rows()
    in_flight = collections.deque()
    for _, ids in plan:
      local_ids = ids[rows]
      if np.all(local_ids < 0):
        # every row of this process is padding: feed a zero-weight copy of a
        # real client so the store can still resolve the bucket
        local_data = jax.tree.map(lambda v: v[rows], store.get(ids))
      else:
        local_data = store.get(local_ids)
      if self.mesh is not None:
        data, ids_dev = multihost.put_client_sharded(
          (local_data, local_ids), self.mesh, self.chunk_size
        )
      else:
        data, ids_dev = local_data, ids
      args = (acc, client_input, data, ids_dev, round_key)
      acc = self._chunk_step(*args)
      self._measure(args)
      # bound the host->device queue: wait for chunk i-1 once i is queued
      in_flight.append(acc.weight_sum)
      if len(in_flight) >= self.max_in_flight:
        in_flight.popleft().block_until_ready()
    return agg.finalize(acc, self.reducers)

  def _run_device_loop(self, client_input, store, plan, round_key, acc):
    if jax.process_count() > 1:
      raise ValueError("device_loop=True supports a single process only")
    for b in sorted({b for b, _ in plan}):
      ids = np.stack([c for bb, c in plan if bb == b])  # [n_chunks, C]
      chunks = [store.get(c) for c in ids]
      data = jax.tree.map(lambda *c: np.stack(c), *chunks)
      if self.mesh is not None:
        sharding = jax.sharding.NamedSharding(
          self.mesh, jax.sharding.PartitionSpec(None, multihost.CLIENTS)
        )
        data, ids = jax.device_put((data, ids), sharding)
      acc = self._scan_chunks(acc, client_input, data, ids, round_key)
    return agg.finalize(acc, self.reducers)


class SequentialExecutor(_Executor):
  """Reference: one jitted client update per client, added in cohort order."""

  def _setup(self) -> None:
    self.update = jax.jit(self.client_update)
    reducers, weighting = self.reducers, self.weighting

    def add(acc, out):
      one = lambda x: jnp.asarray(x)[None]  # noqa: E731
      return agg.accumulate(
        acc, jax.tree.map(one, out), jnp.ones((1,), jnp.float32), reducers, weighting
      )

    self._add = jax.jit(add)

  def __call__(self, client_input, store, client_ids, round_key):
    def add(acc, data, cid):
      one = jax.tree.map(lambda v: v[0], data)
      return self._add(acc, self.update(client_input, one, jax.random.fold_in(round_key, cid)))

    ids = np.asarray(client_ids, np.int64)
    return self._accumulate(client_input, ((c, store.get(np.array([c]))) for c in ids), add)


class DrjaxExecutor(_Executor):
  """Whole-cohort ``drjax.map_fn`` per bucket (memory grows with the cohort)."""

  def _setup(self) -> None:
    self._cache = {}

  def _program(self, n: int):
    if n in self._cache:
      return self._cache[n]
    import drjax  # pylint: disable=g-import-not-at-top

    update, weighting, reducers = self.client_update, self.weighting, self.reducers

    @jax.jit
    @drjax.program(placements={"clients": n})
    def run(acc, client_input, data, ids, round_key):
      placed = drjax.broadcast(client_input)
      keys = drjax.map_fn(lambda i: jax.random.fold_in(round_key, i), ids)
      out = drjax.map_fn(update, (placed, data, keys))
      return agg.accumulate(acc, out, jnp.ones_like(out.num_examples), reducers, weighting)

    self._cache[n] = run
    return run

  def __call__(self, client_input, store, client_ids, round_key):
    def add(acc, data, ids):
      # DrJAX logs a warning per primitive when no 'clients' mesh is set
      verbosity = absl_logging.get_verbosity()
      absl_logging.set_verbosity(absl_logging.ERROR)
      try:
        return self._program(len(ids))(acc, client_input, data, ids, round_key)
      finally:
        absl_logging.set_verbosity(verbosity)

    client_ids = np.asarray(client_ids, np.int64)
    bucket_of = store.bucket_of(client_ids)
    groups = (client_ids[bucket_of == b] for b in np.unique(bucket_of))
    return self._accumulate(client_input, ((ids, store.get(ids)) for ids in groups), add)


def timed(executor, *args, **kwargs):
  """Runs an executor; returns (aggregate, metrics with 'seconds')."""
  t0 = time.perf_counter()
  out, metrics = executor(*args, **kwargs)
  jax.block_until_ready(out)
  metrics = dict(metrics, seconds=time.perf_counter() - t0)
  return out, metrics
