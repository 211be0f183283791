"""The ASR task as both trainers see it: loading a split (and synthesizing the embedded corpus),
the model, the training loss (SpecAugment, then dropout), evaluation splits, the run's workdir
and params checkpoints.

Shared by the centralized trainer (``train.centralized``), the federated job
(``job``) and the centralized pruning baseline, so all of them train and evaluate the
same objective on the same data.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from fedprune_jax import errors
from fedprune_jax import io_utils
from fedprune_jax import fields
from fedprune_jax.data import alignable
from fedprune_jax.data import feature_sets
from fedprune_jax.data import features as features_lib
from fedprune_jax.models import asr
from fedprune_jax import evaluation as evaluate_lib

Params = Any


def load_split(cfg: ml_collections.ConfigDict, split: str) -> feature_sets.FeatureSet:
  """Features of a split of ``cfg.data.root`` (cached on disk after the first call); ``a+b+c``
  joins several (LibriSpeech train-960: ``train-clean-100+train-clean-360+train-other-500``)."""
  if "+" in split:
    return feature_sets.concat_feature_sets([load_split(cfg, part) for part in split.split("+")])
  if cfg.data.source == "tfds":
    from fedprune_jax.data import tfds_librispeech  # pylint: disable=g-import-not-at-top

    utterances = tfds_librispeech.read_tfds(split, data_dir=cfg.data.root or None)
    examples, utt_ids, speakers = [], [], []
    for u, example in zip_featurized(utterances):
      examples.append(example)
      utt_ids.append(u.utt_id)
      speakers.append(u.speaker_id)
    return feature_sets.pack_examples(examples, utt_ids, speakers)
  root = pathlib.Path(cfg.data.root)
  split_dir = root / split
  if not split_dir.is_dir():
    raise FileNotFoundError(
      f"data.root={str(root)!r} has no split directory {split!r} "
      f"(run `fedprune corpus synth --out {root}` to make the embedded corpus)"
    )
  cache_dir = cfg.data.cache_dir or str(root / ".features")
  return feature_sets.cached_features(str(split_dir), cache_dir)


def load_train_split(cfg: ml_collections.ConfigDict) -> feature_sets.FeatureSet:
  """The training split, checked for utterances too short for their transcript under the
  model's head (``data.alignable``): an error naming the file, or with
  ``data.skip_unalignable`` each one dropped with a warning."""
  strict = not cfg.data.get("skip_unalignable", fields.default("data.skip_unalignable"))
  split = cfg.data.train_split
  where = f"tfds:{split}" if cfg.data.source == "tfds" else pathlib.Path(cfg.data.root) / split
  return alignable.check_alignable(load_split(cfg, split), cfg.model.head, where, strict=strict)


def embedded_corpus(data_cfg: ml_collections.ConfigDict, data_dir: str) -> pathlib.Path:
  """The embedded corpus a data config describes (``data.synth_*``), synthesized under
  ``data_dir`` as ``synth_v<vocab>`` unless it is already there."""
  from fedprune_jax.data import synth  # pylint: disable=g-import-not-at-top

  return synth.synthesize_corpus(
    pathlib.Path(data_dir) / f"synth_v{data_cfg.synth_vocab_size}",
    speakers=data_cfg.synth_speakers,
    utterances=data_cfg.synth_utterances,
    vocab_size=data_cfg.synth_vocab_size,
    seed=data_cfg.synth_seed,
    progress=True,
  )


def zip_featurized(utterances):
  """Yields ``(utterance, Example)`` pairs, featurising one utterance at a time."""
  for u in utterances:
    (example,) = feature_sets.featurize([u])
    yield u, example


def make_model(cfg: ml_collections.ConfigDict) -> asr.AsrModel:
  """The config's model: a preset plus optional ConformerConfig field overrides."""
  overrides = dict(cfg.model.get("overrides", {}) or {})
  head_options = dict(cfg.model.get("head_options", {}) or {})
  return asr.make_asr_model(
    cfg.model.preset, head=cfg.model.head, head_options=head_options, **overrides
  )


def make_optimizer(
  optim: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
  """Clip-by-global-norm, then AdamW on a linear-warmup + cosine-decay learning rate."""
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=optim.peak_lr,
    warmup_steps=optim.warmup_steps,
    decay_steps=max(total_steps, optim.warmup_steps + 1),
    end_value=optim.peak_lr * optim.end_lr_fraction,
  )
  return optax.chain(
    optax.clip_by_global_norm(optim.clip_norm),
    optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay),
  )


def make_training_loss(model: asr.AsrModel, specaug: dict | None) -> Callable:
  """``loss_fn(params, batch, rng) -> (loss, aux)`` of one training step: SpecAugment, then dropout.

  Shared by the centralized step and the federated client update, so both train the same objective.
  ``specaug`` holds ``features.spec_augment`` keyword arguments, or None for no augmentation.
  """

  def loss_fn(params, batch, rng):
    aug_rng, dropout_rng = jax.random.split(rng)
    if specaug is not None:
      batch = dict(
        batch,
        features=features_lib.spec_augment(
          aug_rng, batch["features"], batch["feature_paddings"], **specaug
        ),
      )
    return model.loss(params, batch, dropout_rng, True)

  return loss_fn


class EvalSplits:
  """The dev and test splits with their fixed-shape eval batches, padded once and reused."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    limit = cfg.data.get("eval_max_utterances") or 0
    self.feature_sets = {
      name: _spread_subset(load_split(cfg, getattr(cfg.data, f"{name}_split")), limit)
      for name in ("dev", "test")
    }
    self.batches = {
      name: evaluate_lib.eval_batches(fs, cfg.data.eval_batch_size, cfg.data.num_buckets)
      for name, fs in self.feature_sets.items()
    }

  def evaluate(self, model: asr.AsrModel, params: Params, name: str) -> dict[str, float]:
    return evaluate_lib.evaluate(model, params, self.feature_sets[name], batches=self.batches[name])

  def dev_metrics(self, model: asr.AsrModel, params: Params) -> dict[str, float]:
    """``{dev_wer, dev_cer, dev_loss}``: what training logs as it goes."""
    dev = self.evaluate(model, params, "dev")
    return {"dev_wer": dev["wer"], "dev_cer": dev["cer"], "dev_loss": dev["loss"]}

  def evaluate_all(self, model: asr.AsrModel, params: Params) -> dict[str, dict[str, float]]:
    return {name: self.evaluate(model, params, name) for name in self.feature_sets}


def _spread_subset(fs: feature_sets.FeatureSet, limit: int) -> feature_sets.FeatureSet:
  """At most ``limit`` utterances (0 = all), evenly spread over the split (so over speakers)."""
  if not limit or len(fs) <= limit:
    return fs
  idx = np.linspace(0, len(fs) - 1, limit).round().astype(np.int64)
  return feature_sets.pack_examples(
    [fs.example(int(i)) for i in idx], fs.utt_ids[idx], fs.speaker_ids[idx]
  )


def save_params(path: pathlib.Path, params: Params) -> None:
  """Saves params with orbax (atomic: orbax writes a temporary directory, then renames)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path).absolute()
  # a failed write on a full disk is one CLI line: orbax's background noise about it is dropped
  with io_utils.stderr_held(
    drop_if=lambda e: errors.environment_failure(e) is not None,
    late_noise=io_utils.closed_event_loop,
  ):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params, force=True)
    checkpointer.wait_until_finished()


def restore_params(path: pathlib.Path, like: Params) -> Params:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
  with io_utils.quiet_failed_restore():  # its callers report a failure in one line
    return ocp.StandardCheckpointer().restore(path, abstract)


def evaluate_checkpoint(
  cfg: ml_collections.ConfigDict, checkpoint: str, splits=("dev", "test")
) -> dict:
  """WER/CER of a saved checkpoint on the named splits of ``cfg.data``."""
  model = make_model(cfg)
  params = restore_params(pathlib.Path(checkpoint), model.init(jax.random.key(0)))
  out = {}
  for split in splits:
    fs = load_split(cfg, getattr(cfg.data, f"{split}_split", split))
    out[split] = evaluate_lib.evaluate(model, params, fs, batch_size=cfg.data.eval_batch_size)
  return out


def load_run_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict | None:
  """The resolved config a run recorded in ``workdir/config.json`` (None if there is none);
  ConfigError naming the file if it is unreadable (truncated or hand-edited)."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    return None
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text(encoding="utf-8")))
  except ValueError as e:
    raise errors.ConfigError(f"{path}: unreadable run config: {e}") from e
