"""RNN-T loss, decoding and head: brute force, a NumPy DP, finite differences, hand-built joints."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import MICRO_MODEL
from fedprune_jax import pruning
from fedprune_jax.bench import step as step_lib
from fedprune_jax.models import asr
from fedprune_jax.models import rnnt
from fedprune_jax.models import transducer
from fedprune_jax.pruning import compaction
from fedprune_jax.pruning import units


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _brute_force_nll(logits, labels):
  """-log sum over every alignment: T blanks and U labels in any order, a blank last."""
  lp = _log_softmax(np.asarray(logits, np.float64))
  t_len, u_len = lp.shape[0], len(labels)
  scores = []
  for pos in itertools.combinations(range(t_len + u_len - 1), u_len):
    t = u = 0
    s = 0.0
    for i in range(t_len + u_len):
      if i in pos:
        s += lp[t, u, labels[u]]
        u += 1
      else:
        s += lp[t, u, 0]
        t += 1
    scores.append(s)
  return -np.logaddexp.reduce(scores)


def _numpy_dp_nll(logits, labels):
  """Textbook forward DP (Graves 2012) in float64, one utterance."""
  lp = _log_softmax(np.asarray(logits, np.float64))
  t_len, u_len = lp.shape[0], len(labels)
  alpha = np.full((t_len, u_len + 1), -np.inf)
  for t in range(t_len):
    for u in range(u_len + 1):
      if t == 0 and u == 0:
        alpha[t, u] = 0.0
        continue
      a = alpha[t - 1, u] + lp[t - 1, u, 0] if t > 0 else -np.inf
      b = alpha[t, u - 1] + lp[t, u - 1, labels[u - 1]] if u > 0 else -np.inf
      alpha[t, u] = np.logaddexp(a, b)
  return -(alpha[-1, -1] + lp[-1, -1, 0])


def _random_padded_case(rng, t_lens, u_lens, vocab, t_max=None, u_max=None):
  """Random logits/labels for the given lengths, padded with random garbage."""
  t_max = t_max or max(t_lens)
  u_max = u_max or max(u_lens)
  b = len(t_lens)
  logits = rng.normal(0, 2, (b, t_max, u_max + 1, vocab)).astype(np.float32)
  labels = rng.integers(1, vocab, (b, u_max)).astype(np.int32)
  lpad = (np.arange(t_max)[None] >= np.asarray(t_lens)[:, None]).astype(np.float32)
  ypad = (np.arange(u_max)[None] >= np.asarray(u_lens)[:, None]).astype(np.float32)
  return logits, lpad, labels, ypad


def _reference(fn, logits, lpad, labels, ypad):
  out = []
  for i in range(logits.shape[0]):
    t, u = int((lpad[i] == 0).sum()), int((ypad[i] == 0).sum())
    out.append(fn(logits[i, :t, : u + 1], labels[i, :u]))
  return np.array(out)


def test_loss_matches_brute_force_over_alignments():
  rng = np.random.default_rng(0)
  # (T, U) pairs incl. U = 0, T = 1 and U > T; padded to T=5, U=4.
  t_lens, u_lens = [1, 3, 4, 5, 2, 5], [0, 2, 4, 3, 3, 1]
  case = _random_padded_case(rng, t_lens, u_lens, vocab=5)
  got = jax.jit(rnnt.rnnt_loss_from_logits)(*case)
  np.testing.assert_allclose(got, _reference(_brute_force_nll, *case), rtol=1e-5)


def test_loss_matches_numpy_dp_on_longer_padded_batch():
  rng = np.random.default_rng(1)
  case = _random_padded_case(rng, [17, 9, 30, 1], [12, 9, 25, 6], vocab=11, t_max=32, u_max=26)
  got = jax.jit(rnnt.rnnt_loss_from_logits)(*case)
  np.testing.assert_allclose(got, _reference(_numpy_dp_nll, *case), rtol=1e-5)


def test_loss_gradient_matches_finite_differences():
  rng = np.random.default_rng(2)
  logits, lpad, labels, ypad = _random_padded_case(rng, [4, 3], [2, 3], vocab=4, t_max=5, u_max=3)
  grad = jax.grad(lambda x: rnnt.rnnt_loss_from_logits(x, lpad, labels, ypad).sum())(logits)

  def ref_sum(x):
    return _reference(_numpy_dp_nll, x, lpad, labels, ypad).sum()

  x64 = logits.astype(np.float64)
  fd = np.zeros_like(x64)
  eps = 1e-6
  for idx in np.ndindex(x64.shape):
    d = np.zeros_like(x64)
    d[idx] = eps
    fd[idx] = (ref_sum(x64 + d) - ref_sum(x64 - d)) / (2 * eps)
  assert np.abs(fd).max() > 0.1
  np.testing.assert_allclose(np.asarray(grad), fd, atol=2e-5)
  # Padded frames / labels get exactly zero gradient.
  assert np.all(np.asarray(grad)[0, 4:] == 0) and np.all(np.asarray(grad)[0, :, 3:] == 0)


def test_loss_of_all_padding_example_is_zero():
  logits = jnp.zeros((1, 3, 3, 4))
  got = rnnt.rnnt_loss_from_logits(
    logits, jnp.ones((1, 3)), jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2))
  )
  assert float(got[0]) == 0.0


def _table_model(table):
  """A joint whose output at (frame t, u labels emitted) is table[b, t, u] (hand-built).

  The encoder frame is one-hot(t), the prediction state counts emitted labels.
  """
  table = jnp.asarray(table, jnp.float32)  # [B, T, Umax, V]
  b, t = table.shape[:2]
  u_max = table.shape[2]
  enc = jnp.broadcast_to(jnp.eye(t, dtype=jnp.float32), (b, t, t))

  def joint_fn(e, out):  # e [B, T] one-hot frame, out [B, Umax] one-hot count
    return jnp.einsum("bt,bu,btuv->bv", e, out, table)

  def pred_step(count, tok):
    del tok
    count = jnp.minimum(count + 1, u_max - 1)
    return count, jax.nn.one_hot(count, u_max)

  count0 = jnp.zeros((b,), jnp.int32)
  return joint_fn, pred_step, count0, jax.nn.one_hot(count0, u_max), enc


def test_greedy_search_on_hand_built_joint():
  v, t, u_max = 6, 4, 6
  table = np.zeros((2, t, u_max, v))
  table[..., 0] = 1.0  # blank wins unless a label is set higher below
  # Row 0: frame 0 emits 3 then 5; frame 1 nothing; frame 2 emits 2; frame 3 emits 4, 4, 1 but
  # max_symbols=2 stops after two.
  table[0, 0, 0, 3] = table[0, 0, 1, 5] = 2.0
  table[0, 2, 2, 2] = 2.0
  table[0, 3, 3, 4] = table[0, 3, 4, 4] = table[0, 3, 5, 1] = 2.0
  # Row 1: frame 0 emits 1; frame 2 would emit 5 but it is padding.
  table[1, 0, 0, 1] = 2.0
  table[1, 2, 1, 5] = 2.0
  joint_fn, pred_step, state, out, enc = _table_model(table)
  pads = jnp.asarray([[0, 0, 0, 0], [0, 0, 1, 1]], jnp.float32)
  ids, lengths = jax.jit(rnnt.greedy_search, static_argnums=(0, 1, 6))(
    joint_fn, pred_step, state, out, enc, pads, 2
  )
  assert ids.shape == (2, 8)
  np.testing.assert_array_equal(lengths, [5, 1])
  np.testing.assert_array_equal(ids[0], [3, 5, 2, 4, 4, -1, -1, -1])
  np.testing.assert_array_equal(ids[1], [1, -1, -1, -1, -1, -1, -1, -1])


def test_beam_search_is_exact_with_a_wide_beam_and_greedy_with_beam_one():
  rng = np.random.default_rng(3)
  v, t = 3, 4
  table = rng.normal(0, 1.5, (1, t, t + 1, v))
  joint_fn, pred_step, state, out, enc = _table_model(table)
  # Brute force over the beam topology: each frame emits blank or exactly one label.
  lp = _log_softmax(table[0])
  totals: dict[tuple, float] = {}
  for path in itertools.product(range(v), repeat=t):
    labels = tuple(s for s in path if s != 0)
    score, u = 0.0, 0
    for f, s in enumerate(path):
      score += lp[f, u, s]
      u += s != 0
    totals[labels] = np.logaddexp(totals.get(labels, -np.inf), score)
  hyps = rnnt.beam_search(joint_fn, pred_step, state, out, enc[0], beam=64)
  assert len(hyps) == len(totals)
  for labels, score in hyps:
    np.testing.assert_allclose(score, totals[tuple(labels)], rtol=1e-5)
  assert tuple(hyps[0][0]) == max(totals, key=totals.get)

  ids, n = rnnt.greedy_search(joint_fn, pred_step, state, out, enc, jnp.zeros((1, t)), 1)
  (best, _), *_ = rnnt.beam_search(joint_fn, pred_step, state, out, enc[0], beam=1)
  assert best == list(np.asarray(ids[0, : int(n[0])]))


MICRO_HEAD = dict(embed_dim=8, pred_dim=16, joint_dim=24)


@pytest.mark.parametrize("predictor", ["lstm", "stateless"])
def test_head_chunked_loss_and_grads_match_full_joint(predictor):
  head = transducer.RnntHead(vocab_size=7, predictor=predictor, joint_chunk=3, **MICRO_HEAD)
  params = head.init(jax.random.PRNGKey(0), 12)
  rng = np.random.default_rng(4)
  enc = jnp.asarray(rng.normal(size=(3, 10, 12)), jnp.float32)
  enc_pad = jnp.asarray(np.arange(10)[None] >= np.array([[10], [7], [1]]), jnp.float32)
  labels = jnp.asarray(rng.integers(1, 7, (3, 5)), jnp.int32)
  batch = {"labels": labels, "label_paddings": jnp.asarray(np.arange(5)[None] >= [[5], [2], [0]])}

  def chunked(p):
    return head.per_example_loss(p, enc, enc_pad, batch, None, True).sum()

  def full(p):  # the whole joint tensor f32[B, T, U+1, V], then the loss from logits
    pred = head.prediction(p, labels)
    e = enc @ p["joint"]["enc"]["kernel"] + p["joint"]["enc"]["bias"]
    q = pred @ p["joint"]["pred"]["kernel"]
    logits = head.joint_logits(p, e[:, :, None], q[:, None])
    return rnnt.rnnt_loss_from_logits(logits, enc_pad, labels, batch["label_paddings"]).sum()

  (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(f))(params) for f in (chunked, full))
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


@pytest.mark.parametrize("predictor", ["lstm", "stateless"])
def test_prediction_sequence_equals_step_by_step(predictor):
  head = transducer.RnntHead(vocab_size=7, predictor=predictor, context=3, **MICRO_HEAD)
  params = head.init(jax.random.PRNGKey(1), 12)
  labels = jnp.asarray([[3, 1, 4, 1, 5], [2, 6, 5, 3, 5]], jnp.int32)
  seq = head.prediction(params, labels)
  state = head.init_state(params, 2)
  tokens = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), labels], axis=1)
  for u in range(6):
    state, out = head.pred_step(params, state, tokens[:, u])
    np.testing.assert_allclose(seq[:, u], out, rtol=1e-5, atol=1e-6)


def test_head_greedy_decode_matches_python_loop():
  head = transducer.RnntHead(vocab_size=5, max_symbols=3, **MICRO_HEAD)
  params = head.init(jax.random.PRNGKey(2), 12)
  # Favour labels so that several come out per frame.
  params["joint"]["output"]["bias"] = jnp.asarray([0.0, 1.5, 1.0, 0.5, 1.0])
  rng = np.random.default_rng(5)
  enc = jnp.asarray(rng.normal(size=(2, 6, 12)), jnp.float32)
  pads = jnp.asarray([[0] * 6, [0] * 4 + [1] * 2], jnp.float32)
  ids, lengths = jax.jit(head.decode_ids)(params, enc, pads)
  for i, t_len in enumerate([6, 4]):
    state = head.init_state(params, 1)
    state, out = head.pred_step(params, state, jnp.zeros((1,), jnp.int32))
    hyp = []
    for t in range(t_len):
      e = enc[i : i + 1, t] @ params["joint"]["enc"]["kernel"] + params["joint"]["enc"]["bias"]
      for _ in range(3):
        k = int(jnp.argmax(head.joint_logits(params, e, out @ params["joint"]["pred"]["kernel"])))
        if k == 0:
          break
        hyp.append(k)
        state, out = head.pred_step(params, state, jnp.asarray([k]))
    assert int(lengths[i]) == len(hyp) > 0
    assert list(np.asarray(ids[i, : len(hyp)])) == hyp


def test_rnnt_model_is_prunable_and_unit_compaction_keeps_outputs():
  model = asr.make_asr_model("tiny", head="rnnt", **MICRO_MODEL)
  params = model.init(jax.random.PRNGKey(0))
  prunable = {p for p, m in pruning.flatten_with_paths(pruning.init_mask(params)) if m is not None}
  head_prunable = {p for p in prunable if p.startswith("rnnt_head/")}
  assert head_prunable == {
    "rnnt_head/pred/lstm/input/kernel",
    "rnnt_head/pred/lstm/recurrent/kernel",
    "rnnt_head/joint/enc/kernel",
    "rnnt_head/joint/pred/kernel",
  }
  batch = step_lib.synthetic_batch(2, 48, seed=1)
  cfg = model.config
  um = units.unit_mask(
    params, cfg, 0.5, scores=pruning.random_scores(params, jax.random.PRNGKey(1))
  )
  masked = pruning.apply_mask(params, units.expand_unit_mask(params, cfg, um))
  small_model, small = compaction.compact(model, masked, um)
  assert small_model.head == model.head
  assert pruning.param_count(small) < pruning.param_count(params)
  loss = jax.jit(lambda m, p: m.per_example_loss(p, batch, None, False)[0], static_argnums=0)
  np.testing.assert_allclose(loss(small_model, small), loss(model, masked), rtol=1e-4)
  with pytest.raises(TypeError, match="no frame-level logits"):
    model.logits(params, batch)


def test_chunked_joint_needs_less_memory():
  rng = np.random.default_rng(6)
  enc = jnp.asarray(rng.normal(size=(4, 64, 12)), jnp.float32)
  batch = {"labels": jnp.ones((4, 32), jnp.int32), "label_paddings": jnp.zeros((4, 32))}

  def memory(chunk):
    head = transducer.RnntHead(vocab_size=29, joint_chunk=chunk, **MICRO_HEAD)
    params = head.init(jax.random.PRNGKey(0), 12)
    grad = jax.grad(
      lambda p: head.per_example_loss(p, enc, jnp.zeros((4, 64)), batch, None, True).sum()
    )
    return step_lib.memory_bytes(jax.jit(grad).lower(params).compile())

  full, chunked = memory(0), memory(4)
  # The unchunked step holds the joint activations, 4-frame chunks a sixteenth of them
  # (measured: 4.5 MB vs 0.6 MB).
  assert full > transducer.joint_bytes(4, 64, 32, 24, 29) / 2
  assert chunked < full / 4


def test_beam_decode_with_beam_one_equals_greedy_with_one_symbol_per_frame():
  model = asr.make_asr_model("tiny", head="rnnt", head_options={"max_symbols": 1}, **MICRO_MODEL)
  params = model.init(jax.random.PRNGKey(3))
  batch = step_lib.synthetic_batch(2, 40, seed=2)
  greedy = model.decode(params, batch)
  assert any(greedy)  # the untrained model emits labels, so the comparison is not vacuous
  assert model.beam_decode(params, batch, beam=1) == greedy
