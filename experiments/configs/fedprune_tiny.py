"""Federated pruning of the `tiny` Conformer on the embedded corpus, one client per speaker.

Run: fedprune federated --config fedprune_tiny --data DIR [--set pruning.pattern=column ...]
The server holds 16 speakers (disjoint from the clients) for a short centralized warm start, as a
federated deployment would start from a server-trained model; the clients then prune it over
`pruning.pruning_rounds` rounds (cubic schedule to the target), refine the mask, and fine-tune.
Fields of `pruning`, their defaults and allowed values: `fedprune fields` (fedprune_jax/fields.py);
what they do: fedprune_jax/algorithms/mask_policy.py.
"""

import ml_collections

from fedprune_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  c = config_lib.load_config("tiny_federated")
  c.workdir = "runs/fedprune_tiny"
  c.rounds = 40
  c.cohort_size = 16
  c.eval_every = 10
  c.checkpoint_every = 5
  c.keep_checkpoints = 2
  c.client.learning_rate = 1e-3
  c.data.server_speakers = 16  # server-side speakers: warm start and centralized baseline
  c.data.split_seed = None  # seed of the server/client speaker split (None = the run's seed)
  c.data.eval_max_utterances = 0  # evaluate on at most this many utterances per split (0 = all)

  c.warm_start = ml_collections.ConfigDict()
  c.warm_start.steps = 400  # centralized steps on the server-side speakers (0 = from scratch)
  c.warm_start.batch_size = 16
  c.warm_start.path = ""  # a saved warm start (must exist; default: WORKDIR/warm_start)
  c.warm_start.train_if_missing = False  # train one at a given warm_start.path that is absent
  c.warm_start.seed = None  # its init and batch seed (None = the run's seed)
  c.warm_start.eval_every = 0  # dev WER every k steps and at the end, in PATH.json (0 = none)
  c.warm_start.optim = config_lib.load_config("tiny_centralized").optim
  c.warm_start.optim.warmup_steps = 50

  c.pruning = ml_collections.ConfigDict()
  c.pruning.target_sparsity = 0.5
  c.pruning.pattern = "unstructured"
  c.pruning.score = "magnitude"
  c.pruning.allocation = "uniform"
  c.pruning.schedule = "polynomial"
  c.pruning.initial_sparsity = 0.0
  c.pruning.begin_round = 0
  c.pruning.update_every = 2
  c.pruning.step_delta = 0.1
  c.pruning.pruning_rounds = 20
  c.pruning.refining_rounds = 10
  c.pruning.refine_every = 5
  c.pruning.refinement = "server"
  c.pruning.client_aggregation = "mean"
  c.pruning.trim_fraction = 0.1
  c.pruning.mask_path = ""  # a mask.npz to train with, frozen (e.g. a baseline run's)

  # The centralized pruning baseline (`fedprune baseline`): same policy, keyed by steps.
  c.baseline = ml_collections.ConfigDict()
  c.baseline.data = "server"  # or "pooled" (all clients' data: the non-private upper bound)
  c.baseline.steps_per_round = 0  # 0 = cohort_size * data.max_steps (a round's client steps)
  c.baseline.batch_size = 8
  return c
