"""TFDS ``librispeech`` adapter yielding ``Utterance`` records.

TensorFlow and tensorflow_datasets are imported lazily inside functions: the
core package never imports TensorFlow (install the ``tfds`` extra to use this
module).

TFDS features used: ``speech`` (int16 [n] at 16 kHz), ``text`` (bytes),
``speaker_id``/``chapter_id`` (int64), ``id`` (bytes, "SPK-CHAP-NNNN").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from fedprune_jax.data.librispeech import validate_text
from fedprune_jax.data.records import SAMPLE_RATE, CorpusError, Utterance

DATASET = "librispeech"


def _import_tfds():
  try:
    # pylint: disable-next=import-outside-toplevel
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
      "the TFDS LibriSpeech loader needs tensorflow-datasets: pip install 'fedprune_jax[tfds]'"
    ) from e
  return tfds


def _as_str(value: Any) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value)


def example_to_utterance(
  example: dict[str, Any], *, where: str = DATASET, strict_text: bool = True
) -> Utterance:
  """Converts one TFDS example (numpy values) into an ``Utterance``.

  Args:
    example: dict with ``speech`` int16 [n], ``text``, ``speaker_id``,
      ``chapter_id`` and ``id``.
    where: names the source in errors (e.g. "librispeech/dev_clean").
    strict_text: validate the text against ``ALPHABET`` (else only upper-case
      and collapse whitespace).
  """
  for key in ("speech", "text", "speaker_id", "chapter_id", "id"):
    if key not in example:
      raise CorpusError(f"{where}: example lacks the feature {key!r}")
  utt_id = _as_str(example["id"])
  where = f"{where}[{utt_id}]"
  speech = np.asarray(example["speech"])
  if speech.ndim != 1:
    raise CorpusError(f"{where}: expected mono speech [n], got {speech.shape}")
  if speech.size == 0:
    raise CorpusError(f"{where}: speech has no samples")
  if speech.dtype == np.int16:
    audio = speech.astype(np.float32) / 32768.0
  elif np.issubdtype(speech.dtype, np.integer):  # Older TFDS: int64 PCM.
    audio = np.clip(speech, -32768, 32767).astype(np.float32) / 32768.0
  else:
    audio = speech.astype(np.float32)
  raw_text = _as_str(example["text"]).upper()
  text = validate_text(raw_text, f"{where}.text") if strict_text else " ".join(raw_text.split())
  return Utterance(
    utt_id=utt_id,
    speaker_id=str(int(np.asarray(example["speaker_id"]))),
    chapter_id=str(int(np.asarray(example["chapter_id"]))),
    text=text,
    audio=audio,
    sample_rate=SAMPLE_RATE,
  )


def read_tfds(
  split: str,
  *,
  data_dir: str | None = None,
  speakers: Iterable[str] | None = None,
  download: bool = False,
  strict_text: bool = True,
  name: str = DATASET,
) -> Iterator[Utterance]:
  """Yields ``Utterance`` records of a TFDS LibriSpeech split.

  Args:
    split: TFDS split, e.g. "train_clean100", "dev_clean", "test_clean".
    data_dir: TFDS data directory (None: TFDS default).
    speakers: keep only these speaker ids.
    download: let TFDS download and prepare the dataset if missing.
    strict_text: validate transcripts against ``ALPHABET``.
    name: TFDS dataset name (config suffix allowed, e.g. "librispeech:2.1.1").
  """
  tfds = _import_tfds()
  keep = None if speakers is None else {str(s) for s in speakers}
  ds = tfds.load(name, split=split, data_dir=data_dir, download=download, shuffle_files=False)
  for example in tfds.as_numpy(ds):
    if keep is not None and str(int(example["speaker_id"])) not in keep:
      continue
    yield example_to_utterance(example, where=f"{name}/{split}", strict_text=strict_text)
