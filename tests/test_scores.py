"""Importance scores as pluggable units (``pruning.scores``): the registry agrees with the config's
allowed names; Taylor, movement and update against brute-force loops over a client's local steps,
in one client and in one federated-pruning round (clients, aggregate, server scores, next mask);
saliency, Taylor and movement in the centralized baseline's step; and a run selecting each
through the config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import toy_store
from fedprune_jax import fields, pruning
from fedprune_jax.algorithms import build, centralized, fedprune
from fedprune_jax.federated import client, executor, rounds, toy
from fedprune_jax.federated.algorithm import executor_factory
from fedprune_jax.federated.sampling import CohortSampler
from fedprune_jax.pruning import scores as scores_lib

F, K, H = 4, 3, 6
LR = 0.3


def _policy(score: str, **kw):
  pcfg = build.resolve_pruning(
    {"target_sparsity": 0.6, "pruning_rounds": 4, "update_every": 1, "score": score, **kw}
  )
  return build.policy_from_config(pcfg)


def _brute_force_client(params, mask, data, score: str):
  """A plain loop over a client's live steps: masked SGD, and the mean over those steps of
  |w_t g_t| (taylor) or -w_t g_t (movement) at the current masked params, g_t unmasked; for
  update, the size of the client's change |w_start - w_end| instead."""
  loss_fn = toy.make_loss_fn()
  p = start = pruning.apply_mask(params, mask)
  acc, steps = jax.tree.map(jnp.zeros_like, p), 0
  for s in range(data["weights"].shape[0]):
    batch = {k: v[s] for k, v in data.items()}
    if batch["weights"].sum() == 0:
      continue
    g = jax.grad(lambda q: loss_fn(q, batch, None)[0])(p)
    if score == "taylor":
      term = jax.tree.map(lambda w, gi: np.abs(np.asarray(w) * np.asarray(gi)), p, g)
    else:
      term = jax.tree.map(lambda w, gi: -np.asarray(w) * np.asarray(gi), p, g)
    acc = jax.tree.map(lambda a, t: a + t, acc, term)
    steps += 1
    g = pruning.apply_mask(g, mask)
    p = jax.tree.map(lambda a, b: a - LR * b, p, g)
  if score == "update":
    return p, jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)), start, p)
  return p, jax.tree.map(lambda a: a / steps, acc)


def _close(a, b, tol=1e-5):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def test_registry_is_the_configs_allowed_scores():
  assert set(scores_lib.REGISTRY) == set(fields.SERVER_SCORES + fields.CLIENT_SCORES)
  assert {n for n, s in scores_lib.REGISTRY.items() if s.from_clients} == set(fields.CLIENT_SCORES)
  assert {n for n, s in scores_lib.REGISTRY.items() if s.server} == set(fields.SERVER_SCORES)
  assert fields.FIELDS["pruning.score"].rule.choices is not None
  for name in scores_lib.REGISTRY:
    fields.check("pruning.score", name)
  with pytest.raises(ValueError, match="pruning.score"):
    scores_lib.get_score("sparkle")


def test_movement_shift_keeps_the_order_and_ranks_every_entry_above_zero():
  s = {"a": jnp.array([-3.0, 0.5, -1e-8]), "b": jnp.array([[2.0, -3.0]]), "n": None}
  out = scores_lib.shift_to_nonnegative(s)
  flat_in = np.concatenate([np.ravel(s["a"]), np.ravel(s["b"])])
  flat_out = np.concatenate([np.ravel(out["a"]), np.ravel(out["b"])])
  assert out["n"] is None and np.all(flat_out > 0)
  np.testing.assert_array_equal(
    np.argsort(flat_in, kind="stable"), np.argsort(flat_out, kind="stable")
  )
  np.testing.assert_allclose(flat_out, flat_in + 3.0, atol=1e-7)


@pytest.mark.parametrize("score", ["taylor", "movement", "update"])
def test_client_scores_equal_a_brute_force_accumulation_over_local_steps(score):
  """One client, two epochs' worth of live steps plus a padding step, with a mask: its upload is
  the mean over live steps of the per-step term at its current masked params (update: the size
  of its change over those steps)."""
  params = toy.init_params(jax.random.key(1), F, K, hidden=H)
  mask = pruning.prune_mask(pruning.magnitude(params), 0.5)
  data = {k: v[0] for k, v in toy_store(4, 2).get(np.array([1])).items()}
  assert data["weights"].shape[0] >= 2 and float(data["weights"][-1].sum()) == 0.0  # padding
  policy = _policy(score)
  local = client.make_client_update(toy.make_loss_fn(), optax.sgd(LR), per_step=policy.per_step)
  alg = fedprune.federated_pruning(local, optax.sgd(1.0), policy, 4)
  program = alg.plan_round(alg.init(params, 0)).program
  msg = {
    "params": pruning.apply_mask(params, mask),
    "mask": mask,
    "want_scores": jnp.bool_(True),
    "sparsity": jnp.float32(0.6),
  }
  out = jax.jit(program.client_update)(msg, data, jax.random.key(0))
  p_end, expected = _brute_force_client(params, mask, data, score)
  _close(out.update["scores"], expected, 1e-6)
  _close(out.update["delta"], jax.tree.map(jnp.subtract, msg["params"], p_end), 1e-6)
  dense = pruning.dense_mask(mask, params)
  for s, m in zip(jax.tree.leaves(out.update["scores"]), jax.tree.leaves(dense)):
    np.testing.assert_array_equal(np.asarray(s)[~np.asarray(m)], 0.0)  # w = 0 there
  assert any(np.any(np.asarray(s) != 0) for s in jax.tree.leaves(out.update["scores"]))


@pytest.mark.parametrize("score", ["taylor", "movement", "update"])
def test_one_round_selecting_the_score_equals_a_hand_written_reference(score):
  """Round 0 of federated pruning with the score chosen in the config: brute-force clients, the
  example-weighted mean of their uploads, the server's scores (movement shifted by its minimum)
  and the next mask (uniform, unstructured, intersected with the current one)."""
  store, params = toy_store(10, 0), toy.init_params(jax.random.key(0), F, K, hidden=H)
  policy = _policy(score)
  local = client.make_client_update(toy.make_loss_fn(), optax.sgd(LR), per_step=policy.per_step)
  alg = fedprune.federated_pruning(local, optax.sgd(1.0), policy, 6)
  sampler = CohortSampler(store.num_clients, 6, seed=0)
  sets = {"include": policy.include, "exclude": policy.exclude, "allocation": "uniform"}
  mask0 = pruning.prune_mask(pruning.magnitude(params), 0.0, **sets)  # the schedule starts dense
  ends, uploads, weights = [], [], []
  for cid in sampler.sample(0):
    data = {k: v[0] for k, v in store.get(np.array([cid])).items()}
    end, up = _brute_force_client(params, mask0, data, score)
    ends.append(end)
    uploads.append(up)
    weights.append(float(data["weights"].sum()))
  w = np.array(weights) / sum(weights)
  start = pruning.apply_mask(params, mask0)
  new_params = jax.tree.map(
    lambda s, *e: s - sum(wi * (s - ei) for wi, ei in zip(w, e)), start, *ends
  )
  agg = jax.tree.map(lambda *u: sum(wi * ui for wi, ui in zip(w, u)), *uploads)
  if score == "movement":  # shifted by the minimum to > 0 (the smallest one to the tiniest float)
    low = min(float(np.min(x)) for x in jax.tree.leaves(agg))
    agg = jax.tree.map(lambda a: (a - low + np.finfo(np.float32).tiny).astype(np.float32), agg)
  m0 = pruning.dense_mask(mask0, params)
  ref = jax.tree.map(lambda a, m: np.where(m, a, 0.0), agg, m0)
  mask1 = pruning.prune_mask(ref, policy.target(1), **sets)
  mask1 = jax.tree.map(
    lambda a, b: None if a is None else a & b, mask1, mask0, is_leaf=lambda x: x is None
  )
  state0 = alg.init(params, 0)
  ex = executor_factory(executor.ChunkedExecutor, 4)
  state, hist = rounds.run_rounds(alg, state0, store, ex, sampler, 1, progress=False)
  _close(state.params, new_params, 1e-5)
  for a, b in zip(jax.tree.leaves(state.mask), jax.tree.leaves(mask1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the client-data score chose another mask than magnitude of the new params would have
  mag = pruning.prune_mask(pruning.magnitude(new_params), policy.target(1), **sets)
  assert any(
    np.any(np.asarray(a) != np.asarray(b))
    for a, b in zip(jax.tree.leaves(state.mask), jax.tree.leaves(mag))
  )
  assert hist[0]["mask_updated"] == 1.0


@pytest.mark.parametrize("score", ["taylor", "movement"])
def test_a_run_selects_the_score_through_the_config(score):
  cfg = {
    "seed": 1,
    "rounds": 2,
    "cohort_size": 4,
    "client": {"learning_rate": 0.3},
    "engine": {"chunk_size": 2},
    "pruning": {"score": score, "target_sparsity": 0.5, "pruning_rounds": 2, "schedule": "constant",
                "begin_round": 1},
  }  # fmt: skip
  params = toy.init_params(jax.random.key(0), F, K, hidden=H)
  state, hist = build.run_federated(
    cfg, toy.make_loss_fn(), params, toy_store(8, 1), progress=False
  )
  assert build.resolve(cfg)[1].client_score is scores_lib.REGISTRY[score]
  assert hist[0]["sparsity"] == 0.0 and hist[1]["sparsity"] == pytest.approx(0.5, abs=0.05)
  # the clients of round 0 uploaded scores (the delta and as much again)
  assert hist[0]["bytes_up_sent"] > hist[1]["bytes_up_sent"] * 1.5


@pytest.mark.parametrize("score", ["saliency", "taylor", "movement"])
def test_centralized_step_accumulates_the_scores_per_step_terms(score):
  """The centralized baseline's step accumulates the same per-step term as a client, at the
  masked params (pruned values kept in ``params``, zero in the model)."""
  params = toy.init_params(jax.random.key(3), F, K, hidden=H)
  mask = pruning.prune_mask(pruning.magnitude(params), 0.5)
  per_step = scores_lib.REGISTRY[score].per_step
  tx = pruning.masked_optimizer(optax.sgd(LR), pruned="freeze")
  step = jax.jit(centralized.scoring_step(toy.make_loss_fn(), tx, per_step))
  data = toy_store(2, 4).get(np.array([0]))
  opt_state = pruning.update_mask(tx.init(params), mask)
  acc = jax.tree.map(jnp.zeros_like, params)
  p, expected = params, jax.tree.map(jnp.zeros_like, params)
  for s in range(2):
    batch = {k: v[0, s] for k, v in data.items()}
    model = pruning.apply_mask(p, mask)
    g = jax.grad(lambda q: toy.make_loss_fn()(q, batch, None)[0])(model)
    if score == "saliency":
      term = jax.tree.map(lambda gi: np.abs(np.asarray(gi)), g)
    elif score == "taylor":
      term = jax.tree.map(lambda w, gi: np.abs(np.asarray(w) * np.asarray(gi)), model, g)
    else:
      term = jax.tree.map(lambda w, gi: -np.asarray(w) * np.asarray(gi), model, g)
    expected = jax.tree.map(lambda a, t: a + t, expected, term)
    p, opt_state, _, acc = step(p, opt_state, mask, batch, jax.random.key(s), acc)
  _close(acc, expected, 1e-6)


@pytest.mark.parametrize("name", fields.CLIENT_SCORES)
def test_zero_at_pruned_says_whether_a_pruned_entry_finishes_to_zero(name):
  """What ``Score.zero_at_pruned`` promises (a compacted client's vote relies on it): at a pruned
  entry (weight 0 and frozen: gradient term and delta 0 there) a client's own scores are exactly
  0 and every score is >= 0; movement's shift puts a pruned entry at minus the tree's minimum."""
  score = scores_lib.get_score(name)
  rng = np.random.default_rng(1)
  params = toy.init_params(jax.random.key(2), F, K, hidden=H)
  mask = pruning.prune_mask(pruning.magnitude(params), 0.5)
  dense_mask = pruning.dense_mask(mask, params)
  params = pruning.apply_mask(params, mask)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  delta = pruning.apply_mask(jax.tree.map(lambda g: 0.1 * g, grads), mask)
  step_mean = None if score.per_step is None else score.per_step(params, grads)
  out = score.finish(params, score.upload(step_mean, params, delta))
  pruned = np.concatenate([np.ravel(~np.asarray(m)) for m in jax.tree.leaves(dense_mask)])
  flat = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(out)])
  assert pruned.any() and np.all(flat >= 0)
  if score.zero_at_pruned:
    np.testing.assert_array_equal(flat[pruned], 0.0)
  else:
    assert name == "movement" and np.all(flat[pruned] > 0)
