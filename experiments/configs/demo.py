"""`make demo`: the centralized tiny job on the embedded corpus (issue 3's target run).

Later issues switch the demo to federated pruning.
"""

from fedprune_jax import config as config_lib


def get_config():
  c = config_lib.load_config("tiny_centralized")
  c.workdir = "runs/demo"
  return c
