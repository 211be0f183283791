"""Utterances whose encoder frames cannot hold their label sequence, found before training.

The Conformer's two stride-2 convolutions give ``T' = ceil(ceil(T/2)/2)`` encoder frames for
``T`` feature frames. CTC emits at most one label per frame and needs a blank between two equal
labels, so it needs ``T' >= U + R`` (U labels, R adjacent repeats); an utterance below that has
probability 0 (an infinite or huge loss that swamps its batch). An RNN-T may emit any number of
labels per frame, so it only needs ``T' >= 1``.

``check_alignable`` reports every such utterance by its audio file and either raises (strict,
the default of the corpus readers) or drops them with a warning (non-strict).
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np

from fedprune_jax.data import feature_sets
from fedprune_jax.data.records import CorpusError


def encoder_frames(num_frames: np.ndarray) -> np.ndarray:
  """T' = ceil(ceil(T/2)/2) of int [N] feature-frame counts."""
  half = -(-np.asarray(num_frames, np.int64) // 2)
  return -(-half // 2)


def min_encoder_frames(tokens: np.ndarray, head: str) -> int:
  """Frames an alignment of ``tokens`` (int [U]) needs: CTC ``U + repeats``, RNN-T 1."""
  tokens = np.asarray(tokens)
  if head == "rnnt":
    return 1
  return int(len(tokens) + np.count_nonzero(tokens[1:] == tokens[:-1]))


def unalignable(fs: feature_sets.FeatureSet, head: str) -> list[tuple[int, int, int]]:
  """``(index, encoder frames, frames needed)`` of each utterance of ``fs`` that cannot align."""
  have = encoder_frames(fs.num_frames)
  out = []
  for i in range(len(fs)):
    t0, t1 = fs.token_offsets[i], fs.token_offsets[i + 1]
    need = min_encoder_frames(fs.tokens[t0:t1], head)
    if have[i] < need:
      out.append((i, int(have[i]), need))
  return out


def check_alignable(
  fs: feature_sets.FeatureSet, head: str, split_dir: str | pathlib.Path, strict: bool = True
) -> feature_sets.FeatureSet:
  """``fs`` without the utterances that cannot align (see module docstring).

  Raises CorpusError naming the first one's audio file (and how many there are) when
  ``strict``; otherwise logs one warning per file and returns the rest.
  """
  bad = unalignable(fs, head)
  if not bad:
    return fs
  rule = "U + repeats (CTC)" if head != "rnnt" else "1 (RNN-T)"

  def describe(i: int, have: int, need: int) -> str:
    spk = str(fs.speaker_ids[i])
    utt = str(fs.utt_ids[i])
    chapter = utt.split("-")[1] if utt.count("-") >= 2 else "?"
    path = pathlib.Path(split_dir) / spk / chapter / f"{utt}.flac"
    return (
      f"{path}: too short for its transcript: {fs.num_frames[i]} feature frames give {have} "
      f"encoder frames, its {fs.num_labels[i]} labels need {need} ({rule})"
    )

  if strict:
    more = f" (and {len(bad) - 1} more utterances)" if len(bad) > 1 else ""
    raise CorpusError(describe(*bad[0]) + more)
  for item in bad:
    logging.warning("skipping: %s", describe(*item))
  dropped = {i for i, _, _ in bad}
  keep = np.array([i for i in range(len(fs)) if i not in dropped], np.int64)
  return feature_sets.pack_examples(
    [fs.example(int(i)) for i in keep], fs.utt_ids[keep], fs.speaker_ids[keep]
  )
