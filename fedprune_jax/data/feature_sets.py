"""Featurisation and a split's packed, cached features (``FeatureSet``).

``featurize`` turns utterances into examples (``batching.Example``: normalised log-mel
float32 [T_i, F] and token ids int32 [L_i]); a ``FeatureSet`` packs a split's examples into flat
arrays; ``cached_features`` computes it once per split and feature parameters and keeps it as
one .npz, keyed by the split's files (``split_fingerprint``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import zipfile
from typing import Callable, Iterable, Sequence

import numpy as np

from fedprune_jax import io_utils
from fedprune_jax.data import corpus_identity
from fedprune_jax.data import features as features_lib
from fedprune_jax.data import tokenizer
from fedprune_jax.data.batching import Example
from fedprune_jax.data.records import CorpusError, Utterance

CACHE_VERSION = 1


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
