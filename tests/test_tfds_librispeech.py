"""Tests of the TFDS LibriSpeech adapter (mocked data) and its lazy import."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from fedprune_jax.data import tfds_librispeech
from fedprune_jax.data.records import ALPHABET, CorpusError, Utterance


def test_data_package_never_imports_tensorflow():
  code = (
    "import importlib, pkgutil, sys\n"
    "import fedprune_jax.data as d\n"
    "for m in pkgutil.iter_modules(d.__path__):\n"
    "  importlib.import_module('fedprune_jax.data.' + m.name)\n"
    "bad = sorted(k for k in sys.modules if k.split('.')[0] in\n"
    "             ('tensorflow', 'tensorflow_datasets'))\n"
    "assert 'fedprune_jax.data.tfds_librispeech' in sys.modules\n"
    "print(bad)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_example_to_utterance_converts_exactly():
  speech = np.array([0, 1, -1, 32767, -32768, 1000], np.int16)
  utt = tfds_librispeech.example_to_utterance(
    {
      "speech": speech,
      "text": b"it's  a test",
      "speaker_id": np.int64(1089),
      "chapter_id": np.int64(134686),
      "id": b"1089-134686-0000",
    }
  )
  assert utt == Utterance("1089-134686-0000", "1089", "134686", "IT'S A TEST", utt.audio, 16000)
  assert utt.audio.dtype == np.float32
  np.testing.assert_array_equal(utt.audio, speech / 32768.0)


def test_example_errors_name_the_example():
  good = {
    "speech": np.ones(4, np.int16),
    "text": b"HI",
    "speaker_id": np.int64(1),
    "chapter_id": np.int64(2),
    "id": b"1-2-0000",
  }
  with pytest.raises(CorpusError, match=r"lib/x\[1-2-0000\]\.text: characters '1'"):
    tfds_librispeech.example_to_utterance({**good, "text": b"HI 1"}, where="lib/x")
  with pytest.raises(CorpusError, match="lacks the feature 'speech'"):
    tfds_librispeech.example_to_utterance({k: v for k, v in good.items() if k != "speech"})
  with pytest.raises(CorpusError, match=r"1-2-0000\]: speech has no samples"):
    tfds_librispeech.example_to_utterance({**good, "speech": np.zeros(0, np.int16)})


def test_read_tfds_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    utts = list(tfds_librispeech.read_tfds("dev_clean"))
  assert len(utts) == 4
  for u in utts:
    assert isinstance(u, Utterance)
    assert isinstance(u.utt_id, str) and u.utt_id
    assert u.speaker_id.isdigit() and u.chapter_id.isdigit()
    assert u.text and set(u.text) <= set(ALPHABET)
    assert u.text == " ".join(u.text.split())
    assert u.sample_rate == 16000 and u.audio.dtype == np.float32
    assert u.audio.ndim == 1 and u.audio.size > 0
    assert np.all(np.abs(u.audio) <= 1.0)
  # Speaker filter: keep only the first example's speaker.
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    kept = list(tfds_librispeech.read_tfds("dev_clean", speakers=[utts[0].speaker_id]))
  assert kept and {u.speaker_id for u in kept} == {utts[0].speaker_id}
