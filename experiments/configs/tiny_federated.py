"""Federated training (FedAvg server, Adam clients) of the `tiny` Conformer, one client per speaker.

Run: fedprune federated --config tiny_federated [--set rounds=50 --set cohort_size=32]
Engine fields: see fedprune_jax/federated/rounds.py; `engine.vmap_size=None` vmaps a whole chunk;
`engine.vmap_size=1` maps the clients of a chunk one by one (lowest memory).
"""

import ml_collections

from fedprune_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  base = config_lib.load_config("tiny_centralized")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/tiny_federated"
  c.data = base.data
  c.data.batch_size = 8
  c.data.max_steps = 8  # local steps per round cap (S); a speaker has ~40 utterances
  c.data.max_frames = None
  # Padding (issue 14, `fedprune bench fedround`): speakers grouped by (steps, frames) shape and
  # each client's steps cut into 4 length-sorted scan segments: padding 0.50 -> 0.30.
  c.data.packing = "shape"
  c.data.segments = 4
  c.model = base.model
  c.specaug = base.specaug  # on every client step, as in centralized training; None = off

  c.rounds = 40
  c.cohort_size = 16
  c.sampling = "uniform"
  c.eval_every = 10
  c.checkpoint_every = 10  # orbax round checkpoints in WORKDIR/rounds; a re-run resumes
  c.keep_checkpoints = 2

  # Clients: a fresh Adam per round (CTC losses are large and badly scaled for plain SGD);
  # server: FedAvg (set server.optimizer='fedadam' / 'fedyogi' and a learning rate to switch).
  # compact: under unit pruning clients train the compacted model (auto: whenever the mask is
  # unit-structured; see README "Compacted clients"); compact_quantum bounds its shapes
  c.client = ml_collections.ConfigDict(
    dict(
      optimizer="adam",
      learning_rate=1e-3,
      momentum=None,
      num_epochs=1,
      shuffle=True,
      compact="auto",
      compact_quantum=0.125,
    )
  )
  c.server = ml_collections.ConfigDict(
    dict(optimizer="fedavg", learning_rate=1.0, b1=0.9, b2=0.99, eps=1e-8, momentum=None)
  )
  c.engine = ml_collections.ConfigDict(
    dict(
      executor="chunked",
      # 1 on CPU: a partly filled chunk computes its padding clients too, and vmapped clients run
      # slower than one after the other here (`fedprune bench fedround`: 2.5x); raise it on
      # accelerators, where the chunk is the vmapped (and device-sharded) batch of clients
      chunk_size=1,
      num_devices=1,
      weighting="num_examples",
      vmap_size=None,
      device_loop=False,
    )
  )
  return c
