"""The report's statistics: the regime gate, paired tests, Holm, TOST, speaker bootstrap.

A table of the paper is read in three steps:

1. **The regime gate** (``table_gate``, ``broken_arms``): a table's readings count only when its
   setting can answer the question: (a) dense federated training improves dev WER over its own
   warm start by at least ``GATE.min_improvement`` (the federated phase does the work); (b) the
   dense federated reference is at most ``GATE.max_reference_wer`` dev WER; (c) no arm of a
   comparison is a broken model (test WER >= ``GATE.broken_wer``) unless the comparison says that
   is its finding. A comparison that fails the gate reads "inconclusive: setting out of regime
   (...)", never "does not reproduce".
2. **Tests over seeds** (paired by replicate: the same seed and warm start / speaker split): the
   two-sided paired t-test (``paired_t``) for an effect, and the two one-sided tests (``tost``)
   for equivalence within a margin (``Comparison.margin``, WER points as a fraction). Each kind
   of p-value is Holm-corrected over the table's comparisons (``holm``).
3. **The reading** (``reading``) from the comparison's expected outcome (``lower``, ``higher``,
   ``equivalent``, or none: descriptive), the corrected p-values and the gate.

Beside each paired difference the report gives a speaker-level bootstrap interval
(``speaker_bootstrap``): test speakers resampled with replacement, the WER difference of the
resampled speakers' pooled word errors (averaged over the paired replicates).

Thresholds live in ``GATE``, ``ALPHA`` and ``DEFAULT_MARGIN`` only.
"""

from __future__ import annotations

import dataclasses
import math
import statistics as py_statistics  # the standard library's, not this module
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

ALPHA = 0.05  # significance level of every test (after Holm's correction)
DEFAULT_MARGIN = 0.01  # equivalence margin of TOST: 1 WER point (a fraction of 1)
EXPECTATIONS = ("lower", "higher", "equivalent", "")


@dataclasses.dataclass(frozen=True)
class Gate:
  """The regime gate's thresholds (WER as fractions)."""

  min_improvement: float = 0.10  # (a) dense federated dev WER <= warm start's - this
  max_reference_wer: float = 0.35  # (b) dense federated dev WER <= this
  broken_wer: float = 0.90  # (c) an arm at or above this test WER is a broken model


GATE = Gate()


def _pts(x: float) -> str:
  return f"{100 * x:.1f}"


def table_gate(
  reference_dev_wer: float | None, warm_start_dev_wer: float | None, gate: Gate = GATE
) -> list[str]:
  """Gates (a) and (b) of a table: the reasons it fails ([] = passes).

  Args:
    reference_dev_wer: the dense federated reference's dev WER (mean over replicates).
    warm_start_dev_wer: its warm start's dev WER (mean over replicates).
  """
  if reference_dev_wer is None or math.isnan(reference_dev_wer):
    return ["no dense federated reference run is finished"]
  out = []
  if warm_start_dev_wer is None or math.isnan(warm_start_dev_wer):
    out.append("(a) the warm start's dev WER is not recorded")
  else:
    gain = warm_start_dev_wer - reference_dev_wer
    if gain < gate.min_improvement:
      out.append(
        f"(a) dense federated training improves dev WER by {_pts(gain)} points over its warm "
        f"start ({_pts(warm_start_dev_wer)}% -> {_pts(reference_dev_wer)}%), needs >= "
        f"{_pts(gate.min_improvement)}: short by {_pts(gate.min_improvement - gain)}"
      )
  if reference_dev_wer > gate.max_reference_wer:
    out.append(
      f"(b) dense federated dev WER {_pts(reference_dev_wer)}% > {_pts(gate.max_reference_wer)}%"
      f": over by {_pts(reference_dev_wer - gate.max_reference_wer)} points"
    )
  return out


def broken_arms(test_wers: Mapping[str, float], gate: Gate = GATE) -> list[str]:
  """Gate (c): the arms (name -> mean test WER) that are broken models, as reasons."""
  return [
    f"(c) {name} is a broken model (test WER {_pts(w)}% >= {_pts(gate.broken_wer)}%)"
    for name, w in test_wers.items()
    if not math.isnan(w) and w >= gate.broken_wer
  ]


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
  """(mean, sample std (0 for one value), n); (nan, nan, 0) for no values."""
  n = len(values)
  if n == 0:
    return math.nan, math.nan, 0
  return py_statistics.fmean(values), py_statistics.stdev(values) if n > 1 else 0.0, n


def paired_t(diffs: Sequence[float]) -> tuple[float, float]:
  """(t, two-sided p) of the paired t-test of ``diffs`` (a - b per replicate) against 0.

  NaN for fewer than 2 differences; with no spread, p = 0 for a nonzero mean, 1 for zero.
  """
  d = np.asarray(diffs, np.float64)
  if d.size < 2:
    return math.nan, math.nan
  if np.ptp(d) == 0:
    return (math.inf if d[0] else math.nan), (0.0 if d[0] else 1.0)
  res = scipy_stats.ttest_1samp(d, 0.0)
  return float(res.statistic), float(res.pvalue)


def tost(diffs: Sequence[float], margin: float) -> float:
  """p-value of the two one-sided paired t-tests of equivalence: |mean| < ``margin``.

  H0: mean <= -margin or mean >= margin; the p-value is the larger of the two one-sided tests'
  (reject both at ALPHA: equivalent within the margin). NaN for fewer than 2 differences.
  """
  d = np.asarray(diffs, np.float64)
  if d.size < 2:
    return math.nan
  if np.ptp(d) == 0:
    return 0.0 if abs(d[0]) < margin else 1.0
  lower = scipy_stats.ttest_1samp(d, -margin, alternative="greater").pvalue
  upper = scipy_stats.ttest_1samp(d, margin, alternative="less").pvalue
  return float(max(lower, upper))


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values (NaN entries stay NaN and are not in the family).

  The i-th smallest of m p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``.
  """
  p = np.asarray(pvalues, np.float64)
  out = np.full(p.shape, math.nan)
  valid = np.flatnonzero(~np.isnan(p))
  m = valid.size
  running = 0.0
  for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
    running = max(running, min(1.0, (m - rank) * p[i]))
    out[i] = running
  return [float(x) for x in out]


def speaker_bootstrap(
  errors_a: Sequence[Mapping[str, Sequence[int]]],
  errors_b: Sequence[Mapping[str, Sequence[int]]],
  *,
  confidence: float = 0.95,
  n_resamples: int = 2000,
  seed: int = 0,
) -> tuple[float, float] | None:
  """A speaker-level bootstrap interval of the WER difference a - b.

  Args:
    errors_a, errors_b: per paired replicate, ``{speaker: [word edits, reference words]}`` of the
      test split (``results.json``: ``final.test.speakers``).

  Returns:
    (low, high) percentile interval of ``sum_s (e_a - e_b) / sum_s words`` over speakers drawn
    with replacement (edits averaged over the replicates), or None with < 2 common speakers.
  """
  pairs = [(a, b) for a, b in zip(errors_a, errors_b) if a and b]
  if not pairs:
    return None
  speakers = sorted(set.intersection(*(set(a) & set(b) for a, b in pairs)))
  if len(speakers) < 2:
    return None
  diff = np.array([np.mean([a[s][0] - b[s][0] for a, b in pairs]) for s in speakers], np.float64)
  words = np.array([pairs[0][0][s][1] for s in speakers], np.float64)

  def ratio(d, w, axis=-1):
    return np.sum(d, axis=axis) / np.sum(w, axis=axis)

  if np.ptp(diff) == 0 and np.ptp(words) == 0:  # every resample gives the same value
    value = float(ratio(diff, words))
    return value, value
  res = scipy_stats.bootstrap(
    (diff, words),
    ratio,
    paired=True,
    vectorized=True,
    confidence_level=confidence,
    n_resamples=n_resamples,
    method="percentile",
    rng=np.random.default_rng(seed),
  )
  return float(res.confidence_interval.low), float(res.confidence_interval.high)


def reading(
  expect: str,
  mean: float,
  n: int,
  p_t: float,
  p_tost: float,
  margin: float,
  out_of_regime: Sequence[str] = (),
  names: tuple[str, str] = ("a", "b"),
) -> str:
  """The comparison's reading.

  Args:
    expect: the paper's claim about ``a - b``: ``lower`` (a < b), ``higher``, ``equivalent``
      (|a - b| < margin), or ``""`` (no claim: a description).
    mean: mean paired difference a - b; ``n`` replicates.
    p_t, p_tost: Holm-adjusted p-values of the paired t-test and of TOST.
    margin: TOST's equivalence margin (fraction).
    out_of_regime: the gate's reasons (empty = in regime).
  """
  if expect not in EXPECTATIONS:
    raise ValueError(f"expect={expect!r}; expected one of {EXPECTATIONS}")
  if out_of_regime:
    return "inconclusive: setting out of regime (" + "; ".join(out_of_regime) + ")"
  if n < 2:
    return "inconclusive: needs >= 2 replicates"
  effect = not math.isnan(p_t) and p_t < ALPHA
  equivalent = not math.isnan(p_tost) and p_tost < ALPHA
  within = f"equivalent within ±{_pts(margin)} points"
  neither = f"inconclusive: neither an effect nor {within}"
  a = names[0]
  direction = f"{a} {'higher' if mean > 0 else 'lower'}"
  if expect in ("lower", "higher"):
    if effect:
      right = (mean < 0) if expect == "lower" else (mean > 0)
      return "reproduces" if right else f"does not reproduce: the opposite effect ({direction})"
    if equivalent:
      return f"does not reproduce: no effect, {within}"
    return neither
  if expect == "equivalent":
    if equivalent:
      return f"reproduces: {within}"
    if effect:
      return f"does not reproduce: {direction}"
    return neither
  if effect:
    return direction
  # Not "within noise": without equivalence a non-significant difference is not shown to be small.
  return within if equivalent else neither
