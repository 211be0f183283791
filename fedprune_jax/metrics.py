"""Word and character error rates (corpus level), computed with jiwer.

Corpus-level rates are ``total edits / total reference units`` (not a mean of
per-utterance rates), so sharded evaluation accumulates ``error_counts`` and
divides once at the end. Words are whitespace-separated tokens (runs of
whitespace collapse, ends are stripped); characters include the single
spaces between words. Empty hypotheses count every reference unit as a
deletion; empty references count every hypothesis unit as an insertion.
"""

from __future__ import annotations

from typing import Sequence

import jiwer

_WORDS = jiwer.Compose(
  [
    jiwer.RemoveMultipleSpaces(),
    jiwer.Strip(),
    jiwer.ReduceToListOfListOfWords(),
  ]
)
_CHARS = jiwer.Compose(
  [
    jiwer.RemoveMultipleSpaces(),
    jiwer.Strip(),
    jiwer.ReduceToListOfListOfChars(),
  ]
)
_UNITS = ("word", "char")


def _check(references: Sequence[str], hypotheses: Sequence[str]) -> None:
  if isinstance(references, str) or isinstance(hypotheses, str):
    raise TypeError("references and hypotheses must be lists of strings, not a single string")
  if len(references) != len(hypotheses):
    raise ValueError(f"got {len(references)} references but {len(hypotheses)} hypotheses")


def corpus_error_counts(
  references: Sequence[str], hypotheses: Sequence[str], unit: str = "word"
) -> tuple[int, int]:
  """Returns ``(edits, reference_length)`` summed over a list of pairs.

  Args:
    references: reference transcripts.
    hypotheses: hypothesis transcripts, same length as ``references``.
    unit: "word" or "char".

  Returns:
    (substitutions + deletions + insertions, number of reference units).
  """
  _check(references, hypotheses)
  if unit not in _UNITS:
    raise ValueError(f"unit must be one of {_UNITS}, got {unit!r}")
  if not references:
    return 0, 0
  process = jiwer.process_words if unit == "word" else jiwer.process_characters
  transform = _WORDS if unit == "word" else _CHARS
  out = process(
    list(references),
    list(hypotheses),
    reference_transform=transform,
    hypothesis_transform=transform,
  )
  edits = out.substitutions + out.deletions + out.insertions
  return int(edits), int(out.substitutions + out.deletions + out.hits)


def error_counts(ref: str, hyp: str, unit: str = "word") -> tuple[int, int]:
  """``(edits, ref_len)`` for one utterance (word or char level)."""
  return corpus_error_counts([ref], [hyp], unit)


def rate(edits: int, ref_len: int) -> float:
  """``edits / ref_len``; with no reference units: 0.0, or inf if edits > 0."""
  if ref_len == 0:
    return 0.0 if edits == 0 else float("inf")
  return edits / ref_len


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
  """Corpus word error rate: total word edits / total reference words."""
  return rate(*corpus_error_counts(references, hypotheses, "word"))


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
  """Corpus character error rate (spaces between words count as characters)."""
  return rate(*corpus_error_counts(references, hypotheses, "char"))
