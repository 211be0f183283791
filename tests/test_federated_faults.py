"""A failed client (non-finite loss or delta) is dropped; the round goes on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import toy_store
from fedprune_jax.algorithms import fedavg
from fedprune_jax.federated.algorithm import executor_factory
from fedprune_jax.federated import (
  client,
  client_data,
  executor,
  faults,
  rounds,
  sampling,
  server,
  toy,
)

F, K = 4, 3


class PoisonedStore(client_data.ClientStore):
  """Wraps a store; the features of the ``poisoned`` clients are NaN."""

  def __init__(self, inner: client_data.ClientStore, poisoned):
    self.inner, self.poisoned = inner, set(int(c) for c in poisoned)
    self.buckets = inner.buckets

  @property
  def num_clients(self):
    return self.inner.num_clients

  def bucket_of(self, client_ids):
    return self.inner.bucket_of(client_ids)

  def num_examples(self):
    return self.inner.num_examples()

  def get(self, client_ids):
    data = dict(self.inner.get(client_ids))
    bad = np.isin(np.asarray(client_ids), list(self.poisoned))
    feats = np.array(data["features"], copy=True)
    feats[bad] = np.nan
    data["features"] = feats
    return data


@pytest.fixture(scope="module")
def setup():
  inner = toy_store(12, seed=1)
  cu = client.make_client_update(toy.make_loss_fn(), optax.adam(0.05), num_epochs=2, shuffle=True)
  params = toy.init_params(jax.random.key(0), F, K, hidden=5)
  return inner, cu, params


def _close(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("which", ["chunked", "chunked_map", "drjax", "sequential"])
def test_failed_clients_are_dropped_from_the_aggregate(setup, which):
  inner, cu, params = setup
  ids = np.array([4, 0, 9, 2, 7, 11, 5])
  bad = [9, 5]
  key = jax.random.key(7)
  good = np.array([c for c in ids if c not in bad])
  ref, ref_m = executor.SequentialExecutor(cu)(params, inner, good, key)
  ex = {
    "chunked": lambda: executor.ChunkedExecutor(cu, 3),
    "chunked_map": lambda: executor.ChunkedExecutor(cu, 3, vmap_size=1),
    "drjax": lambda: executor.DrjaxExecutor(cu),
    "sequential": lambda: executor.SequentialExecutor(cu),
  }[which]()
  got, m = ex(params, PoisonedStore(inner, bad), ids, key)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(got))
  _close(got, ref)
  assert m["num_failed_clients"] == 2 and m["num_clients"] == 5
  assert m["num_examples"] == inner.num_examples()[good].sum()
  np.testing.assert_allclose(m["train_loss"], ref_m["train_loss"], rtol=1e-5)
  assert ref_m["num_failed_clients"] == 0


def test_a_round_where_every_client_fails_leaves_the_server_unchanged(setup):
  inner, cu, params = setup
  store = PoisonedStore(inner, range(12))
  opt = server.make_server_optimizer("fedadam", 0.1)
  state = server.server_init(params, opt)
  sampler = sampling.CohortSampler(12, 4, seed=0)
  algorithm = fedavg.fedavg(cu, opt)
  final, history = rounds.run_rounds(
    algorithm,
    state,
    store,
    executor_factory(executor.ChunkedExecutor, 4),
    sampler,
    2,
    progress=False,
  )
  assert int(final.round) == 2
  _close(final.params, params)
  _close(final.opt_state, state.opt_state)
  assert [h["num_failed_clients"] for h in history] == [4, 4]
  assert [h["num_clients"] for h in history] == [0, 0]


def test_a_failed_client_leaves_the_round_of_the_others(setup):
  inner, cu, params = setup
  opt = server.make_server_optimizer("fedavg", 1.0)
  sampler = sampling.CohortSampler(12, 12, seed=0)  # everyone, every round
  final, history = rounds.run_rounds(
    fedavg.fedavg(cu, opt),
    server.server_init(params, opt),
    PoisonedStore(inner, [3]),
    executor_factory(executor.ChunkedExecutor, 5),
    sampler,
    1,
    progress=False,
  )
  good = np.array([c for c in range(12) if c != 3])
  ref, _ = executor.SequentialExecutor(cu)(
    params, inner, good, jax.random.fold_in(jax.random.key(0), 0)
  )
  expected = server.server_update(server.server_init(params, opt), ref.update["delta"], opt)
  _close(final.params, expected.params)
  assert history[0]["num_failed_clients"] == 1
  assert history[0]["num_clients"] == 11


def test_client_finite_flags_nan_inf_and_overflowing_params():
  params = {"a": jnp.ones((3, 2)), "b": {"c": jnp.zeros(4)}}
  assert bool(client.client_finite(jnp.float32(1.0), params))
  assert not bool(client.client_finite(jnp.float32(jnp.nan), params))
  assert not bool(client.client_finite(jnp.float32(jnp.inf), params))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    broken = {"a": params["a"].at[2, 1].set(bad), "b": params["b"]}
    assert not bool(client.client_finite(jnp.float32(1.0), broken)), bad
  huge = {"a": jnp.full((3, 2), 3e38, jnp.float32), "b": params["b"]}
  assert not bool(client.client_finite(jnp.float32(1.0), huge))  # diverged


def _faults_setup(n=14):
  store = toy_store(n, seed=2)
  params = toy.init_params(jax.random.key(1), F, K, hidden=5)
  local = client.make_client_update(toy.make_loss_fn(), optax.adam(0.05), num_epochs=1)
  return store, params, local, np.arange(n), jax.random.key(3)


@pytest.mark.parametrize("kind", ["nan", "scale"])
def test_dropouts_and_corrupt_updates_equal_the_round_of_the_survivors(kind):
  store, params, local, ids, key = _faults_setup()
  cfg = faults.FaultConfig(dropout=0.3, corrupt=0.3, corrupt_kind=kind, max_update_norm=1e3)
  draws = [faults.draw_faults(jax.random.fold_in(key, c), cfg) for c in ids]
  dropped = np.array([bool(d["dropped"]) for d in draws])
  corrupt = np.array([bool(d["corrupt"]) for d in draws]) & ~dropped
  assert dropped.any() and corrupt.any() and (~dropped & ~corrupt).any()
  survivors = ids[~dropped & ~corrupt]
  ref, ref_m = executor.SequentialExecutor(local)(params, store, survivors, key)
  got, m = executor.ChunkedExecutor(faults.with_faults(local, cfg), 4)(params, store, ids, key)
  _close(got.update, ref.update)
  assert m["num_clients"] == len(survivors)
  assert m["sum_dropped"] == dropped.sum() and m["num_failed_clients"] == corrupt.sum()
  np.testing.assert_allclose(m["train_loss"], ref_m["train_loss"], rtol=1e-5)


def test_stragglers_train_only_their_first_steps():
  store, params, local, ids, key = _faults_setup(8)
  cfg = faults.FaultConfig(straggler=1.0)
  got, m = executor.ChunkedExecutor(faults.with_faults(local, cfg), 3)(params, store, ids, key)
  deltas, weights = [], []
  for c in ids:
    data = {k: v[0] for k, v in store.get(np.array([c])).items()}
    frac = faults.draw_faults(jax.random.fold_in(key, c), cfg)["fraction"]
    done = int(np.ceil(float(frac) * data["weights"].shape[0]))
    data["weights"] = data["weights"] * (np.arange(data["weights"].shape[0]) < done)[:, None]
    out = local(params, data, jax.random.fold_in(key, c))
    deltas.append(out.update["delta"])
    weights.append(float(data["weights"].sum()))
  w = np.array(weights)
  expected = jax.tree_util.tree_map(
    lambda *d: sum(wi * x for wi, x in zip(w, d)) / w.sum(), *deltas
  )
  _close(got.update["delta"], expected)
  assert m["sum_straggler"] == len(ids) and m["num_examples"] == w.sum()
  assert m["num_examples"] < store.num_examples()[ids].sum()


def test_update_norm_clipping():
  store, params, local, ids, key = _faults_setup(6)
  clip = 1e-3
  got, m = executor.ChunkedExecutor(
    faults.with_faults(local, faults.FaultConfig(clip_norm=clip)), 3
  )(params, store, ids, key)
  deltas, w = [], store.num_examples()[ids]
  for c in ids:
    d = local(
      params, {k: v[0] for k, v in store.get(np.array([c])).items()}, jax.random.fold_in(key, c)
    )
    d = d.update["delta"]
    norm = np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree_util.tree_leaves(d)))
    assert norm > clip
    deltas.append(jax.tree_util.tree_map(lambda x: x * clip / norm, d))
  expected = jax.tree_util.tree_map(
    lambda *d: sum(wi * x for wi, x in zip(w, d)) / w.sum(), *deltas
  )
  _close(got.update["delta"], expected)
  assert m["sum_clipped"] == len(ids)


def test_fault_config_is_validated():
  with pytest.raises(ValueError, match="faults.dropout"):
    faults.FaultConfig(dropout=1.5)
  with pytest.raises(ValueError, match="faults.corrupt_kind"):
    faults.FaultConfig(corrupt_kind="zeros")
