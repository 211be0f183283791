"""RNN-T (transducer) loss and decoding in pure JAX (blank = 0).

Shapes: B = batch, T = encoder frames, U = label positions, V = vocabulary,
P = prediction-network output width.

The loss works on the two lattice quantities it needs, not on the full joint
output: ``blank_logp[b, t, u] = log P(blank | t, u)`` (f32[B, T, U+1]) and
``label_logp[b, t, u] = log P(y_{u+1} | t, u)`` (f32[B, T, U]).  Producing them
chunk by chunk over T (``fedprune_jax.models.transducer``) keeps the
B x T x U x V joint tensor out of memory.

Forward variables (Graves 2012), alpha[t, u] = log-prob of having emitted
y_1..y_u by the time frame t is entered::

  alpha[t, u] = logaddexp(alpha[t-1, u] + blank[t-1, u], alpha[t, u-1] + label[t, u-1])

A ``lax.scan`` runs over t.  Within a frame the recursion along u is a linear
recurrence in log space, solved in closed form with a cumulative sum ``c`` of
the label log-probs and ``lax.cumlogsumexp``::

  alpha[t, u] = c[u] + logsumexp_{k <= u} (alpha[t-1, k] + blank[t-1, k] - c[k])

so a frame costs one parallel scan over U instead of U sequential steps.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

BLANK_ID = 0
# Finite stand-in for log(0): keeps gradients of never-used lattice states NaN-free.
_LOG_ZERO = -1e10


def _lengths(paddings: Array) -> Array:
  return jnp.sum(paddings < 0.5, axis=1).astype(jnp.int32)


def forward_variables(blank_logp: Array, label_logp: Array) -> Array:
  """alpha f32[B, T, U+1] from blank_logp f32[B, T, U+1] and label_logp f32[B, T, U].

  alpha[b, t, u] only depends on lattice entries (t' <= t, u' <= u), so padded
  frames / labels after an example's end never change its loss.
  """
  b, _, u1 = blank_logp.shape
  start = jnp.full((b, u1), _LOG_ZERO, jnp.float32).at[:, 0].set(0.0)
  # Frame 0 is entered from the start state, frame t from frame t-1 by a blank.
  blank_in = jnp.concatenate([jnp.zeros_like(blank_logp[:, :1]), blank_logp[:, :-1]], axis=1)

  def frame(alpha_prev, xs):
    blank_prev, label_t = xs  # f32[B, U+1], f32[B, U]
    a = alpha_prev + blank_prev
    c = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), jnp.cumsum(label_t, axis=1)], axis=1)
    alpha = c + jax.lax.cumlogsumexp(a - c, axis=1)
    return alpha, alpha

  xs = (jnp.moveaxis(blank_in, 1, 0), jnp.moveaxis(label_logp, 1, 0))
  _, alphas = jax.lax.scan(frame, start, xs)
  return jnp.moveaxis(alphas, 0, 1)


def rnnt_loss(
  blank_logp: Array, label_logp: Array, logit_paddings: Array, label_paddings: Array
) -> Array:
  """Per-sequence transducer negative log-likelihood.

  Args:
    blank_logp: f32[B, T, U+1], log P(blank | frame t, u labels emitted).
    label_logp: f32[B, T, U], log P(label u+1 | frame t, u labels emitted).
    logit_paddings: f32[B, T], 1.0 = padded frame.
    label_paddings: f32[B, U], 1.0 = padded label (real labels come first).

  Returns:
    f32[B]: -log p(labels | frames); 0 for an example without frames.
  """
  b, t, u1 = blank_logp.shape
  if label_logp.shape != (b, t, u1 - 1):
    raise ValueError(f"label_logp: expected {(b, t, u1 - 1)}, got {label_logp.shape}")
  if logit_paddings.shape != (b, t) or label_paddings.shape != (b, u1 - 1):
    raise ValueError(
      f"paddings {logit_paddings.shape} / {label_paddings.shape}: expected {(b, t)} / {(b, u1 - 1)}"
    )
  alpha = forward_variables(blank_logp.astype(jnp.float32), label_logp.astype(jnp.float32))
  t_len, u_len = _lengths(logit_paddings), _lengths(label_paddings)
  last = jnp.maximum(t_len - 1, 0)
  rows = jnp.arange(b)
  ll = alpha[rows, last, u_len] + blank_logp[rows, last, u_len]
  return jnp.where(t_len > 0, -ll, 0.0)


def lattice_logprobs(log_probs: Array, labels: Array) -> tuple[Array, Array]:
  """Full joint log-probs f32[B, T, U+1, V], labels i32[B, U] -> (blank_logp, label_logp)."""
  u = labels.shape[1]
  idx = jnp.broadcast_to(labels[:, None, :, None], log_probs.shape[:2] + (u, 1))
  label_logp = jnp.take_along_axis(log_probs[:, :, :u], idx, axis=-1)[..., 0]
  return log_probs[..., BLANK_ID], label_logp


def rnnt_loss_from_logits(
  logits: Array, logit_paddings: Array, labels: Array, label_paddings: Array
) -> Array:
  """``rnnt_loss`` from the full joint output logits f32[B, T, U+1, V] (small cases, tests)."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  labels = jnp.clip(labels, 0, logits.shape[-1] - 1)
  return rnnt_loss(*lattice_logprobs(lp, labels), logit_paddings, label_paddings)


# --- decoding ------------------------------------------------------------------------------------

# joint_fn(enc_t f32[B, d], pred_out f32[B, P]) -> logits f32[B, V]
JointFn = Callable[[Array, Array], Array]
# pred_step(state, tokens i32[B]) -> (state, pred_out f32[B, P]); state leaves lead with B.
PredStep = Callable[[PyTree, Array], tuple[PyTree, Array]]


def _select(mask: Array, new: PyTree, old: PyTree) -> PyTree:
  """Per-row choice between two pytrees whose leaves lead with B."""
  return jax.tree.map(
    lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o), new, old
  )


def greedy_search(
  joint_fn: JointFn,
  pred_step: PredStep,
  pred_state: PyTree,
  pred_out: Array,
  enc: Array,
  enc_paddings: Array,
  max_symbols: int = 4,
) -> tuple[Array, Array]:
  """Batched greedy transducer decoding (jit-able).

  At each frame the most likely symbol is taken; a label is emitted and the
  prediction network advanced, up to ``max_symbols`` labels per frame; a blank
  moves to the next frame.

  Args:
    joint_fn, pred_step: the model (see ``JointFn`` / ``PredStep``).
    pred_state, pred_out: prediction network state and output after the start symbol.
    enc: f32[B, T, d] encoder output; enc_paddings f32[B, T] (padded frames emit nothing).
    max_symbols: labels emitted per frame at most.

  Returns:
    ids i32[B, T * max_symbols] left-compacted, -1 after the end; lengths i32[B].
  """
  b, t = enc.shape[:2]
  n = t * max_symbols
  rows = jnp.arange(b)

  def symbol(carry, _):
    enc_t, valid, state, out, ids, count, done = carry
    k = jnp.argmax(joint_fn(enc_t, out), axis=-1).astype(jnp.int32)
    emit = (k != BLANK_ID) & valid & ~done
    new_state, new_out = pred_step(state, k)
    state, out = _select(emit, (new_state, new_out), (state, out))
    ids = ids.at[rows, jnp.where(emit, count, n)].set(k)  # column n is a discard slot
    return (enc_t, valid, state, out, ids, count + emit, done | ~emit), None

  def frame(carry, xs):
    enc_t, pad_t = xs
    state, out, ids, count = carry
    init = (enc_t, pad_t < 0.5, state, out, ids, count, jnp.zeros((b,), bool))
    (_, _, state, out, ids, count, _), _ = jax.lax.scan(symbol, init, None, length=max_symbols)
    return (state, out, ids, count), None

  ids0 = jnp.full((b, n + 1), -1, jnp.int32)
  carry = (pred_state, pred_out, ids0, jnp.zeros((b,), jnp.int32))
  xs = (jnp.moveaxis(enc, 1, 0), jnp.moveaxis(enc_paddings, 1, 0))
  (_, _, ids, count), _ = jax.lax.scan(frame, carry, xs)
  return ids[:, :n], count


def beam_search(
  joint_fn: JointFn,
  pred_step: PredStep,
  pred_state: PyTree,
  pred_out: Array,
  enc: Array,
  beam: int = 4,
) -> list[tuple[list[int], float]]:
  """Beam search over one utterance, at most one label per frame (host loop).

  Each frame, every hypothesis is extended by blank or by one of its ``beam``
  best labels; hypotheses with equal label sequences are merged (log-sum of
  their scores) and the ``beam`` best are kept.  With ``beam=1`` this is greedy
  search with ``max_symbols=1``.

  Args:
    joint_fn, pred_step, pred_state, pred_out: as ``greedy_search``, batch of 1 (pass
      jitted functions: they are called once per frame / hypothesis).
    enc: f32[T, d], real frames only.
    beam: hypotheses kept.

  Returns:
    up to ``beam`` (labels, log-prob) pairs, best first.
  """
  # hyp key = label tuple -> (score, pred_state, pred_out)
  hyps = {(): (0.0, pred_state, pred_out)}
  for t in range(enc.shape[0]):
    keys = list(hyps)
    outs = jnp.concatenate([hyps[k][2] for k in keys], axis=0)
    logits = joint_fn(jnp.repeat(enc[t : t + 1], len(keys), 0), outs)
    lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    cand: dict[tuple[int, ...], tuple[float, Any]] = {}

    def add(key, score, src):
      if key in cand:  # same labels, hence same prediction state: merge
        old_score, old_src = cand[key]
        src = old_src if old_score >= score else src
        score = float(np.logaddexp(old_score, score))
      cand[key] = (score, src)

    for i, key in enumerate(keys):
      score = hyps[key][0]
      add(key, score + lp[i, BLANK_ID], (key, None))
      labels = [v for v in np.argsort(-lp[i]) if v != BLANK_ID][:beam]
      for v in labels:
        add(key + (int(v),), score + lp[i, v], (key, int(v)))
    best = sorted(cand.items(), key=lambda kv: -kv[1][0])[:beam]
    new = {}
    for key, (score, (parent, v)) in best:
      _, state, out = hyps[parent]
      if v is not None:
        state, out = pred_step(state, jnp.asarray([v], jnp.int32))
      new[key] = (score, state, out)
    hyps = new
  return [(list(k), float(s)) for k, (s, _, _) in sorted(hyps.items(), key=lambda kv: -kv[1][0])]
