"""Federated pruning: one round against a hand-written reference, schedule and phases, mask
refinement, the mask-aware server optimizer, client-score aggregation, and the centralized
baseline's policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import toy_store
from fedprune_jax import pruning
from fedprune_jax.algorithms import build, fedprune, mask_policy
from fedprune_jax.federated import aggregation, client, executor, rounds, toy
from fedprune_jax.federated.algorithm import executor_factory
from fedprune_jax.federated.sampling import CohortSampler
from fedprune_jax.pruning import scores as scores_lib

F, K, H = 4, 3, 6


def _store(n=10, seed=0):
  return toy_store(n, seed)


def _params(seed=0):
  return toy.init_params(jax.random.key(seed), F, K, hidden=H)


def _policy(schedule="polynomial", **kw):
  pcfg = build.resolve_pruning(
    {
      "target_sparsity": 0.6,
      "schedule": schedule,
      "pruning_rounds": kw.pop("pruning_rounds", 4),
      "update_every": 1,
      **kw,
    }
  )
  return build.policy_from_config(pcfg)


def _algorithm(policy, lr=0.3, server="fedavg", cohort=6):
  local = client.make_client_update(toy.make_loss_fn(), optax.sgd(lr), per_step=policy.per_step)
  opt = optax.sgd(1.0) if server == "fedavg" else optax.adam(0.05, eps=1e-3)
  return fedprune.federated_pruning(local, opt, policy, cohort)


def _close(a, b, tol=1e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def _masked_sgd(params, mask, data, lr):
  """Brute-force local training of one client: plain loop over live steps, masked grads."""
  loss_fn = toy.make_loss_fn()
  p = pruning.apply_mask(params, mask)
  for s in range(data["weights"].shape[0]):
    batch = {k: v[s] for k, v in data.items()}
    if batch["weights"].sum() == 0:
      continue
    g = jax.grad(lambda q: loss_fn(q, batch, None)[0])(p)
    g = pruning.apply_mask(g, mask)
    p = jax.tree.map(lambda a, b: a - lr * b, p, g)
  return p


@pytest.mark.parametrize("schedule", ["constant", "polynomial"])
def test_one_round_equals_hand_written_reference(schedule):
  store, params, lr = _store(), _params(), 0.3
  policy = _policy(schedule)
  alg = _algorithm(policy, lr)
  ids = np.array([7, 2, 5, 0, 9, 3])
  sampler = CohortSampler(store.num_clients, len(ids), seed=0)
  cohort = sampler.sample(0)

  # reference: mask from the server params at step 0, clients on the masked model, weighted mean,
  # FedAvg step, next mask from the new params (pruned entries score 0, monotone)
  s0 = float(policy.target(0))
  mask0 = pruning.prune_mask(
    pruning.magnitude(params), s0, pattern="unstructured", allocation="uniform"
  )
  ends, weights = [], []
  for cid in cohort:
    data = {k: v[0] for k, v in store.get(np.array([cid])).items()}
    ends.append(_masked_sgd(params, mask0, data, lr))
    weights.append(float(data["weights"].sum()))
  w = np.array(weights) / sum(weights)
  start = pruning.apply_mask(params, mask0)
  mean_delta = jax.tree.map(lambda s, *e: sum(wi * (s - ei) for wi, ei in zip(w, e)), start, *ends)
  new_params = jax.tree.map(
    lambda p, d, m: p - d, params, mean_delta, pruning.dense_mask(mask0, params)
  )
  scores = jax.tree.map(
    lambda x, m: jnp.where(m, jnp.abs(x), 0.0), new_params, pruning.dense_mask(mask0, params)
  )
  mask1 = pruning.prune_mask(
    scores, float(policy.target(1)), pattern="unstructured", allocation="uniform"
  )
  if schedule == "constant":  # one-shot: no update after round 0
    mask1 = mask0
  mask1 = jax.tree.map(
    lambda a, b: None if a is None else a & b, mask1, mask0, is_leaf=lambda x: x is None
  )

  state0 = alg.init(params, 0)
  _close(state0.mask, mask0)
  ex = executor_factory(executor.ChunkedExecutor, 4)
  state, hist = rounds.run_rounds(alg, state0, store, ex, sampler, 1, progress=False)
  _close(state.params, new_params, 1e-5)
  for a, b in zip(jax.tree.leaves(state.mask), jax.tree.leaves(mask1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert hist[0]["sparsity"] == pytest.approx(s0, abs=1 / 24)
  assert int(state.round) == 1


def test_sparsity_follows_schedule_phases_and_fine_tuning_freezes_the_mask():
  store = _store(12)
  policy = _policy("polynomial", pruning_rounds=5, refining_rounds=2, refine_every=1)
  alg = _algorithm(policy)
  sampler = CohortSampler(store.num_clients, 4, seed=1)
  masks = []
  ex = executor_factory(executor.ChunkedExecutor, 4)
  state, hist = rounds.run_rounds(
    alg,
    alg.init(_params(1), 3),
    store,
    ex,
    sampler,
    10,
    progress=False,
    on_round=lambda st, m: masks.append(st.mask),
  )
  total = sum(m.size for m in jax.tree.leaves(masks[0]))
  for r, h in enumerate(hist):
    assert h["phase"] == int(policy.phase(r))
    expected = float(policy.target(min(r, 4)))  # update_every=1: every pruning round updates
    assert h["sparsity"] == pytest.approx(expected, abs=2 / total), r
  assert [h["phase"] for h in hist] == [0] * 5 + [1] * 2 + [2] * 3
  flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(m)]) for m in masks]
  # masks[r] is the mask after round r, i.e. the mask of round r + 1
  for r in range(3):  # pruning phase: masks only shrink
    assert np.all(flat[r + 1] <= flat[r])
  for r in range(6, 9):  # fine-tuning: frozen
    np.testing.assert_array_equal(flat[r + 1], flat[r])


def test_refining_revives_a_weight_whose_score_rises_and_pruning_does_not():
  policy = _policy(
    "constant", pruning_rounds=2, refining_rounds=2, refine_every=1, target_sparsity=0.5
  )
  alg = _algorithm(policy, server="fedavg")
  params = _params(2)
  state = alg.init(params, 0)  # one-shot mask at round 0
  kernel_mask = np.asarray(state.mask["hidden"]["kernel"])
  i, j = np.argwhere(~kernel_mask)[0]
  # the server keeps pruned values; raise this one above every kept weight
  big = float(jnp.abs(params["hidden"]["kernel"]).max()) * 10
  params2 = jax.tree.map(lambda x: x, state.params)
  params2["hidden"]["kernel"] = params2["hidden"]["kernel"].at[i, j].set(big)
  zero = jax.tree.map(jnp.zeros_like, params)
  agg = aggregation.Aggregate({"delta": zero}, jnp.float32(1), jnp.float32(1), jnp.float32(1))
  update = jax.jit(alg.server_update)
  # round 0 -> mask of round 1 (pruning phase, not an update step of a constant schedule)
  st1, _ = update(state.replace(params=params2), agg)
  assert not bool(st1.mask["hidden"]["kernel"][i, j])
  # round 1 -> mask of round 2: the refining phase re-scores the server's dense params
  st2, m2 = update(st1, agg)
  assert bool(st2.mask["hidden"]["kernel"][i, j])
  assert float(st2.params["hidden"]["kernel"][i, j]) == big  # revived with its kept value
  assert m2["revived_next"] >= 1
  assert float(pruning.sparsity(st2.mask)) == pytest.approx(0.5, abs=1 / 24)


def test_fedadam_pruned_coordinates_do_not_drift_and_regrown_moments_reset():
  policy = _policy("constant", pruning_rounds=2, refining_rounds=1, target_sparsity=0.5)
  alg = _algorithm(policy, server="fedadam")
  params = _params(3)
  state = alg.init(params, 0)
  m = pruning.dense_mask(state.mask, params)
  update = jax.jit(alg.server_update)
  # adversarial aggregates with non-zero delta everywhere, pruned coordinates included
  for r in range(2):
    delta = jax.tree.map(lambda x: jnp.full_like(x, 0.1 * (r + 1)), params)
    agg = aggregation.Aggregate({"delta": delta}, jnp.float32(1), jnp.float32(1), jnp.float32(1))
    new, _ = update(state, agg)
    for p_old, p_new, keep in zip(*map(jax.tree.leaves, (state.params, new.params, m))):
      np.testing.assert_array_equal(
        np.asarray(p_new)[~np.asarray(keep)], np.asarray(p_old)[~np.asarray(keep)]
      )
      assert np.all(np.asarray(p_new)[np.asarray(keep)] != np.asarray(p_old)[np.asarray(keep)])
    if r == 0:
      state = new
  # round 1 -> 2 is a refining update: regrown entries have zero Adam moments
  regrown = jax.tree.map(lambda n, o: n & ~o, pruning.dense_mask(new.mask, params), m)
  mu = new.opt_state.inner_state[0].mu
  for mu_leaf, g in zip(jax.tree.leaves(mu), jax.tree.leaves(regrown)):
    assert np.all(np.asarray(mu_leaf)[np.asarray(g)] == 0.0)


def test_all_failed_round_keeps_params_optimizer_and_mask():
  policy = _policy("polynomial", score="saliency")
  alg = _algorithm(policy, server="fedadam")
  state = alg.init(_params(4), 0)
  zero = jax.tree.map(jnp.zeros_like, state.params)
  agg = aggregation.Aggregate(
    {"delta": zero, "scores": zero}, jnp.float32(0), jnp.float32(0), jnp.float32(0)
  )
  new, _ = jax.jit(alg.server_update)(state, agg)
  _close(new.params, state.params, 0)
  _close(new.opt_state, state.opt_state, 0)
  _close(new.mask, state.mask, 0)
  assert int(new.round) == 1


@pytest.mark.parametrize("aggregation_kind", ["mean", "trimmed_mean", "vote"])
def test_client_scores_equal_brute_force_and_do_not_depend_on_chunks_or_order(aggregation_kind):
  store = _store(11)
  policy = _policy(
    "polynomial", score="saliency", client_aggregation=aggregation_kind, trim_fraction=0.2
  )
  alg = _algorithm(policy, cohort=10)
  state = alg.init(_params(5), 0)
  plan = alg.plan_round(state)
  msg, program = plan.client_input, plan.program
  assert bool(msg["want_scores"])
  ids = np.array([3, 9, 0, 4, 7, 1, 10, 5, 2, 8])
  key = jax.random.key(11)
  per_client = jax.jit(program.client_update)
  outs = [
    per_client(
      msg, {k: v[0] for k, v in store.get(np.array([c])).items()}, jax.random.fold_in(key, c)
    )
    for c in ids
  ]
  scores = [o.update["scores"] for o in outs]
  w = np.array([float(o.num_examples) for o in outs])
  if aggregation_kind == "trimmed_mean":
    k = int(0.2 * len(ids))

    def brute(*xs):
      s = np.sort(np.stack([np.asarray(x) for x in xs]), axis=0)
      return s[k : len(xs) - k].mean(axis=0)
  else:

    def brute(*xs):
      return sum(wi * np.asarray(x) for wi, x in zip(w, xs)) / w.sum()

  expected = jax.tree.map(brute, *scores)
  if aggregation_kind == "vote":  # votes are 0/1 and about half the entries
    v = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(scores[0])])
    assert set(np.unique(v)) <= {0.0, 1.0}
  results = []
  for chunk, order in ((3, ids), (10, ids), (4, ids[::-1])):
    ex = executor.ChunkedExecutor(program.client_update, chunk, reducers=program.reducers)
    agg, _ = ex(msg, store, order, key)
    _close(agg.update["scores"], expected, 1e-5)
    results.append(agg.update)
  seq, _ = executor.SequentialExecutor(program.client_update, reducers=program.reducers)(
    msg, store, ids, key
  )
  _close(seq.update, results[0], 1e-5)
  _close(results[1], results[2], 1e-5)


def test_trimmed_mean_reducer_matches_sorting_with_padding_and_failed_clients():
  red = aggregation.TrimmedMean(2)
  rng = np.random.default_rng(0)
  vals = rng.normal(size=(9, 3, 2)).astype(np.float32)
  weights = np.array([1, 2, 0, 1, 1, 3, 1, 0, 1], np.float32)  # two excluded
  st = red.init(jax.ShapeDtypeStruct((3, 2), jnp.float32))
  for lo in range(0, 9, 4):  # chunks of 4, the last one short
    st = red.add(st, jnp.asarray(vals[lo : lo + 4]), jnp.asarray(weights[lo : lo + 4]))
  live = np.sort(vals[weights > 0], axis=0)
  np.testing.assert_allclose(red.result(st, None), live[2:-2].mean(0), rtol=1e-6)


def test_one_shot_constant_schedule_without_refining_is_expressible():
  policy = _policy("constant", pruning_rounds=1, refining_rounds=0, target_sparsity=0.5)
  assert [bool(policy.should_update(r)) for r in range(5)] == [True, False, False, False, False]
  assert [int(policy.phase(r)) for r in range(3)] == [0, 2, 2]


def test_policy_rejects_a_schedule_that_ends_after_the_pruning_phase():
  with pytest.raises(ValueError, match="pruning_rounds"):
    _policy("step", pruning_rounds=3, step_delta=0.1, update_every=2)
  with pytest.raises(ValueError, match="pruning.score"):
    mask_policy.MaskPolicy(pruning.Constant(0.5), 1, score="sparkle")


def test_units_pattern_prunes_whole_conformer_units_consistently():
  from conftest import MICRO_MODEL  # pylint: disable=g-import-not-at-top
  from fedprune_jax.models import asr  # pylint: disable=g-import-not-at-top
  from fedprune_jax.pruning import units  # pylint: disable=g-import-not-at-top

  model = asr.make_asr_model("tiny", **dict(MICRO_MODEL, ffn_mult=4))
  params = model.init(jax.random.key(0))
  cpg = model.config.d_model // model.config.conv_groups
  policy = mask_policy.MaskPolicy(
    pruning.Constant(0.5), 1, pattern="units", allocation="uniform", channels_per_group=cpg
  )
  mask = policy.next_mask(policy.init_mask(params), pruning.magnitude(params), 0, params)
  expected = units.expand_unit_mask(
    params, cpg, units.unit_mask(params, cpg, 0.5, allocation="uniform")
  )
  for a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ffn = mask["encoder"]["block_0"]["ffn1"]
  cols = np.asarray(ffn["dense_in"]["kernel"]).all(axis=0)
  rows = np.asarray(ffn["dense_out"]["kernel"]).all(axis=1)
  np.testing.assert_array_equal(cols, rows)  # a hidden unit goes with its in-column and out-row
  assert cols.sum() == len(cols) // 2


def test_a_given_mask_is_trained_frozen_from_round_zero():
  """pruning.mask_path: the given mask is the reduced model of every round (fine-tuning phase,
  never updated), pruned weights stay exactly zero, and the logged sparsity is the mask's."""
  store = _store(8)
  pcfg = build.resolve_pruning({"target_sparsity": 0.6, "pruning_rounds": 2, "mask_path": "m"})
  policy = build.policy_from_config(pcfg)
  assert policy.frozen
  params = _params(2)
  rng = np.random.default_rng(0)
  given = jax.tree.map(
    lambda m: None if m is None else jnp.asarray(rng.random(m.shape) < 0.3),
    policy.init_mask(params),
    is_leaf=lambda x: x is None,
  )
  alg = fedprune.federated_pruning(
    client.make_client_update(toy.make_loss_fn(), optax.sgd(0.3)),
    optax.adam(0.05),
    policy,
    4,
    initial_mask=given,
  )
  ex = executor_factory(executor.ChunkedExecutor, 4)
  state0 = alg.init(params, 1)
  kept, total = fedprune.mask_stats(given)
  assert float(state0.sparsity) == pytest.approx(1 - float(kept) / float(total))
  state, hist = rounds.run_rounds(
    alg, state0, store, ex, CohortSampler(store.num_clients, 4, seed=0), 4, progress=False
  )
  for new, old in zip(jax.tree.leaves(state.mask), jax.tree.leaves(given)):
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
  assert [h["phase"] for h in hist] == [2] * 4 and all(h["mask_updated"] == 0 for h in hist)
  assert all(h["sparsity"] == pytest.approx(1 - float(kept) / float(total)) for h in hist)
  pairs = []  # (model, start, mask) of the prunable leaves
  jax.tree.map(
    lambda w, p, m: None if m is None else pairs.append((np.asarray(w), np.asarray(p), m)),
    alg.model_params(state),
    params,
    jax.tree.map(
      lambda m: None if m is None else np.asarray(m), given, is_leaf=lambda x: x is None
    ),
    is_leaf=lambda x: x is None,
  )
  assert pairs and all(np.all(w[~m] == 0) for w, _, m in pairs)
  assert any(np.any(w[m] != p[m]) for w, p, m in pairs)  # the kept weights did train


def test_a_compacted_clients_vote_ranks_the_dense_layer():
  """``local_vote`` on a compacted tree (the kept entries and some zero-scored pruned ones, as
  padding units) with the dense leaf sizes, scattered back, equals the dense client's vote (its
  pruned entries score 0); without the sizes the thresholds are the compacted leaves' own."""
  from fedprune_jax.pruning import compaction  # pylint: disable=g-import-not-at-top

  params = _params(3)
  rng = np.random.default_rng(0)
  mask = pruning.prune_mask(pruning.magnitude(params), 0.5)
  scores = jax.tree.map(
    lambda p, m: jnp.asarray(rng.random(p.shape), jnp.float32) * (1.0 if m is None else m),
    params,
    mask,
    is_leaf=lambda x: x is None,
  )

  def idx_of(m):  # kept entries and 2 pruned ones (their scores are 0)
    if m is None:
      return None
    m = np.ravel(np.asarray(m))
    return np.sort(np.concatenate([np.flatnonzero(m), np.flatnonzero(~m)[:2]])).astype(np.int32)

  idx = jax.tree.map(idx_of, mask, is_leaf=lambda x: x is None)
  small, small_mask = compaction.gather(scores, idx), compaction.gather(mask, idx)
  scoring = mask_policy.ClientScoring(scores_lib.get_score("saliency"), vote=True)
  sizes = scoring.compacted(params).dense_sizes
  assert sizes == tuple(int(np.size(x)) for x in jax.tree.leaves(params))
  dense = mask_policy.local_vote(scores, mask, 0.7)
  got = compaction.scatter(mask_policy.local_vote(small, small_mask, 0.7, sizes), idx, params)
  _close(got, dense, 0)
  own = compaction.scatter(mask_policy.local_vote(small, small_mask, 0.7), idx, params)
  assert not all(np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, (own, dense))))


def test_a_movement_vote_keeps_clients_masked_dense():
  """Movement's scores are shifted by the whole tree's minimum, so a pruned entry's vote depends
  on the other entries: its votes are not taken on the compacted model (compact='on' is an error;
  the saliency vote builds)."""
  local = client.make_client_update(toy.make_loss_fn(), optax.sgd(0.3))
  compact = fedprune.CompactClients(1, lambda sizes: (None, local), mode="on")
  for score, ok in (("saliency", True), ("update", True), ("taylor", True), ("movement", False)):
    policy = _policy(score=score, client_aggregation="vote")
    assert policy.client_scoring.compactable == ok
    if ok:
      fedprune.federated_pruning(local, optax.sgd(1.0), policy, 4, compact=compact)
    else:
      with pytest.raises(ValueError, match="movement"):
        fedprune.federated_pruning(local, optax.sgd(1.0), policy, 4, compact=compact)
      with pytest.raises(ValueError, match="movement"):
        policy.client_scoring.compacted(_params(0))
    # without a vote every client score is computed on the compacted model
    assert _policy(score=score).client_scoring.compacted(_params(0)).dense_sizes is None
