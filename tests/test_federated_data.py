"""Cohort sampling, client packing / bucketing, stores, and the round driver."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from fedprune_jax.algorithms import build
from fedprune_jax.federated import client_data, packing, rounds, sampling, toy


# ---------------------------------------------------------------- sampling


def test_sampling_deterministic_distinct_and_round_dependent():
  s = sampling.CohortSampler(50, 10, seed=3)
  a, b = s.sample(4), s.sample(4)
  np.testing.assert_array_equal(a, b)
  assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 50
  assert not np.array_equal(s.sample(4), s.sample(5))
  assert not np.array_equal(s.sample(4), sampling.CohortSampler(50, 10, seed=4).sample(4))
  full = sampling.CohortSampler(7, 7, seed=0).sample(2)
  assert sorted(full.tolist()) == list(range(7))


def test_weighted_sampling_frequencies():
  w = np.array([0.0, 1.0, 1.0, 2.0, 4.0])
  s = sampling.CohortSampler(5, 1, seed=0, weights=w)
  counts = np.bincount([s.sample(r)[0] for r in range(4000)], minlength=5)
  assert counts[0] == 0  # zero weight is never drawn
  np.testing.assert_allclose(counts / 4000, w / w.sum(), atol=0.03)
  s2 = sampling.CohortSampler(5, 4, seed=0, weights=w)
  for r in range(20):
    assert sorted(s2.sample(r).tolist()) == [1, 2, 3, 4]


def test_sampler_rejects_bad_input():
  with pytest.raises(ValueError, match="cohort_size"):
    sampling.CohortSampler(5, 6)
  with pytest.raises(ValueError, match="weights"):
    sampling.CohortSampler(3, 1, weights=np.array([1.0, -1.0, 1.0]))
  with pytest.raises(ValueError, match="positive weight"):
    sampling.CohortSampler(3, 2, weights=np.array([1.0, 0.0, 0.0]))


# ------------------------------------------------------------ client data


def _examples(rng, n, max_t, feat=3):
  out = []
  for _ in range(n):
    t = int(rng.integers(1, max_t + 1))
    l = int(rng.integers(1, 4))
    out.append(
      {
        "features": rng.normal(size=(t, feat)).astype(np.float32),
        "labels": rng.integers(1, 29, size=l).astype(np.int32),
      }
    )
  return out


def test_pack_client_layout():
  rng = np.random.default_rng(0)
  exs = _examples(rng, 5, 6)
  bucket = packing.Bucket(3, 2, {"features": (6, 3), "labels": (4,)})
  d = packing.pack_client(exs, bucket)
  assert d["features"].shape == (3, 2, 6, 3)
  assert d["labels"].dtype == np.int32
  np.testing.assert_array_equal(d["weights"].ravel(), [1, 1, 1, 1, 1, 0])
  for i, ex in enumerate(exs):
    s, b = divmod(i, 2)
    t, l = len(ex["features"]), len(ex["labels"])
    np.testing.assert_array_equal(d["features"][s, b, :t], ex["features"])
    assert not d["features"][s, b, t:].any()
    np.testing.assert_array_equal(d["feature_paddings"][s, b], [0] * t + [1] * (6 - t))
    np.testing.assert_array_equal(d["labels"][s, b, :l], ex["labels"])
    np.testing.assert_array_equal(d["label_paddings"][s, b], [0] * l + [1] * (4 - l))
  assert d["feature_paddings"][2, 1].all()
  with pytest.raises(ValueError, match="spk7.*'features'"):
    packing.pack_client([{"features": np.zeros((9, 3)), "labels": np.ones(2)}], bucket, name="spk7")
  with pytest.raises(ValueError, match="exceed"):
    packing.pack_client(exs * 2, bucket)


def test_buckets_cut_padding_and_store_roundtrip():
  rng = np.random.default_rng(1)
  sizes = rng.integers(1, 30, size=40)
  clients = {f"s{i}": _examples(rng, int(n), int(rng.integers(5, 60))) for i, n in enumerate(sizes)}
  waste = {}
  for nb in (1, 4):
    store = client_data.InMemoryClientStore.from_examples(
      clients, batch_size=4, num_buckets=nb, round_to=1
    )
    waste[nb] = store.padding_fraction()
    assert len(store.buckets) <= nb
    # brute-force padding fraction over the packed arrays
    real = sum(len(e["features"]) for c in clients.values() for e in c)
    slots = sum(
      store.buckets[b].slots * store.buckets[b].shapes["features"][0]
      for b in store.bucket_of(np.arange(40))
    )
    np.testing.assert_allclose(waste[nb], 1 - real / slots)
  assert waste[4] < waste[1]
  np.testing.assert_array_equal(store.num_examples(), sizes)
  ids = np.flatnonzero(store.bucket_of(np.arange(40)) == 2)[:3]
  chunk = store.get(np.concatenate([ids, [-1]]))
  assert chunk["weights"][-1].sum() == 0 and chunk["feature_paddings"][-1].all()
  for j, cid in enumerate(ids):
    exs = clients[f"s{cid}"]
    flat = chunk["features"][j].reshape(-1, *chunk["features"].shape[3:])
    for i, ex in enumerate(exs):
      np.testing.assert_array_equal(flat[i, : len(ex["features"])], ex["features"])
  with pytest.raises(ValueError, match="share a bucket"):
    store.get(np.array([int(np.flatnonzero(store.bucket_of(np.arange(40)) == 0)[0]), int(ids[0])]))


def test_synthetic_store_is_lazy_and_deterministic():
  a = client_data.SyntheticClientStore(1000, seed=2, num_buckets=2)
  b = client_data.SyntheticClientStore(1000, seed=2, num_buckets=2)
  ids = np.flatnonzero(a.bucket_of(np.arange(1000)) == 1)[[5, 9, 400]]
  ca, cb = a.get(ids), b.get(ids)
  for k in ca:
    np.testing.assert_array_equal(ca[k], cb[k])
  np.testing.assert_array_equal(ca["weights"].sum((1, 2)), a.num_examples()[ids])
  # the vectorised generator packs exactly like pack_client(examples)
  bucket = a.buckets[1]
  for j, cid in enumerate(ids):
    ref = packing.pack_client(a.examples(int(cid)), bucket)
    for k in ref:
      np.testing.assert_array_equal(ca[k][j], ref[k])
  mem = a.materialize(ids)
  for k in ca:
    np.testing.assert_array_equal(mem.get(np.arange(3))[k], ca[k])


# ------------------------------------------------------------ round driver


def _run(tmp_path, rounds_, state=None, log="log.jsonl", on_round=None):
  store = client_data.SyntheticClientStore(
    24,
    batch_size=4,
    max_examples=8,
    num_frames=6,
    feature_dim=4,
    label_len=2,
    num_classes=3,
    seed=0,
  )
  cfg = {
    "seed": 1,
    "rounds": rounds_,
    "cohort_size": 8,
    "sampling": "weighted",
    "eval_every": 2,
    "log_path": str(tmp_path / log),
    "client": {"learning_rate": 0.5, "num_epochs": 2},
    "server": {"optimizer": "fedadam", "learning_rate": 0.05},
    "engine": {"chunk_size": 3},
    "data": {"ignored": True},
  }
  params = toy.init_params(jax.random.key(0), 4, 3, hidden=8)
  loss = toy.make_loss_fn()
  all_ids = np.arange(24)
  full = {k: v.reshape((-1,) + v.shape[3:]) for k, v in store.get(all_ids).items()}

  def eval_fn(p, r):
    return {"loss": float(loss(p, full, None)[0]), "round": r}

  if on_round is None:
    return build.run_federated(
      cfg, loss, params, store, eval_fn=eval_fn, state=state, progress=False
    )
  # the same as run_federated, with a per-round callback
  c = rounds.resolve_config(cfg)
  algorithm = build.build_algorithm(c, loss)
  sampler = build.make_sampler(c, store)
  return rounds.run_rounds(
    algorithm,
    algorithm.init(params, 1),
    store,
    build.executor_factory_for(c["engine"]),
    sampler,
    rounds_,
    progress=False,
    on_round=on_round,
  )


def test_run_federated_learns_logs_and_resumes(tmp_path):
  saved = {}
  straight, _ = _run(tmp_path, 4, on_round=lambda st, m: saved.setdefault(m["round"], st))
  state, hist = _run(tmp_path, 4)
  for x, y in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(state)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  assert [h["round"] for h in hist] == list(range(4))
  assert int(state.round) == 4
  assert hist[3]["eval_loss"] < hist[1]["eval_loss"]
  assert hist[-1]["train_loss"] < hist[0]["train_loss"]
  lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
  assert len(lines) == 4 and lines[3]["eval_round"] == 4
  assert "eval_loss" not in lines[0]
  assert all(l["num_clients"] == 8 and l["clients_per_s"] > 0 for l in lines)
  # resume from the state saved after round 1 (2 rounds done) == 4 straight
  half = saved[1]
  assert int(half.round) == 2
  resumed, hist2 = _run(tmp_path, 4, state=half, log="b.jsonl")
  assert [h["round"] for h in hist2] == [2, 3]
  for x, y in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(state)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="client.lr"):
    rounds.resolve_config({"client": {"lr": 0.1}})
  with pytest.raises(ValueError, match="fedsgdx"):
    from fedprune_jax.federated import server  # pylint: disable=g-import-not-at-top

    server.make_server_optimizer("fedsgdx")


def test_server_state_orbax_roundtrip(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from fedprune_jax.federated import server  # pylint: disable=g-import-not-at-top

  opt = server.make_server_optimizer("fedyogi", 0.1)
  st = server.server_init(toy.init_params(jax.random.key(0), 4, 3), opt)
  st = server.server_update(st, jax.tree_util.tree_map(lambda x: x * 0 + 0.1, st.params), opt)
  ck = ocp.StandardCheckpointer()
  ck.save(tmp_path / "state", st)
  ck.wait_until_finished()
  back = ck.restore(tmp_path / "state", st)
  assert isinstance(back, server.ServerState) and int(back.round) == 1
  for a, b in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
