"""The centralized warm start a federated run starts from: trained, cached, checked, evaluated.

``warm_start.steps`` centralized steps on the server-side speakers, trained through the round
driver as the dense ``centralized`` algorithm. A warm start is trained only where the config says
so: at the default ``WORKDIR/warm_start`` (``warm_start.path`` empty) or, with
``warm_start.train_if_missing=True``, at a given path that does not exist yet (the demo and the
experiment suite share warm starts this way). A given path that does not exist is an error
otherwise (a mistyped path never trains a new warm start). A trained warm start records what it
was trained from (``inputs_of``), its loss history and its compile time in ``PATH.json``; a run
that reuses it with other inputs is refused, naming the differing fields.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, NamedTuple

import jax
import ml_collections

from fedprune_jax import io_utils
from fedprune_jax import speaker_split
from fedprune_jax import task
from fedprune_jax import workdir as workdir_lib
from fedprune_jax.algorithms import build
from fedprune_jax.algorithms import centralized as centralized_lib
from fedprune_jax.errors import ConfigError
from fedprune_jax.federated import rounds

PyTree = Any


class WarmStart(NamedTuple):
  """The params a run starts from and where they were saved (None: no warm start, ``params``
  are the initialization)."""

  params: PyTree
  path: str | None


WARM_START_ROUND = 25  # warm-start steps a record of its history (without warm_start.eval_every)


def train(
  cfg, model, loss_fn, params, train_fs, server_speakers, workdir, progress, corpus=None
) -> WarmStart:
  """Params after ``warm_start.steps`` centralized steps on the server-side speakers (dense
  ``centralized`` training through the round driver: a round of ``warm_start.eval_every`` steps,
  else of ``WARM_START_ROUND``; one history record per call of the round, dev metrics every
  ``eval_every`` steps and at the end).

  Cached in ``warm_start.path`` (default ``workdir/warm_start``), so runs that share a warm
  start (dense reference and pruned runs) train it once; ``warm_start.seed`` (default: the run's
  seed) seeds its initialization and batches, so runs of several seeds can share one. Its loss
  history (and dev WER every ``warm_start.eval_every`` steps, if set) goes to ``PATH.json``,
  with ``corpus``, the identity of the corpus it trained on (``corpus_identity``), which a run
  that finds it cached checks.
  """
  ws = cfg.get("warm_start")
  if not ws or not ws.steps:
    return WarmStart(params, None)
  if not server_speakers:
    raise ConfigError("config field warm_start.steps > 0 needs data.server_speakers > 0")
  path = path_of(cfg, workdir)
  if path.exists():
    check_record(path, cfg, corpus)
    try:
      return WarmStart(task.restore_params(path, params), str(path))
    except Exception as e:  # pylint: disable=broad-except  (any orbax failure: not this model's)
      raise restore_error(path, e) from e
  seed = cfg.seed if ws.get("seed") is None else ws.seed
  if seed != cfg.seed:  # a warm start shared by runs of several seeds starts from its own
    params = model.init(jax.random.key(seed))
  eval_every = ws.get("eval_every", 0)
  eval_fn = None
  if eval_every:
    evals = task.EvalSplits(cfg)
    eval_fn = lambda p, r: evals.dev_metrics(model, p)  # noqa: E731
  data = centralized_lib.ServerBatches(
    speaker_split.examples_of(train_fs, server_speakers),
    ws.batch_size,
    cfg.data.num_buckets,
    seed,
    steps_per_round=eval_every or min(ws.steps, WARM_START_ROUND),
    total_steps=ws.steps,
    label="warm_start",
  )
  state, rounds_run = build.run_federated(
    {
      "seed": seed,
      "rounds": -(-ws.steps // data.steps_per_call),
      "eval_every": data.parts if eval_every else 0,  # every eval_every steps
    },
    loss_fn,
    params,
    centralized_lib.SERVER_STORE,
    eval_fn=eval_fn,
    progress=progress,
    server=centralized_lib.ServerInputs(data, task.make_optimizer(ws.optim, ws.steps)),
  )
  params = state.params
  history = [
    {
      "step": h["round"] * data.steps_per_call + data.steps_in(h["round"]),
      "loss": h["train_loss"],
      **{k[len("eval_") :]: v for k, v in h.items() if k.startswith("eval_")},
    }
    for h in rounds_run
  ]
  if eval_fn is not None and history and "dev_wer" not in history[-1]:  # and at the end
    history[-1].update(eval_fn(params, len(history)))
  task.save_params(path, params)
  io_utils.write_json_atomic(
    path.with_name(path.name + ".json"),
    {
      "history": history,
      "inputs": inputs_of(cfg),
      "corpus": corpus,
      # what compiling its programs cost (of this process's run: 0 where the cache had them)
      **rounds.compile_totals(rounds_run),
    },
  )
  return WarmStart(params, str(path))


def dev_metrics(warm_path: str | None, evaluate_dev) -> dict | None:
  """The warm start's ``{dev_wer, ...}``: the last evaluated record of its ``PATH.json``
  history, else ``evaluate_dev()`` (then recorded in ``PATH.json`` as ``dev``, so runs sharing
  the warm start evaluate it once). None without a warm start."""
  if not warm_path:
    return None
  record = pathlib.Path(warm_path)
  record = record.with_name(record.name + ".json")
  try:
    data = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
  except (OSError, ValueError):
    data = None
  if isinstance(data, dict):
    if isinstance(data.get("dev"), dict):
      return data["dev"]
    evaluated = [h for h in data.get("history", []) if "dev_wer" in h]
    if evaluated and evaluated[-1].get("step") == max(h.get("step", 0) for h in data["history"]):
      return {k: v for k, v in evaluated[-1].items() if k.startswith("dev_")}
  dev = evaluate_dev()
  if isinstance(data, dict):  # a trained warm start's record (not another run's checkpoint)
    io_utils.write_json_atomic(record, {**data, "dev": dev})
  return dev


def path_of(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path | None:
  """Where the run's warm start is (or is to be trained); None without a warm start.

  Raises ConfigError for a given ``warm_start.path`` that does not exist (unless
  ``warm_start.train_if_missing``), and InputError if it cannot be written where it must be
  trained, before anything is trained.
  """
  ws = cfg.get("warm_start")
  if not ws or not ws.steps:
    return None
  given = ws.get("path") or ""
  path = pathlib.Path(given or workdir / "warm_start").absolute()
  if path.exists():
    return path
  if given and not ws.get("train_if_missing", False):
    raise ConfigError(
      f"config field warm_start.path={given!r} does not exist (leave it empty to train a warm "
      "start in the workdir, or set warm_start.train_if_missing=True to train one there)"
    )
  io_utils.ensure_writable_dir(path.parent, "warm_start.path's directory")
  return path


def inputs_of(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a warm start's params depend on: corpus, speaker split, model, loss, its own fields
  (path and logging left out) and its effective seed."""
  d = workdir_lib.as_json(cfg)
  ignored = ("path", "eval_every", "train_if_missing")
  ws = {k: v for k, v in d.get("warm_start", {}).items() if k not in ignored}
  ws["seed"] = d["seed"] if ws.get("seed") is None else ws["seed"]
  data_fields = ("root", "source", "train_split", "server_speakers", "split_seed", "num_buckets")
  data = {k: d["data"].get(k) for k in data_fields}
  return {"warm_start": ws, "data": data, "model": d["model"], "specaug": d.get("specaug")}


def check_record(
  path: pathlib.Path, cfg: ml_collections.ConfigDict, corpus: str | None = None
) -> None:
  """ConfigError if the warm start at ``path`` was trained from other inputs than this run's,
  or on another corpus than ``corpus`` (the identity of the one at its path now). A record
  without inputs or corpus, written before they were recorded, is accepted."""
  record_path = path.with_name(path.name + ".json")
  try:
    record = json.loads(record_path.read_text(encoding="utf-8"))
    recorded = record.get("inputs")
  except (OSError, ValueError, AttributeError):
    return
  if corpus is not None and record.get("corpus") not in (None, corpus):
    raise ConfigError(
      f"warm start {str(path)!r} was trained on another corpus than the one now at "
      f"data.root={cfg.data.root!r} (identity {record['corpus'][:12]}, now {corpus[:12]}: "
      "rebuilt with other contents?); remove it or set warm_start.path elsewhere"
    )
  if recorded is None:
    return
  current = inputs_of(cfg)
  fields = workdir_lib.differences(recorded, current, ignored=())
  if fields:
    raise ConfigError(
      f"warm start {str(path)!r} was trained with other settings: "
      f"{workdir_lib.describe_differences(recorded, current, fields)}; remove it or set "
      "warm_start.path elsewhere"
    )


def restore_error(path: pathlib.Path, exc: Exception) -> ConfigError:
  """The one line for a warm start that does not restore as this model's params."""
  reason = " ".join(str(exc).split())
  if len(reason) > 200:
    reason = reason[:197] + "..."
  return ConfigError(
    f"config field warm_start.path={str(path)!r}: not a checkpoint of this model's params "
    f"({type(exc).__name__}: {reason})"
  )
