"""Centralized training of a Conformer ASR model: optax Adam(W) + warmup/cosine, clipping,
SpecAugment, length-bucketed batches, periodic dev evaluation, final dev/test WER.

This is also the *centralized pruning baseline*'s trainer in later issues: the step takes an
optional mask pytree so pruned weights stay exactly zero.
"""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from fedprune_jax import io_utils
from fedprune_jax.data import batching
from fedprune_jax.data import features as features_lib
from fedprune_jax.models import asr
from fedprune_jax.models import conformer
from fedprune_jax.pruning.masks import apply_mask
from fedprune_jax.train import evaluate as evaluate_lib

Params = Any


# --- data ---------------------------------------------------------------------------------------


def load_split(cfg: ml_collections.ConfigDict, split: str) -> batching.FeatureSet:
  """Features of one split of ``cfg.data.root`` (cached on disk after the first call)."""
  if cfg.data.source == "tfds":
    from fedprune_jax.data import tfds_librispeech  # pylint: disable=g-import-not-at-top

    utterances = tfds_librispeech.read_tfds(split, data_dir=cfg.data.root or None)
    examples, utt_ids, speakers = [], [], []
    for u, example in zip_featurized(utterances):
      examples.append(example)
      utt_ids.append(u.utt_id)
      speakers.append(u.speaker_id)
    return batching.pack_examples(examples, utt_ids, speakers)
  root = pathlib.Path(cfg.data.root)
  split_dir = root / split
  if not split_dir.is_dir():
    raise FileNotFoundError(
      f"data.root={str(root)!r} has no split directory {split!r} "
      f"(run `fedprune corpus synth --out {root}` to make the embedded corpus)"
    )
  cache_dir = cfg.data.cache_dir or str(root / ".features")
  return batching.cached_features(str(split_dir), cache_dir)


def zip_featurized(utterances):
  """Yields ``(utterance, Example)`` pairs, featurising one utterance at a time."""
  for u in utterances:
    (example,) = batching.featurize([u])
    yield u, example


def make_model(cfg: ml_collections.ConfigDict) -> asr.AsrModel:
  """The config's model: a preset plus optional ConformerConfig field overrides."""
  overrides = dict(cfg.model.get("overrides", {}) or {})
  return asr.make_asr_model(cfg.model.preset, head=cfg.model.head, **overrides)


# --- optimisation -------------------------------------------------------------------------------


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


def make_train_step(
  model: asr.AsrModel, optimizer: optax.GradientTransformation, specaug: dict | None
) -> Callable:
  """Returns a jitted ``step(params, opt_state, batch, rng, mask=None) -> (params, opt_state, metrics)``.

  ``mask`` (optional pytree of {0,1} arrays or None leaves, the params' structure) keeps pruned
  weights exactly zero: gradients and updates are masked.
  """
  loss_fn = make_training_loss(model, specaug)

  def step(params, opt_state, batch, rng, mask=None):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
    grads = apply_mask(grads, mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = apply_mask(optax.apply_updates(params, updates), mask)
    return (
      params,
      opt_state,
      {"loss": loss, "grad_norm": optax.tree.norm(grads), "num_examples": aux["num_examples"]},
    )

  return jax.jit(step, donate_argnums=(0, 1))


def prepare_workdir(cfg: ml_collections.ConfigDict) -> pathlib.Path:
  """Creates ``cfg.workdir`` and records the resolved config in it (``config.json``)."""
  workdir = pathlib.Path(cfg.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  io_utils.write_text_atomic(workdir / "config.json", cfg.to_json_best_effort(indent=2))
  return workdir


class EvalSplits:
  """The dev and test splits with their fixed-shape eval batches, padded once and reused."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.feature_sets = {
      name: load_split(cfg, getattr(cfg.data, f"{name}_split")) for name in ("dev", "test")
    }
    self.batches = {
      name: evaluate_lib.eval_batches(fs, cfg.data.eval_batch_size, cfg.data.num_buckets)
      for name, fs in self.feature_sets.items()
    }

  def evaluate(self, model: asr.AsrModel, params: Params, name: str) -> dict[str, float]:
    return evaluate_lib.evaluate(model, params, self.feature_sets[name], batches=self.batches[name])

  def evaluate_all(self, model: asr.AsrModel, params: Params) -> dict[str, dict[str, float]]:
    return {name: self.evaluate(model, params, name) for name in self.feature_sets}


# --- the loop -----------------------------------------------------------------------------------


def train_and_evaluate(cfg: ml_collections.ConfigDict, *, progress: bool = True) -> dict:
  """Trains ``cfg.model`` on ``cfg.data.train_split``; evaluates dev during and dev/test after.

  Writes ``workdir/metrics.jsonl`` (one record per log/eval step), ``workdir/results.json`` and
  an orbax checkpoint of the final params in ``workdir/checkpoint``.

  Returns:
    {'final': {split: {'wer', 'cer', 'loss', 'num_utterances'}, ...}, 'train': {...}}.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  workdir = prepare_workdir(cfg)

  train_fs = load_split(cfg, cfg.data.train_split)
  evals = EvalSplits(cfg)

  model = make_model(cfg)
  rng = jax.random.key(cfg.seed)
  params = model.init(jax.random.fold_in(rng, 0))
  num_params = conformer.count_params(params)
  optimizer = make_optimizer(cfg.optim, cfg.train.steps)
  opt_state = optimizer.init(params)
  specaug = dict(cfg.specaug) if cfg.train.spec_augment else None
  train_step = make_train_step(model, optimizer, specaug)

  examples = train_fs.examples()
  ids = [str(u) for u in train_fs.utt_ids]
  boundaries = batching.bucket_boundaries(train_fs.num_frames, cfg.data.num_buckets)
  max_labels = batching.round_up(int(train_fs.num_labels.max()), 16)

  def epoch_batches(epoch: int):
    return batching.bucketed_batches(
      examples,
      ids,
      cfg.data.batch_size,
      boundaries,
      rng=np.random.default_rng([cfg.seed, epoch]),
      max_labels=max_labels,
    )

  history = []
  step, epoch, train_seconds = 0, 0, 0.0
  budget_s = cfg.train.max_minutes * 60.0
  pending: list[dict] = []  # device metrics not yet fetched (fetching blocks, so it is batched)
  loss_window: list[float] = []  # fetched losses since the last log record
  examples_seen = 0
  log = io_utils.JsonlLogger(workdir / "metrics.jsonl", tensorboard_dir=workdir / "tensorboard")
  bar = tqdm(total=cfg.train.steps, desc="train", unit="step", disable=not progress)
  batches = epoch_batches(epoch)
  stop_reason = "steps"
  t_start = time.perf_counter()
  while step < cfg.train.steps:
    try:
      batch = next(batches)
    except StopIteration:
      epoch += 1
      batches = epoch_batches(epoch)
      continue
    # Dispatch is asynchronous: the host pads the next batch while the device runs this step.
    params, opt_state, m = train_step(params, opt_state, batch, jax.random.fold_in(rng, step + 1))
    pending.append(m)
    step += 1
    bar.update(1)
    at_log = step % cfg.train.log_every == 0
    at_eval = step % cfg.train.eval_every == 0
    if at_log or at_eval or step == cfg.train.steps or step % 10 == 0:
      fetched = jax.device_get(pending)  # blocks, so the time below counts finished steps
      pending = []
      train_seconds += time.perf_counter() - t_start
      examples_seen += int(sum(f["num_examples"] for f in fetched))
      loss_window += [float(f["loss"]) for f in fetched]
      if at_log:
        record = {
          "step": step,
          "epoch": epoch,
          "train_loss": float(np.mean(loss_window)),
          "grad_norm": float(fetched[-1]["grad_norm"]),
          "train_minutes": train_seconds / 60.0,
          "examples_per_s": examples_seen / max(train_seconds, 1e-9),
        }
        bar.set_postfix(loss=f"{record['train_loss']:.3f}")
        log.log(**record)
        loss_window = []
      if at_eval:
        dev = evals.evaluate(model, params, "dev")
        record = {
          "step": step,
          "train_minutes": train_seconds / 60.0,
          **{f"dev_{k}": v for k, v in dev.items()},
        }
        history.append(record)
        log.log(**record)
        bar.write(
          f"step {step}: dev WER {dev['wer']:.2%} CER {dev['cer']:.2%} loss {dev['loss']:.3f}",
          file=sys.stderr,
        )
      if train_seconds >= budget_s:
        stop_reason = f"time budget ({cfg.train.max_minutes} min)"
        break
      t_start = time.perf_counter()  # evaluation and logging are not training time
  bar.close()

  final = evals.evaluate_all(model, params)
  train_info = {
    "steps": step,
    "epochs": epoch,
    "train_minutes": train_seconds / 60.0,
    "stop_reason": stop_reason,
    "num_params": num_params,
    "preset": cfg.model.preset,
    "train_utterances": len(train_fs),
    "train_speakers": len(set(train_fs.speaker_ids.tolist())),
    "examples_per_s": examples_seen / max(train_seconds, 1e-9),
  }
  log.log(step=step, **{f"{s}_{k}": v for s, r in final.items() for k, v in r.items()})
  log.close()
  result = {"final": final, "train": train_info, "history": history}
  io_utils.write_json_atomic(workdir / "results.json", result)
  if cfg.train.checkpoint:
    save_params(workdir / "checkpoint", params)
  return result


# --- checkpoints --------------------------------------------------------------------------------


def save_params(path: pathlib.Path, params: Params) -> None:
  """Saves params with orbax (atomic: orbax writes a temporary directory, then renames)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path).absolute()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params, force=True)
  checkpointer.wait_until_finished()


def restore_params(path: pathlib.Path, like: Params) -> Params:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
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


def format_results_table(result: dict) -> str:
  """Markdown table of the final WER/CER per split plus the training summary."""
  t = result["train"]
  lines = [
    f"preset {t['preset']} ({t['num_params']:,} params), {t['steps']} steps in "
    f"{t['train_minutes']:.1f} min ({t['stop_reason']}), {t['train_utterances']} utterances "
    f"from {t['train_speakers']} speakers",
    "",
    "| split | utterances | WER | CER | loss |",
    "|---|---:|---:|---:|---:|",
  ]
  for split, r in result["final"].items():
    lines.append(
      f"| {split} | {r['num_utterances']} | {r['wer']:.2%} | {r['cer']:.2%} | {r['loss']:.3f} |"
    )
  return "\n".join(lines)
