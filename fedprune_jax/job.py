"""`fedprune federated`: federated training or pruning on a corpus's speakers (one client each).

Glue between the config, the task (``fedprune_jax.task``: data, model, loss, evaluation), the
algorithm (``algorithms.build``) and the run's workdir::

  workdir/config.json        the resolved config (``fedprune eval`` reads it; a rerun with another
                             config is refused: ``workdir.py``)
  workdir/.lock              held by the process running in the workdir
  workdir/metrics.jsonl      one line per round (+ eval metrics on eval rounds)
  workdir/tensorboard/       the same numbers as TensorBoard scalars (``tensorboard=True``)
  workdir/rounds/            orbax round checkpoints (whole server state + metrics); a re-run of
                             the same command resumes from the latest one
  workdir/results.json       final dev/test WER, sparsity, costs, params/mask sha256
  workdir/checkpoint/        the final model (masked params), for ``fedprune eval``
  workdir/mask.npz           the final mask (pruning runs)
  workdir/done.json          the completion marker, written last (``finish``)

The train split's speakers are the server's and the clients' (``speaker_split``); the run
starts from the (cached) centralized warm start on the server's speakers (``warm_start``).
``pruning.mask_path`` trains a given reduced model (e.g. a baseline run's ``mask.npz``) with its
mask frozen.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import jax
import ml_collections

from fedprune_jax import io_utils
from fedprune_jax import programs
from fedprune_jax import pruning
from fedprune_jax import run_inputs
from fedprune_jax import speaker_split
from fedprune_jax import task
from fedprune_jax import warm_start
from fedprune_jax import workdir as workdir_lib
from fedprune_jax.errors import ConfigError
from fedprune_jax.algorithms import build
from fedprune_jax.algorithms import centralized as centralized_lib
from fedprune_jax.algorithms import costs as costs_lib
from fedprune_jax.data import corpus_identity
from fedprune_jax.data import feature_sets
from fedprune_jax.federated import rounds
from fedprune_jax.federated.checkpoints import saved_rounds
from fedprune_jax.models import asr
from fedprune_jax.models import conformer
from fedprune_jax.models import flops as flops_lib
from fedprune_jax.pruning import compaction

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the federated job and its centralized baseline share (``_setup``)."""

  workdir: pathlib.Path
  model: asr.AsrModel
  loss_fn: Callable  # the training loss (``task.make_training_loss``), shared per process
  params: PyTree  # the warm start's params, else the initialization (seeded by ``cfg.seed``)
  train_fs: feature_sets.FeatureSet
  speakers: speaker_split.SpeakerSplit
  warm_path: str | None  # where the warm start is saved (None: none)
  corpus: str | None  # the corpus' identity (``corpus_identity``; None for TFDS)


def _setup(cfg: ml_collections.ConfigDict, progress: bool) -> Setup:
  """The workdir, model, loss, the train split, its server/client speaker split and the
  (cached) warm start of a run."""
  workdir = pathlib.Path(cfg.workdir)
  model = task.make_model(cfg)
  params = model.init(jax.random.key(cfg.seed))
  _check_inputs(cfg, model, params, workdir)
  specaug = dict(cfg.specaug) if cfg.get("specaug") else None
  # one loss function object per (model, SpecAugment), so later runs of this process reuse the
  # programs traced from it (``programs.shared``)
  loss_fn = programs.shared(
    ("training_loss", model, programs.config_key(specaug)),
    lambda: task.make_training_loss(model, specaug),
  )
  with corpus_identity.walk_once():  # the train split is listed once for both hashes
    train_fs = task.load_train_split(cfg)
    corpus = corpus_identity.of_data_config(cfg.data)
  split_seed = cfg.data.get("split_seed")
  speakers = speaker_split.split_speakers(
    train_fs,
    cfg.data.get("server_speakers", 0),
    cfg.seed if split_seed is None else split_seed,
    speaker_split.server_eligible(cfg),
  )
  warm = warm_start.train(
    cfg, model, loss_fn, params, train_fs, speakers.server, workdir, progress, corpus
  )
  return Setup(workdir, model, loss_fn, warm.params, train_fs, speakers, warm.path, corpus)


def _check_inputs(cfg, model, params, workdir: pathlib.Path) -> None:
  """Pattern, mask file and warm-start path checked against the model before data loads."""
  pcfg = build.resolve_pruning(cfg.to_dict().get("pruning"))
  if pcfg is not None:
    policy = build.policy_from_config(pcfg, model.config.d_model // model.config.conv_groups)
    run_inputs.initial_mask(pcfg, run_inputs.prunable_mask(pcfg, policy, params))
  warm_start.path_of(cfg, workdir)


@workdir_lib.claimed
def run(cfg: ml_collections.ConfigDict, *, progress: bool = True) -> dict:
  """Runs (or resumes) ``cfg.rounds`` rounds; evaluates dev WER every ``cfg.eval_every`` rounds
  and dev/test at the end. ``fresh=True`` discards the workdir's run state first
  (``workdir.claimed``: the workdir is locked and must hold a run of this config)."""
  setup = _setup(cfg, progress)
  store = speaker_split.make_store(cfg, setup.train_fs, setup.speakers.clients)
  evals = task.EvalSplits(cfg)
  warm_dev = warm_start.dev_metrics(
    setup.warm_path, lambda: evals.dev_metrics(setup.model, setup.params)
  )

  def eval_fn(model_params, round_index):
    del round_index
    return evals.dev_metrics(setup.model, model_params)

  raw = cfg.to_dict()
  engine = _engine_config(cfg, setup.workdir)
  pcfg = build.resolve_pruning(raw.get("pruning"))
  policy, round_costs, initial_mask, compact_model = None, None, None, None
  if pcfg is not None:
    compact_model = _compact_model(cfg, setup.model, setup.loss_fn, store)
    policy = build.policy_from_config(
      pcfg, setup.model.config.d_model // setup.model.config.conv_groups
    )
    round_costs = _round_costs(setup.model, store, policy)
    initial_mask = run_inputs.initial_mask(
      pcfg, run_inputs.prunable_mask(pcfg, policy, setup.params)
    )
  _start_log(cfg, setup.workdir, engine, eval_fn, setup.params)
  fed_cfg = {**engine, "pruning": pcfg}
  algorithm = build.model_algorithm(fed_cfg, setup.loss_fn, policy, initial_mask, compact_model)
  state, history = build.run_federated(
    fed_cfg,
    setup.loss_fn,
    setup.params,
    store,
    eval_fn=eval_fn,
    progress=progress,
    policy=policy,
    round_costs=round_costs,
    initial_mask=initial_mask,
    compact_model=compact_model,
  )
  train = {
    "num_clients": store.num_clients,
    "server_speakers": len(setup.speakers.server),
    "warm_start": setup.warm_path,
    # the starting point's dev WER: the report's regime gate compares the dense run with it
    "warm_start_dev_wer": warm_dev and warm_dev["dev_wer"],
    "padding_fraction": store.padding_fraction(),
    "mean_clients_per_s": _mean(history, "clients_per_s"),
    "mean_examples_per_s": _mean(history, "examples_per_s"),
  }
  return _finish_run(cfg, setup, evals, algorithm, state, history, train)


@workdir_lib.claimed
def run_baseline(cfg: ml_collections.ConfigDict, *, progress: bool = True) -> dict:
  """The centralized pruning baseline of a federated pruning config (``fedprune baseline``).

  Same warm start, same mask policy object (``build.policy_from_config(cfg.pruning)``), keyed by
  steps: ``baseline.steps_per_round`` centralized steps per round (default: a round's client
  steps, ``cohort_size * data.max_steps``), ``cfg.rounds`` rounds' worth of steps, on the
  server-side speakers (``baseline.data='server'``) or on all clients' data pooled
  (``'pooled'``, the non-private upper bound). It is the registered ``centralized`` algorithm
  run by the round driver (``build.run_federated``), so it logs, evaluates, checkpoints, resumes
  and writes ``results.json`` like the federated job.
  """
  setup = _setup(cfg, progress)
  which = cfg.baseline.data
  if which not in ("server", "pooled"):
    raise ConfigError(f"config field baseline.data={which!r}; expected 'server' or 'pooled'")
  speakers = setup.speakers.server if which == "server" else setup.speakers.clients
  if not speakers:
    raise ConfigError("config field baseline.data='server' needs data.server_speakers > 0")
  pcfg = build.resolve_pruning(cfg.pruning.to_dict())
  policy = build.policy_from_config(
    pcfg, setup.model.config.d_model // setup.model.config.conv_groups
  )
  per_round = cfg.baseline.steps_per_round or cfg.cohort_size * (cfg.data.get("max_steps") or 1)
  data = centralized_lib.ServerBatches(
    speaker_split.examples_of(setup.train_fs, speakers),
    cfg.baseline.batch_size,
    cfg.data.num_buckets,
    cfg.seed,
    per_round,
    label=which,
  )
  engine = _engine_config(cfg, setup.workdir)
  # a driver round is one call of data.steps_per_call steps, data.parts calls a baseline round
  for field in ("rounds", "eval_every", "checkpoint_every"):
    engine[field] *= data.parts
  evals = task.EvalSplits(cfg)

  def eval_fn(model_params, round_index):
    del round_index
    return evals.dev_metrics(setup.model, model_params)

  _start_log(cfg, setup.workdir, engine, eval_fn, setup.params)
  # the optimizer of federated clients, named for program sharing
  server = centralized_lib.ServerInputs(data, key=programs.config_key(engine["client"]))
  fed_cfg = {**engine, "pruning": pcfg}
  state, history = build.run_federated(
    fed_cfg,
    setup.loss_fn,
    setup.params,
    centralized_lib.SERVER_STORE,
    eval_fn=eval_fn,
    progress=progress,
    policy=policy,
    server=server,
  )
  algorithm = build.model_algorithm(fed_cfg, setup.loss_fn, policy, server=server)
  train = {
    "rounds": int(state.round) // data.parts,
    "calls_per_round": data.parts,
    "steps": cfg.rounds * per_round,
    "steps_per_round": per_round,
    "speakers": len(speakers),
    "warm_start": setup.warm_path,
  }
  return _finish_run(cfg, setup, evals, algorithm, state, history, train)


def _engine_config(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """The resolved engine config of a run in ``workdir``: its log, round checkpoints and
  TensorBoard scalars there."""
  engine = rounds.resolve_config(cfg.to_dict())
  engine.update(
    log_path=str(workdir / "metrics.jsonl"),
    checkpoint_dir=str(workdir / "rounds"),
    tensorboard_dir=str(workdir / "tensorboard") if cfg.get("tensorboard", True) else None,
  )
  return engine


def _start_log(cfg, workdir: pathlib.Path, engine: dict, eval_fn, params) -> None:
  """A run's log before its rounds: afresh unless a round checkpoint resumes, with the starting
  point's evaluation (``rounds_completed=0``) when ``eval_every`` is set, so the log shows what
  the rounds changed."""
  log = workdir / "metrics.jsonl"
  if not saved_rounds(workdir / "rounds"):
    log.unlink(missing_ok=True)  # no checkpoint to resume: the log starts afresh
  if cfg.eval_every and not log.exists():
    with io_utils.JsonlLogger(
      log, engine["tensorboard_dir"], step_key="rounds_completed"
    ) as logger:
      start = eval_fn(params, 0)
      logger.log(rounds_completed=0, **{f"eval_{k}": v for k, v in start.items()})


COST_KEYS = (  # the last round's per-client costs, in the summary of a pruning run
  "bytes_down_masked",
  "bytes_down_dense",
  "bytes_up",
  "bytes_down_sent",
  "bytes_up_sent",
  "client_train_memory_bytes",
  "client_flops_per_step",
)


def _finish_run(cfg, setup: Setup, evals, algorithm, state, history, train: dict) -> dict:
  """Every run's summary and saves (``job.run`` and ``job.run_baseline``): final dev/test of
  ``algorithm.model_params(state)``, the summary (``train`` first, then the algorithm's name,
  rounds, sizes, hashes, compilations; with a mask its sparsity, hash and costs, and
  ``mask.npz``), then ``finish``."""
  model_params = algorithm.model_params(state)
  final = evals.evaluate_all(setup.model, model_params)
  mask = getattr(state, "mask", None)  # None: the algorithm has no mask
  summary = {
    "rounds": int(state.round),
    "algorithm": algorithm.name,
    **train,
    "num_params": conformer.count_params(state.params),
    "nonzero_params": int(pruning.param_count(state.params, mask)),
    "preset": cfg.model.preset,
    "params_sha256": io_utils.tree_sha256(state.params),
    **_compile_summary(history),
  }
  if mask is not None:
    summary.update(
      sparsity=float(pruning.sparsity(mask)),
      mask_sha256=io_utils.tree_sha256(mask),
      **costs_lib.totals(history),
    )
    if any("bytes_down_dense" in h for h in history):  # clients' costs (not the server's)
      summary.update({f"last_{k}": history[-1].get(k) for k in COST_KEYS})
    pruning.save_mask(setup.workdir / "mask.npz", mask)
  # the corpus it read: the suite refuses this result if the corpus at its path changes
  result = {"final": final, "train": summary, "history": history, "corpus": setup.corpus}
  return finish(setup.workdir, result, model_params)


def environment() -> dict[str, Any]:
  """Where a run ran: JAX's platform (``cpu``, ``gpu``, ``tpu``), the first device's kind, the
  device count and the JAX version. Float rounding differs between platforms, so a table whose
  runs ran on two platforms is marked so by the report."""
  devices = jax.devices()
  return {
    "platform": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "jax": jax.__version__,
  }


def finish(workdir: pathlib.Path, result: dict, model_params) -> dict:
  """The run's last writes, in this order: the final checkpoint, ``results.json``, then the
  completion marker (``workdir.mark_done``), so a run killed (or out of disk) between any two is
  not taken for a finished one."""
  task.save_params(workdir / "checkpoint", model_params)
  io_utils.write_json_atomic(workdir / "results.json", {**result, "environment": environment()})
  workdir_lib.mark_done(workdir)
  return result


def format_comparison(results: dict[str, dict]) -> str:
  """Markdown table of runs (e.g. {'dense': ..., 'pruned': ...}): WER, sparsity, client bytes."""
  lines = [
    "| run | dev WER | test WER | dev CER | sparsity | nonzero params | bytes down / client / round"
    " | bytes up / client / round | rounds |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, r in results.items():
    t, f = r["train"], r["final"]
    dense_bytes = 4.0 * t["num_params"]
    down = t.get("last_bytes_down_sent") or dense_bytes  # what the last round actually sent
    up = t.get("last_bytes_up_sent") or dense_bytes
    lines.append(
      f"| {name} | {f['dev']['wer']:.2%} | {f['test']['wer']:.2%} | {f['dev']['cer']:.2%} | "
      f"{t.get('sparsity', 0.0):.1%} | {t['nonzero_params']:,} | {down / 1e6:.2f} MB | "
      f"{up / 1e6:.2f} MB | {t.get('rounds', '')} |"
    )
  return "\n".join(lines)


def _round_costs(model, store, policy):
  """Cost accounting on the largest client batch [B, T] of the store."""
  batch_size, frames = _largest_batch(store)
  dense = flops_lib.conformer_flops(model.config, batch_size, frames)
  return costs_lib.make_round_costs(policy, dense)


def _compact_model(cfg, model, loss_fn, store) -> build.CompactModel:
  """The job's model as federated pruning's compactable model: ``loss_for(sizes)`` is the training
  loss of the model with those unit counts (the dense sizes: ``loss_fn`` itself); ``step_flops``
  the analytic FLOPs of one local step on the largest client batch [B, T] (3x the forward of the
  encoder of those sizes and the output projection)."""
  specaug = dict(cfg.specaug) if cfg.get("specaug") else None
  dense = compaction.BlockSizes.dense(model.config)
  key = programs.config_key(specaug)
  b, t = _largest_batch(store)
  t_out = -(-(-(-t // 2)) // 2)
  head = 2 * t_out * model.config.d_model * model.head.vocab_size

  def step_flops(sizes: compaction.BlockSizes | None) -> float:
    return 3.0 * b * (compaction.flops(model.config, t, sizes or dense) + head)

  def make_loss(small) -> Any:
    return programs.shared(
      ("training_loss", small, key), lambda: task.make_training_loss(small, specaug)
    )

  return programs.shared(  # one object per (model, batch shape): runs may share its programs
    ("compact_model", loss_fn, b, t),
    lambda: build.compact_model_for(model, loss_fn, make_loss, step_flops),
  )


def _largest_batch(store) -> tuple[int, int]:
  """(B, T) of the store's largest client batch."""
  segments = [seg for b in store.buckets for seg in (b if isinstance(b, tuple) else (b,))]
  biggest = max(segments, key=lambda b: b.shapes["features"][0])
  return biggest.batch_size, biggest.shapes["features"][0]


def _compile_summary(history: list[dict]) -> dict:
  """Compilations and compile seconds of the rounds this process ran, client programs, paths."""
  paths = [h.get("client_path") for h in history if h.get("client_path")]
  return {
    **rounds.compile_totals(history),
    "client_programs": int(max([h.get("client_programs", 0) for h in history] or [0])),
    "client_paths": {p: paths.count(p) for p in sorted(set(paths))},
  }


def _mean(history: list[dict], key: str) -> float:
  values = [h[key] for h in history[1:]] or [h[key] for h in history]  # round 0 compiles
  return float(sum(values) / max(len(values), 1))
