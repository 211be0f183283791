"""The seam between the engine and federated algorithms (fedjax's ``FederatedAlgorithm``, with
optax-style pure functions and a host-side step that may change what clients train).

One round, top to bottom::

  plan = algorithm.plan_round(state)                 # host side, outside jit: the client
                                                     # program and its input for this round
  executor = executors(plan.program)                 # one executor per program key (cached)
  aggregate, m = executor(plan.client_input, store, cohort, round_key)
  aggregate = plan.finish(aggregate)                 # e.g. compact -> dense coordinates
  state, server_metrics = algorithm.server_update(state, aggregate)

The round driver (``rounds.py``) knows no algorithm policy (sampling, keys, evaluation cadence,
logging and checkpoints only) and nothing about what the program trains: a FedAvg program trains
the server's model, federated pruning's trains the masked model or a compacted (physically
smaller) one. Everything a round depends on lives in the algorithm's own state pytree, which has
at least ``round`` (int32 scalar) and ``seed`` (int32 scalar) fields.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, NamedTuple

import jax

from fedprune_jax.federated.aggregation import Aggregate, Reducer
from fedprune_jax.federated.client import ClientOutput

PyTree = Any
ClientUpdate = Callable[[PyTree, dict, jax.Array], ClientOutput]


class ClientProgram(NamedTuple):
  """What every sampled client of a round runs.

  Attributes:
    key: hashable; programs with equal keys are interchangeable (the engine builds, traces and
      compiles one executor per key and reuses it, also across runs of one process); None: never
      shared. A key must change whenever ``client_update``'s shapes or semantics do.
    client_update: ``(client_input, data, rng) -> ClientOutput`` (pure, vmap-able); on failure it
      must return zeros in ``update`` and ``metrics['failed'] = 1``.
    reducers: how each key of the clients' ``update`` is aggregated (default weighted mean).
  """

  key: Hashable | None
  client_update: ClientUpdate
  reducers: Mapping[str, Reducer] = {}


class RoundPlan(NamedTuple):
  """The host-side step's answer for one round.

  Attributes:
    program: the client program of this round.
    client_input: what every client receives (a pytree of arrays).
    finish: ``Aggregate -> Aggregate`` mapping the clients' aggregate to what ``server_update``
      reads (e.g. scatter compacted deltas back to dense coordinates), or None (identity).
    metrics: host-side values recorded with the round (e.g. which path clients took, costs).
  """

  program: ClientProgram
  client_input: PyTree
  finish: Callable[[Aggregate], Aggregate] | None = None
  metrics: Mapping[str, Any] = {}


class FederatedAlgorithm(NamedTuple):
  """A federated algorithm.

  Attributes:
    name: its registry name (``algorithms.registry``), also in logs and ``results.json``.
    init: ``(params, seed) -> state`` (jit-able); the state is the algorithm's own pytree.
    plan_round: ``state -> RoundPlan``, run on the host before every round (not traced).
    server_update: ``(state, Aggregate) -> (state, metrics)`` (jit-able); it must advance
      ``round`` and keep the model when ``aggregate.weight_sum == 0``.
    model_params: ``state -> params`` of the model to evaluate or export.
  """

  name: str
  init: Callable[[PyTree, int], PyTree]
  plan_round: Callable[[PyTree], RoundPlan]
  server_update: Callable[[PyTree, Aggregate], tuple[PyTree, dict]]
  model_params: Callable[[PyTree], PyTree] = lambda state: state.params


class ExecutorCache:
  """One executor per client program key: ``cache(program) -> executor``.

  ``make(program) -> executor`` builds one (e.g. ``executor_factory``); ``programs`` counts the
  distinct programs of this run.
  """

  def __init__(self, make: Callable[[ClientProgram], Any]):
    self.make = make
    self._cache: dict = {}

  def __call__(self, program: ClientProgram):
    key = program.key if program.key is not None else ("unshared", id(program.client_update))
    if key not in self._cache:
      self._cache[key] = self.make(program)
    return self._cache[key]

  @property
  def programs(self) -> int:
    return len(self._cache)


def executor_factory(executor_cls, *args, **kwargs) -> Callable[[ClientProgram], Any]:
  """``program -> executor_cls(program.client_update, *args, reducers=..., **kwargs)``."""
  return lambda program: executor_cls(
    program.client_update, *args, reducers=dict(program.reducers), **kwargs
  )
