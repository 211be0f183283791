"""Character tokenizer for LibriSpeech-style transcripts.

Vocabulary (see docs/architecture.md): id 0 is the CTC blank, then the
characters of ``ALPHABET`` in order: 1 = space, 2 = apostrophe, 3..28 = A..Z.
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np

from fedprune_jax.data.records import ALPHABET

VOCAB: list[str] = ["<blank>"] + list(ALPHABET)
VOCAB_SIZE = len(VOCAB)  # 29
BLANK_ID = 0

_CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB) if i != BLANK_ID}
_ID_TO_CHAR = np.array([""] + list(ALPHABET), dtype=object)
# Typographic apostrophes / primes that transcripts from other sources use.
_APOSTROPHES = str.maketrans(
  {"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'", "`": "'", "\u00b4": "'"}
)
_WHITESPACE = re.compile(r"\s+")

assert VOCAB_SIZE == 29


def normalize_text(text: str) -> str:
  """Upper-cases, maps curly apostrophes to "'" and collapses whitespace.

  Characters outside ``ALPHABET`` are left in place so that ``encode`` can name
  them; this function never silently drops content.
  """
  text = text.translate(_APOSTROPHES).upper()
  return _WHITESPACE.sub(" ", text).strip()


def encode(text: str) -> np.ndarray:
  """Maps a transcript in ``ALPHABET`` to token ids.

  Args:
    text: a normalised transcript (see ``normalize_text``); no blank symbol.

  Returns:
    int32 [len(text)] ids in 1..VOCAB_SIZE-1.

  Raises:
    ValueError: naming the first character outside ``ALPHABET`` and its index.
  """
  try:
    return np.fromiter((_CHAR_TO_ID[c] for c in text), dtype=np.int32, count=len(text))
  except KeyError:
    for i, c in enumerate(text):
      if c not in _CHAR_TO_ID:
        raise ValueError(
          f"encode: character {c!r} (U+{ord(c):04X}) at index {i} of "
          f"{text!r} is not in the alphabet {ALPHABET!r}; call "
          "normalize_text first"
        ) from None
    raise


def decode(ids: Iterable[int] | np.ndarray) -> str:
  """Maps token ids back to text.

  Args:
    ids: int [L] token ids; the blank (0) and negative ids (padding
      sentinels) are skipped. CTC repeat-collapsing is *not* done here (that
      belongs to the decoder).

  Returns:
    The transcript string.

  Raises:
    ValueError: if an id is >= VOCAB_SIZE.
  """
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  if ids.size and ids.max() >= VOCAB_SIZE:
    bad = int(ids[ids >= VOCAB_SIZE][0])
    raise ValueError(f"decode: token id {bad} is out of range [0, {VOCAB_SIZE})")
  ids = ids[ids > BLANK_ID]
  return "".join(_ID_TO_CHAR[ids].tolist())


def decode_batch(labels: np.ndarray, paddings: np.ndarray | None = None) -> list[str]:
  """Decodes each row of int [B, L] ``labels`` (positions with padding 1 skipped)."""
  labels = np.asarray(labels)
  if paddings is not None:
    labels = np.where(np.asarray(paddings) > 0, BLANK_ID, labels)
  return [decode(row) for row in labels]
