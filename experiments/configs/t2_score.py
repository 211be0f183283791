"""T2: importance score at 70% unstructured sparsity: magnitude, random, and client-data scores
(saliency |w| * mean |g| and update magnitude, aggregated over the cohort).

Run: fedprune experiment t2_score [--quick]
"""

from fedprune_jax import suite

SCORES = ("magnitude", "random", "saliency", "update")


def get_experiment(setting: str = "small") -> suite.Experiment:
  arms = [suite.Arm("dense", {"pruning": None}, row="dense")]
  for score in SCORES:
    overrides = {"pruning.target_sparsity": 0.7, "pruning.score": score}
    arms.append(suite.Arm(score, overrides, row=score))
  return suite.Experiment(
    name="t2_score",
    title="T2: importance score (70% unstructured)",
    question="Weight magnitude works well; random is the floor; client-data scores are offered.",
    base=suite.setting_config(setting),
    arms=tuple(arms),
    row_title="score",
    comparisons=(
      suite.Comparison("random - magnitude (positive: magnitude better)", "random", "magnitude"),
      suite.Comparison("saliency - magnitude", "saliency", "magnitude"),
      suite.Comparison("update - magnitude", "update", "magnitude"),
    ),
  )
