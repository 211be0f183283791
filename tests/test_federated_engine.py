"""Executors agree with the sequential reference; client update semantics."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from fedprune_jax.federated import client, client_data, executor, packing, server, toy

F, K = 4, 3


def _store(n=13, seed=0, num_buckets=1):
  return client_data.SyntheticClientStore(
    n,
    batch_size=3,
    min_examples=1,
    max_examples=8,
    num_frames=5,
    feature_dim=F,
    label_len=2,
    num_classes=K,
    seed=seed,
    num_buckets=num_buckets,
  )


def _params(seed=0):
  return toy.init_params(jax.random.key(seed), F, K, hidden=5)


def _leaves_close(a, b, tol=1e-6):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


_EXECUTORS = {}


def _chunked(cu, chunk, weighting="num_examples"):
  # one executor (= one compilation per bucket) per configuration
  if (chunk, weighting) not in _EXECUTORS:
    _EXECUTORS[chunk, weighting] = executor.ChunkedExecutor(cu, chunk, weighting=weighting)
  return _EXECUTORS[chunk, weighting]


@pytest.fixture(scope="module")
def setup():
  store = _store()
  # shuffle=True makes every client's result depend on its rng
  cu = client.make_client_update(toy.make_loss_fn(), optax.adam(0.05), num_epochs=2, shuffle=True)
  ids = np.array([12, 3, 7, 0, 9, 5, 11, 1, 8])
  key = jax.random.fold_in(jax.random.key(42), 3)
  seq = executor.SequentialExecutor(cu)
  ref = seq(_params(), store, ids, key)
  return store, cu, ids, key, ref, seq


@pytest.mark.parametrize("chunk", [1, 7, 9])
def test_chunked_matches_sequential(setup, chunk):
  store, cu, ids, key, (ref_delta, ref_m), _ = setup
  delta, m = _chunked(cu, chunk)(_params(), store, ids, key)
  _leaves_close(delta, ref_delta)
  assert m["num_clients"] == 9
  assert m["num_examples"] == store.num_examples()[ids].sum()
  np.testing.assert_allclose(m["train_loss"], ref_m["train_loss"], rtol=1e-5)


@pytest.mark.parametrize("vmap_size", [None, 2])
def test_device_loop_and_lax_map_match_sequential(setup, vmap_size):
  store, cu, ids, key, (ref_delta, ref_m), _ = setup
  ex = executor.ChunkedExecutor(cu, 4, device_loop=vmap_size is None, vmap_size=vmap_size)
  delta, m = ex(_params(), store, ids, key)
  _leaves_close(delta, ref_delta)
  assert m["num_clients"] == 9


def test_server_params_match_after_one_round(setup):
  store, cu, ids, key, (ref_delta, _), _ = setup
  opt = server.make_server_optimizer("fedyogi", 0.1)
  s0 = server.server_init(_params(), opt)
  ref = server.server_update(s0, ref_delta.update["delta"], opt)
  delta, _ = _chunked(cu, 7)(_params(), store, ids, key)
  got = server.server_update(s0, delta.update["delta"], opt)
  _leaves_close(got.params, ref.params)
  assert int(got.round) == 1


def test_cohort_order_and_drjax(setup):
  store, cu, ids, key, (ref_delta, _), _ = setup
  perm = np.random.default_rng(0).permutation(ids)
  delta, _ = _chunked(cu, 7)(_params(), store, perm, key)
  _leaves_close(delta, ref_delta)
  delta, _ = executor.DrjaxExecutor(cu)(_params(), store, perm, key)
  _leaves_close(delta, ref_delta)


def test_mean_delta_is_weighted_mean_of_client_deltas(setup):
  store, cu, ids, key, (ref_delta, _), seq = setup
  upd = seq.update  # reuse the reference's compiled per-client update
  deltas, ws = [], []
  for cid in ids:
    data = {k: v[0] for k, v in store.get(np.array([cid])).items()}
    out = upd(_params(), data, jax.random.fold_in(key, cid))
    deltas.append(out.update["delta"])
    ws.append(float(out.num_examples))
  ws = np.array(ws)
  np.testing.assert_array_equal(ws, store.num_examples()[ids])
  brute = jax.tree_util.tree_map(lambda *d: sum(w * x for w, x in zip(ws, d)) / ws.sum(), *deltas)
  _leaves_close(brute, ref_delta.update["delta"])
  uni, m = _chunked(cu, 9, weighting="uniform")(_params(), store, ids, key)
  _leaves_close(uni.update["delta"], jax.tree_util.tree_map(lambda *d: sum(d) / len(d), *deltas))
  assert m["weight_sum"] == len(ids)


def test_several_buckets_match_sequential():
  store = _store(num_buckets=2)
  ids = np.arange(13)[::-1]
  assert len(set(store.bucket_of(ids).tolist())) == 2
  cu = client.make_client_update(toy.make_loss_fn(), optax.sgd(0.2))
  key = jax.random.key(0)
  ref, _ = executor.SequentialExecutor(cu)(_params(), store, ids, key)
  got, m = executor.ChunkedExecutor(cu, 4)(_params(), store, ids, key)
  _leaves_close(got, ref)
  assert m["num_clients"] == 13


def _sgd_brute_force(params, data, lr, epochs):
  """Plain python SGD over the live steps (no padding steps, no rng use)."""
  loss_fn = toy.make_loss_fn()
  p = params
  live = [s for s in range(data["weights"].shape[0]) if data["weights"][s].sum() > 0]
  for _ in range(epochs):
    for s in live:
      batch = {k: v[s] for k, v in data.items()}
      g = jax.grad(lambda q: loss_fn(q, batch, None)[0])(p)
      p = jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)
  return jax.tree_util.tree_map(lambda a, b: a - b, params, p)


def test_client_update_matches_brute_force_and_padding_steps_are_noops():
  store = _store()
  cid = int(np.argmax(store.num_examples()))
  exs = store.examples(cid)
  small = packing.Bucket(3, 3, {"features": (5, F), "labels": (2,)})
  big = packing.Bucket(7, 3, {"features": (9, F), "labels": (4,)})
  d_small = packing.pack_client(exs, small)
  d_big = packing.pack_client(exs, big)
  params = _params(1)
  cu = jax.jit(client.make_client_update(toy.make_loss_fn(), optax.sgd(0.3), num_epochs=2))
  out = cu(params, d_small, jax.random.key(0))
  _leaves_close(out.update["delta"], _sgd_brute_force(params, d_small, 0.3, 2), 1e-5)
  assert float(out.metrics["num_steps"]) == 2 * 3
  # Adam state would move on a non-no-op padding step: extra padded steps,
  # frames and label positions must give the same result.
  cu_adam = jax.jit(client.make_client_update(toy.make_loss_fn(), optax.adam(0.1), num_epochs=3))
  a = cu_adam(params, d_small, jax.random.key(0))
  b = cu_adam(params, d_big, jax.random.key(0))
  _leaves_close(a.update["delta"], b.update["delta"], 1e-6)
  assert float(a.num_examples) == float(b.num_examples) == len(exs)
  np.testing.assert_allclose(a.metrics["loss"], b.metrics["loss"], rtol=1e-6)


def test_mask_keeps_pruned_weights_at_zero():
  store = _store()
  data = {k: v[0] for k, v in store.get(np.array([4])).items()}
  params = _params(2)
  kmask = np.random.default_rng(0).random(params["hidden"]["kernel"].shape) > 0.5
  mask = {"hidden": {"kernel": kmask, "bias": None}, "out": {"kernel": None, "bias": None}}
  cu = jax.jit(
    client.make_client_update(toy.make_loss_fn(), optax.sgd(0.5, momentum=0.9), num_epochs=3)
  )
  out = cu(params, data, jax.random.key(0), mask)
  start = np.where(kmask, params["hidden"]["kernel"], 0.0)
  end = start - np.asarray(out.update["delta"]["hidden"]["kernel"])
  assert np.all(end[~kmask] == 0.0)
  assert np.all(np.asarray(out.update["delta"]["hidden"]["kernel"])[~kmask] == 0.0)
  assert np.abs(end[kmask] - start[kmask]).max() > 1e-4
  assert np.abs(np.asarray(out.update["delta"]["out"]["kernel"])).max() > 1e-4
  # the mask travels through the executors unchanged (broadcast to clients)
  ids = np.arange(7)
  masked = lambda msg, d, k: cu(msg["params"], d, k, msg["mask"])  # noqa: E731
  msg = {"params": params, "mask": mask}
  ref, _ = executor.SequentialExecutor(masked)(msg, store, ids, jax.random.key(1))
  got, _ = executor.ChunkedExecutor(masked, 3)(msg, store, ids, jax.random.key(1))
  _leaves_close(got, ref)
  assert np.all(np.asarray(got.update["delta"]["hidden"]["kernel"])[~kmask] == 0.0)


def test_plan_chunks_pads_with_minus_one():
  plan = executor.plan_chunks(np.array([1, 0, 1, 1, 0]), np.array([10, 11, 12, 13, 14]), 2)
  assert [(b, c.tolist()) for b, c in plan] == [(0, [11, 14]), (1, [10, 12]), (1, [13, -1])]


def test_float64_client_update_matches_brute_force():
  """Under ``jax_enable_x64`` with float64 params and data, the client update runs (its loss and
  example accumulators follow the loss dtype) and equals float64 SGD by hand."""
  store = _store()
  cid = int(np.argmax(store.num_examples()))
  bucket = packing.Bucket(3, 3, {"features": (5, F), "labels": (2,)})
  data = packing.pack_client(store.examples(cid), bucket)
  with jax.enable_x64(True):
    as64 = lambda x: np.asarray(x, np.float64) if np.issubdtype(x.dtype, np.floating) else x
    params = jax.tree.map(as64, _params(1))
    data = {k: as64(v) for k, v in data.items()}
    cu = jax.jit(client.make_client_update(toy.make_loss_fn(), optax.sgd(0.3), num_epochs=2))
    out = cu(params, data, jax.random.key(0))
    assert out.update["delta"]["hidden"]["kernel"].dtype == np.float64
    assert out.metrics["loss"].dtype == np.float64
    _leaves_close(out.update["delta"], _sgd_brute_force(params, data, 0.3, 2), 1e-12)


def test_inputs_placed_any_way_run_one_compiled_program():
  """The same client input as fresh (uncommitted) arrays, as committed jit outputs, and as host
  arrays runs one compiled chunk program, with the same result (a run's mask was a fresh array in
  make demo's dense run and a jitted output in its pruned run: two compilations of one program)."""
  store = _store()
  cu = client.make_client_update(toy.make_loss_fn(), optax.sgd(0.2))
  ex = executor.ChunkedExecutor(cu, 4)
  ids, key = np.arange(8), jax.random.key(0)
  fresh = _params()
  committed = jax.jit(lambda p: jax.tree.map(lambda x: x * 1.0, p))(
    jax.device_put(fresh, jax.devices()[0])
  )
  host = jax.tree.map(np.asarray, fresh)
  results = [ex(p, store, ids, key)[0] for p in (fresh, committed, host)]
  assert ex._chunk_step._cache_size() == 1  # pylint: disable=protected-access
  for got in results[1:]:
    _leaves_close(got, results[0], tol=0)
