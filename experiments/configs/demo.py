"""`make demo`: synthesize the default embedded corpus, train `tiny` for 10 minutes, print WER.

This is issue 3's target run (measured numbers in the README).  Later issues switch the demo to
federated pruning.
"""

from fedprune_jax import config as config_lib


def get_config():
  c = config_lib.load_config("tiny_centralized")
  c.workdir = "runs/demo"
  # The embedded corpus the demo writes: 160 voices (128 train / 16 dev / 16 test) x 50 utterances.
  c.data.synth_speakers = 160
  c.data.synth_utterances = 50
  c.data.synth_seed = 0
  return c
