"""Server state and the optax server step fed the mean client delta.

The mean delta (``params_start - params_end``, see client.py) is a pseudo-gradient: FedAvg =
``optax.sgd(1.0)`` (params <- mean client params), FedAdam = ``optax.adam``, FedYogi =
``optax.yogi`` (Reddi et al., 2021).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedprune_jax import fields

PyTree = Any


@flax.struct.dataclass
class ServerState:
  """The FedAvg family's state: everything its round depends on (one orbax-saveable pytree).

  Other algorithms own their own state pytrees (e.g. ``algorithms.fedprune.PruningState`` adds
  the mask); the round driver only reads ``round`` and ``seed``.

  Attributes:
    params: model params pytree.
    opt_state: server optimizer state.
    round: int32 scalar, completed rounds.
    seed: int32 scalar; round keys are ``fold_in(key(seed), round)`` and cohorts are drawn from
      (seed, round), so a restored state repeats the uninterrupted run exactly.
  """

  params: PyTree
  opt_state: PyTree
  round: jax.Array
  seed: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))


def make_server_optimizer(
  name: str,
  learning_rate: float = fields.default("server.learning_rate"),
  b1: float = fields.default("server.b1"),
  b2: float = fields.default("server.b2"),
  eps: float = fields.default("server.eps"),
  momentum: float | None = fields.default("server.momentum"),
) -> optax.GradientTransformation:
  """Server optimizers by name.

  Args:
    name: ``fedavg`` (SGD, lr default 1, optional momentum = FedAvgM), ``fedadam`` or
      ``fedyogi``. The ``eps=1e-3`` default (the adaptivity parameter tau) follows Reddi et al.;
      pass ``eps`` explicitly otherwise.
    learning_rate: server learning rate.
  """
  fields.check("server.optimizer", name)
  name = next(k for k, names in fields.SERVER_OPTIMIZERS.items() if name.lower() in names)
  if name == "fedavg":
    return optax.sgd(learning_rate, momentum=momentum)
  if name == "fedadam":
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  return optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps)


def server_init(
  params: PyTree, optimizer: optax.GradientTransformation, seed: int = 0
) -> ServerState:
  return ServerState(
    params=params,
    opt_state=optimizer.init(params),
    round=jnp.zeros((), jnp.int32),
    seed=jnp.asarray(seed, jnp.int32),
  )


def server_update(state: PyTree, mean_delta: PyTree, optimizer: optax.GradientTransformation):
  """One server step: ``params <- params + opt(mean_delta as gradient)``; round + 1.

  ``state``: any state dataclass with ``params``, ``opt_state`` and ``round`` fields.
  """
  updates, opt_state = optimizer.update(mean_delta, state.opt_state, state.params)
  return state.replace(
    params=optax.apply_updates(state.params, updates), opt_state=opt_state, round=state.round + 1
  )


def tree_select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """``where(pred, a, b)`` leaf by leaf (pred: bool scalar)."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def keep_if_no_clients(weight_sum: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """``new``, or ``old`` when no client succeeded (``weight_sum == 0``).

  An optimizer step on a zero pseudo-gradient would still move FedAdam params (momentum), so a
  round in which every client failed must leave the server where it was.
  """
  return tree_select(weight_sum > 0, new, old)
