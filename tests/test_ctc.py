"""Tests for fedprune_jax.models.ctc: brute-force CTC and greedy decoding."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedprune_jax.models import ctc


def _collapse(path):
  out, prev = [], None
  for s in path:
    if s != prev and s != 0:
      out.append(s)
    prev = s
  return tuple(out)


def _brute_force_nll(logits, label):
  """-log sum over ALL T-length paths whose collapse equals ``label``."""
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  t, v = logits.shape
  total = 0.0
  for path in itertools.product(range(v), repeat=t):
    if _collapse(path) == tuple(label):
      total += np.exp(sum(logp[i, s] for i, s in enumerate(path)))
  return -np.log(total)


def test_ctc_matches_brute_force_over_all_alignments():
  rng = np.random.default_rng(0)
  v, t_max, l_max = 4, 6, 3
  # (frames, label): repeats need a blank in between; includes a label that
  # fills all frames exactly, the empty label and variable padding.
  cases = [(6, [1, 2, 3]), (5, [2, 2]), (6, [3]), (4, []), (3, [1, 1]), (6, [1, 3, 1]), (2, [2, 1])]
  b = len(cases)
  logits = rng.normal(size=(b, t_max, v)).astype(np.float32) * 2
  lp = np.ones((b, t_max), np.float32)
  labels = np.zeros((b, l_max), np.int32)
  lab_pad = np.ones((b, l_max), np.float32)
  for i, (t, lab) in enumerate(cases):
    lp[i, :t] = 0
    labels[i, : len(lab)] = lab
    lab_pad[i, : len(lab)] = 0
    logits[i, t:] = 99.0  # garbage in padded frames must be ignored
  got = np.asarray(
    ctc.ctc_loss(jnp.asarray(logits), jnp.asarray(lp), jnp.asarray(labels), jnp.asarray(lab_pad))
  )
  for i, (t, lab) in enumerate(cases):
    ref = _brute_force_nll(logits[i, :t].astype(np.float64), lab)
    np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=1e-5, err_msg=str(cases[i]))


def test_ctc_infeasible_label_is_large_but_finite():
  logits = jnp.zeros((1, 2, 4))
  loss = ctc.ctc_loss(logits, jnp.zeros((1, 2)), jnp.asarray([[1, 1, 2]]), jnp.zeros((1, 3)))
  assert np.isfinite(loss).all() and float(loss[0]) > 1e3


def test_ctc_shape_errors_name_the_field():
  with pytest.raises(ValueError, match="logit_paddings"):
    ctc.ctc_loss(
      jnp.zeros((2, 5, 4)), jnp.zeros((2, 4)), jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3))
    )
  with pytest.raises(ValueError, match="labels"):
    ctc.ctc_loss(
      jnp.zeros((2, 5, 4)), jnp.zeros((2, 5)), jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 2))
    )


def _one_hot_logits(paths, v):
  return jnp.asarray(np.eye(v, dtype=np.float32)[np.asarray(paths)] * 5.0)


def test_greedy_decode_hand_made():
  paths = [
    [1, 1, 0, 1, 2, 2, 0, 0],  # a a _ a b b _ _ -> 1 1 2
    [0, 0, 0, 0, 0, 0, 0, 0],  # all blank -> empty
    [3, 3, 3, 3, 3, 3, 3, 3],  # one long run -> 3
    [2, 0, 2, 0, 2, 1, 3, 3],
  ]  # padded after 5 frames -> 2 2 2
  pad = np.zeros((4, 8), np.float32)
  pad[3, 5:] = 1.0
  ids, lengths = jax.jit(ctc.greedy_decode)(_one_hot_logits(paths, 4), jnp.asarray(pad))
  np.testing.assert_array_equal(np.asarray(lengths), [3, 0, 1, 3])
  expected = -np.ones((4, 8), np.int32)
  expected[0, :3] = [1, 1, 2]
  expected[2, :1] = [3]
  expected[3, :3] = [2, 2, 2]
  np.testing.assert_array_equal(np.asarray(ids), expected)
  assert ids.dtype == jnp.int32


def test_greedy_decode_matches_python_reference():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 11, 6)).astype(np.float32)
  lengths_in = [11, 0, 4, 7, 10]
  pad = np.array([[0.0] * n + [1.0] * (11 - n) for n in lengths_in], np.float32)
  ids, lengths = ctc.greedy_decode(jnp.asarray(logits), jnp.asarray(pad))
  for i, n in enumerate(lengths_in):
    ref = _collapse(np.argmax(logits[i, :n], -1).tolist())
    assert int(lengths[i]) == len(ref)
    assert tuple(np.asarray(ids[i, : len(ref)]).tolist()) == ref
    assert (np.asarray(ids[i, len(ref) :]) == -1).all()


def test_ids_to_strings_uses_tokenizer():
  tokenizer = pytest.importorskip("fedprune_jax.data.tokenizer")
  ids = np.array([[10, 7, 14, 14, 17, -1], [3, 1, 4, -1, -1, -1]])
  assert ctc.ids_to_strings(ids, [5, 3]) == ["HELLO", "A B"]
  assert tokenizer.decode([10, 7]) == "HE"
