"""Tests for fedprune_jax.data.tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedprune_jax.data import tokenizer
from fedprune_jax.data.records import ALPHABET


def test_vocab_layout_matches_contract():
  assert tokenizer.VOCAB_SIZE == 29 == len(tokenizer.VOCAB)
  assert tokenizer.BLANK_ID == 0 and tokenizer.VOCAB[0] == "<blank>"
  assert tokenizer.VOCAB[1] == " " and tokenizer.VOCAB[2] == "'"
  assert tokenizer.VOCAB[3:] == [chr(ord("A") + i) for i in range(26)]


def test_encode_known_ids():
  ids = tokenizer.encode("IT'S A Z")
  assert ids.dtype == np.int32
  # I=11, T=22, '=2, S=21, space=1, A=3, Z=28
  np.testing.assert_array_equal(ids, [11, 22, 2, 21, 1, 3, 1, 28])
  assert tokenizer.encode("").shape == (0,)


@pytest.mark.parametrize("text,bad", [("HELLO, WORLD", "','"), ("hello", "'h'"), ("A\tB", "'\\t'")])
def test_encode_names_bad_character(text, bad):
  with pytest.raises(ValueError, match="character " + bad.replace("\\", "\\\\")):
    tokenizer.encode(text)


def test_decode_skips_blank_and_negative_and_rejects_out_of_range():
  assert tokenizer.decode([0, 10, 0, 0, 7, -1, 14, 14, 17, -5, 0]) == "HELLO"
  assert tokenizer.decode(np.zeros((0,), np.int32)) == ""
  with pytest.raises(ValueError, match="29"):
    tokenizer.decode([3, 29])


def test_decode_batch_respects_paddings():
  labels = np.array([[10, 11, 5], [3, 0, 0]], np.int32)
  paddings = np.array([[0, 0, 1], [0, 1, 1]], np.float32)
  assert tokenizer.decode_batch(labels, paddings) == ["HI", "A"]


def test_normalize_text():
  assert tokenizer.normalize_text("  don\u2019t \n  stop\t‘em ") == "DON'T STOP 'EM"
  assert tokenizer.normalize_text("") == ""
  # Unknown characters survive so that encode can name them.
  assert tokenizer.normalize_text("a,b") == "A,B"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=60))
def test_round_trip(text):
  ids = tokenizer.encode(text)
  assert ids.shape == (len(text),)
  assert np.all((ids >= 1) & (ids < tokenizer.VOCAB_SIZE))
  assert tokenizer.decode(ids) == text
  # Blanks interleaved anywhere do not change the decoded text.
  with_blanks = np.stack([ids, np.zeros_like(ids)], axis=1).reshape(-1)
  assert tokenizer.decode(with_blanks) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=ALPHABET.lower() + " \t\n\u2019", max_size=40))
def test_normalized_text_always_encodes(text):
  norm = tokenizer.normalize_text(text)
  assert tokenizer.decode(tokenizer.encode(norm)) == norm
  assert "  " not in norm and norm == norm.strip()
