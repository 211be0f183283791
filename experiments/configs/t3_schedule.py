"""T3: sparsity schedule at 70% unstructured: constant (one-shot at round 0), step (equal raises
at each mask update of the pruning phase), polynomial (cubic).

Run: fedprune experiment t3_schedule [--quick]
"""

from fedprune_jax import suite


def _step_delta(cfg) -> float:
  updates = max(1, cfg.pruning.pruning_rounds // cfg.pruning.update_every)
  return cfg.pruning.target_sparsity / updates


def get_experiment(setting: str = "small") -> suite.Experiment:
  return suite.one_factor(
    "t3_schedule",
    "T3: sparsity schedule (70% unstructured)",
    "A gradual (step) schedule is compared with a constant one; cubic is the reference.",
    setting,
    "pruning.schedule",
    ("constant", "step", "polynomial"),
    comparisons=(
      ("constant - step (positive: step better)", "constant", "step"),
      ("polynomial - step", "polynomial", "step"),
    ),
    extra={"step": {"pruning.step_delta": _step_delta}},
  )
