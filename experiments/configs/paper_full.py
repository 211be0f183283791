"""The paper's experiments, full setting: the `l` Conformer-transducer (`model.head=rnnt`, as the
paper's) on LibriSpeech.

Same experiments and arms as the small setting (`fedprune experiment NAME --setting full --data
LIBRISPEECH_ROOT`), sized for accelerators:

* Corpus: LibriSpeech in its native layout under --data (or `data.source=tfds`): train-960
  (train-clean-100 + train-clean-360 + train-other-500) split by speaker, 2,338 speakers; dev-clean
  and test-clean for evaluation.
* Server / clients: 338 speakers server-side (warm start, centralized baselines), the other 2,000
  are the clients, one per speaker.
* Rounds: cohort 128, up to 16 local steps of 16 utterances; clients are vmapped in chunks of 64
  and sharded over all devices (`engine.num_devices='all'`).

Only the wiring of this setting is tested here (tests/test_suite.py runs it on a small
LibriSpeech-layout corpus with the `tiny` preset); its figures need accelerators.
"""

import ml_collections

from fedprune_jax import config as config_lib


def get_config():
  c = config_lib.load_config("paper_small")
  c.workdir = "runs/paper_full"
  for field in ("synth_speakers", "synth_utterances", "synth_vocab_size", "synth_seed"):
    del c.data[field]
  c.data.root = "data/LibriSpeech"
  c.data.train_split = "train-clean-100+train-clean-360+train-other-500"
  c.data.dev_split = "dev-clean"
  c.data.test_split = "test-clean"
  c.data.batch_size = 16
  c.data.max_steps = 16
  c.data.segments = 4
  c.data.num_buckets = 4
  c.data.skip_unalignable = False  # LibriSpeech: an unalignable utterance is an error
  c.data.server_speakers = 338
  c.model.preset = "l"
  c.rounds = 400
  c.cohort_size = 128
  c.checkpoint_every = 10
  c.engine = ml_collections.ConfigDict(
    {**c.engine.to_dict(), "chunk_size": 64, "num_devices": "all"}
  )
  c.warm_start.steps = 20000
  c.warm_start.batch_size = 64
  c.warm_start.eval_every = 2000
  c.warm_start.optim.warmup_steps = 2000
  c.warm_start.optim.peak_lr = 1e-3
  c.model.head = "rnnt"  # the paper's Conformer-transducer
  c.client.learning_rate = 3e-4
  c.pruning.pruning_rounds = 200
  c.pruning.update_every = 10
  c.pruning.refining_rounds = 100
  c.pruning.refine_every = 25
  c.baseline.batch_size = 16
  return c
