"""Featurisation, fixed-shape padding, length bucketing and a feature cache.

Produces the batch dict of docs/architecture.md (NumPy arrays, host side):

  features          float32 [B, T, F]  normalised log-mel, 0 in padded frames
  feature_paddings  float32 [B, T]     1.0 = padded frame
  labels            int32   [B, L]     token ids, 0 in padded positions
  label_paddings    float32 [B, L]     1.0 = padded label position
  weights           float32 [B]        1.0 real example, 0.0 padding example

An *example* is a pair ``(features float32 [T_i, F], tokens int32 [L_i])``
(``Example`` is a NamedTuple with exactly those two fields, so plain tuples
work too). Utterance ids travel in a parallel list so that errors can name
the offending utterance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import zipfile
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from fedprune_jax import io_utils
from fedprune_jax.data import corpus_identity
from fedprune_jax.data import features as features_lib
from fedprune_jax.data import tokenizer
from fedprune_jax.data.records import CorpusError, Utterance

BATCH_KEYS = ("features", "feature_paddings", "labels", "label_paddings", "weights")
_OVERFLOW = ("error", "drop", "truncate")
CACHE_VERSION = 1


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


def featurize(
  utterances: Iterable[Utterance],
  *,
  encode_fn: Callable[[str], np.ndarray] = tokenizer.encode,
  normalize_text_fn: Callable[[str], str] = tokenizer.normalize_text,
  config: features_lib.FeatureConfig = features_lib.DEFAULT_CONFIG,
) -> list[Example]:
  """Host-side featurisation: normalised log-mel + token ids per utterance.

  Returns:
    One ``Example(features float32 [T_i, F], tokens int32 [L_i])`` per
    utterance, in input order.

  Raises:
    CorpusError: naming the utterance, if its audio is shorter than one frame,
      its sample rate differs from ``config.sample_rate``, or its text has a
      character outside the vocabulary.
  """
  return [_featurize_one(u, encode_fn, normalize_text_fn, config) for u in utterances]


def _featurize_one(
  u: Utterance, encode_fn, normalize_text_fn, config: features_lib.FeatureConfig
) -> Example:
  if u.sample_rate != config.sample_rate:
    raise CorpusError(
      f"utterance {u.utt_id!r}: sample rate {u.sample_rate} != {config.sample_rate}"
    )
  feats = features_lib.log_mel_np(u.audio, u.sample_rate, config)
  if feats.shape[0] == 0:
    raise CorpusError(
      f"utterance {u.utt_id!r}: {len(u.audio)} samples is "
      f"shorter than one {config.frame_length}-sample frame"
    )
  try:
    tokens = np.asarray(encode_fn(normalize_text_fn(u.text)), np.int32)
  except ValueError as e:
    raise CorpusError(f"utterance {u.utt_id!r}: {e}") from e
  return Example(features_lib.normalize_np(feats), tokens)


@dataclasses.dataclass(frozen=True)
class FeatureSet:
  """A split's examples, packed into flat arrays (the cache's content).

  Attributes:
    features: float [sum T_i, F], utterances concatenated along time.
    frame_offsets: int64 [U + 1]; utterance i is rows
      ``frame_offsets[i]:frame_offsets[i+1]``.
    tokens: int32 [sum L_i], token ids concatenated.
    token_offsets: int64 [U + 1].
    utt_ids: str [U].
    speaker_ids: str [U].
  """

  features: np.ndarray
  frame_offsets: np.ndarray
  tokens: np.ndarray
  token_offsets: np.ndarray
  utt_ids: np.ndarray
  speaker_ids: np.ndarray

  def __len__(self) -> int:
    return len(self.utt_ids)

  def example(self, i: int) -> Example:
    f0, f1 = self.frame_offsets[i], self.frame_offsets[i + 1]
    t0, t1 = self.token_offsets[i], self.token_offsets[i + 1]
    return Example(self.features[f0:f1].astype(np.float32, copy=False), self.tokens[t0:t1])

  def examples(self) -> list[Example]:
    return [self.example(i) for i in range(len(self))]

  @property
  def num_frames(self) -> np.ndarray:
    return np.diff(self.frame_offsets)

  @property
  def num_labels(self) -> np.ndarray:
    return np.diff(self.token_offsets)

  def speaker_indices(self) -> dict[str, np.ndarray]:
    """Speaker id -> int64 indices of its utterances (input order)."""
    speakers, inverse = np.unique(self.speaker_ids, return_inverse=True)
    return {str(s): np.flatnonzero(inverse == k) for k, s in enumerate(speakers)}


def pack_examples(
  examples: Sequence[Example],
  utt_ids: Sequence[str],
  speaker_ids: Sequence[str],
  dtype: np.dtype = np.float32,
) -> FeatureSet:
  """Packs examples (+ ids) into a ``FeatureSet``."""
  if not len(examples) == len(utt_ids) == len(speaker_ids):
    raise ValueError("pack_examples: examples, utt_ids and speaker_ids differ in length")
  num_features = examples[0].features.shape[1] if examples else features_lib.NUM_MEL_BINS
  offsets = lambda n: np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
  return FeatureSet(
    features=np.concatenate([e.features for e in examples] + [np.zeros((0, num_features))]).astype(
      dtype
    ),
    frame_offsets=offsets([e.features.shape[0] for e in examples]),
    tokens=np.concatenate([e.tokens for e in examples] + [np.zeros(0)]).astype(np.int32),
    token_offsets=offsets([e.tokens.shape[0] for e in examples]),
    utt_ids=np.asarray(list(utt_ids), dtype=np.str_),
    speaker_ids=np.asarray(list(speaker_ids), dtype=np.str_),
  )


def concat_feature_sets(sets: Sequence[FeatureSet]) -> FeatureSet:
  """One FeatureSet of several (e.g. LibriSpeech's train-960 = clean-100 + clean-360 + other-500)."""
  if len(sets) == 1:
    return sets[0]

  def offsets(name: str) -> np.ndarray:
    shifted, base = [np.zeros(1, np.int64)], 0
    for fs in sets:
      o = getattr(fs, name)
      shifted.append(o[1:] + base)
      base += int(o[-1])
    return np.concatenate(shifted)

  return FeatureSet(
    features=np.concatenate([fs.features for fs in sets]),
    frame_offsets=offsets("frame_offsets"),
    tokens=np.concatenate([fs.tokens for fs in sets]),
    token_offsets=offsets("token_offsets"),
    utt_ids=np.concatenate([fs.utt_ids for fs in sets]),
    speaker_ids=np.concatenate([fs.speaker_ids for fs in sets]),
  )


def save_feature_set(fs: FeatureSet, path: str) -> None:
  """Writes ``fs`` to ``path`` (.npz) atomically: temp file + os.replace."""
  io_utils.save_npz_atomic(
    path,
    {
      "version": np.int64(CACHE_VERSION),
      **{k.name: getattr(fs, k.name) for k in dataclasses.fields(FeatureSet)},
    },
  )


def load_feature_set(path: str) -> FeatureSet:
  """Reads a ``save_feature_set`` file (no pickles)."""
  with np.load(path, allow_pickle=False) as z:
    if int(z["version"]) != CACHE_VERSION:
      raise ValueError(f"{path}: cache version {int(z['version'])} != {CACHE_VERSION}")
    return FeatureSet(**{k.name: z[k.name] for k in dataclasses.fields(FeatureSet)})


def split_fingerprint(
  split_dir: str, config: features_lib.FeatureConfig = features_lib.DEFAULT_CONFIG, extra: str = ""
) -> str:
  """Hex hash of a split's file list, sizes and mtimes, transcripts and feature params.

  Each file contributes its size and modification time (nanoseconds), so a
  rewritten audio file of the same size (corrupted, re-rendered) is noticed
  without reading the audio of the whole corpus on every run, as make and
  rsync do; only a change that also restores the old mtime goes unseen.
  Transcript (``*.txt``) contents are hashed too (they are small and a
  regenerated corpus may keep their sizes). The walk is ``corpus_identity``'s.
  """
  h = hashlib.sha256()
  h.update(f"v{CACHE_VERSION}|{config!r}|{tokenizer.VOCAB!r}|{extra}".encode())
  corpus_identity.hash_split(h, split_dir, mtimes=True)
  return h.hexdigest()


def cached_features(
  split_dir: str,
  cache_dir: str,
  *,
  config: features_lib.FeatureConfig = features_lib.DEFAULT_CONFIG,
  reader: Callable[[str], Iterable[Utterance]] | None = None,
  dtype: np.dtype = np.float32,
) -> FeatureSet:
  """Featurised split, computed once and cached as one .npz per split.

  The cache file is ``cache_dir/<split>-<fingerprint[:16]>.npz``, so a
  changed split (files, sizes, mtimes, transcripts) or changed feature parameters
  gives a new file; an unreadable cache file is rebuilt.

  Args:
    split_dir: LibriSpeech-layout split (``SPEAKER/CHAPTER/*.flac``).
    cache_dir: where cache files live (created if needed).
    config: feature parameters.
    reader: ``split_dir -> Iterable[Utterance]``; default
      ``fedprune_jax.data.librispeech.read_split``.
    dtype: storage dtype of the features (float16 halves the file; examples
      come back as float32 either way).

  Returns:
    The split's ``FeatureSet`` in reader order.
  """
  split_dir = os.path.abspath(split_dir)
  key = split_fingerprint(split_dir, config, extra=np.dtype(dtype).str)
  name = os.path.basename(split_dir.rstrip(os.sep)) or "split"
  path = os.path.join(cache_dir, f"{name}-{key[:16]}.npz")
  if os.path.exists(path):
    try:
      return load_feature_set(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
      logging.warning("feature cache %s unreadable (%s); rebuilding", path, e)
  if reader is None:
    from fedprune_jax.data.librispeech import read_split  # pylint: disable=g-import-not-at-top

    reader = read_split
  examples, utt_ids, speaker_ids = [], [], []
  for u in reader(split_dir):  # streamed: audio is not kept in memory
    e = _featurize_one(u, tokenizer.encode, tokenizer.normalize_text, config)
    examples.append(Example(e.features.astype(dtype), e.tokens))
    utt_ids.append(u.utt_id)
    speaker_ids.append(u.speaker_id)
  fs = pack_examples(examples, utt_ids, speaker_ids, dtype=dtype)
  save_feature_set(fs, path)
  return fs
