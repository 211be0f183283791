"""T6: federated pruning vs centralized pruning, 70% unstructured, same client compute.

Arms (all from the same dense warm start):
* ``central_server``: centralized pruning on the server-side speakers (same policy keyed by
  steps, ``cfg.rounds * cohort_size * max_steps`` steps of the clients' batch size: the examples
  the clients see in the federated run);
* ``server_mask+fed``: that run's mask, frozen from round 0, applied to the warm start and trained
  federatedly for the same rounds as federated pruning (the mask is chosen without the clients'
  data; same start, same client compute: the claim's comparison);
* ``central_server+fed``: that run's model *and* mask, then the same federated rounds (server
  compute on top: how far more training goes);
* ``federated``: federated pruning on the clients (mask chosen with the clients' data);
* ``central_pooled``: centralized pruning on all clients' data pooled (the non-private bound).

Run: fedprune experiment t6_data [--quick]
"""

from fedprune_jax import suite


def get_experiment(setting: str = "small") -> suite.Experiment:
  sparse = {"pruning.target_sparsity": 0.7}
  arms = (
    suite.Arm("dense", {"pruning": None}, row="dense (federated)"),
    suite.Arm(
      "central_server",
      {**sparse, "baseline.data": "server"},
      kind=suite.BASELINE,
      row="centralized pruning, server speakers",
    ),
    suite.Arm(
      "server_mask+fed",
      {**sparse, "pruning.mask_path": suite.From("central_server", "mask.npz")},
      row="server-chosen mask (frozen) on the warm start, federated training",
    ),
    suite.Arm(
      "central_server+fed",
      {
        **sparse,
        "warm_start.path": suite.From("central_server", "checkpoint"),
        "pruning.mask_path": suite.From("central_server", "mask.npz"),
      },
      row="centralized pruning's model and mask, then federated training (2x compute)",
    ),
    suite.Arm("federated", sparse, row="federated pruning"),
    suite.Arm(
      "central_pooled",
      {**sparse, "baseline.data": "pooled"},
      kind=suite.BASELINE,
      row="centralized pruning, pooled client data",
    ),
  )
  return suite.Experiment(
    name="t6_data",
    title="T6: federated vs centralized pruning (70% unstructured)",
    question="Clients' data improves the pruning result compared to centralized pruning.",
    base=suite.setting_config(setting),
    arms=arms,
    row_title="how the mask is chosen",
    comparisons=(
      suite.Comparison(
        "federated - server-chosen mask, same start and rounds (negative: clients' data helps)",
        "federated",
        "server_mask+fed",
      ),
      suite.Comparison("federated - central_server", "federated", "central_server"),
      suite.Comparison("federated - pooled (the price of privacy)", "federated", "central_pooled"),
    ),
  )
