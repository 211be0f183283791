"""Tests for fedprune_jax.metrics against hand-computed edit distances."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune_jax import metrics


def _levenshtein(a, b) -> int:
  """Brute-force reference edit distance (dynamic programming)."""
  d = np.arange(len(b) + 1)
  for i, x in enumerate(a, 1):
    prev, d[0] = d.copy(), i
    for j, y in enumerate(b, 1):
      d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (x != y))
  return int(d[-1])


def test_one_substitution_one_deletion_in_five_words():
  assert metrics.wer(["THE CAT SAT ON MATS"], ["THE BAT SAT MATS"]) == 0.4
  assert metrics.error_counts("THE CAT SAT ON MATS", "THE BAT SAT MATS") == (2, 5)


def test_corpus_level_is_total_edits_over_total_words():
  refs = ["A B C D", "E F"]
  hyps = ["A B C D", "X"]  # 0/4 and 2/2 -> corpus 2/6, not mean(0, 1)
  assert metrics.wer(refs, hyps) == pytest.approx(2 / 6)


def test_empty_hypothesis_and_reference():
  assert metrics.wer(["A B C"], [""]) == 1.0
  assert metrics.error_counts("", "A B") == (2, 0)
  assert metrics.wer(["A B", ""], ["A B", "C"]) == 0.5  # 1 insertion / 2 words
  assert metrics.wer([""], [""]) == 0.0
  assert metrics.wer([""], ["A"]) == float("inf")
  assert metrics.wer([], []) == 0.0


def test_insertions_counted_and_whitespace_ignored():
  assert metrics.error_counts("A B", "A  X B  ") == (1, 2)
  assert metrics.wer(["  A   B "], ["A B"]) == 0.0


def test_cer_counts_spaces_as_characters():
  # "AB CD" (5 chars incl. space) vs "AB CE": one substitution.
  assert metrics.cer(["AB CD"], ["AB CE"]) == pytest.approx(1 / 5)
  # Missing space: one deletion.
  assert metrics.cer(["AB CD"], ["ABCD"]) == pytest.approx(1 / 5)
  assert metrics.error_counts("HELLO", "", unit="char") == (5, 5)


def test_matches_brute_force_levenshtein():
  rng = np.random.default_rng(0)
  words = ["A", "B", "C", "DD"]
  refs, hyps = [], []
  for _ in range(30):
    refs.append(" ".join(rng.choice(words, rng.integers(0, 7))))
    hyps.append(" ".join(rng.choice(words, rng.integers(0, 7))))
  edits = sum(_levenshtein(r.split(), h.split()) for r, h in zip(refs, hyps))
  n = sum(len(r.split()) for r in refs)
  assert metrics.corpus_error_counts(refs, hyps) == (edits, n)
  assert metrics.wer(refs, hyps) == pytest.approx(edits / n)
  cedits = sum(_levenshtein(r, h) for r, h in zip(refs, hyps))
  assert metrics.corpus_error_counts(refs, hyps, "char") == (cedits, sum(len(r) for r in refs))


def test_sharded_accumulation_equals_corpus():
  refs = ["A B C", "D E", "F", "G H I J"]
  hyps = ["A C", "D E X", "", "G H I J"]
  total = [0, 0]
  for shard in ([0, 1, 2], [3]):
    e, n = metrics.corpus_error_counts([refs[i] for i in shard], [hyps[i] for i in shard])
    total[0] += e
    total[1] += n
  assert metrics.rate(*total) == metrics.wer(refs, hyps) == pytest.approx(3 / 10)


def test_bad_arguments():
  with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
    metrics.wer(["A", "B"], ["A"])
  with pytest.raises(TypeError):
    metrics.wer("A B", "A B")
  with pytest.raises(ValueError, match="unit"):
    metrics.error_counts("A", "A", unit="phone")
