"""fedjax oracle: our FedAvg equals fedjax's fed_avg on the same clients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedprune_jax.federated import client, executor, server, toy
from fedprune_jax.federated.fedjax_compat import fedjax
from fedprune_jax.federated import fedjax_interop

B, T, F, K = 8, 6, 5, 4


def _fd(sizes, seed=0):
  rng = np.random.default_rng(seed)
  data = {}
  for i, n in enumerate(sizes):
    feats = rng.normal(size=(n, T, F)).astype(np.float32)
    pads = np.zeros((n, T), np.float32)
    for j in range(n):
      pads[j, rng.integers(2, T + 1) :] = 1.0
    feats *= (1.0 - pads)[..., None]
    data[f"c{i:02d}".encode()] = {
      "features": feats,
      "feature_paddings": pads,
      "labels": rng.integers(1, K + 1, size=(n, 2)).astype(np.int32),
    }
  return fedjax.InMemoryFederatedData(data)


def _fedjax_fed_avg(fd, params, client_lr, server_opt, num_epochs, rounds=1):
  loss_fn = toy.make_loss_fn()

  def grad_fn(p, batch, rng):
    b = dict(batch, weights=jnp.ones(batch["labels"].shape[0], jnp.float32))
    return jax.grad(lambda q: loss_fn(q, b, rng)[0])(p)

  algo = fedjax.algorithms.fed_avg.federated_averaging(
    grad_fn,
    fedjax.optimizers.sgd(client_lr),
    server_opt,
    fedjax.ShuffleRepeatBatchHParams(batch_size=B, num_epochs=num_epochs, seed=0),
  )
  state = algo.init(params)
  ids = list(fd.client_ids())
  for r in range(rounds):
    clients = [(cid, fd.get_client(cid), jax.random.key(r)) for cid in ids]
    state, _ = algo.apply(state, clients)
  return state.params


def _ours(fd, params, client_lr, server_opt, num_epochs, chunk, rounds=1):
  store = fedjax_interop.store_from_fedjax(fd, batch_size=B)
  cu = client.make_client_update(toy.make_loss_fn(), optax.sgd(client_lr), num_epochs=num_epochs)
  ex = executor.ChunkedExecutor(cu, chunk)
  state = server.server_init(params, server_opt)
  for r in range(rounds):
    delta, _ = ex(state.params, store, np.arange(store.num_clients), jax.random.key(r))
    state = server.server_update(state, delta.update["delta"], server_opt)
  return state.params


def _close(a, b, tol=2e-5):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


@pytest.mark.parametrize("sizes,epochs", [([8, 4, 2, 1, 8, 4, 2], 1), ([8, 8, 8], 3)])
def test_fedavg_matches_fedjax(sizes, epochs):
  fd = _fd(sizes)
  params = toy.init_params(jax.random.key(1), F, K, hidden=6)
  ref = _fedjax_fed_avg(fd, params, 0.5, fedjax.optimizers.sgd(1.0), epochs, rounds=2)
  ours = _ours(fd, params, 0.5, optax.sgd(1.0), epochs, chunk=3, rounds=2)
  _close(ref, ours)
  # and the round actually moved the params
  assert (
    max(
      float(jnp.abs(a - b).max())
      for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(params))
    )
    > 1e-3
  )


def test_fedadam_matches_fedjax():
  fd = _fd([8, 4, 2])
  params = toy.init_params(jax.random.key(2), F, K, hidden=6)
  ref = _fedjax_fed_avg(
    fd, params, 0.3, fedjax.optimizers.adam(0.05, b1=0.9, b2=0.99, eps=1e-3), 1, rounds=3
  )
  ours = _ours(fd, params, 0.3, server.make_server_optimizer("fedadam", 0.05), 1, chunk=2, rounds=3)
  _close(ref, ours, tol=1e-4)


def test_vmap_backend_matches_jit_backend():
  fd = _fd([8, 4, 2, 1, 8])
  params = toy.init_params(jax.random.key(3), F, K, hidden=6)
  ref = _fedjax_fed_avg(fd, params, 0.5, fedjax.optimizers.sgd(1.0), 2)
  with fedjax.for_each_client_backend(fedjax_interop.VmapBackend(2)):
    ours = _fedjax_fed_avg(fd, params, 0.5, fedjax.optimizers.sgd(1.0), 2)
  _close(ref, ours)


def test_vmap_backend_step_results_and_padding_steps():
  def init(shared, cin):
    return {"count": cin["start"], "limit": shared["limit"]}

  def step(s, batch):
    num = jnp.sum(batch["x"] > s["limit"])
    return {"count": s["count"] + num, "limit": s["limit"]}, {"num": num}

  def final(shared, s):
    del shared
    return s["count"]

  clients = [
    (b"a", [{"x": np.array([1, 2, 3, 4])}, {"x": np.array([1, 2, 3, 9])}], {"start": np.array(2)}),
    (b"b", [{"x": np.array([5, 2, 1, 1])}], {"start": np.array(0)}),
    (b"c", [], {"start": np.array(1)}),
  ]
  shared = {"limit": np.array(2)}
  with fedjax.for_each_client_backend(fedjax_interop.VmapBackend(2)):
    fn = fedjax.for_each_client(init, step, final, with_step_result=True)
    out = list(fn(shared, clients))
  assert [o[0] for o in out] == [b"a", b"b", b"c"]
  assert [int(o[1]) for o in out] == [2 + 2 + 2, 1, 1]
  assert [[int(r["num"]) for r in o[2]] for o in out] == [[2, 2], [1], []]


def test_store_from_fedjax_packs_every_example():
  fd = _fd([8, 3, 17])
  store = fedjax_interop.store_from_fedjax(fd, batch_size=B)
  np.testing.assert_array_equal(store.num_examples(), [8, 3, 17])
  assert store.client_names() == ["c00", "c01", "c02"]
  got = store.get(np.array([2]))
  ex = fd.get_client(b"c02").all_examples()
  s = got["weights"].shape[1]
  assert s == 3
  flat = got["features"][0].reshape(s * B, T, F)
  np.testing.assert_array_equal(flat[:17], ex["features"])
  assert not flat[17:].any()
  np.testing.assert_array_equal(got["weights"][0].reshape(-1), [1.0] * 17 + [0.0] * 7)
