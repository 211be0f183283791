"""T2: importance score at 70% unstructured sparsity: magnitude, random, and client-data scores
(saliency |w| * mean |g| and update magnitude, aggregated over the cohort).

The main comparison refines with nothing (``pruning.refinement=none``): each arm's mask is its
own score's, so random is a floor. A separate sub-comparison uses each score for refinement too
(magnitude: server re-scoring; saliency and update: the clients' scores); random has no
refinement of its own (a refinement re-scores the kept weights; random would redraw them).

Run: fedprune experiment t2_score [--quick]
"""

from fedprune_jax import suite

SPARSE = {"pruning.target_sparsity": 0.7, "pruning.refinement": "none"}
REFINED = {"magnitude": "server", "saliency": "client", "update": "client"}


def get_experiment(setting: str = "small") -> suite.Experiment:
  refined = tuple(
    suite.Arm(
      f"{score}+refine",
      {**SPARSE, "pruning.score": score, "pruning.refinement": refinement},
      row=f"{score}, refined with it ({refinement})",
    )
    for score, refinement in REFINED.items()
  )
  return suite.one_factor(
    "t2_score",
    "T2: importance score (70% unstructured, no refinement)",
    "Weight magnitude works well; random is the floor; client-data scores are offered.",
    setting,
    "pruning.score",
    ("magnitude", "random", "saliency", "update"),
    comparisons=(
      suite.Comparison(
        "random - magnitude (positive: magnitude works well)",
        "random",
        "magnitude",
        expect="higher",
      ),
      ("saliency - magnitude", "saliency", "magnitude"),
      ("update - magnitude", "update", "magnitude"),
      ("refined with the score: saliency - magnitude", "saliency+refine", "magnitude+refine"),
      ("refined with the score: update - magnitude", "update+refine", "magnitude+refine"),
    ),
    fixed=SPARSE,
    more_arms=refined,
  )
