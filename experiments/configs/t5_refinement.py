"""T5: mask refinement at 70% unstructured: none, server re-scoring of the kept dense values,
client-data (saliency) scores aggregated over the cohort.

Run: fedprune experiment t5_refinement [--quick]
"""

from fedprune_jax import suite


def get_experiment(setting: str = "small") -> suite.Experiment:
  return suite.one_factor(
    "t5_refinement",
    "T5: mask refinement (70% unstructured)",
    "Mask refinement lowers WER.",
    setting,
    "pruning.refinement",
    ("none", "server", "client"),
    comparisons=(
      suite.Comparison(
        "server - none (negative: refinement helps)", "server", "none", expect="lower"
      ),
      suite.Comparison("client - none", "client", "none", expect="lower"),
    ),
  )
