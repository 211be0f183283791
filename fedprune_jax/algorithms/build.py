"""From a config to a running federated algorithm (the edge: config values are read here once).

``run_federated(config, loss_fn, params, store)`` resolves the engine config
(``federated.rounds.DEFAULTS``) and the optional ``pruning`` section (``PRUNING_DEFAULTS``; absent
or None = dense FedAvg/FedAdam/FedYogi), looks the algorithm up by name in
``algorithms.registry`` and builds it, restores the latest round checkpoint if there is one, and
runs the remaining rounds.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping, NamedTuple

import jax
from absl import logging as absl_logging

from fedprune_jax import fields, io_utils
from fedprune_jax import programs
from fedprune_jax.algorithms import centralized as centralized_lib
from fedprune_jax.algorithms import fedprune as fedprune_lib
from fedprune_jax.algorithms import mask_policy
from fedprune_jax.algorithms import registry
from fedprune_jax.errors import ConfigError
from fedprune_jax.federated import faults, rounds
from fedprune_jax.federated.algorithm import ClientProgram, ExecutorCache, FederatedAlgorithm
from fedprune_jax.federated.checkpoints import RoundCheckpointer
from fedprune_jax.federated.client import LossFn, make_client_update
from fedprune_jax.federated.client_data import ClientStore
from fedprune_jax.federated.sampling import CohortSampler
from fedprune_jax.federated.server import make_server_optimizer
from fedprune_jax.pruning import compaction

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
  for field in ("include", "exclude"):  # library callers skip config validation
    fields.check(f"pruning.{field}", out[field])
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


class CompactModel(NamedTuple):
  """A model whose clients may train it compacted (``fedprune.CompactClients``).

  Attributes:
    channels_per_group: the Conformer's conv channels per group.
    loss_for: ``BlockSizes -> loss_fn`` of the model with those unit counts; the dense sizes must
      give the dense ``loss_fn`` object itself (so dense and all-kept rounds share one program).
    step_flops: ``BlockSizes | None -> float``, FLOPs of one local step (None: dense), or None.
  """

  channels_per_group: int
  loss_for: Callable[[compaction.BlockSizes], LossFn]
  step_flops: Callable[[compaction.BlockSizes | None], float] | None = None


def compact_model_for(
  model: Any,
  loss_fn: LossFn,
  make_loss: Callable[[Any], LossFn],
  step_flops: Callable[[compaction.BlockSizes | None], float] | None = None,
) -> CompactModel:
  """A Conformer ``AsrModel`` as a ``CompactModel``: the model of other unit counts is ``model``
  with ``config.layer_sizes`` set, its loss ``make_loss(that model)``; the dense sizes give
  ``loss_fn`` itself."""
  dense = compaction.BlockSizes.dense(model.config)

  def loss_for(sizes: compaction.BlockSizes) -> LossFn:
    if sizes == dense:
      return loss_fn
    layer_sizes = sizes.layer_sizes()
    return make_loss(
      dataclasses.replace(model, config=model.config.replace(layer_sizes=layer_sizes))
    )

  return CompactModel(model.config.conv_group_channels, loss_for, step_flops)


SERVER_ALIASES = {"sgd": "fedavg", "adam": "fedadam", "yogi": "fedyogi"}


def algorithm_name(
  cfg: Mapping[str, Any],
  policy: mask_policy.MaskPolicy | None,
  server: centralized_lib.ServerInputs | None = None,
) -> str:
  """The registry name a resolved config selects: ``centralized`` when the server's data are
  given, ``fedprune`` with a pruning policy, else the server optimizer's (``fedavg``,
  ``fedadam``, ``fedyogi``)."""
  if server is not None:
    return "centralized"
  if policy is not None:
    return "fedprune"
  name = cfg["server"]["optimizer"].lower()
  return SERVER_ALIASES.get(name, name)


def local_update_of(
  loss: LossFn, client_json: str, faults_json: str, per_step: Callable | None
) -> Callable:
  """A client's local update (``make_client_update`` with simulated faults) built from hashable
  values only: the loss (by identity), the resolved ``client`` and ``faults`` sections as
  ``programs.config_key`` strings, and the score's per-step accumulator (``MaskPolicy.per_step``).
  Its program key is ``('local', *arguments)`` (``build_algorithm``): it reads nothing else, so
  the key cannot miss a value it depends on."""
  (c,), (fault_cfg,) = json.loads(client_json), json.loads(faults_json)
  local = make_client_update(
    loss,
    rounds.make_client_optimizer(c),
    num_epochs=c["num_epochs"],
    shuffle=c["shuffle"],
    per_step=per_step,
  )
  return faults.with_faults(local, faults.FaultConfig(**fault_cfg))


def build_algorithm(
  cfg: Mapping[str, Any],
  loss_fn: LossFn,
  policy: mask_policy.MaskPolicy | None = None,
  initial_mask: PyTree | None = None,
  compact_model: CompactModel | None = None,
  name: str | None = None,
  server: centralized_lib.ServerInputs | None = None,
) -> FederatedAlgorithm:
  """The registered algorithm ``name`` (default ``algorithm_name(cfg, policy, server)``) from a
  resolved engine config."""
  c, s = cfg["client"], cfg["server"]
  # the local update's inputs besides the loss, as hashable values (``local_update_of``)
  local_inputs = (
    programs.config_key({k: v for k, v in c.items() if k not in ("compact", "compact_quantum")}),
    programs.config_key(cfg["faults"]),
    None if policy is None else policy.per_step,
  )

  def local_for_loss(loss: LossFn):
    return local_update_of(loss, *local_inputs)

  def key_of(loss: LossFn):
    return ("local", loss, *local_inputs)

  compact = None
  if policy is not None and compact_model is not None:
    locals_by_sizes: dict = {}

    def local_for(sizes: compaction.BlockSizes):
      if sizes not in locals_by_sizes:
        loss = compact_model.loss_for(sizes)
        locals_by_sizes[sizes] = key_of(loss), local_for_loss(loss)
      return locals_by_sizes[sizes]

    compact = fedprune_lib.CompactClients(
      compact_model.channels_per_group,
      local_for,
      c["compact"],
      c["compact_quantum"],
      compact_model.step_flops,
    )
  elif policy is not None and c["compact"] == "on":
    raise ConfigError("config field client.compact='on' needs a Conformer model (unit structure)")
  server_opt = make_server_optimizer(
    s["optimizer"], s["learning_rate"], b1=s["b1"], b2=s["b2"], eps=s["eps"], momentum=s["momentum"]
  )
  inputs = registry.BuildInputs(
    cfg,
    local_for_loss(loss_fn),
    key_of(loss_fn),
    server_opt,
    policy=policy,
    initial_mask=initial_mask,
    compact=compact,
    loss_fn=loss_fn,
    server=server,
  )
  return registry.get(name or algorithm_name(cfg, policy, server))(inputs)


def with_round_costs(
  algorithm: FederatedAlgorithm, round_costs: Callable[[Any], dict] | None
) -> FederatedAlgorithm:
  """``algorithm`` whose round plans also carry ``round_costs(state)`` in their metrics."""
  if round_costs is None:
    return algorithm
  plan_round = algorithm.plan_round

  def plan(state):
    out = plan_round(state)
    return out._replace(metrics={**round_costs(state), **out.metrics})

  return algorithm._replace(plan_round=plan)


def _programs(
  cfg: Mapping[str, Any],
  loss_fn: LossFn,
  policy: mask_policy.MaskPolicy | None,
  initial_mask: PyTree | None,
  compact_model: CompactModel | None = None,
  name: str | None = None,
  server_inputs: centralized_lib.ServerInputs | None = None,
):
  """(algorithm, executors), shared with earlier runs of this process built from equal inputs.

  ``loss_fn`` is keyed by identity (``job`` reuses one per model and SpecAugment config), the
  policy by value. An executor, which holds a traced client program, is shared by every run with
  the same engine config and an equal ``ClientProgram.key`` (e.g. magnitude pruning at any
  pattern or sparsity), the algorithm (init, host step, server update) by equal policies and
  masks (an algorithm on the server's data: never, the data object is this run's).
  """
  local = programs.config_key(cfg["client"], cfg["faults"])
  server = programs.config_key(cfg["server"], cfg["cohort_size"])
  mask = None if initial_mask is None else io_utils.tree_sha256(initial_mask)
  algorithm = programs.shared(
    None
    if server_inputs is not None
    else ("algorithm", name, loss_fn, local, server, policy, mask, compact_model),
    lambda: build_algorithm(cfg, loss_fn, policy, initial_mask, compact_model, name, server_inputs),
  )
  return algorithm, shared_executors(cfg["engine"])


def shared_executors(engine: Mapping[str, Any]) -> ExecutorCache:
  """A run's ``ExecutorCache`` whose executors are shared with every earlier run of this process
  with the same resolved ``engine`` section and an equal ``ClientProgram.key`` (``programs``)."""
  engine_key = programs.config_key(engine)
  make = executor_factory_for(engine)

  def executor_for(program: ClientProgram):
    key = None if program.key is None else ("executor", engine_key, program.key)
    return programs.shared(key, lambda: make(program))

  return ExecutorCache(executor_for)


def executor_factory_for(engine: Mapping[str, Any]) -> Callable[[ClientProgram], Any]:
  """``program -> executor`` from a resolved ``engine`` config section."""
  return lambda program: rounds.make_executor(engine, program.client_update, program.reducers)


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
  state: PyTree | None = None,
  progress: bool = True,
  policy: mask_policy.MaskPolicy | None = None,
  round_costs: Callable[[Any], dict] | None = None,
  initial_mask: PyTree | None = None,
  compact_model: CompactModel | None = None,
  on_round: Callable[[PyTree, dict], None] | None = None,
  name: str | None = None,
  server: centralized_lib.ServerInputs | None = None,
) -> tuple[PyTree, list[dict]]:
  """Federated training (or pruning) from a config; resumes from ``checkpoint_dir`` if set.

  Args:
    config: dict / ConfigDict (engine fields, see ``federated.rounds``); a ``pruning`` section
      selects federated pruning (``policy`` overrides it).
    loss_fn: ``loss_fn(params, batch, rng) -> (scalar, aux)``.
    params: initial server params.
    store: the clients.
    eval_fn: ``eval_fn(params, round) -> {name: value}`` every ``eval_every`` rounds.
    state: start from this state instead of ``params`` (and of any checkpoint).
    policy: the mask policy (default: from the config's ``pruning`` section).
    round_costs: per-client cost accounting, recorded with every round.
    initial_mask: federated pruning starts from this mask (frozen if the policy is).
    compact_model: lets federated pruning's clients train the compacted model
      (``client.compact``); None: masked-dense clients.
    on_round: called after every round with (state, that round's metrics).
    name: the registered algorithm (default: ``algorithm_name(config, policy, server)``).
    server: the server's data (``centralized.ServerInputs``): centralized training on them, one
      client (the server, ``store`` = ``centralized.SERVER_STORE``) a round.
  """
  cfg, policy = resolve(config, policy)
  if server is not None:
    cfg = centralized_lib.server_config(cfg)
  algorithm, executors = _programs(cfg, loss_fn, policy, initial_mask, compact_model, name, server)
  algorithm = with_round_costs(algorithm, round_costs)
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
    executors,
    sampler,
    remaining,
    eval_fn=eval_fn,
    eval_every=cfg["eval_every"],
    log_path=cfg["log_path"],
    progress=progress,
    tensorboard_dir=cfg["tensorboard_dir"],
    on_round=on_round,
    checkpointer=checkpointer,
    history=history,
  )
  if checkpointer is not None:
    checkpointer.save(state, history, force=True)
    checkpointer.close()
  return state, history


def resolve(
  config: Mapping[str, Any] | Any, policy: mask_policy.MaskPolicy | None = None
) -> tuple[dict, mask_policy.MaskPolicy | None]:
  """(resolved engine config, the policy: ``policy`` or the config's ``pruning`` section's)."""
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
  cfg = rounds.resolve_config(raw)
  if policy is None:
    pcfg = resolve_pruning(raw.get("pruning"))
    policy = None if pcfg is None else policy_from_config(pcfg)
  return cfg, policy


def model_algorithm(
  config: Mapping[str, Any] | Any,
  loss_fn: LossFn,
  policy: mask_policy.MaskPolicy | None = None,
  initial_mask: PyTree | None = None,
  compact_model: CompactModel | None = None,
  name: str | None = None,
  server: centralized_lib.ServerInputs | None = None,
) -> FederatedAlgorithm:
  """The algorithm ``run_federated`` runs for these inputs (e.g. for ``model_params``)."""
  cfg, policy = resolve(config, policy)
  return _programs(cfg, loss_fn, policy, initial_mask, compact_model, name, server)[0]
