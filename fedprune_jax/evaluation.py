"""Evaluation: greedy decoding of a split and corpus-level WER / CER."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

from fedprune_jax import metrics
from fedprune_jax.data import batching
from fedprune_jax.data import feature_sets
from fedprune_jax.data import tokenizer
from fedprune_jax.models import ctc


def eval_batches(
  feature_set: feature_sets.FeatureSet,
  batch_size: int,
  num_buckets: int = 4,
  frame_multiple: int = 16,
) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
  """Length-sorted fixed-shape batches covering every utterance exactly once.

  Returns:
    ``(indices int64[n_b], batch)`` pairs; ``indices`` are the utterances in the batch's
    real rows, so predictions can be matched to references.  At most ``num_buckets`` frame
    lengths occur, so decoding compiles a handful of times.
  """
  frames = feature_set.num_frames
  if len(frames) == 0:
    return []
  boundaries = np.asarray(batching.bucket_boundaries(frames, num_buckets, multiple=frame_multiple))
  max_labels = batching.round_up(int(feature_set.num_labels.max()), 16)
  order = np.argsort(frames, kind="stable")
  result = []
  for start in range(0, len(order), batch_size):
    idx = order[start : start + batch_size]
    bound = int(boundaries[np.searchsorted(boundaries, frames[idx].max())])
    batch = batching.pad_batch(
      [feature_set.example(i) for i in idx],
      batch_size=batch_size,
      max_frames=bound,
      max_labels=max_labels,
      ids=[str(feature_set.utt_ids[i]) for i in idx],
    )
    result.append((idx, batch))
  return result


def references(feature_set: feature_sets.FeatureSet) -> list[str]:
  """Reference transcripts, recovered exactly from the stored token ids."""
  return [tokenizer.decode(feature_set.example(i).tokens) for i in range(len(feature_set))]


def evaluate(
  model: Any,
  params: Any,
  feature_set: feature_sets.FeatureSet,
  *,
  batch_size: int = 64,
  num_buckets: int = 4,
  batches: Sequence | None = None,
) -> dict[str, float]:
  """WER, CER and mean CTC loss of greedy decoding over a whole split.

  Args:
    model: an ``AsrModel`` (``decode`` and ``per_example_loss`` are used).
    params: its params.
    feature_set: the split's features (``feature_sets.cached_features``).
    batches: precomputed ``eval_batches`` (reuse across evaluations to avoid re-padding).

  Returns:
    {'wer', 'cer', 'loss', 'num_utterances', 'speakers'}; ``speakers`` maps each speaker to
    ``[word edits, reference words]`` (for speaker-level bootstrap intervals of WER differences).
  """
  if batches is None:
    batches = eval_batches(feature_set, batch_size, num_buckets)
  params = committed(params)
  refs = references(feature_set)
  hyps: list[str] = [""] * len(refs)
  loss_sum, count = 0.0, 0.0
  for idx, batch in batches:
    ids, lengths, per_example = _decode_with_loss(model, params, batch)
    for row, text in zip(idx, ctc.ids_to_strings(ids, lengths)):
      hyps[row] = text
    weights = batch["weights"]
    loss_sum += float(np.sum(np.asarray(per_example) * weights))
    count += float(np.sum(weights))
  return {
    "wer": metrics.wer(refs, hyps),
    "cer": metrics.cer(refs, hyps),
    "loss": loss_sum / max(count, 1.0),
    "num_utterances": len(refs),
    "speakers": speaker_word_errors(refs, hyps, feature_set.speaker_ids),
  }


def speaker_word_errors(
  refs: Sequence[str], hyps: Sequence[str], speakers: Sequence[str]
) -> dict[str, list[int]]:
  """``{speaker: [word edits, reference words]}`` over the utterances of each speaker.

  Args:
    refs, hyps: transcripts, one per utterance.
    speakers: the speaker of each utterance (same length).
  """
  rows: dict[str, list[int]] = {}
  for spk in sorted({str(s) for s in speakers}):
    idx = [i for i, s in enumerate(speakers) if str(s) == spk]
    rows[spk] = list(metrics.corpus_error_counts([refs[i] for i in idx], [hyps[i] for i in idx]))
  return rows


def committed(tree: Any) -> Any:
  """``tree`` with its uncommitted and host arrays placed on the default device (committed ones
  as they are, sharded ones included): jit keys a compiled program by its inputs' placement, so the same params as a fresh array
  (a restored checkpoint) and as a jitted output would compile the evaluation twice."""
  device = jax.local_devices()[0]  # this process's (jax.devices()[0] may be another host's)

  def put(x):
    return x if isinstance(x, jax.Array) and x.committed else jax.device_put(x, device)

  return jax.tree.map(put, tree)


@functools.partial(jax.jit, static_argnums=0)
def _decode_with_loss(model: Any, params: Any, batch: dict) -> tuple[jax.Array, ...]:
  """``model.decode_with_loss`` compiled once per (model, batch shape)."""
  return model.decode_with_loss(params, batch)
