"""From a config to a running federated algorithm (the edge: config values are read here once).

``run_federated(config, loss_fn, params, store)`` resolves the engine config
(``federated.rounds.DEFAULTS``) and the optional ``pruning`` section (``PRUNING_DEFAULTS``; absent
or None = dense FedAvg/FedAdam/FedYogi), builds the algorithm, restores the latest round
checkpoint if there is one, and runs the remaining rounds.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Callable, Mapping

import jax
from absl import logging as absl_logging

from fedprune_jax import fields, io_utils
from fedprune_jax import programs
from fedprune_jax.algorithms import mask_policy
from fedprune_jax.errors import ConfigError
from fedprune_jax.algorithms.fedavg import fedavg
from fedprune_jax.algorithms.fedprune import federated_pruning
from fedprune_jax.federated import faults, rounds
from fedprune_jax.federated.algorithm import FederatedAlgorithm
from fedprune_jax.federated.checkpoints import RoundCheckpointer
from fedprune_jax.federated.client import LossFn, make_client_update
from fedprune_jax.federated.client_data import ClientStore
from fedprune_jax.federated.sampling import CohortSampler
from fedprune_jax.federated.server import ServerState, make_server_optimizer

PyTree = Any

# fields of the ``pruning`` section and their defaults (one table: ``fedprune_jax.fields``)
PRUNING_DEFAULTS = fields.defaults("pruning")


def resolve_pruning(section: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """``PRUNING_DEFAULTS`` updated by ``section``; unknown fields are an error naming them."""
  if section is None:
    return None
  if hasattr(section, "to_dict"):
    section = section.to_dict()
  unknown = sorted(set(section) - set(PRUNING_DEFAULTS))
  if unknown:
    raise ValueError(
      f"unknown config field pruning.{unknown[0]}; known: {', '.join(sorted(PRUNING_DEFAULTS))}"
    )
  out = {**PRUNING_DEFAULTS, **dict(section)}
  for field in ("include", "exclude"):
    value = out[field]
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
      raise ConfigError(f"config field pruning.{field}={value!r} must be a list of path regexes")
    for pattern in value:
      try:
        re.compile(pattern[5:] if pattern.startswith("glob:") else pattern)
      except re.error as e:
        raise ConfigError(f"config field pruning.{field}: {pattern!r} is not a regex ({e})") from e
  return out


def policy_from_config(
  pcfg: Mapping[str, Any], channels_per_group: int | None = None
) -> mask_policy.MaskPolicy:
  """The mask policy of a resolved ``pruning`` section (step = round)."""
  schedule = mask_policy.make_schedule(
    pcfg["schedule"],
    pcfg["target_sparsity"],
    pcfg["pruning_rounds"],
    initial=pcfg["initial_sparsity"],
    begin=pcfg["begin_round"],
    every=pcfg["update_every"],
    step_delta=pcfg["step_delta"],
    hold_initial=pcfg["step_hold_initial"],
  )
  return mask_policy.MaskPolicy(
    schedule=schedule,
    pruning_steps=pcfg["pruning_rounds"],
    refining_steps=pcfg["refining_rounds"],
    refine_every=pcfg["refine_every"],
    pattern=pcfg["pattern"],
    allocation=pcfg["allocation"],
    score=pcfg["score"],
    refinement=pcfg["refinement"],
    client_aggregation=pcfg["client_aggregation"],
    trim_fraction=pcfg["trim_fraction"],
    channels_per_group=channels_per_group,
    include=tuple(pcfg["include"]),
    exclude=tuple(pcfg["exclude"]),
    frozen=bool(pcfg.get("mask_path")),
  )


def build_algorithm(
  cfg: Mapping[str, Any],
  loss_fn: LossFn,
  policy: mask_policy.MaskPolicy | None = None,
  round_costs: Callable[[ServerState], dict] | None = None,
  initial_mask: PyTree | None = None,
) -> FederatedAlgorithm:
  """FedAvg-family (``policy`` None) or federated pruning from a resolved engine config."""
  c, s = cfg["client"], cfg["server"]
  local = make_client_update(
    loss_fn,
    rounds.make_client_optimizer(c),
    num_epochs=c["num_epochs"],
    shuffle=c["shuffle"],
    grad_stats=policy is not None and policy.uses_client_scores,
  )
  local = faults.with_faults(local, faults.FaultConfig(**cfg["faults"]))
  server_opt = make_server_optimizer(
    s["optimizer"], s["learning_rate"], b1=s["b1"], b2=s["b2"], eps=s["eps"], momentum=s["momentum"]
  )
  if policy is None:
    return fedavg(local, server_opt)
  return federated_pruning(
    local, server_opt, policy, cfg["cohort_size"], round_costs, initial_mask=initial_mask
  )


def _programs(
  cfg: Mapping[str, Any],
  loss_fn: LossFn,
  policy: mask_policy.MaskPolicy | None,
  initial_mask: PyTree | None,
):
  """(algorithm, executor), shared with earlier runs of this process built from equal inputs.

  ``loss_fn`` is keyed by identity (``job`` reuses one per model and SpecAugment config), the
  policy by value. The executor, which holds the traced client program, is shared by every
  algorithm with the same local update and ``client_key`` (e.g. magnitude pruning at any pattern
  or sparsity), the algorithm (init, broadcast, server update) by equal policies and masks.
  """
  local = programs.config_key(cfg["client"], cfg["faults"])
  server = programs.config_key(cfg["server"], cfg["cohort_size"])
  mask = None if initial_mask is None else io_utils.tree_sha256(initial_mask)
  algorithm = programs.shared(
    ("algorithm", loss_fn, local, server, policy, mask),
    lambda: build_algorithm(cfg, loss_fn, policy, None, initial_mask),
  )
  client = algorithm.client_key  # None: its client side is not interchangeable with any other
  engine = programs.config_key(cfg["engine"])
  executor = programs.shared(
    None if client is None else ("executor", loss_fn, local, engine, client),
    lambda: rounds.make_executor(cfg["engine"], algorithm.client_update, algorithm.reducers),
  )
  return algorithm, executor


def make_sampler(cfg: Mapping[str, Any], store: ClientStore) -> CohortSampler:
  fields.check("sampling", cfg["sampling"])
  cohort = cfg["cohort_size"]
  if cohort > store.num_clients:
    absl_logging.warning(
      "cohort_size=%d is larger than the %d clients: every round samples all of them",
      cohort,
      store.num_clients,
    )
  return CohortSampler(
    store.num_clients,
    min(cohort, store.num_clients),
    seed=cfg["seed"],
    weights=store.num_examples() if cfg["sampling"] == "weighted" else None,
  )


def _truncate_log(path: str, history: list[dict]) -> None:
  """Rewrites the JSONL log as its non-round lines (e.g. the start eval) plus ``history``, so
  rounds that ran after the restored checkpoint are not logged twice."""
  log = pathlib.Path(path)
  preamble = []
  if log.exists():
    for line in log.read_text(encoding="utf-8").splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by the kill
      if "round" not in record:
        preamble.append(line + "\n")
  io_utils.write_text_atomic(log, "".join(preamble + [json.dumps(h) + "\n" for h in history]))


def run_federated(
  config: Mapping[str, Any] | Any,
  loss_fn: LossFn,
  params: PyTree,
  store: ClientStore,
  eval_fn: rounds.EvalFn | None = None,
  state: ServerState | None = None,
  progress: bool = True,
  policy: mask_policy.MaskPolicy | None = None,
  round_costs: Callable[[ServerState], dict] | None = None,
  initial_mask: PyTree | None = None,
) -> tuple[ServerState, list[dict]]:
  """Federated training (or pruning) from a config; resumes from ``checkpoint_dir`` if set.

  Args:
    config: dict / ConfigDict (engine fields, see ``federated.rounds``); a ``pruning`` section
      selects federated pruning (``policy`` overrides it).
    loss_fn: ``loss_fn(params, batch, rng) -> (scalar, aux)``.
    params: initial server params.
    store: the clients.
    eval_fn: ``eval_fn(params, round) -> {name: value}`` every ``eval_every`` rounds.
    state: start from this server state instead of ``params`` (and of any checkpoint).
    policy: the mask policy (default: from the config's ``pruning`` section).
    round_costs: per-client cost accounting for federated pruning.
    initial_mask: federated pruning starts from this mask (frozen if the policy is).
  """
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
  cfg = rounds.resolve_config(raw)
  if policy is None:
    pcfg = resolve_pruning(raw.get("pruning"))
    policy = None if pcfg is None else policy_from_config(pcfg)
  algorithm, executor = _programs(cfg, loss_fn, policy, initial_mask)
  algorithm = algorithm._replace(round_costs=round_costs)
  sampler = make_sampler(cfg, store)
  history: list[dict] = []
  checkpointer = None
  if cfg["checkpoint_dir"]:
    checkpointer = RoundCheckpointer(
      cfg["checkpoint_dir"], cfg["checkpoint_every"], cfg["keep_checkpoints"]
    )
  if state is None:
    # one compilation (persistently cached) instead of an eager dispatch per mask op and leaf
    state = jax.jit(algorithm.init)(params, cfg["seed"])
    restored = checkpointer.restore(state) if checkpointer else None
    if restored is not None:
      state, history = restored
      absl_logging.info("resuming from the checkpoint after round %d", int(state.round))
      if cfg["log_path"]:
        _truncate_log(cfg["log_path"], history)
  remaining = max(0, cfg["rounds"] - int(state.round))
  state, history = rounds.run_rounds(
    algorithm,
    state,
    store,
    executor,
    sampler,
    remaining,
    eval_fn=eval_fn,
    eval_every=cfg["eval_every"],
    log_path=cfg["log_path"],
    progress=progress,
    tensorboard_dir=cfg["tensorboard_dir"],
    checkpointer=checkpointer,
    history=history,
  )
  if checkpointer is not None:
    checkpointer.save(state, history, force=True)
    checkpointer.close()
  return state, history
