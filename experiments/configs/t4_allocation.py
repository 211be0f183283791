"""T4: per-layer sparsity at 70% unstructured: uniform, adaptive (one global ranking of the
weights, each layer's sparsity bounded to [50%, 90%]), global (unbounded), ERK.

Run: fedprune experiment t4_allocation [--quick]
"""

from fedprune_jax import suite

# the global ranking with every layer's sparsity kept within [50%, 90%] (bare "adaptive" has the
# bounds [0, 1] and is "global")
ADAPTIVE = "adaptive:0.5-0.9"


def get_experiment(setting: str = "small") -> suite.Experiment:
  return suite.one_factor(
    "t4_allocation",
    "T4: per-layer sparsity allocation (70% unstructured)",
    "Adaptive per-layer sparsity beats uniform per-layer sparsity.",
    setting,
    "pruning.allocation",
    ("uniform", ADAPTIVE, "global", "erk"),
    comparisons=(
      suite.Comparison(
        "adaptive - uniform (negative: adaptive better)", ADAPTIVE, "uniform", expect="lower"
      ),
      ("global - uniform", "global", "uniform"),
      ("erk - uniform", "erk", "uniform"),
    ),
  )
