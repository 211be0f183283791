"""FedAvg / FedAdam / FedYogi (Reddi et al., 2021) as a ``FederatedAlgorithm``."""

from __future__ import annotations

from typing import Any, Callable, Hashable

import optax

from fedprune_jax.federated import server as server_lib
from fedprune_jax.federated.aggregation import Aggregate
from fedprune_jax.federated.algorithm import ClientProgram, FederatedAlgorithm, RoundPlan
from fedprune_jax.federated.server import ServerState

PyTree = Any


def fedavg(
  local_update: Callable[..., Any],
  server_optimizer: optax.GradientTransformation,
  name: str = "fedavg",
  client_key: Hashable | None = None,
) -> FederatedAlgorithm:
  """Clients train the server params locally; the server applies the mean delta with optax.

  The state is ``server.ServerState`` (params, optimizer state, round, seed: no mask).

  Args:
    local_update: ``client.make_client_update(...)``, ``(params, data, rng) -> ClientOutput``.
    server_optimizer: ``server.make_server_optimizer(...)``.
    name: the algorithm's name (``fedavg``, ``fedadam``, ``fedyogi``).
    client_key: identifies ``local_update`` (``ClientProgram.key``: equal keys share a program);
      None: never shared.
  """

  def init(params: PyTree, seed: int = 0) -> ServerState:
    return server_lib.server_init(params, server_optimizer, seed)

  def server_update(state: ServerState, aggregate: Aggregate) -> tuple[ServerState, dict]:
    new = server_lib.server_update(state, aggregate.update["delta"], server_optimizer)
    kept = server_lib.keep_if_no_clients(aggregate.weight_sum, new, state)
    return kept.replace(round=state.round + 1), {}

  program = ClientProgram(
    key=None if client_key is None else ("train", client_key),
    client_update=lambda params, data, rng: local_update(params, data, rng),
  )

  return FederatedAlgorithm(
    name=name,
    init=init,
    plan_round=lambda state: RoundPlan(program, state.params, metrics={"client_path": "dense"}),
    server_update=server_update,
  )
