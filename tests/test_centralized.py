"""The one centralized training step (``fedprune train``, the warm start, the centralized pruning
baseline) against plain reference computations: dense training equals a plain optax loop, and the
centralized pruning baseline equals a brute-force loop of the federated mask rule."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import MICRO_MODEL
from fedprune_jax import config as config_lib
from fedprune_jax import pruning
from fedprune_jax import task
from fedprune_jax.algorithms import build
from fedprune_jax.algorithms import centralized as centralized_lib
from fedprune_jax.bench import step as bench_step
from fedprune_jax.data import batching
from fedprune_jax.train import centralized


def _micro_cfg(name: str, sets=()):
  overrides = [f"model.overrides.{k}={v!r}" for k, v in MICRO_MODEL.items()]
  return config_lib.load_config(name, overrides + list(sets))


def test_dense_train_step_equals_a_plain_optax_loop():
  """``fedprune train``'s step (mask=None) is value_and_grad + optimizer.update + apply_updates
  of the training loss (SpecAugment on), step after step on a fixed batch."""
  cfg = _micro_cfg("tiny_centralized")
  model = task.make_model(cfg)
  specaug = dict(cfg.specaug)
  optimizer = task.make_optimizer(cfg.optim, 10)
  batch = bench_step.synthetic_batch(4, 48, model.config.input_dim, seed=1, labels_len=16)
  params0 = model.init(jax.random.key(0))
  loss_fn = task.make_training_loss(model, specaug)

  @jax.jit
  def reference_step(p, s, key):
    (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, key)
    u, s = optimizer.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  ref, ref_state = params0, optimizer.init(params0)
  step = centralized.make_train_step(model, optimizer, specaug)
  got = jax.tree.map(jnp.copy, params0)  # the step donates its inputs
  got_state = optimizer.init(got)
  for i in range(4):
    key = jax.random.key(100 + i)
    ref, ref_state, ref_loss = reference_step(ref, ref_state, key)
    got, got_state, m = step(got, got_state, batch, key)
    np.testing.assert_allclose(float(m["loss"]), float(ref_loss), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  moved = sum(
    float(jnp.abs(a - b).sum()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params0))
  )
  assert moved > 0.0  # it trained


def test_masked_step_freezes_pruned_values_and_trains_the_rest():
  """The federated rule: the gradient is taken at apply_mask(params, mask); pruned values are
  kept as they were (frozen), kept ones move."""
  cfg = _micro_cfg("tiny_centralized")
  model = task.make_model(cfg)
  loss_fn = task.make_training_loss(model, None)
  batch = bench_step.synthetic_batch(4, 48, model.config.input_dim, seed=1, labels_len=16)
  params = model.init(jax.random.key(0))
  kernel = params["encoder"]["block_0"]["ffn1"]["dense_in"]["kernel"]
  keep = jnp.asarray(np.arange(kernel.size).reshape(kernel.shape) % 2 == 1)
  mask = jax.tree.map(lambda _: None, params)
  mask["encoder"]["block_0"]["ffn1"]["dense_in"]["kernel"] = keep
  tx = pruning.masked_optimizer(optax.adam(1e-2), mask, pruned="freeze")
  p, s = params, tx.init(params)
  step = jax.jit(functools.partial(centralized_lib.train_step, loss_fn, tx))
  for i in range(3):
    p, s, *_ = step(p, s, batch, jax.random.key(i), mask)
  before, after = (
    np.asarray(kernel),
    np.asarray(p["encoder"]["block_0"]["ffn1"]["dense_in"]["kernel"]),
  )
  np.testing.assert_array_equal(after[~np.asarray(keep)], before[~np.asarray(keep)])
  assert np.all(np.abs(after - before)[np.asarray(keep)] > 0)
  # the gradient was taken at the masked model: the reference gradient at apply_mask(params, mask)
  _, ref = jax.value_and_grad(loss_fn, has_aux=True)(
    pruning.apply_mask(p, mask), batch, jax.random.key(3)
  )
  _, _, _, _, got = step(p, s, batch, jax.random.key(3), mask)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


# --- the centralized pruning baseline -------------------------------------------------------------


def reference_baseline(
  loss_fn, params, examples, optimizer, policy, *, rounds_, per_round, batch_size, num_buckets, seed
):
  """Brute force: ``rounds_ * per_round`` steps over the epochs' bucketed batches; at the start
  of every round the policy may update the mask (scores from the server's params, or from what
  one client would upload: the mean per-step score term since the last update, the params then
  and the delta since); the model is apply_mask(params, mask) and the optimizer the
  federated one (pruned values frozen, moments reset on regrowth).

  Returns (params, mask, [mask of every round])."""
  tx = pruning.masked_optimizer(optimizer, pruned="freeze")
  state, mask = tx.init(params), policy.init_mask(params)
  boundaries = batching.bucket_boundaries(
    np.array([e.features.shape[0] for e in examples]), num_buckets
  )
  max_labels = batching.round_up(max(len(e.tokens) for e in examples), 16)

  def stream():
    epoch = 0
    while True:
      yield from batching.bucketed_batches(
        examples,
        None,
        batch_size,
        boundaries,
        rng=np.random.default_rng([seed, epoch]),
        max_labels=max_labels,
      )
      epoch += 1

  grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  key = jax.random.key(seed)
  batches = stream()
  per_step = policy.per_step
  gsum, gcount, start = None, 0, params  # since the last mask update
  masks = []
  for r in range(rounds_):
    if bool(policy.should_update(r)):
      data = None
      if bool(policy.scores_from_clients(r)) and gcount:
        mean = None if gsum is None else jax.tree.map(lambda a: a / gcount, gsum)
        data = policy.client_score.upload(mean, start, jax.tree.map(jnp.subtract, start, params))
      scores = policy.scores(r, params, data, jax.random.fold_in(key, r))
      mask = policy.next_mask(mask, scores, r, params)
      state = pruning.update_mask(state, mask)
      gsum, gcount, start = None, 0, params
    masks.append(mask)
    for s in range(per_round):
      step = r * per_round + s
      model = pruning.apply_mask(params, mask)
      _, g = grad(model, next(batches), jax.random.fold_in(key, step + 1_000_003))
      updates, state = tx.update(g, state, params)
      params = optax.apply_updates(params, updates)
      if per_step is not None:
        term = per_step(model, g)
        gsum = term if gsum is None else jax.tree.map(jnp.add, gsum, term)
      gcount += 1
  return params, mask, masks


@pytest.mark.parametrize(
  "score, num_buckets, resume", [("saliency", 1, False), ("magnitude", 2, True)]
)
def test_centralized_baseline_equals_the_reference_loop(
  tiny_corpus, tmp_path, score, num_buckets, resume
):
  """The ``centralized`` algorithm through the round driver (with 2 buckets: a call's batches
  padded to its longest; with rounds split into 3 calls; resumed from a round checkpoint by a
  second call) trains the reference loop's masks and params."""
  cfg = _micro_cfg("fedprune_tiny", [f"data.root={tiny_corpus}", f"pruning.score={score!r}"])
  model = task.make_model(cfg)
  loss_fn = task.make_training_loss(model, dict(cfg.specaug))
  params = model.init(jax.random.key(0))
  pcfg = build.resolve_pruning(
    {
      **cfg.pruning.to_dict(),
      "target_sparsity": 0.5,
      "pruning_rounds": 3,
      "update_every": 1,
      "refining_rounds": 1,
      "refine_every": 1,
      "pattern": "unstructured",
    }
  )
  policy = build.policy_from_config(pcfg, model.config.d_model // model.config.conv_groups)
  examples = task.load_train_split(cfg).examples()
  # Adam, with an eps above float noise: a gradient that is 0 up to rounding (a bias before a
  # normalization) would otherwise take +-lr steps of random sign
  optimizer = optax.adam(1e-3, eps=1e-4)
  kw = dict(batch_size=3, num_buckets=num_buckets, seed=2)
  ref_params, ref_mask, ref_masks = reference_baseline(
    loss_fn, params, examples, optimizer, policy, rounds_=5, per_round=3, **kw
  )
  parts = 3 if resume else 1  # rounds of 3 calls of 1 step, or of one call of 3 steps
  for rounds_ in (2, 5) if resume else (5,):  # a second process resumes from the checkpoint
    data = centralized_lib.ServerBatches(
      examples, steps_per_round=3, max_steps_per_call=3 // parts, **kw
    )
    assert data.parts == parts
    state, history = build.run_federated(
      {"seed": kw["seed"], "rounds": rounds_ * parts, "checkpoint_dir": str(tmp_path / "rounds")},
      loss_fn,
      params,
      centralized_lib.SERVER_STORE,
      progress=False,
      policy=policy,
      server=centralized_lib.ServerInputs(data, optimizer),
    )
  got_params, got_mask = state.params, state.mask
  assert len({float(pruning.sparsity(m)) for m in ref_masks}) >= 3  # the mask did change
  assert [h["sparsity"] for h in history] == pytest.approx(
    [float(pruning.sparsity(m)) for m in ref_masks for _ in range(parts)], abs=1e-7
  )
  assert [h["sum_num_steps"] for h in history] == [3.0 / parts] * 5 * parts
  for a, b in zip(jax.tree.leaves(got_mask), jax.tree.leaves(ref_mask)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # float tolerance: the loop is jitted differently (a scan over a round's steps); measured
  # against main's loop: equal with one bucket, max |diff| 4e-6 with two
  for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_server_batches_cut_rounds_into_calls_and_resume_anywhere():
  """A round of S steps is the fewest equal calls of <= max steps; call d is steps [d*P, (d+1)*P)
  of the epoch stream, padded to its longest bucket, the same when asked first (a resume)."""
  rng = np.random.default_rng(0)
  examples = [
    batching.Example(
      rng.normal(size=(int(t), 4)).astype(np.float32), np.arange(1, 4, dtype=np.int32)
    )
    for t in rng.integers(5, 40, 30)
  ]
  assert centralized_lib.ServerBatches(examples, 2, 1, 0, 2000).parts == 40  # 40 calls of 50
  data = centralized_lib.ServerBatches(examples, 2, 3, 0, 6, total_steps=40, max_steps_per_call=4)
  assert (data.parts, data.steps_per_call) == (2, 3)
  stream = centralized_lib.batch_stream(examples, 2, data.boundaries, 0, data.max_labels)
  expected = [next(stream)[1] for _ in range(40)]
  calls = [data.call(d) for d in range(14)]
  assert [c["weights"].shape[0] for c in calls] == [3] * 13 + [1]  # the last call: 40 - 39
  for d, call in enumerate(calls):
    for s in range(call["weights"].shape[0]):
      want, got = expected[d * 3 + s], jax.tree.map(lambda x: x[s], call)
      t = want["features"].shape[1]
      np.testing.assert_array_equal(got["features"][:, :t], want["features"])
      assert np.all(got["features"][:, t:] == 0) and np.all(got["feature_paddings"][:, t:] == 1)
      np.testing.assert_array_equal(got["labels"], want["labels"])
  again = centralized_lib.ServerBatches(examples, 2, 3, 0, 6, total_steps=40, max_steps_per_call=4)
  for k in calls[9]:
    np.testing.assert_array_equal(again.call(9)[k], calls[9][k])
