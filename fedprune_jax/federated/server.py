"""Server state and update: an optax optimizer fed the mean client delta.

The mean delta (``params_start - params_end``, see client.py) is a
pseudo-gradient: FedAvg = ``optax.sgd(1.0)`` (params <- mean client params),
FedAdam = ``optax.adam``, FedYogi = ``optax.yogi`` (Reddi et al., 2021).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class ServerState:
  """Everything the server carries between rounds (an orbax-saveable pytree).

  Attributes:
    params: model params pytree.
    opt_state: server optimizer state.
    round: int32 scalar, number of completed rounds.
  """

  params: PyTree
  opt_state: PyTree
  round: jax.Array


def make_server_optimizer(
  name: str,
  learning_rate: float = 1.0,
  b1: float = 0.9,
  b2: float = 0.99,
  eps: float = 1e-3,
  momentum: float | None = None,
) -> optax.GradientTransformation:
  """Server optimizers by name.

  Args:
    name: ``fedavg`` (SGD, lr default 1, optional momentum = FedAvgM),
      ``fedadam`` or ``fedyogi``. The ``eps=1e-3`` default (the adaptivity
      parameter tau) follows Reddi et al.; pass ``eps`` explicitly otherwise.
    learning_rate: server learning rate.
  """
  name = name.lower()
  if name in ("fedavg", "sgd"):
    return optax.sgd(learning_rate, momentum=momentum)
  if name in ("fedadam", "adam"):
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  if name in ("fedyogi", "yogi"):
    return optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps)
  raise ValueError(f"unknown server optimizer {name!r}; expected 'fedavg', 'fedadam' or 'fedyogi'")


def server_init(params: PyTree, optimizer: optax.GradientTransformation) -> ServerState:
  return ServerState(
    params=params, opt_state=optimizer.init(params), round=jnp.zeros((), jnp.int32)
  )


def server_update(
  state: ServerState, mean_delta: PyTree, optimizer: optax.GradientTransformation
) -> ServerState:
  """One server step: ``params <- params + opt(mean_delta as gradient)``."""
  updates, opt_state = optimizer.update(mean_delta, state.opt_state, state.params)
  return ServerState(
    params=optax.apply_updates(state.params, updates), opt_state=opt_state, round=state.round + 1
  )


def weighted_mean_delta(delta_sum: PyTree, weight_sum: jax.Array) -> PyTree:
  """``delta_sum / weight_sum`` (zero when no client had any weight)."""
  denom = jnp.maximum(weight_sum, 1e-12)
  return jax.tree_util.tree_map(lambda d: d / denom.astype(d.dtype), delta_sum)
