"""Centralized training of a Conformer ASR model: optax Adam(W) + warmup/cosine, clipping,
SpecAugment, length-bucketed batches, periodic dev evaluation, final dev/test WER.

The step is the project's one training step (``algorithms.centralized.train_step``, here without a
mask: dense training; the centralized pruning baseline and the warm start run the same step with
the federated mask rule), the batches its one stream of length-bucketed epochs
(``algorithms.centralized.batch_stream``). Data, model, loss and evaluation come from
``fedprune_jax.task``.
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
from fedprune_jax import task
from fedprune_jax import workdir as workdir_lib
from fedprune_jax.algorithms import centralized as centralized_lib
from fedprune_jax.data import batching
from fedprune_jax.models import asr
from fedprune_jax.models import conformer

Params = Any


def make_train_step(
  model: asr.AsrModel, optimizer: optax.GradientTransformation, specaug: dict | None
) -> Callable:
  """Returns a jitted ``step(params, opt_state, batch, rng) -> (params, opt_state, metrics)``
  (dense: ``centralized.train_step`` without a mask; params and opt_state are donated)."""
  loss_fn = task.make_training_loss(model, specaug)

  def step(params, opt_state, batch, rng):
    params, opt_state, loss, aux, grads = centralized_lib.train_step(
      loss_fn, optimizer, params, opt_state, batch, rng
    )
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return params, opt_state, {**metrics, "num_examples": aux["num_examples"]}

  return jax.jit(step, donate_argnums=(0, 1))


# --- the loop -----------------------------------------------------------------------------------


@workdir_lib.claimed
def train_and_evaluate(cfg: ml_collections.ConfigDict, *, progress: bool = True) -> dict:
  """Trains ``cfg.model`` on ``cfg.data.train_split``; evaluates dev during and dev/test after.

  Writes ``workdir/metrics.jsonl`` (one record per log/eval step), ``workdir/results.json`` and
  an orbax checkpoint of the final params in ``workdir/checkpoint``.

  Returns:
    {'final': {split: {'wer', 'cer', 'loss', 'num_utterances'}, ...}, 'train': {...}}.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(cfg.workdir)
  (workdir / "metrics.jsonl").unlink(missing_ok=True)  # every run trains from step 0

  train_fs = task.load_train_split(cfg)
  evals = task.EvalSplits(cfg)

  model = task.make_model(cfg)
  rng = jax.random.key(cfg.seed)
  params = model.init(jax.random.fold_in(rng, 0))
  num_params = conformer.count_params(params)
  optimizer = task.make_optimizer(cfg.optim, cfg.train.steps)
  opt_state = optimizer.init(params)
  specaug = dict(cfg.specaug) if cfg.train.spec_augment else None
  train_step = make_train_step(model, optimizer, specaug)

  batches = centralized_lib.batch_stream(
    train_fs.examples(),
    cfg.data.batch_size,
    batching.bucket_boundaries(train_fs.num_frames, cfg.data.num_buckets),
    cfg.seed,
    max_labels=batching.round_up(int(train_fs.num_labels.max()), 16),
    ids=[str(u) for u in train_fs.utt_ids],
  )
  history = []
  step, epoch, train_seconds = 0, 0, 0.0
  budget_s = cfg.train.max_minutes * 60.0
  pending: list[dict] = []  # device metrics not yet fetched (fetching blocks, so it is batched)
  loss_window: list[float] = []  # fetched losses since the last log record
  examples_seen = 0
  tensorboard = workdir / "tensorboard" if cfg.get("tensorboard", True) else None
  log = io_utils.JsonlLogger(workdir / "metrics.jsonl", tensorboard_dir=tensorboard)
  bar = tqdm(total=cfg.train.steps, desc="train", unit="step", disable=not progress)
  stop_reason = "steps"
  t_start = time.perf_counter()
  while step < cfg.train.steps:
    epoch, batch = next(batches)
    # Dispatch is asynchronous: the host pads the next batch while the device runs this step.
    params, opt_state, m = train_step(params, opt_state, batch, jax.random.fold_in(rng, step + 1))
    pending.append(m)
    step += 1
    bar.update(1)
    at_log = step % cfg.train.log_every == 0
    at_eval = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0  # 0 = never
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
  if cfg.train.checkpoint:
    task.save_params(workdir / "checkpoint", params)
  io_utils.write_json_atomic(workdir / "results.json", result)
  workdir_lib.mark_done(workdir)
  return result


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
