"""Fixed-shape padding and length bucketing of examples into batches.

Produces the batch dict of docs/architecture.md (NumPy arrays, host side):

  features          float32 [B, T, F]  normalised log-mel, 0 in padded frames
  feature_paddings  float32 [B, T]     1.0 = padded frame
  labels            int32   [B, L]     token ids, 0 in padded positions
  label_paddings    float32 [B, L]     1.0 = padded label position
  weights           float32 [B]        1.0 real example, 0.0 padding example

An *example* is a pair ``(features float32 [T_i, F], tokens int32 [L_i])``
(``Example`` is a NamedTuple with exactly those two fields, so plain tuples
work too). Utterance ids travel in a parallel list so that errors can name
the offending utterance. Featurising utterances and the packed, cached split they make
(``FeatureSet``) are ``feature_sets``'.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from fedprune_jax.data import features as features_lib
from fedprune_jax.data import tokenizer

BATCH_KEYS = ("features", "feature_paddings", "labels", "label_paddings", "weights")
_OVERFLOW = ("error", "drop", "truncate")


class Example(NamedTuple):
  features: np.ndarray  # float32 [T, F]
  tokens: np.ndarray  # int32 [L]


def round_up(x: int, multiple: int) -> int:
  """Smallest multiple of ``multiple`` that is >= x (and >= multiple)."""
  return max(multiple, -(-int(x) // multiple) * multiple)


def _name(ids: Sequence[str] | None, i: int) -> str:
  return f"utterance {ids[i]!r}" if ids is not None else f"example #{i}"


def pad_batch(
  examples: Sequence[tuple[np.ndarray, np.ndarray]],
  *,
  batch_size: int,
  max_frames: int,
  max_labels: int,
  ids: Sequence[str] | None = None,
  on_overflow: str = "error",
  num_features: int | None = None,
) -> dict[str, np.ndarray]:
  """Pads up to ``batch_size`` examples into one fixed-shape batch dict.

  Args:
    examples: at most ``batch_size`` pairs (features [T_i, F], tokens [L_i]).
    batch_size: B; rows ``len(examples)..B-1`` are padding examples
      (weight 0, all frames and labels padded).
    max_frames: T of the batch.
    max_labels: L of the batch.
    ids: optional utterance ids (parallel to ``examples``) for error messages.
    on_overflow: what to do with an example longer than ``max_frames`` frames
      or ``max_labels`` labels: "error" (raise, naming it), "drop" (leave it
      out; later examples move up) or "truncate" (cut both sequences).
    num_features: F; inferred from the examples when None (80 if empty).

  Returns:
    The batch dict (NumPy arrays, shapes above).
  """
  if on_overflow not in _OVERFLOW:
    raise ValueError(f"on_overflow must be one of {_OVERFLOW}, got {on_overflow!r}")
  if len(examples) > batch_size:
    raise ValueError(f"pad_batch: {len(examples)} examples do not fit in batch_size {batch_size}")
  if ids is not None and len(ids) != len(examples):
    raise ValueError(f"pad_batch: {len(ids)} ids for {len(examples)} examples")
  if num_features is None:
    num_features = np.shape(examples[0][0])[-1] if len(examples) else features_lib.NUM_MEL_BINS
  feats = np.zeros((batch_size, max_frames, num_features), np.float32)
  feat_pad = np.ones((batch_size, max_frames), np.float32)
  labels = np.zeros((batch_size, max_labels), np.int32)
  label_pad = np.ones((batch_size, max_labels), np.float32)
  weights = np.zeros((batch_size,), np.float32)
  row = 0
  for i, (x, y) in enumerate(examples):
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or x.shape[1] != num_features:
      raise ValueError(
        f"pad_batch: {_name(ids, i)} has features of shape {x.shape}, expected [T, {num_features}]"
      )
    if y.ndim != 1:
      raise ValueError(f"pad_batch: {_name(ids, i)} has tokens of shape {y.shape}, expected [L]")
    if y.size and y.min() <= tokenizer.BLANK_ID:
      raise ValueError(f"pad_batch: {_name(ids, i)} has a blank/negative token id in its labels")
    if x.shape[0] > max_frames or y.shape[0] > max_labels:
      if on_overflow == "error":
        raise ValueError(
          f"pad_batch: {_name(ids, i)} has {x.shape[0]} frames and "
          f"{y.shape[0]} labels, more than max_frames={max_frames} / "
          f"max_labels={max_labels} (use on_overflow='drop' or "
          "'truncate', or raise the limits)"
        )
      if on_overflow == "drop":
        continue
      x, y = x[:max_frames], y[:max_labels]
    feats[row, : x.shape[0]] = x
    feat_pad[row, : x.shape[0]] = 0.0
    labels[row, : y.shape[0]] = y
    label_pad[row, : y.shape[0]] = 0.0
    weights[row] = 1.0
    row += 1
  return {
    "features": feats,
    "feature_paddings": feat_pad,
    "labels": labels,
    "label_paddings": label_pad,
    "weights": weights,
  }


def bucket_boundaries(
  lengths: Sequence[int] | np.ndarray, num_buckets: int, multiple: int = 16
) -> list[int]:
  """Upper frame limits of up to ``num_buckets`` length buckets.

  Boundary k is the (k+1)/num_buckets quantile of ``lengths`` rounded up to a
  multiple of ``multiple``; the last boundary covers the longest example.
  Duplicates (from rounding) are merged, so fewer buckets may come back.

  Returns:
    Strictly increasing list of ints, each a multiple of ``multiple``.
  """
  lengths = np.asarray(lengths)
  if lengths.size == 0:
    raise ValueError("bucket_boundaries: no lengths given")
  if num_buckets < 1 or multiple < 1:
    raise ValueError(
      f"bucket_boundaries: need num_buckets >= 1 and multiple >= 1, got {num_buckets}, {multiple}"
    )
  q = np.quantile(lengths, np.arange(1, num_buckets + 1) / num_buckets)
  bounds = {round_up(int(np.ceil(v)), multiple) for v in q}
  bounds.add(round_up(int(lengths.max()), multiple))
  return sorted(bounds)


def bucketed_batches(
  examples: Sequence[tuple[np.ndarray, np.ndarray]],
  ids: Sequence[str] | None,
  batch_size: int,
  boundaries: Sequence[int],
  rng: np.random.Generator | int | None,
  *,
  max_labels: int | None = None,
  label_multiple: int = 16,
  drop_remainder: bool = False,
  on_overflow: str = "error",
) -> Iterator[dict]:
  """One epoch of length-bucketed, fixed-shape batches (centralized training).

  Each example goes to the first bucket whose boundary is >= its frame count;
  a batch of bucket k is padded to ``boundaries[k]`` frames, so there are at
  most ``len(boundaries)`` distinct batch shapes (one compilation each).

  Args:
    examples: (features [T_i, F], tokens [L_i]) pairs.
    ids: utterance ids parallel to ``examples`` (for error messages), or None.
    batch_size: B.
    boundaries: increasing frame limits (see ``bucket_boundaries``).
    rng: NumPy Generator or seed: shuffles examples within buckets and the
      batch order. None keeps the input order (bucket by bucket), e.g. for
      evaluation.
    max_labels: L of every batch; default: the longest label sequence rounded
      up to ``label_multiple``.
    drop_remainder: drop each bucket's last, partial batch instead of filling
      it with weight-0 padding rows.
    on_overflow: for examples longer than the last boundary or than
      ``max_labels``: "error" (naming it) or "drop".

  Yields:
    Batch dicts (see module docstring).
  """
  if on_overflow not in ("error", "drop"):
    raise ValueError("bucketed_batches: on_overflow must be 'error' or 'drop'")
  if ids is not None and len(ids) != len(examples):
    raise ValueError(f"bucketed_batches: {len(ids)} ids for {len(examples)} examples")
  bounds = np.asarray(boundaries)
  if bounds.ndim != 1 or bounds.size == 0 or np.any(np.diff(bounds) <= 0):
    raise ValueError(
      f"bucketed_batches: boundaries must be a non-empty increasing list, got {list(boundaries)}"
    )
  frames = np.array([np.shape(x)[0] for x, _ in examples], np.int64)
  if max_labels is None:
    longest = max((np.shape(y)[0] for _, y in examples), default=1)
    max_labels = round_up(longest, label_multiple)
  bucket = np.searchsorted(bounds, frames, side="left")
  over = np.flatnonzero(bucket == bounds.size)
  if over.size and on_overflow == "error":
    i = int(over[0])
    raise ValueError(
      f"bucketed_batches: {_name(ids, i)} has {frames[i]} "
      f"frames, more than the last boundary {bounds[-1]}"
    )
  if rng is not None:
    rng = np.random.default_rng(rng)
  plan = []  # (bucket, example indices)
  for k in range(bounds.size):
    members = np.flatnonzero(bucket == k)
    if rng is not None:
      members = rng.permutation(members)
    for start in range(0, members.size, batch_size):
      chunk = members[start : start + batch_size]
      if chunk.size < batch_size and drop_remainder:
        continue
      plan.append((k, chunk))
  order = rng.permutation(len(plan)) if rng is not None else range(len(plan))
  for j in order:
    k, chunk = plan[j]
    yield pad_batch(
      [examples[i] for i in chunk],
      batch_size=batch_size,
      max_frames=int(bounds[k]),
      max_labels=max_labels,
      ids=None if ids is None else [ids[i] for i in chunk],
      on_overflow=on_overflow,
    )


def padding_fraction(batches: Iterable[dict]) -> float:
  """Fraction of all frame slots that carry no real data.

  A frame counts as padding if it is a padded frame or belongs to a row of
  weight 0; the fraction is over all frames of all batches (larger batches
  weigh more), 0.0 for no batches.
  """
  padded = total = 0.0
  for b in batches:
    real = (1.0 - np.asarray(b["feature_paddings"])) * (np.asarray(b["weights"])[:, None] > 0)
    padded += real.size - real.sum()
    total += real.size
  return float(padded / total) if total else 0.0
