"""T5: mask refinement at 70% unstructured: none, server re-scoring of the kept dense values,
client-data (saliency) scores aggregated over the cohort.

Run: fedprune experiment t5_refinement [--quick]
"""

from fedprune_jax import suite


def get_experiment(setting: str = "small") -> suite.Experiment:
  arms = [suite.Arm("dense", {"pruning": None}, row="dense")]
  for refinement in ("none", "server", "client"):
    overrides = {"pruning.target_sparsity": 0.7, "pruning.refinement": refinement}
    arms.append(suite.Arm(refinement, overrides, row=refinement))
  return suite.Experiment(
    name="t5_refinement",
    title="T5: mask refinement (70% unstructured)",
    question="Mask refinement lowers WER.",
    base=suite.setting_config(setting),
    arms=tuple(arms),
    row_title="refinement",
    comparisons=(
      suite.Comparison("server - none (negative: refinement helps)", "server", "none"),
      suite.Comparison("client - none", "client", "none"),
    ),
  )
