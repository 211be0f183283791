"""`fedprune federated`: a federated training job on a corpus's speakers (one client each).

Glue between the config file, the data (feature cache -> ``SpeakerClientStore``), the model
(``AsrModel.loss`` is the engine's ``loss_fn``), the round driver and WER evaluation.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from fedprune_jax import io_utils
from fedprune_jax.federated import rounds
from fedprune_jax.federated.speakers import SpeakerClientStore
from fedprune_jax.models import conformer
from fedprune_jax.train import centralized


def make_store(cfg: ml_collections.ConfigDict) -> SpeakerClientStore:
  """One client per training speaker, packed to fixed [S, B, T, F] shape buckets."""
  train_fs = centralized.load_split(cfg, cfg.data.train_split)
  return SpeakerClientStore(
    train_fs,
    batch_size=cfg.data.batch_size,
    num_buckets=cfg.data.num_buckets,
    max_steps=cfg.data.get("max_steps"),
    max_frames=cfg.data.get("max_frames"),
  )


def run(cfg: ml_collections.ConfigDict, *, progress: bool = True) -> dict[str, Any]:
  """Runs ``cfg.rounds`` rounds; evaluates dev WER every ``cfg.eval_every`` rounds, dev/test at the end.

  Writes ``workdir/metrics.jsonl`` (a line per round, eval metrics on eval rounds),
  ``workdir/results.json`` and an orbax checkpoint of the final server params.
  """
  workdir = centralized.prepare_workdir(cfg)
  model = centralized.make_model(cfg)
  params = model.init(jax.random.key(cfg.seed))
  store = make_store(cfg)
  evals = centralized.EvalSplits(cfg)

  def eval_fn(server_params, round_index):
    del round_index
    dev = evals.evaluate(model, server_params, "dev")
    return {"dev_wer": dev["wer"], "dev_cer": dev["cer"], "dev_loss": dev["loss"]}

  specaug = cfg.get("specaug")
  loss_fn = centralized.make_training_loss(model, dict(specaug) if specaug else None)
  run_cfg = cfg.to_dict()
  run_cfg["log_path"] = str(workdir / "metrics.jsonl")
  if cfg.eval_every:  # the starting point, so the log shows what the rounds changed
    with io_utils.JsonlLogger(run_cfg["log_path"]) as log:
      log.log(rounds_completed=0, **{f"eval_{k}": v for k, v in eval_fn(params, 0).items()})
  state, history = rounds.run_federated(
    run_cfg, loss_fn, params, store, eval_fn=eval_fn, progress=progress
  )
  final = evals.evaluate_all(model, state.params)
  summary = {
    "rounds": int(state.round),
    "num_clients": store.num_clients,
    "padding_fraction": store.padding_fraction(),
    "num_params": conformer.count_params(state.params),
    "preset": cfg.model.preset,
    "mean_clients_per_s": _mean(history, "clients_per_s"),
    "mean_examples_per_s": _mean(history, "examples_per_s"),
  }
  result = {"final": final, "train": summary, "history": history}
  io_utils.write_json_atomic(workdir / "results.json", result)
  centralized.save_params(workdir / "checkpoint", state.params)
  return result


def _mean(history: list[dict], key: str) -> float:
  values = [h[key] for h in history[1:]] or [
    h[key] for h in history
  ]  # round 0 includes compilation
  return float(sum(values) / max(len(values), 1))
