"""The record every corpus loader yields, and the LibriSpeech alphabet."""

from __future__ import annotations

import dataclasses

import numpy as np

SAMPLE_RATE = 16_000
# LibriSpeech transcripts use upper-case letters, apostrophe and space only.
ALPHABET = " 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclasses.dataclass(frozen=True)
class Utterance:
  """One utterance, as read from LibriSpeech (directory or TFDS) or synthesized.

  Attributes:
    utt_id: "SPEAKER-CHAPTER-NNNN", LibriSpeech's own id.
    speaker_id: the speaker (= federated client) id, e.g. "1089".
    chapter_id: the chapter id.
    text: transcript in ``ALPHABET`` (upper case, apostrophe, single spaces).
    audio: float32 [num_samples] waveform in [-1, 1].
    sample_rate: samples per second (16 kHz for LibriSpeech).
  """

  utt_id: str
  speaker_id: str
  chapter_id: str
  text: str
  audio: np.ndarray
  sample_rate: int = SAMPLE_RATE

  @property
  def duration_s(self) -> float:
    return len(self.audio) / float(self.sample_rate)


class CorpusError(ValueError):
  """Bad input data; the message always names the offending file or field."""
