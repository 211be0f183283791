"""An experiment expanded into its runs: one resolved config and content key per run.

``expand`` turns an experiment (``fedprune_jax.experiments_def``) into ``RunSpec``s, one per
(arm, split, seed), in the index's order; a run's key hashes its resolved config (paths written
relative to RUNS, the workdir left out), so a run shared by several tables is computed once and a
changed config is a new run. ``materialize`` makes a spec's config runnable under a runs
directory; ``check_experiment`` validates every run's config before any starts. The scheduler
(``suite.run_experiment``) runs the specs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import pathlib
from typing import Any, Mapping, Sequence

import ml_collections

from fedprune_jax import config as config_lib
from fedprune_jax import workdir as workdir_lib
from fedprune_jax.errors import ConfigError, InputError
from fedprune_jax.experiments_def import QUICK, Arm, Experiment, From

# --- one run's config and key ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One (arm, split, seed) of an experiment, resolved."""

  experiment: str
  arm: Arm
  seed: int
  config: ml_collections.ConfigDict  # paths relative to RUNS (the key is computed from it)
  key: str
  split: int = 0

  @property
  def dirname(self) -> str:
    return f"runs/{self.key}"


def _set(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = cfg
  for p in parents:
    if p not in node:
      raise ConfigError(f"experiment override {dotted!r}: the config has no section {p!r}")
    node = node[p]
  if isinstance(node, ml_collections.ConfigDict):
    with node.unlocked():
      node[leaf] = value
  else:
    raise ConfigError(f"experiment override {dotted!r}: {'.'.join(parents)} is not a section")


# Fields added after runs were cached, left out of the key while they hold these values (or
# always, for ``warm_start.train_if_missing``: where a warm start comes from, not what it is), so
# finished runs keep their keys.
_KEY_OMITTED = {**workdir_lib.ADDED_DEFAULTS, "warm_start.train_if_missing": None}


def _key_config(config: Mapping[str, Any]) -> dict:
  config = copy.deepcopy(dict(config))
  for dotted, default in _KEY_OMITTED.items():
    section, leaf = dotted.split(".")
    node = config.get(section)
    if isinstance(node, dict) and leaf in node and (default is None or node[leaf] == default):
      del node[leaf]
  return config


def _key_of(config: Mapping[str, Any], kind: str) -> str:
  config = _key_config(config)
  blob = json.dumps({"kind": kind, "config": config}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warm_start_key(cfg: ml_collections.ConfigDict) -> str:
  """What the shared warm start depends on: corpus, split, model, loss and its own fields."""
  d = cfg.to_dict()
  ignored = ("path", "eval_every", "train_if_missing")
  ws = {k: v for k, v in d.get("warm_start", {}).items() if k not in ignored}
  data = {k: d["data"].get(k) for k in ("root", "source", "train_split", "server_speakers")}
  if d["data"].get("server_accents"):  # absent or empty: the key of the earlier warm starts
    data["server_accents"] = list(d["data"]["server_accents"])
  data["split_seed"] = d["data"].get("split_seed")
  data["num_buckets"] = d["data"].get("num_buckets")
  return _key_of({"ws": ws, "data": data, "model": d["model"], "specaug": d.get("specaug")}, "ws")


def expand(
  experiment: Experiment,
  *,
  quick: bool = False,
  seeds: Sequence[int] | None = None,
  splits: Sequence[int] | None = None,
  data_root: str | None = None,
  overrides: Sequence[str] = (),
) -> list[RunSpec]:
  """The experiment's runs (seed-major, then split, arms in order): the index's order.

  ``suite.run_experiment`` starts them comparison by comparison (``Experiment.start_ranks``).

  A seed outside ``experiment.seeds`` runs the claim arms only (``Experiment.runs_seed``). A
  run's config: the setting's, then ``--quick``'s ``QUICK`` fields, then the split replicate
  (``data.split_seed`` and ``warm_start.seed``), then the user's ``overrides`` (``key=value``),
  then the seed, then the arm's overrides. Default seeds and splits: all (``--quick``: the first).
  """
  if seeds is None:
    seeds = experiment.seeds[:1] if quick else experiment.all_seeds
  if splits is None:
    splits = experiment.splits[: 1 if quick else None]
  specs: list[RunSpec] = []
  for seed in seeds:
    for split in splits:
      keys: dict[str, str] = {}
      for arm in experiment.arms:
        if not experiment.runs_seed(arm, seed):
          continue
        cfg = _run_config(experiment, arm, seed, split, keys, quick, data_root, overrides)
        key = _key_of(cfg.to_dict(), arm.kind)
        keys[arm.name] = key
        specs.append(RunSpec(experiment.name, arm, seed, cfg, key, split))
  return specs


def _run_config(experiment, arm, seed, split, keys, quick, data_root, overrides):
  """One run's config (``expand``); ``keys``: the run keys of the replicate's earlier arms."""
  cfg = experiment.base.copy_and_resolve_references()
  if data_root:
    cfg.data.root = str(pathlib.Path(data_root).absolute())
  if quick:
    for k, v in {**QUICK, **experiment.quick}.items():
      _set(cfg, k, copy.deepcopy(v))  # never a shared ConfigDict that --set would mutate
  if "split_seed" in cfg.data:
    cfg.data.split_seed = split
  if cfg.get("warm_start") and "seed" in cfg.warm_start:
    cfg.warm_start.seed = split
  config_lib.apply_overrides(cfg, overrides, source="--set")
  cfg.seed = seed
  derived = {}
  for k, v in arm.overrides.items():
    if isinstance(v, From):
      _set(cfg, k, f"runs/{keys[v.arm]}/{v.file}")
    elif callable(v):
      derived[k] = v
    else:
      _set(cfg, k, v)
  for k, fn in derived.items():  # functions of the arm's other fields
    _set(cfg, k, fn(cfg))
  if cfg.get("warm_start") and cfg.warm_start.steps and not cfg.warm_start.get("path"):
    cfg.warm_start.path = f"warm_start/{warm_start_key(cfg)}"
    cfg.warm_start.train_if_missing = True  # the first run that needs it trains it
  cfg.workdir = ""
  return cfg


def materialize(spec: RunSpec, runs_dir: pathlib.Path) -> ml_collections.ConfigDict:
  """The spec's config with RUNS-relative paths made absolute and the workdir set; validated."""
  from fedprune_jax import validation  # pylint: disable=g-import-not-at-top

  cfg = spec.config.copy_and_resolve_references()
  cfg.workdir = str(runs_dir / spec.dirname)
  if cfg.get("warm_start") and cfg.warm_start.get("path"):
    cfg.warm_start.path = _under(runs_dir, cfg.warm_start.path)
  if cfg.get("pruning") and cfg.pruning.get("mask_path"):
    cfg.pruning.mask_path = _under(runs_dir, cfg.pruning.mask_path)
  validation.validate(cfg)
  return cfg


def check_experiment(
  experiment: Experiment,
  runs_dir: str | pathlib.Path,
  *,
  quick: bool = False,
  seeds: Sequence[int] | None = None,
  data_root: str | None = None,
  overrides: Sequence[str] = (),
  check_data: bool = True,
) -> None:
  """Every run's config validated (and with ``check_data`` the corpus's train split found)
  before any run starts, so a bad ``--set``, seed or data root is one error, not a failed run
  each."""
  runs_dir = pathlib.Path(runs_dir).absolute()
  specs = expand(experiment, quick=quick, seeds=seeds, data_root=data_root, overrides=overrides)
  for spec in specs:
    cfg = materialize(spec, runs_dir)
  if check_data and specs and cfg.data.get("source", "librispeech_dir") == "librispeech_dir":
    root = pathlib.Path(cfg.data.root)
    for split in cfg.data.train_split.split("+"):
      if not (root / split).is_dir():
        raise ConfigError(
          f"data.root={str(root)!r} has no split directory {split!r} (the {experiment.name} "
          "runs read it; pass the corpus root with --data)"
        )


def _under(runs_dir: pathlib.Path, path: str) -> str:
  p = pathlib.Path(path)
  return str(p if p.is_absolute() else runs_dir / p)


def warm_start_path(spec: RunSpec, runs_dir: pathlib.Path) -> str | None:
  """The absolute path of the warm start a run starts from (None: it has none)."""
  path = spec.config.get("warm_start", {}).get("path")
  return _under(runs_dir, path) if path else None


def check_needs(spec: RunSpec, runs_dir: pathlib.Path) -> None:
  """InputError naming the run if a file it starts from (``From``) is missing: a finished
  dependency's artefact is never silently replaced (e.g. by training a new warm start)."""
  for field, value in spec.arm.overrides.items():
    if isinstance(value, From):
      path = runs_dir / _get(spec.config, field)
      if not path.exists():
        raise InputError(
          f"run {spec.dirname} ({spec.experiment} arm {spec.arm.name!r} seed {spec.seed}) needs "
          f"{path} ({field}) of arm {value.arm!r}, which is missing; remove that run's directory "
          "to redo it"
        )


def check_corpora(finished: Sequence[RunSpec], runs_dir: pathlib.Path) -> None:
  """InputError naming the runs, if finished runs were computed on another corpus than the one
  now at their ``data.root`` (a corpus rebuilt there with other contents): their results would
  stand in for runs on this corpus. Runs that recorded no corpus identity (TFDS, or finished
  before runs recorded it) are taken as they are."""
  from fedprune_jax.data import corpus_identity  # pylint: disable=g-import-not-at-top

  now: dict[tuple, str | None] = {}  # identity per corpus and splits
  stale = []
  for spec in {s.dirname: s for s in finished}.values():  # a shared run once
    try:
      results = json.loads((runs_dir / spec.dirname / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
      continue  # not finished after all: ``workdir.incomplete`` decides that, not this check
    recorded = results.get("corpus") if isinstance(results, dict) else None
    if recorded is None:
      continue
    data = spec.config.data.to_dict()  # ``materialize`` leaves data.root as it is
    which = tuple(data.get(k) for k in ("source", "root", "train_split", "dev_split", "test_split"))
    if which not in now:
      now[which] = corpus_identity.of_data_config(data)
    if now[which] != recorded:
      stale.append(f"{spec.dirname} (data.root={data['root']})")
  if stale:
    raise InputError(
      f"{len(stale)} finished run(s) in {runs_dir} were computed on another corpus than the one "
      f"now at their data.root (rebuilt with other contents?): {', '.join(stale[:5])}"
      f"{' ...' if len(stale) > 5 else ''}; give the corpus they ran on (--data) or another "
      "--runs directory"
    )


def _get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node
