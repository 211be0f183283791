"""The report's statistics against hand-computed values, and the regime gate on hand-made result
files (pass, each failure, the inconclusive wording)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import write_finished_run
from fedprune_jax import report
from fedprune_jax import statistics as st


def _t2_cdf(t: float) -> float:
  """Student's t CDF with 2 degrees of freedom, in closed form: 1/2 + t / (2 sqrt(t^2 + 2))."""
  return 0.5 + t / (2.0 * math.sqrt(t * t + 2.0))


def test_holm_against_hand_computed_values():
  # sorted 0.01, 0.03, 0.04, 0.20 -> 4 x .01 = .04; 3 x .03 = .09; max(.09, 2 x .04) = .09; .20
  assert st.holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
  # NaN is not in the family: m = 2
  out = st.holm([math.nan, 0.01, 0.04])
  assert math.isnan(out[0]) and out[1:] == pytest.approx([0.02, 0.04])
  assert st.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_tost_and_paired_t_against_hand_computed_values():
  diffs = [0.002, 0.004, 0.006]  # mean .004, sd .002, se .002 / sqrt(3)
  se = 0.002 / math.sqrt(3)
  lower = 1.0 - _t2_cdf((0.004 + 0.01) / se)  # H0 mean <= -.01
  upper = _t2_cdf((0.004 - 0.01) / se)  # H0 mean >= .01
  assert st.tost(diffs, 0.01) == pytest.approx(max(lower, upper), rel=1e-9)
  assert st.tost(diffs, 0.01) == pytest.approx(0.01755, abs=1e-5)
  # a narrower margin than the differences themselves: not equivalent
  assert st.tost(diffs, 0.003) > 0.5
  t, p = st.paired_t(diffs)
  assert t == pytest.approx(0.004 / se)
  assert p == pytest.approx(2.0 * (1.0 - _t2_cdf(0.004 / se)))
  assert all(math.isnan(x) for x in (*st.paired_t([0.1]), st.tost([0.1], 0.01)))
  assert st.tost([0.002] * 3, 0.01) == 0.0 and st.tost([0.02] * 3, 0.01) == 1.0


def test_speaker_bootstrap_on_two_speakers():
  # speaker s1: a - b = 1 edit of 10 words (0.1); s2: 8 of 20 (0.4). A resample is (s1, s1),
  # (s2, s2) with 1/4 each or mixed: the 2.5% / 97.5% percentiles are 0.1 and 0.4 exactly.
  a = [{"s1": [2, 10], "s2": [10, 20]}]
  b = [{"s1": [1, 10], "s2": [2, 20]}]
  low, high = st.speaker_bootstrap(a, b)
  assert (low, high) == pytest.approx((0.1, 0.4))
  # errors proportional to words: every resample gives 0.2
  low, high = st.speaker_bootstrap(
    [{"s1": [3, 10], "s2": [6, 20]}], [{"s1": [1, 10], "s2": [2, 20]}]
  )
  assert (low, high) == pytest.approx((0.2, 0.2))
  # edits are averaged over the paired replicates; one common speaker is too few
  two = st.speaker_bootstrap(a * 2, b * 2)
  assert two == pytest.approx((0.1, 0.4))
  assert st.speaker_bootstrap([{"s1": [1, 5]}], [{"s1": [0, 5]}]) is None
  assert st.speaker_bootstrap([None], [None]) is None


def test_readings():
  r = st.reading
  assert r("lower", -0.02, 5, 0.001, 0.9, 0.01) == "reproduces"
  assert r("lower", 0.02, 5, 0.001, 0.9, 0.01, names=("x", "y")).startswith(
    "does not reproduce: the opposite effect (x higher)"
  )
  assert r("higher", 0.001, 5, 0.7, 0.01, 0.01) == (
    "does not reproduce: no effect, equivalent within ±1.0 points"
  )
  assert r("lower", -0.01, 5, 0.2, 0.3, 0.01).startswith("inconclusive: neither an effect")
  assert r("equivalent", 0.002, 5, 0.6, 0.01, 0.01) == "reproduces: equivalent within ±1.0 points"
  assert r("equivalent", 0.05, 5, 0.001, 1.0, 0.01, names=("x", "y")) == (
    "does not reproduce: x higher"
  )
  assert r("", -0.03, 3, 0.01, 1.0, 0.01, names=("x", "y")) == "x lower"
  assert r("", 0.0, 3, 0.5, 0.5, 0.01) == (
    "inconclusive: neither an effect nor equivalent within ±1.0 points"
  )
  assert r("", 0.001, 3, 0.5, 0.01, 0.01) == "equivalent within ±1.0 points"
  assert r("lower", -0.2, 1, math.nan, math.nan, 0.01) == "inconclusive: needs >= 2 replicates"
  gated = r("lower", -0.2, 5, 1e-6, 1.0, 0.01, ["(a) x"])
  assert gated == "inconclusive: setting out of regime ((a) x)"
  with pytest.raises(ValueError):
    r("smaller", 0.0, 3, 0.5, 0.5, 0.01)


def test_gate_thresholds():
  assert st.table_gate(0.30, 0.45) == []
  (a,) = st.table_gate(0.234, 0.227)
  assert a.startswith("(a) dense federated training improves dev WER by -0.7 points")
  assert a.endswith("needs >= 10.0: short by 10.7")
  (b,) = st.table_gate(0.40, 0.60)
  assert b == "(b) dense federated dev WER 40.0% > 35.0%: over by 5.0 points"
  assert len(st.table_gate(0.50, 0.52)) == 2
  assert st.table_gate(0.30, None) == ["(a) the warm start's dev WER is not recorded"]
  assert st.table_gate(None, 0.5) == ["no dense federated reference run is finished"]
  assert st.broken_arms({"x": 0.95, "y": 0.5, "z": math.nan}) == [
    "(c) x is a broken model (test WER 95.0% >= 90.0%)"
  ]


# --- the gate through `fedprune report`, on hand-made result files --------------------------------


def _write_table(tmp_path, arms: dict[str, tuple[list, list]], warm: float | None, comparisons):
  """arm -> (per-seed test WER, per-seed dev WER); ``warm``: the dense run's warm start dev WER."""
  runs = []
  for arm, (tests, devs) in arms.items():
    for seed, (test_wer, dev_wer) in enumerate(zip(tests, devs)):
      d = tmp_path / "runs" / f"{arm}-{seed}"
      d.mkdir(parents=True)
      final = {"test": {"wer": test_wer, "cer": 0.1}, "dev": {"wer": dev_wer, "cer": 0.1}}
      train = {"sparsity": 0.0 if arm == "dense" else 0.5}
      if warm is not None:
        train["warm_start_dev_wer"] = warm
      write_finished_run(d, {"final": final, "train": train, "history": []})
      runs.append(
        dict(
          arm=arm,
          seed=seed,
          split=0,
          dir=f"runs/{arm}-{seed}",
          state="done",
          row=arm,
          col="",
          report=True,
        )
      )
  index = dict(
    experiment="t9",
    title="T9",
    question="q",
    quick=False,
    row_title="arm",
    col_title="",
    figures=[],
    runs=runs,
    comparisons=comparisons,
    reference="dense",
  )
  (tmp_path / "t9.json").write_text(json.dumps(index))
  return report.render(tmp_path)


CLAIM = dict(claim="pruned - dense", a="pruned", b="dense", metric="test_wer", expect="higher")


def test_report_gate_pass_and_each_failure(tmp_path):
  pruned = ([0.40, 0.42, 0.44, 0.41, 0.43], [0.39, 0.41, 0.43, 0.40, 0.42])
  dense = ([0.30, 0.31, 0.32, 0.30, 0.31], [0.29, 0.30, 0.31, 0.29, 0.30])
  text = _write_table(tmp_path / "pass", {"dense": dense, "pruned": pruned}, 0.45, [CLAIM])
  assert "passes (a), (b)" in text and "| reproduces |" in text
  assert "| t9 | 10 | 0.0 | 29.8% | 45.0% | pass |" in text  # the closing table

  # (a): the warm start is as good as the federated model: inconclusive, never "does not ..."
  text = _write_table(tmp_path / "a", {"dense": dense, "pruned": pruned}, 0.30, [CLAIM])
  assert (
    "inconclusive: setting out of regime ((a) dense federated training improves dev WER by "
    "0.2 points" in text
  )
  assert "does not reproduce" not in text

  # (b): the reference itself is poor
  poor = ([0.52, 0.53, 0.50, 0.51, 0.52], [0.50, 0.51, 0.49, 0.50, 0.50])
  text = _write_table(tmp_path / "b", {"dense": poor, "pruned": pruned}, 0.80, [CLAIM])
  assert "inconclusive: setting out of regime ((b) dense federated dev WER 50.0% > 35.0%" in text

  # (c): a compared arm is broken, unless the comparison says that is its finding
  broken = ([0.95, 0.96, 0.97, 0.95, 0.96], [0.95] * 5)
  text = _write_table(tmp_path / "c", {"dense": dense, "pruned": broken}, 0.45, [CLAIM])
  assert "((c) pruned is a broken model (test WER 95.8% >= 90.0%))" in text
  text = _write_table(
    tmp_path / "c2", {"dense": dense, "pruned": broken}, 0.45, [{**CLAIM, "broken_ok": True}]
  )
  assert "| reproduces |" in text

  # no warm start dev WER recorded: (a) cannot be checked
  text = _write_table(tmp_path / "none", {"dense": dense, "pruned": pruned}, None, [CLAIM])
  assert "(a) the warm start's dev WER is not recorded" in text


# three arms of three replicates: (per-seed test WER, per-seed dev WER)
HOLM_ARMS = {
  "dense": ([0.30, 0.31, 0.32], [0.29, 0.30, 0.31]),
  "x": ([0.33, 0.35, 0.34], [0.3] * 3),  # diffs .03, .04, .02
  "y": ([0.31, 0.33, 0.31], [0.3] * 3),  # diffs .01, .02, -.01
}
HOLM_RAW = [st.paired_t([0.03, 0.04, 0.02])[1], st.paired_t([0.01, 0.02, -0.01])[1]]


def test_report_holm_over_a_table(tmp_path):
  """Two comparisons: the t-test p-values in the table are Holm's of the raw ones."""
  comparisons = [
    dict(claim="x - dense", a="x", b="dense", metric="test_wer"),
    dict(claim="y - dense", a="y", b="dense", metric="test_wer"),
  ]
  text = _write_table(tmp_path, HOLM_ARMS, 0.5, comparisons)
  raw = HOLM_RAW
  adjusted = sorted([2 * min(raw), max(2 * min(raw), max(raw))])
  assert f"| {adjusted[0]:.3f} |" in text and f"| {min(1.0, adjusted[1]):.3f} |" in text
  assert np.isclose(st.holm(raw), [2 * raw[0], max(2 * raw[0], raw[1])]).all()


def test_report_holm_counts_a_comparison_and_its_mirror_once(tmp_path):
  """T1 states column - row under both axis conventions: x - dense and dense - x are one test
  (the same t and TOST p-values), so Holm's family has 2 members here, not 3."""
  comparisons = [
    dict(claim="x - dense", a="x", b="dense", metric="test_wer"),
    dict(claim="dense - x", a="dense", b="x", metric="test_wer"),
    dict(claim="y - dense", a="y", b="dense", metric="test_wer"),
  ]
  text = _write_table(tmp_path, HOLM_ARMS, 0.5, comparisons)
  raw = HOLM_RAW
  x_adjusted, y_adjusted = st.holm(raw)
  assert x_adjusted != st.holm(raw + raw[:1])[0]  # a family of 3 would adjust it differently
  rows = [line for line in text.splitlines() if line.startswith(("| x - dense", "| dense - x"))]
  assert len(rows) == 2 and all(f"| {x_adjusted:.3f} |" in row for row in rows)
  assert f"| {y_adjusted:.3f} |" in next(r for r in text.splitlines() if r.startswith("| y - d"))


def test_a_finished_comparison_is_provisional_while_holm_can_still_change_it(tmp_path):
  """While a comparison of its table runs, a finished one's reading is provisional if the
  unfinished p-values, anywhere in [0, 1], can move its Holm-adjusted p across 0.05; a reading no
  outcome of theirs changes is final. Brute force: Holm over the finished p-values and a running
  comparison's p on a grid."""
  dense = ([0.30, 0.31, 0.32, 0.30, 0.31], [0.29, 0.30, 0.31, 0.29, 0.30])
  clear = ([0.40, 0.42, 0.44, 0.41, 0.43], [0.3] * 5)  # +11 points: p ~ 1e-5
  near = ([0.32, 0.31, 0.34, 0.31, 0.335], [0.3] * 5)  # diffs .02, 0, .02, .01, .025: p ~ .03
  comparisons = [
    dict(claim="clear - dense", a="clear", b="dense", metric="test_wer", expect="higher"),
    dict(claim="near - dense", a="near", b="dense", metric="test_wer", expect="higher"),
    dict(claim="later - dense", a="later", b="dense", metric="test_wer", expect="higher"),
  ]
  later = ([0.35], [0.3])  # 1 of its 5 replicates finished
  arms = {"dense": dense, "clear": clear, "near": near, "later": later}

  def running_table(name: str, warm: float) -> dict[str, str]:
    root = tmp_path / name
    _write_table(root, arms, warm, comparisons)
    index = json.loads((root / "t9.json").read_text())
    for seed in range(1, 5):
      index["runs"].append(
        dict(arm="later", seed=seed, split=0, dir=f"runs/later-{seed}", state="pending",
             row="later", col="", report=True)
      )  # fmt: skip
    (root / "t9.json").write_text(json.dumps(index))
    text = report.render(root)
    return {r.split(" |")[0]: r for r in text.splitlines() if " - dense |" in r}

  p_clear = st.paired_t([0.10, 0.11, 0.12, 0.11, 0.12])[1]
  p_near = st.paired_t([0.02, 0.0, 0.02, 0.01, 0.025])[1]
  grid = np.linspace(0.0, 1.0, 101)
  near_can_cross = {st.holm([p_clear, p_near, q])[1] < st.ALPHA for q in grid}
  clear_can_cross = {st.holm([p_clear, p_near, q])[0] < st.ALPHA for q in grid}
  assert near_can_cross == {True, False} and clear_can_cross == {True}  # the case's premise
  line = running_table("running", 0.5)
  assert line["| clear - dense"].endswith("| reproduces |")
  assert (
    "(provisional: Holm's correction waits for 1 test(s) still running)" in (line["| near - dense"])
  )
  assert "(provisional: 1 of 5 replicates)" in line["| later - dense"]
  # out of regime (the dense reference improves its warm start by 5 points, not 10): the reading
  # does not use the p-values, so no outcome of the running test changes it
  line = running_table("out_of_regime", 0.35)
  assert line["| near - dense"].endswith(
    "| inconclusive: setting out of regime ((a) dense federated training improves dev WER by 5.2"
    " points over its warm start (35.0% -> 29.8%), needs >= 10.0: short by 4.8) |"
  )
  # the same finished runs with the table complete: no reading provisional
  _write_table(tmp_path / "done", {**arms, "later": (later[0] * 5, later[1] * 5)}, 0.5, comparisons)
  assert "provisional" not in (tmp_path / "done" / "report" / "report.md").read_text()


def test_report_claims_section_provisional_readings_and_tables_not_run(tmp_path):
  """The claims table repeats each claim's reading from its table (descriptive comparisons left
  out) with replicates done of planned; a reading on fewer replicates than planned is marked
  provisional; the suite's tables without an index are listed; the claims figure is a PNG."""
  pruned = ([0.40, 0.42, 0.44, 0.41, 0.43], [0.39, 0.41, 0.43, 0.40, 0.42])
  dense = ([0.30, 0.31, 0.32, 0.30, 0.31], [0.29, 0.30, 0.31, 0.29, 0.30])
  described = dict(claim="dense - pruned", a="dense", b="pruned", metric="test_wer")
  text = _write_table(tmp_path, {"dense": dense, "pruned": pruned}, 0.45, [CLAIM, described])
  claims = text[text.index("### The paper's claims") :]
  # pruned - dense: .10, .11, .12, .11, .12: mean +11.2, sample std 0.8
  assert "| t9 | pruned - dense | +11.2 ± 0.8 | - | 5 of 5 | reproduces |" in claims
  assert "dense - pruned" not in claims  # no claim: described in its table only
  assert (
    "Not run yet: t1_pattern, t2_score, t3_schedule, t4_allocation, t5_refinement, t6_data."
    in claims
  )
  png = tmp_path / "report" / "claims.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # a sixth replicate of both arms planned, not finished: the same numbers, marked provisional
  index = json.loads((tmp_path / "t9.json").read_text())
  for arm in ("dense", "pruned"):
    index["runs"].append(
      dict(
        arm=arm, seed=5, split=0, dir=f"runs/{arm}-5", state="pending", row=arm, col="", report=True
      )
    )
  (tmp_path / "t9.json").write_text(json.dumps(index))
  text = report.render(tmp_path)
  assert "| pruned - dense | +11.2 ± 0.8 | - | 5 of 6 |" in text  # the table's row
  assert "| 5 of 6 | reproduces (provisional: 5 of 6 replicates) |" in text  # the claims row
  assert "| t9 | 10 of 12 |" in text  # the closing table: runs done of planned


def _texts_inside(fig) -> int:
  """Asserts every text of ``fig`` (titles, labels, legends, notes; not x tick labels, some of
  which lie outside the view limits, undrawn) lies inside the figure; returns how many."""
  import matplotlib.text

  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  ticks = {t for ax in fig.axes for t in ax.get_xticklabels()}
  texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text() and t not in ticks]
  for text in texts:
    extent = text.get_window_extent(renderer)
    assert fig.bbox.x0 - 1 <= extent.x0 and extent.x1 <= fig.bbox.x1 + 1, text.get_text()
    assert fig.bbox.y0 - 1 <= extent.y0 and extent.y1 <= fig.bbox.y1 + 1, text.get_text()
  return len(texts)


def test_figures_keep_their_titles_labels_and_legends_inside(tmp_path, monkeypatch):
  """The claims figure with T1-length claims (its title used to run off the right edge), and F1
  / F2 with T1's six patterns (legend and axis note): no text leaves the saved figure."""
  from fedprune_jax import report_figures

  checked = []
  monkeypatch.setattr(report_figures, "_save", lambda fig, path: checked.append(_texts_inside(fig)))
  claim = "column beats row, y = Wx convention: fan-out - fan-in at 50% (negative: reproduces)"
  rows = [
    dict(
      table="t1_pattern",
      claim=claim * k,
      mean=0.01 * k,
      interval=(0.0, 0.02 * k),
      n=10,
      planned=10,
      provisional=False,
      expect="lower",
      margin=0.01,
      reading="reproduces",
    )
    for k in (1, 2)
  ]
  report_figures.claims_forest(rows, tmp_path / "claims.png")
  metrics = dict(
    test_wer=0.4,
    bytes_down_sent=2e6,
    bytes_up_sent=2e6,
    client_flops_per_step=1e9,
    client_train_memory_bytes=2e8,
    bytes_down_dense=4e6,
    client_flops_per_step_dense=2e9,
  )
  arms = {"dense": {"seeds": {0: {"test_wer": 0.33}}}}
  for pattern in ("unstructured", "row", "half_row", "column", "half_column", "units"):
    for s in (0.5, 0.7, 0.8):
      arms[f"{pattern}@{s}"] = {"seeds": {0: metrics, 1: metrics}}
  report_figures.wer_vs_sparsity(arms, tmp_path / "f1.png")
  report_figures.cost_vs_sparsity(arms, tmp_path / "f2.png")
  # claims: title, 2 labels, x label; F1: + 7 legend entries and the note; F2: 4 panels' labels
  assert len(checked) == 3 and checked[0] >= 4 and checked[1] >= 11 and checked[2] >= 14, checked
