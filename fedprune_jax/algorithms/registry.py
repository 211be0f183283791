"""Federated algorithms by name: ``register(name)(builder)``, ``get(name)``.

A builder takes ``BuildInputs`` (what ``build.build_algorithm`` assembled from the config: the
resolved engine config, the local update, the server optimizer, and the pruning inputs) and
returns a ``FederatedAlgorithm``. ``fedavg``, ``fedadam``, ``fedyogi``, ``fedprune`` and
``centralized`` (training on the server's data: the centralized baseline and the warm start) are
registered here; anything else (e.g. a test's toy algorithm) registers itself.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, NamedTuple

import optax

from fedprune_jax.algorithms import centralized as centralized_lib
from fedprune_jax.algorithms import fedavg as fedavg_lib
from fedprune_jax.algorithms import fedprune as fedprune_lib
from fedprune_jax.errors import ConfigError
from fedprune_jax.federated import rounds
from fedprune_jax.federated.algorithm import FederatedAlgorithm

PyTree = Any


class BuildInputs(NamedTuple):
  """What a builder may read.

  Attributes:
    cfg: the resolved engine config (``federated.rounds.DEFAULTS`` layout).
    local_update: ``(params, data, rng, mask=None) -> ClientOutput`` (with simulated faults).
    client_key: names ``local_update`` for program sharing (None: never shared).
    server_optimizer: the configured server optimizer.
    policy: the mask policy (federated pruning), or None.
    initial_mask: a given starting mask, or None.
    compact: compacted client training (``fedprune.CompactClients``), or None.
    loss_fn: ``(params, batch, rng) -> (loss, aux)``, the loss ``local_update`` trains.
    server: the server's data and optimizer (``centralized.ServerInputs``), or None.
  """

  cfg: Mapping[str, Any]
  local_update: Callable
  client_key: Hashable | None
  server_optimizer: optax.GradientTransformation
  policy: Any = None
  initial_mask: PyTree | None = None
  compact: fedprune_lib.CompactClients | None = None
  loss_fn: Callable | None = None
  server: centralized_lib.ServerInputs | None = None


Builder = Callable[[BuildInputs], FederatedAlgorithm]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
  """Decorator: ``builder`` answers ``get(name)`` (a later registration replaces it)."""

  def add(builder: Builder) -> Builder:
    _REGISTRY[name] = builder
    return builder

  return add


def get(name: str) -> Builder:
  if name not in _REGISTRY:
    raise ConfigError(f"unknown federated algorithm {name!r}; known: {', '.join(names())}")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)


def _fedavg_family(name: str) -> Builder:
  def build(inputs: BuildInputs) -> FederatedAlgorithm:
    return fedavg_lib.fedavg(
      inputs.local_update, inputs.server_optimizer, name=name, client_key=inputs.client_key
    )

  return build


for _name in ("fedavg", "fedadam", "fedyogi"):
  register(_name)(_fedavg_family(_name))


@register("fedprune")
def _fedprune(inputs: BuildInputs) -> FederatedAlgorithm:
  if inputs.policy is None:
    raise ConfigError("algorithm 'fedprune' needs a pruning section")
  return fedprune_lib.federated_pruning(
    inputs.local_update,
    inputs.server_optimizer,
    inputs.policy,
    inputs.cfg["cohort_size"],
    initial_mask=inputs.initial_mask,
    client_key=inputs.client_key,
    compact=inputs.compact,
  )


@register("centralized")
def _centralized(inputs: BuildInputs) -> FederatedAlgorithm:
  if inputs.server is None or inputs.loss_fn is None:
    raise ConfigError("algorithm 'centralized' trains on the server's data: give it (server=...)")
  server = inputs.server
  optimizer = server.optimizer
  if optimizer is None:
    optimizer = rounds.make_client_optimizer(inputs.cfg["client"])
  key = None
  if server.key is not None:
    key = (inputs.loss_fn, server.key, inputs.policy)
  return centralized_lib.centralized(inputs.loss_fn, optimizer, server.data, inputs.policy, key)
