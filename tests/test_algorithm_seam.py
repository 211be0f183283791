"""The algorithm seam is generic: a third algorithm (FedProx's proximal local objective, Li et al.
2020) registered by this test runs through ``build.run_federated`` and the round driver unchanged
and equals a hand-written reference; algorithms are looked up by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import toy_store
from fedprune_jax.algorithms import build, fedavg, registry
from fedprune_jax.errors import ConfigError
from fedprune_jax.federated import client, toy
from fedprune_jax.federated.algorithm import ClientProgram, FederatedAlgorithm, RoundPlan
from fedprune_jax.federated.sampling import CohortSampler

MU, LR = 0.5, 0.3


def _prox_loss(base, anchor, mu):
  def loss_fn(params, batch, rng):
    loss, aux = base(params, batch, rng)
    dist = sum(jnp.sum((p - a) ** 2) for p, a in zip(*map(jax.tree.leaves, (params, anchor))))
    return loss + 0.5 * mu * dist, aux

  return loss_fn


@registry.register("toy_fedprox")
def _fedprox(inputs: registry.BuildInputs) -> FederatedAlgorithm:
  """FedProx: clients minimise loss + mu/2 |w - w_server|^2; the server is FedAvg's."""
  base = fedavg.fedavg(inputs.local_update, inputs.server_optimizer)
  lr = inputs.cfg["client"]["learning_rate"]

  def client_update(params, data, rng):
    local = client.make_client_update(_prox_loss(toy.make_loss_fn(), params, MU), optax.sgd(lr))
    return local(params, data, rng)

  program = ClientProgram(("toy_fedprox", MU, lr), client_update)
  return base._replace(
    name="toy_fedprox",
    plan_round=lambda state: RoundPlan(program, state.params, metrics={"mu": MU}),
  )


def _reference(params, store, cohort):
  """Plain loops: proximal SGD per client over its live steps, example-weighted mean, FedAvg."""
  loss_fn = _prox_loss(toy.make_loss_fn(), params, MU)
  ends, weights = [], []
  for cid in cohort:
    data = {k: v[0] for k, v in store.get(np.array([cid])).items()}
    p = params
    for s in range(data["weights"].shape[0]):
      batch = {k: v[s] for k, v in data.items()}
      if batch["weights"].sum() == 0:
        continue
      g = jax.grad(lambda q: loss_fn(q, batch, None)[0])(p)
      p = jax.tree.map(lambda a, b: a - LR * b, p, g)
    ends.append(p)
    weights.append(float(data["weights"].sum()))
  w = np.array(weights) / sum(weights)
  return jax.tree.map(lambda *e: sum(wi * ei for wi, ei in zip(w, e)), *ends)


def test_a_registered_third_algorithm_runs_through_the_round_driver_unchanged():
  store = toy_store(9, 2)
  params = toy.init_params(jax.random.key(0), 4, 3, hidden=5)
  cfg = {
    "seed": 4,
    "rounds": 1,
    "cohort_size": 5,
    "client": {"learning_rate": LR, "shuffle": False},
    "engine": {"chunk_size": 2},
  }
  seen = []
  state, hist = build.run_federated(
    cfg,
    toy.make_loss_fn(),
    params,
    store,
    progress=False,
    name="toy_fedprox",
    on_round=lambda st, m: seen.append(m["round"]),
  )
  assert seen == [0] and hist[0]["mu"] == MU and int(state.round) == 1
  cohort = CohortSampler(store.num_clients, 5, seed=4).sample(0)
  expected = _reference(params, store, cohort)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
  # the proximal term matters: plain FedAvg from the same start ends elsewhere
  plain, _ = build.run_federated(cfg, toy.make_loss_fn(), params, store, progress=False)
  moved = max(
    float(jnp.abs(a - b).max()) for a, b in zip(*map(jax.tree.leaves, (plain.params, state.params)))
  )
  assert moved > 1e-4


def test_algorithms_are_looked_up_by_name():
  assert {"fedavg", "fedadam", "fedyogi", "fedprune", "centralized"} <= set(registry.names())
  cfg = build.rounds.resolve_config({"server": {"optimizer": "yogi"}})
  assert build.algorithm_name(cfg, None) == "fedyogi"
  alg = build.build_algorithm(cfg, toy.make_loss_fn())
  assert alg.name == "fedyogi"
  assert not hasattr(alg.init(toy.init_params(jax.random.key(0), 4, 3), 0), "mask")
  with pytest.raises(ConfigError, match="unknown federated algorithm 'nope'"):
    build.build_algorithm(cfg, toy.make_loss_fn(), name="nope")
  with pytest.raises(ConfigError, match="algorithm 'centralized' trains on the server's data"):
    build.build_algorithm(cfg, toy.make_loss_fn(), name="centralized")
