"""The paper's experiments, small setting: the `tiny` Conformer on the embedded 200-word corpus.

Chosen by measurement so that a CPU can answer the paper's questions (README, "Paper
experiments"): the dense federated reference must sit far enough below 100% WER that a few WER
points between pruning schemes stand above seed noise, and a table of 3 seeds must fit in about
an hour on 2 cores.

* Corpus: 160 synthetic voices x 50 utterances, 200-word vocabulary (128 train, 16 dev, 16 test
  speakers); `fedprune experiment` synthesizes it under --data if absent.
* Server / clients: 64 of the 128 train speakers are server-side (`data.split_seed` fixes the
  split for every seed); the other 64 are the clients, one per speaker.
* Warm start: the server trains the dense model centrally on its speakers (`warm_start.steps`,
  seeded by `warm_start.seed`, shared by every run and seed, evaluated on dev as it trains). Every
  arm then starts from the same well-trained dense model, as a deployment would.
* Rounds: 10 rounds of cohort 8, 2 local Adam steps of 16 utterances: pruning over rounds
  0-5 (mask updates every 2 rounds), refining in rounds 6-7 (a mask update each), fine-tuning in
  rounds 8-9.
* Evaluation: 400 of the 800 utterances of dev and of test, spread evenly over their 16 speakers
  (the runs' wall time is dominated by rounds and evaluation; 48 runs make T1).
* Seeds vary client sampling, local batch order and SpecAugment; the warm start and the speaker
  split are the same for all seeds (so seed spread is the federated part's).
"""

from fedprune_jax import config as config_lib


def get_config():
  c = config_lib.load_config("fedprune_tiny")
  c.workdir = "runs/paper_small"
  c.data.root = "data/synth_v200"
  c.data.synth_speakers = 160
  c.data.synth_utterances = 50
  c.data.synth_vocab_size = 200
  c.data.synth_seed = 0
  c.data.server_speakers = 64
  c.data.split_seed = 0
  # 2 local steps of 16 utterances (32 of a speaker's 50)
  c.data.batch_size = 16
  c.data.max_steps = 2
  c.data.segments = 1
  c.data.num_buckets = 2
  c.data.eval_max_utterances = 400  # of 800 per split, spread over all 16 speakers
  c.rounds = 10
  c.cohort_size = 8
  c.eval_every = 0
  c.checkpoint_every = 5
  c.warm_start.steps = 2000
  c.warm_start.batch_size = 32
  c.warm_start.seed = 0
  c.warm_start.eval_every = 250
  c.warm_start.optim.warmup_steps = 150
  c.baseline.batch_size = 16  # the clients' batch: a centralized round = a round's client steps
  c.pruning.target_sparsity = 0.5
  c.pruning.pruning_rounds = 6
  c.pruning.update_every = 2
  c.pruning.refining_rounds = 2
  c.pruning.refine_every = 1
  return c
