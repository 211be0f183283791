"""The files and values a federated run reads besides its data, checked against the model
before any data is loaded or anything is trained: the pruning pattern against the prunable
params' shapes, ``pruning.mask_path`` against the model, ``warm_start.path`` for existence.

Each problem is one ``ConfigError``/``InputError`` naming the field or file (one CLI line).

A warm start is trained only where the config says so: at the default ``WORKDIR/warm_start``
(``warm_start.path`` empty) or, with ``warm_start.train_if_missing=True``, at a given path that
does not exist yet (the demo and the experiment suite share warm starts this way). A given path
that does not exist is an error otherwise (a mistyped path never trains a new warm start). A
trained warm start records what it was trained from (``warm_start_inputs``) in ``PATH.json``; a
run that reuses it with other inputs is refused, naming the differing fields.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections

from fedprune_jax import io_utils
from fedprune_jax import pruning
from fedprune_jax import workdir as workdir_lib
from fedprune_jax.errors import ConfigError
from fedprune_jax.pruning import patterns

PyTree = Any


def prunable_mask(pcfg: dict, policy, params: PyTree) -> PyTree:
  """The model's all-kept mask (None = never pruned), with ``pruning.pattern`` checked against
  every prunable param's shape: ConfigError if it cannot tile one (N:M whose ``m`` does not
  divide the grouped dimension)."""
  try:
    mask_like = policy.init_mask(params)
    if str(pcfg["pattern"]).strip().lower() != "units":
      pattern = patterns.parse_pattern(pcfg["pattern"])
      for path, leaf in pruning.flatten_with_paths(mask_like):
        if leaf is not None:
          patterns.check_fits(pattern, leaf.shape, path)
  except ValueError as e:
    raise ConfigError(f"config field pruning.pattern={pcfg['pattern']!r}: {e}") from e
  return mask_like


def initial_mask(pcfg: dict, mask_like: PyTree) -> PyTree | None:
  """The checked mask of ``pruning.mask_path`` (None if unset); see ``load_mask_checked``."""
  if not pcfg.get("mask_path"):
    return None
  return pruning.load_mask_checked(pcfg["mask_path"], mask_like)


def warm_start_path(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path | None:
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


def warm_start_inputs(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a warm start's params depend on: corpus, speaker split, model, loss, its own fields
  (path and logging left out) and its effective seed."""
  d = workdir_lib.as_json(cfg)
  ignored = ("path", "eval_every", "train_if_missing")
  ws = {k: v for k, v in d.get("warm_start", {}).items() if k not in ignored}
  ws["seed"] = d["seed"] if ws.get("seed") is None else ws["seed"]
  data_fields = ("root", "source", "train_split", "server_speakers", "split_seed", "num_buckets")
  data = {k: d["data"].get(k) for k in data_fields}
  return {"warm_start": ws, "data": data, "model": d["model"], "specaug": d.get("specaug")}


def check_warm_start_record(path: pathlib.Path, cfg: ml_collections.ConfigDict) -> None:
  """ConfigError if the warm start at ``path`` was trained from other inputs than this run's
  (a record without inputs, written before they were recorded, is accepted)."""
  record_path = path.with_name(path.name + ".json")
  try:
    recorded = json.loads(record_path.read_text(encoding="utf-8")).get("inputs")
  except (OSError, ValueError, AttributeError):
    return
  if recorded is None:
    return
  current = warm_start_inputs(cfg)
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
