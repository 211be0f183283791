"""T2: importance score at 70% unstructured sparsity: magnitude, random, and client-data scores
(saliency |w| * mean |g| and update magnitude, aggregated over the cohort).

Run: fedprune experiment t2_score [--quick]
"""

from fedprune_jax import suite


def get_experiment(setting: str = "small") -> suite.Experiment:
  return suite.one_factor(
    "t2_score",
    "T2: importance score (70% unstructured)",
    "Weight magnitude works well; random is the floor; client-data scores are offered.",
    setting,
    "pruning.score",
    ("magnitude", "random", "saliency", "update"),
    comparisons=(
      ("random - magnitude (positive: magnitude better)", "random", "magnitude"),
      ("saliency - magnitude", "saliency", "magnitude"),
      ("update - magnitude", "update", "magnitude"),
    ),
  )
