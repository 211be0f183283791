"""T4: per-layer sparsity at 70% unstructured: uniform, adaptive (layers ranked by score with
per-layer bounds), global, ERK.

Run: fedprune experiment t4_allocation [--quick]
"""

from fedprune_jax import suite


def get_experiment(setting: str = "small") -> suite.Experiment:
  arms = [suite.Arm("dense", {"pruning": None}, row="dense")]
  for allocation in ("uniform", "adaptive", "global", "erk"):
    overrides = {"pruning.target_sparsity": 0.7, "pruning.allocation": allocation}
    arms.append(suite.Arm(allocation, overrides, row=allocation))
  return suite.Experiment(
    name="t4_allocation",
    title="T4: per-layer sparsity allocation (70% unstructured)",
    question="Adaptive per-layer sparsity beats uniform per-layer sparsity.",
    base=suite.setting_config(setting),
    arms=tuple(arms),
    row_title="allocation",
    comparisons=(
      suite.Comparison("adaptive - uniform (negative: adaptive better)", "adaptive", "uniform"),
      suite.Comparison("global - uniform", "global", "uniform"),
      suite.Comparison("erk - uniform", "erk", "uniform"),
    ),
  )
