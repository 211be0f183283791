"""T4: per-layer sparsity at 70% unstructured: uniform, adaptive (layers ranked by score with
per-layer bounds), global, ERK.

Run: fedprune experiment t4_allocation [--quick]
"""

from fedprune_jax import suite


def get_experiment(setting: str = "small") -> suite.Experiment:
  return suite.one_factor(
    "t4_allocation",
    "T4: per-layer sparsity allocation (70% unstructured)",
    "Adaptive per-layer sparsity beats uniform per-layer sparsity.",
    setting,
    "pruning.allocation",
    ("uniform", "adaptive", "global", "erk"),
    comparisons=(
      ("adaptive - uniform (negative: adaptive better)", "adaptive", "uniform"),
      ("global - uniform", "global", "uniform"),
      ("erk - uniform", "erk", "uniform"),
    ),
  )
