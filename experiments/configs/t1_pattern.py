"""T1 (and figures F1, F2): pruning pattern x target sparsity, against the dense reference.

Run: fedprune experiment t1_pattern [--quick] ; report: fedprune report RUNS
"""

from fedprune_jax import suite

PATTERNS = ("unstructured", "row", "half_row", "column", "half_column")
SPARSITIES = (0.5, 0.7, 0.8)


def get_experiment(setting: str = "small") -> suite.Experiment:
  arms = [suite.Arm("dense", {"pruning": None}, row="dense", col="0")]
  for pattern in PATTERNS:
    for s in SPARSITIES:
      overrides = {"pruning.pattern": pattern, "pruning.target_sparsity": s}
      arms.append(suite.Arm(f"{pattern}@{s}", overrides, row=pattern, col=f"{s:.0%}"))
  return suite.Experiment(
    name="t1_pattern",
    title="T1: pruning pattern x sparsity",
    question="WER rises with sparsity; column-wise pruning beats row-wise pruning.",
    base=suite.setting_config(setting),
    arms=tuple(arms),
    row_title="pattern",
    col_title="target sparsity",
    comparisons=(
      suite.Comparison("column - row at 50% (negative: column better)", "column@0.5", "row@0.5"),
      suite.Comparison("column - row at 70%", "column@0.7", "row@0.7"),
      suite.Comparison("half-column - half-row at 50%", "half_column@0.5", "half_row@0.5"),
      suite.Comparison("half-column - half-row at 70%", "half_column@0.7", "half_row@0.7"),
      suite.Comparison(
        "unstructured 80% - 50% (positive: WER rises with sparsity)",
        "unstructured@0.8",
        "unstructured@0.5",
      ),
      suite.Comparison("unstructured 50% - dense", "unstructured@0.5", "dense"),
    ),
    figures=("wer_vs_sparsity", "cost_vs_sparsity"),
  )
