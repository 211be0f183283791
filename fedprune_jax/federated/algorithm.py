"""The seam between the engine and federated algorithms (fedjax's ``FederatedAlgorithm``, with
optax-style pure functions).

One round, top to bottom::

  client_input = algorithm.broadcast(state)                      # what clients receive
  aggregate, m = executor(client_input, store, cohort, round_key) # algorithm.client_update per
                                                                  # client, reduced per key
  state, server_metrics = algorithm.server_update(state, aggregate)

The round driver (``rounds.py``) knows no algorithm policy: sampling, keys, evaluation cadence,
logging and checkpoints only. Everything a round depends on lives in the ``ServerState`` pytree.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, NamedTuple

import jax

from fedprune_jax.federated.aggregation import Aggregate, Reducer
from fedprune_jax.federated.client import ClientOutput
from fedprune_jax.federated.server import ServerState

PyTree = Any


class FederatedAlgorithm(NamedTuple):
  """A federated algorithm as pure functions.

  Attributes:
    name: for logs.
    init: ``(params, seed) -> ServerState``.
    broadcast: ``ServerState -> client_input`` (jit-able): what every sampled client receives.
    client_update: ``(client_input, data, rng) -> ClientOutput`` (pure, vmap-able); on failure it
      must return zeros in ``update`` and ``metrics['failed'] = 1``.
    server_update: ``(ServerState, Aggregate) -> (ServerState, metrics)`` (jit-able); it must
      advance ``round`` and keep the model when ``aggregate.weight_sum == 0``.
    reducers: how each key of the clients' ``update`` is aggregated (default weighted mean).
    model_params: ``ServerState -> params`` of the model to evaluate or export.
    round_costs: ``ServerState -> {name: float}``, host-side per-client costs of the next round
      (bytes down/up, FLOPs, memory), or None.
    client_key: hashable; two algorithms built on the same local update whose ``client_key`` are
      equal have interchangeable ``client_update`` and ``reducers`` (so the engine may reuse one
      traced client program for both, ``programs.shared``); None: never interchangeable.
  """

  name: str
  init: Callable[[PyTree, int], ServerState]
  broadcast: Callable[[ServerState], PyTree]
  client_update: Callable[[PyTree, dict, jax.Array], ClientOutput]
  server_update: Callable[[ServerState, Aggregate], tuple[ServerState, dict]]
  reducers: Mapping[str, Reducer] = {}
  model_params: Callable[[ServerState], PyTree] = lambda state: state.params
  round_costs: Callable[[ServerState], dict] | None = None
  client_key: Hashable | None = None
