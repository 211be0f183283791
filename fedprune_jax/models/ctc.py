"""CTC loss (blank = 0) and greedy CTC decoding.

Shapes: B = batch, T = frames, V = vocabulary (29 characters incl. blank),
L = label positions.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array

BLANK_ID = 0


def ctc_loss(logits: Array, logit_paddings: Array, labels: Array, label_paddings: Array) -> Array:
  """Per-sequence CTC negative log-likelihood.

  Args:
    logits: f32[B, T, V] unnormalised scores (log-softmax is applied inside).
    logit_paddings: f32[B, T], 1.0 = padded frame.
    labels: i32[B, L] token ids (1..V-1 in real positions).
    label_paddings: f32[B, L], 1.0 = padded label position.

  Returns:
    f32[B]: -log p(labels | logits).  A label that cannot be aligned (too long
    for its frames) gets a large finite loss (~1e5) rather than inf; an
    all-padding example gets 0.
  """
  if logits.ndim != 3:
    raise ValueError(f"logits: expected [B, T, V], got {logits.shape}")
  if logit_paddings.shape != logits.shape[:2]:
    raise ValueError(f"logit_paddings: expected {logits.shape[:2]}, got {logit_paddings.shape}")
  if labels.shape != label_paddings.shape or labels.shape[0] != logits.shape[0]:
    raise ValueError(
      f"labels {labels.shape} / label_paddings "
      f"{label_paddings.shape}: expected [B={logits.shape[0]}, L]"
    )
  return optax.ctc_loss(
    logits.astype(jnp.float32),
    logit_paddings.astype(jnp.float32),
    labels.astype(jnp.int32),
    label_paddings.astype(jnp.float32),
    blank_id=BLANK_ID,
  )


def greedy_decode(logits: Array, paddings: Array) -> tuple[Array, Array]:
  """Best-path CTC decoding: argmax, collapse repeats, drop blanks.

  Args:
    logits: f32[B, T, V].
    paddings: f32[B, T], 1.0 = padded frame (never emits).

  Returns:
    ids: i32[B, T] decoded tokens compacted to the left, -1 after the end.
    lengths: i32[B] number of decoded tokens.
  """
  b, t, _ = logits.shape
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, T]
  prev = jnp.pad(best, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  keep = (best != prev) & (best != BLANK_ID) & (paddings < 0.5)
  pos = jnp.cumsum(keep, axis=1) - 1
  # Dropped frames write into a spare column t that is sliced away.
  dest = jnp.where(keep, pos, t)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  ids = jnp.full((b, t + 1), -1, jnp.int32).at[rows, dest].set(best)[:, :t]
  return ids, jnp.sum(keep, axis=1).astype(jnp.int32)


def ids_to_strings(
  ids: np.ndarray | Array, lengths: np.ndarray | Array | Sequence[int]
) -> list[str]:
  """Host helper: i32[B, T] decoded ids + lengths -> B transcripts."""
  from fedprune_jax.data import tokenizer  # lazy: data layer is optional here

  ids, lengths = np.asarray(ids), np.asarray(lengths)
  return [tokenizer.decode(row[:n]) for row, n in zip(ids, lengths)]
