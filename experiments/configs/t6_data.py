"""T6: federated pruning vs centralized pruning, 70% unstructured, with scarce, shifted server data.

The claim: the clients' *vast amount* of data improves the pruning result compared to
centralized training on the server's data. So the server's data here is scarce and shifted:
``SERVER_SPEAKERS`` speakers drawn (reproducibly, by ``data.split_seed``) from the corpus'
``SERVER_ACCENTS`` only (``data.server_accents``; accents are the synthetic voices' espeak-ng
languages); the clients are every other train speaker, of all accents; dev and test speakers
are the clients' population (every accent). The warm start trains on the server's data.

Arms (all from the same warm start; every pruning arm has the same schedule, target and
``refinement=none``, so no arm reaches its final mask earlier than another):
* ``dense``: dense federated training, the reference (and the regime gate's);
* ``central_server``: centralized pruning on the server's speakers, ``cohort_size * max_steps``
  steps of the clients' batch per round for the same rounds (the examples the clients see, the
  same schedule keyed by rounds);
* ``federated``: federated pruning, magnitude scores (the mask from the federatedly trained
  weights);
* ``federated_saliency``: federated pruning, the clients' saliency scores combined by a vote
  (the mask from the clients' data directly);
* ``central_pooled``: centralized pruning on all clients' data pooled (the non-private bound).

The federated arms see the same client examples (rounds x cohort x local steps x batch) and make
the same server updates (one per round); the centralized arms see as many examples, from the
server's speakers or the pooled clients. ``full`` (LibriSpeech) has no accents: its server
speakers are a scarce random subset.

Run: fedprune experiment t6_data [--quick]
"""

from fedprune_jax import suite

SERVER_SPEAKERS = {"small": 8, "full": 100}
SERVER_ACCENTS = {"small": ("en-us", "en-us-nyc"), "full": ()}
SPARSE = {"pruning.target_sparsity": 0.7, "pruning.refinement": "none"}


def base_config(setting: str):
  """The setting with T6's scarce, accent-shifted server data."""
  base = suite.setting_config(setting)
  base.data.server_speakers = SERVER_SPEAKERS[setting]
  if setting == "small":
    # the 8-speaker warm start is weaker (measured 71.8% dev WER against the setting's 46.5%),
    # so the dense reference needs more rounds to pass the regime gate: 37.3% dev WER after 80
    # rounds, 30.8% after 100, 33.8% on the second split (README); pruning over its first half,
    # as the setting's
    base.rounds = 100
    base.pruning.pruning_rounds = 50
    base.pruning.update_every = 5
    base.pruning.refining_rounds = 20
    base.pruning.refine_every = 5
  if SERVER_ACCENTS[setting]:
    with base.data.unlocked():
      base.data.server_accents = SERVER_ACCENTS[setting]
  return base


def get_experiment(setting: str = "small") -> suite.Experiment:
  arms = (
    suite.Arm("dense", {"pruning": None}, row="dense (federated)"),
    suite.Arm(
      "central_server",
      {**SPARSE, "baseline.data": "server"},
      kind=suite.BASELINE,
      row="centralized pruning, the server's speakers",
    ),
    suite.Arm("federated", SPARSE, row="federated pruning, magnitude"),
    suite.Arm(
      "federated_saliency",
      {**SPARSE, "pruning.score": "saliency", "pruning.client_aggregation": "vote"},
      row="federated pruning, clients' saliency (vote)",
    ),
    suite.Arm(
      "central_pooled",
      {**SPARSE, "baseline.data": "pooled"},
      kind=suite.BASELINE,
      row="centralized pruning, pooled client data (non-private bound)",
    ),
  )
  return suite.Experiment(
    name="t6_data",
    title="T6: federated vs centralized pruning, scarce accent-shifted server data (70%)",
    question="Clients' data improves the pruning result compared to centralized pruning.",
    base=base_config(setting),
    arms=arms,
    row_title="how the mask is chosen",
    comparisons=(
      suite.Comparison(
        "federated (magnitude) - centralized on the server's data (negative: clients' data helps)",
        "federated",
        "central_server",
        expect="lower",
      ),
      suite.Comparison(
        "federated (clients' saliency) - centralized on the server's data",
        "federated_saliency",
        "central_server",
        expect="lower",
      ),
      suite.Comparison("clients' saliency - magnitude", "federated_saliency", "federated"),
      suite.Comparison("federated - pooled (the price of privacy)", "federated", "central_pooled"),
    ),
    notes=(
      f"Server data: {SERVER_SPEAKERS[setting]} speakers"
      + (f" of the accents {', '.join(SERVER_ACCENTS[setting])}" if SERVER_ACCENTS[setting] else "")
      + "; clients: every other train speaker (all accents); dev / test: all accents.",
    ),
    **suite.PAPER_REPLICATES,
  )
