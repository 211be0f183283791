"""`make demo`: federated pruning of `tiny` on the embedded corpus, against dense federated training.

Setting (chosen to finish in about 15 minutes on 2 CPU cores, bootstrap included, with WERs that
mean something; see the README): a 50-word corpus of 160 voices x 50 utterances; 64 server-side
speakers give a 450-step centralized warm start; the other 64 train speakers are the clients
(cohort 8, up to 4 local Adam steps of 8 utterances). Both runs start from the same warm start and
run 8 rounds; the pruned run reaches 50% unstructured sparsity (cubic schedule over rounds 0-3,
a mask update every round), refines the mask by server re-scoring in rounds 4-5, then
fine-tunes in rounds 6-7.
"""

from fedprune_jax import config as config_lib


def get_config():
  c = config_lib.load_config("fedprune_tiny")
  c.workdir = "runs/demo"
  c.data.synth_speakers = 160
  c.data.synth_utterances = 50
  c.data.synth_vocab_size = 50
  c.data.synth_seed = 0
  c.data.server_speakers = 64
  c.data.max_steps = 4
  # Few shapes to compile (each (S, T) shape bucket and each scan segment is one compilation,
  # minutes on 2 cores): one scan per client, 2 buckets.
  c.data.segments = 1
  c.data.num_buckets = 2
  # the embedded corpus is spoken at up to espeak's fastest rates: a few training utterances are
  # too short for CTC at 4x subsampling (e.g. 156 frames for 40 labels); they are dropped with a
  # warning naming each file instead of stopping the demo
  c.data.skip_unalignable = True
  c.data.eval_max_utterances = 400  # of 800 per split, spread over all 16 speakers
  c.rounds = 8
  c.cohort_size = 8
  c.eval_every = 0
  c.checkpoint_every = 4
  c.warm_start.steps = 450
  c.warm_start.batch_size = 32
  c.warm_start.optim.warmup_steps = 50
  c.pruning.target_sparsity = 0.5
  c.pruning.pruning_rounds = 4
  c.pruning.update_every = 1
  c.pruning.refining_rounds = 2
  c.pruning.refine_every = 1
  return c
