"""T3: sparsity schedule at 70% unstructured: constant (one-shot at round 0), step (equal raises
at each mask update of the pruning phase), polynomial (cubic).

Run: fedprune experiment t3_schedule [--quick]
"""

from fedprune_jax import suite


def _step_delta(cfg) -> float:
  updates = max(1, cfg.pruning.pruning_rounds // cfg.pruning.update_every)
  return cfg.pruning.target_sparsity / updates


def get_experiment(setting: str = "small") -> suite.Experiment:
  arms = [suite.Arm("dense", {"pruning": None}, row="dense")]
  for schedule in ("constant", "step", "polynomial"):
    overrides = {"pruning.target_sparsity": 0.7, "pruning.schedule": schedule}
    if schedule == "step":
      overrides["pruning.step_delta"] = _step_delta
    arms.append(suite.Arm(schedule, overrides, row=schedule))
  return suite.Experiment(
    name="t3_schedule",
    title="T3: sparsity schedule (70% unstructured)",
    question="A gradual (step) schedule is compared with a constant one; cubic is the reference.",
    base=suite.setting_config(setting),
    arms=tuple(arms),
    row_title="schedule",
    comparisons=(
      suite.Comparison("constant - step (positive: step better)", "constant", "step"),
      suite.Comparison("polynomial - step", "polynomial", "step"),
    ),
  )
