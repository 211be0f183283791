"""Centralized training of the `tiny` Conformer-CTC on the embedded synthetic corpus.

Target (issue 3): test-speaker WER <= 25% within 10 minutes of training on a 2-core CPU.
Run: fedprune train --config tiny_centralized [--set train.max_minutes=10]
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/tiny_centralized"

  c.data = ml_collections.ConfigDict()
  c.data.root = "data/synth"  # LibriSpeech layout: ROOT/{train,dev,test}/SPEAKER/CHAPTER/...
  c.data.source = "librispeech_dir"  # or "tfds" (tensorflow-datasets librispeech)
  c.data.train_split = "train"
  c.data.dev_split = "dev"
  c.data.test_split = "test"
  c.data.cache_dir = ""  # feature cache; "" = ROOT/.features
  c.data.batch_size = 32
  c.data.num_buckets = 4
  c.data.eval_batch_size = 64
  c.data.skip_unalignable = False  # a training utterance too short for its transcript: an error

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"
  c.model.head = "ctc"
  c.model.head_options = ml_collections.ConfigDict()  # RnntHead fields for head="rnnt"
  c.model.overrides = ml_collections.ConfigDict()  # ConformerConfig fields, e.g. dropout_rate

  c.optim = ml_collections.ConfigDict()
  c.optim.peak_lr = 3e-3
  c.optim.warmup_steps = 150
  c.optim.end_lr_fraction = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.weight_decay = 1e-3
  c.optim.clip_norm = 5.0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1300  # schedule length: ~what 10 minutes on 2 CPU cores reach
  c.train.max_minutes = 10.0  # wall-clock training budget, excluding evaluation
  c.train.eval_every = 500
  c.train.log_every = 25
  c.train.spec_augment = True
  c.train.checkpoint = True

  c.specaug = ml_collections.ConfigDict()
  c.specaug.num_freq_masks = 2
  c.specaug.max_freq_width = 10
  c.specaug.num_time_masks = 2
  c.specaug.max_time_width = 0.05
  return c
