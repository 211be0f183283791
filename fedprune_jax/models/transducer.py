"""RNN-T head: prediction network (LSTM or stateless), joint network, chunked loss.

Shapes: B = batch, T = encoder frames, U = label positions, d = encoder width,
E = embedding width, P = prediction output width, J = joint width, V = vocabulary.

Params are plain nested dicts (all Dense kernels 2-D ``[in, out]``, as in the
encoder), so the pruning masks treat ``pred/lstm/{input,recurrent}/kernel``
and ``joint/{enc,pred}/kernel`` like any other prunable layer; the embedding
(``pred/embed``) and the vocabulary projection (``joint/output``) are excluded
by the default patterns, like the CTC output layer::

  {'pred': {'embed': {'embedding': [V, E]},
            'lstm': {'input': {'kernel': [E, 4P], 'bias': [4P]},      # LSTM only
                     'recurrent': {'kernel': [P, 4P]}}},
   'joint': {'enc': {'kernel': [d, J], 'bias': [J]}, 'pred': {'kernel': [P, J]},
             'output': {'kernel': [J, V], 'bias': [V]}}}

Memory: the joint activations (tanh hidden f32[B, T, U+1, J] and logits
f32[B, T, U+1, V]) dominate training.  The head evaluates the joint over
chunks of frames inside a rematerialised ``lax.map``: only the two lattice
log-probs (f32[B, T, U+1] and f32[B, T, U]) are kept for the backward pass,
which recomputes each chunk's joint.  See ``joint_bytes``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from fedprune_jax.models import rnnt
from fedprune_jax.models.layers import init_from_shapes

Array = jax.Array
Params = dict[str, Any]


def _dense(p: Params, x: Array) -> Array:
  y = x @ p["kernel"]
  return y + p["bias"] if "bias" in p else y


def joint_bytes(batch: int, frames: int, labels: int, joint_dim: int, vocab: int) -> int:
  """Bytes of the joint activations f32[B, T, U+1, J + 2V] (hidden, logits, log-probs)."""
  return 4 * batch * frames * (labels + 1) * (joint_dim + 2 * vocab)


@dataclasses.dataclass(frozen=True)
class RnntHead:
  """Transducer head; hashable (part of the static ``AsrModel``).

  Attributes:
    vocab_size: V (blank = 0 is also the start symbol of the prediction network).
    predictor: 'lstm' (embedding + one LSTM layer) or 'stateless' (embeddings
      of the last ``context`` labels, concatenated; Ghodsi et al. 2020).
    embed_dim, pred_dim, joint_dim: E, P (LSTM), J; None = the encoder width d.
    context: labels seen by the stateless predictor.
    joint_chunk: frames per joint chunk; None = as many as fit ``joint_budget_mb``;
      0 = whole utterance at once (no rematerialisation).
    joint_budget_mb: activation budget of one joint chunk (see ``joint_bytes``).
    max_symbols: labels emitted per frame at most in greedy decoding.
  """

  vocab_size: int = 29
  predictor: str = "lstm"
  embed_dim: int | None = None
  pred_dim: int | None = None
  joint_dim: int | None = None
  context: int = 2
  joint_chunk: int | None = None
  joint_budget_mb: float = 64.0
  max_symbols: int = 4
  name: str = "rnnt_head"

  def __post_init__(self):
    if self.predictor not in ("lstm", "stateless"):
      raise ValueError(f"RnntHead.predictor: 'lstm' or 'stateless', got {self.predictor!r}")
    if self.context < 1 or self.max_symbols < 1:
      raise ValueError("RnntHead: context and max_symbols must be >= 1")

  # --- params ------------------------------------------------------------------------------------

  def init(self, rng: Array, d_model: int) -> Params:
    e = self.embed_dim or d_model
    p = self.pred_dim or d_model
    j = self.joint_dim or d_model
    v = self.vocab_size
    sd = jax.ShapeDtypeStruct
    pred: Params = {}
    if self.predictor == "lstm":
      pred["lstm"] = {
        "input": {"kernel": sd((e, 4 * p), jnp.float32), "bias": sd((4 * p,), jnp.float32)},
        "recurrent": {"kernel": sd((p, 4 * p), jnp.float32)},
      }
      p_out = p
    else:
      p_out = self.context * e
    shapes = {
      "pred": pred,
      "joint": {
        "enc": {"kernel": sd((d_model, j), jnp.float32), "bias": sd((j,), jnp.float32)},
        "pred": {"kernel": sd((p_out, j), jnp.float32)},
        "output": {"kernel": sd((j, v), jnp.float32), "bias": sd((v,), jnp.float32)},
      },
    }
    k_dense, k_embed = jax.random.split(rng)
    params = init_from_shapes(shapes, k_dense)
    # Flax nn.Embed's default: unit-variance normal.
    params["pred"]["embed"] = {"embedding": jax.random.normal(k_embed, (v, e), jnp.float32)}
    return params

  # --- prediction network ------------------------------------------------------------------------

  def _embed(self, params: Params, tokens: Array) -> Array:
    table = params["pred"]["embed"]["embedding"]
    return table[jnp.clip(tokens, 0, self.vocab_size - 1)]

  def init_state(self, params: Params, batch: int) -> Any:
    """Prediction state before the start symbol (leaves lead with B)."""
    if self.predictor == "lstm":
      p = params["pred"]["lstm"]["recurrent"]["kernel"].shape[0]
      return (jnp.zeros((batch, p), jnp.float32), jnp.zeros((batch, p), jnp.float32))
    return jnp.full((batch, self.context), rnnt.BLANK_ID, jnp.int32)

  def pred_step(self, params: Params, state: Any, tokens: Array) -> tuple[Any, Array]:
    """Consumes tokens i32[B] -> (new state, prediction output f32[B, P])."""
    if self.predictor == "stateless":
      state = jnp.concatenate([state[:, 1:], tokens[:, None].astype(jnp.int32)], axis=1)
      return state, self._embed(params, state).reshape(state.shape[0], -1)
    lstm = params["pred"]["lstm"]
    h, c = state
    gates = _dense(lstm["input"], self._embed(params, tokens)) + h @ lstm["recurrent"]["kernel"]
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(g)  # +1: forget-gate bias
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  def prediction(self, params: Params, labels: Array) -> Array:
    """labels i32[B, U] -> outputs f32[B, U+1, P] after [blank, y_1, ..., y_U]."""
    b = labels.shape[0]
    inputs = jnp.concatenate([jnp.full((b, 1), rnnt.BLANK_ID, jnp.int32), labels], axis=1)
    if self.predictor == "stateless":
      padded = jnp.pad(inputs, ((0, 0), (self.context - 1, 0)), constant_values=rnnt.BLANK_ID)
      u1 = inputs.shape[1]
      windows = jnp.stack([padded[:, k : k + u1] for k in range(self.context)], axis=-1)
      return self._embed(params, windows).reshape(b, u1, -1)

    def step(state, tok):
      return self.pred_step(params, state, tok)

    _, outs = jax.lax.scan(step, self.init_state(params, b), inputs.T)
    return jnp.moveaxis(outs, 0, 1)

  # --- joint -------------------------------------------------------------------------------------

  def joint_logits(self, params: Params, enc_proj: Array, pred_proj: Array) -> Array:
    """Projected enc f32[..., J] + projected pred f32[..., J] (broadcast) -> logits [..., V]."""
    return _dense(params["joint"]["output"], jnp.tanh(enc_proj + pred_proj))

  def _chunk_frames(self, b: int, t: int, u: int, j: int) -> int:
    if self.joint_chunk is not None:
      return t if self.joint_chunk == 0 else min(self.joint_chunk, t)
    per_frame = joint_bytes(b, 1, u, j, self.vocab_size)
    return max(1, min(t, int(self.joint_budget_mb * 2**20) // per_frame))

  def lattice_logprobs(
    self, params: Params, enc: Array, labels: Array, pred_out: Array
  ) -> tuple[Array, Array]:
    """-> blank_logp f32[B, T, U+1], label_logp f32[B, T, U] (see ``rnnt.rnnt_loss``)."""
    enc_proj = _dense(params["joint"]["enc"], enc.astype(jnp.float32))  # [B, T, J]
    pred_proj = _dense(params["joint"]["pred"], pred_out)  # [B, U+1, J]
    labels = jnp.clip(labels, 0, self.vocab_size - 1)

    def chunk(e):  # e f32[B, C, J]
      logits = self.joint_logits(params, e[:, :, None, :], pred_proj[:, None, :, :])
      return rnnt.lattice_logprobs(jax.nn.log_softmax(logits, axis=-1), labels)

    b, t, j = enc_proj.shape
    c = self._chunk_frames(b, t, labels.shape[1], j)
    if c >= t:
      return chunk(enc_proj)
    n = math.ceil(t / c)
    e = jnp.pad(enc_proj, ((0, 0), (0, n * c - t), (0, 0)))
    e = jnp.moveaxis(e.reshape(b, n, c, j), 1, 0)  # [n, B, C, J]
    # checkpoint: the backward pass recomputes a chunk's joint instead of storing it.
    blank, label = jax.lax.map(jax.checkpoint(chunk), e)

    def unchunk(x):  # [n, B, C, ...] -> [B, T, ...]
      return jnp.moveaxis(x, 0, 1).reshape((b, n * c) + x.shape[3:])[:, :t]

    return unchunk(blank), unchunk(label)

  # --- Head protocol -----------------------------------------------------------------------------

  def per_example_loss(self, params, enc, enc_paddings, batch, rng, train):
    del rng, train  # no stochastic layers in the head
    labels = batch["labels"].astype(jnp.int32)
    pred_out = self.prediction(params, labels)
    blank, label = self.lattice_logprobs(params, enc, labels, pred_out)
    return rnnt.rnnt_loss(blank, label, enc_paddings, batch["label_paddings"])

  def _decoder(self, params: Params, enc: Array):
    """(joint_fn, pred_step, state, out, enc_proj) for ``rnnt`` search functions."""
    enc_proj = _dense(params["joint"]["enc"], enc.astype(jnp.float32))
    state = self.init_state(params, enc.shape[0])
    state, out = self.pred_step(params, state, jnp.full((enc.shape[0],), rnnt.BLANK_ID))

    def joint_fn(e, pred_out):
      return self.joint_logits(params, e, _dense(params["joint"]["pred"], pred_out))

    def step(s, tok):
      return self.pred_step(params, s, tok)

    return joint_fn, step, state, out, enc_proj

  def decode_ids(self, params, enc, enc_paddings):
    joint_fn, step, state, out, enc_proj = self._decoder(params, enc)
    return rnnt.greedy_search(joint_fn, step, state, out, enc_proj, enc_paddings, self.max_symbols)

  def beam_search(
    self, params: Params, enc: Array, enc_paddings: Array, beam: int = 4
  ) -> list[list[int]]:
    """Best label sequence per utterance by ``rnnt.beam_search`` (host loop)."""
    joint_fn = functools.partial(_joint_jit, self, params)
    step = functools.partial(_pred_step_jit, self, params)
    enc_proj = _dense(params["joint"]["enc"], enc.astype(jnp.float32))
    state, out = step(self.init_state(params, 1), jnp.full((1,), rnnt.BLANK_ID))
    results = []
    for i in range(enc.shape[0]):
      t = int(jnp.sum(enc_paddings[i] < 0.5))
      results.append(rnnt.beam_search(joint_fn, step, state, out, enc_proj[i, :t], beam)[0][0])
    return results


@functools.partial(jax.jit, static_argnums=0)
def _joint_jit(head: RnntHead, params: Params, enc_proj: Array, pred_out: Array) -> Array:
  return head.joint_logits(params, enc_proj, _dense(params["joint"]["pred"], pred_out))


@functools.partial(jax.jit, static_argnums=0)
def _pred_step_jit(head: RnntHead, params: Params, state: Any, tokens: Array):
  return head.pred_step(params, state, tokens)
