"""The round driver: sample a cohort, run the algorithm's round, log, checkpoint.

``run_rounds`` is algorithm-agnostic (see ``algorithm.py`` for one round top to bottom);
``algorithms.build.run_federated(config, ...)`` builds an algorithm from a config and calls it.
Engine config: a dict or an ml_collections ConfigDict with the top-level fields ``seed``,
``rounds``, ``cohort_size``, ``sampling``, ``eval_every``, ``log_path``, ``tensorboard_dir``, ``checkpoint_dir``,
``checkpoint_every``, ``keep_checkpoints`` and the sections ``client``, ``server``, ``faults``,
``engine``; every key is optional. Defaults and allowed values: ``fedprune_jax/fields.py``
(``fedprune fields`` prints them).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

from absl import logging as absl_logging
import jax
import optax

from fedprune_jax import fields, scalars
from fedprune_jax.errors import ConfigError
from fedprune_jax.federated import multihost
from fedprune_jax.federated.algorithm import ClientProgram, ExecutorCache, FederatedAlgorithm
from fedprune_jax.federated.checkpoints import RoundCheckpointer
from fedprune_jax.federated.client_data import ClientStore
from fedprune_jax.federated.compiles import CompileCounter
from fedprune_jax.federated.executor import ChunkedExecutor, DrjaxExecutor, SequentialExecutor
from fedprune_jax.federated.sampling import CohortSampler

PyTree = Any
# round metrics that depend on the process (time, compiles), not on the run's state: a resumed
# run repeats every other metric exactly
PROCESS_METRICS = (
  "seconds",
  "clients_per_s",
  "examples_per_s",
  "compilations",
  "compile_seconds",
  "client_programs",
)
EvalFn = Callable[[PyTree, int], Mapping[str, float]]

# every key of the engine config and its library default (one table: ``fedprune_jax.fields``)
DEFAULTS = fields.engine_defaults()


def resolve_config(config: Mapping[str, Any] | Any) -> dict[str, Any]:
  """Merges ``config`` over ``DEFAULTS``; rejects unknown keys by name."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}
  for key, value in dict(config or {}).items():
    if key not in DEFAULTS:
      continue  # other sections (data, model, ...) belong to other modules
    if isinstance(DEFAULTS[key], dict):
      if not isinstance(value, Mapping):
        raise ValueError(f"config field {key!r} must be a mapping")
      for sub in value:
        if sub not in DEFAULTS[key]:
          raise ValueError(f"unknown config field {key}.{sub}; known: {sorted(DEFAULTS[key])}")
      out[key].update(value)
    else:
      out[key] = value
  return out


def make_client_optimizer(cfg: Mapping[str, Any]) -> optax.GradientTransformation:
  fields.check("client.optimizer", cfg["optimizer"])
  name = cfg["optimizer"].lower()
  lr = cfg["learning_rate"]
  if name == "sgd":
    return optax.sgd(lr, momentum=cfg.get("momentum"))
  return optax.adam(lr)


def make_executor(cfg: Mapping[str, Any], client_update, reducers=None):
  """Executor from the ``engine`` config section (``executor_factory`` for programs)."""
  fields.check("engine.executor", cfg["executor"])
  kind = cfg["executor"]
  weighting = cfg["weighting"]
  if kind == "sequential":
    return SequentialExecutor(client_update, weighting, reducers=reducers)
  if kind == "drjax":
    return DrjaxExecutor(client_update, weighting, reducers=reducers)
  n = cfg["num_devices"]
  mesh = None
  if n == "all" or (isinstance(n, int) and n > 1):
    if n != "all" and n > jax.device_count():
      raise ConfigError(
        f"config field engine.num_devices={n} but this process sees {jax.device_count()} "
        "device(s); use 'all' or a smaller number"
      )
    devs = jax.devices() if n == "all" else jax.devices()[:n]
    mesh = multihost.client_mesh(devs)
  chunk = cfg["chunk_size"]
  if mesh is not None and chunk % mesh.devices.size:
    chunk += mesh.devices.size - chunk % mesh.devices.size
  vmap_size = cfg["vmap_size"]
  if vmap_size is not None:
    vmap_size = min(vmap_size, chunk)
  return ChunkedExecutor(
    client_update,
    chunk,
    mesh,
    weighting,
    device_loop=cfg["device_loop"],
    vmap_size=vmap_size,
    reducers=reducers,
  )


def _host(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def run_rounds(
  algorithm: FederatedAlgorithm,
  state: PyTree,
  store: ClientStore,
  executors: ExecutorCache | Callable[[ClientProgram], Any],
  sampler: CohortSampler,
  num_rounds: int,
  eval_fn: EvalFn | None = None,
  eval_every: int = 0,
  log_path: str | None = None,
  progress: bool = True,
  tensorboard_dir: str | None = None,
  on_round: Callable[[PyTree, dict], None] | None = None,
  checkpointer: RoundCheckpointer | None = None,
  history: list[dict] | None = None,
) -> tuple[PyTree, list[dict]]:
  """Runs ``num_rounds`` rounds of ``algorithm`` starting at ``state.round``.

  One round: ``plan = algorithm.plan_round(state)`` (host side); the executor of
  ``plan.program`` runs the clients of cohort ``sampler.sample(r)`` on ``plan.client_input`` with
  round key ``fold_in(key(state.seed), r)`` and reduces their outputs; ``plan.finish`` maps the
  aggregate to the server's coordinates; ``server_update`` returns the next state. A run resumed
  from a saved state therefore repeats the uninterrupted run exactly. Clients that failed are
  dropped by the executor and counted in ``num_failed_clients``.

  Args:
    executors: an ``ExecutorCache``, or ``program -> executor`` (wrapped in one): programs with
      equal keys share one executor (one trace and compilation per input shape).
    history: metrics of the rounds before ``state.round`` (resume); they are kept in the returned
      history and in checkpoints.
    on_round: called after every round with (state, that round's metrics).
    checkpointer: saves ``(state, history)`` every k rounds.
    tensorboard_dir: each round's numeric metrics also go there as TensorBoard scalars at step
      ``round + 1`` (if tensorboardX is installed).

  Returns:
    (final state, history) with one metrics dict per round: round, train_loss, num_clients,
    num_failed_clients, num_examples, the plan's metrics, the algorithm's server metrics,
    compilations and compile_seconds (XLA compiles during the round), client_programs (distinct
    client programs so far), seconds, clients_per_s, examples_per_s (+ ``eval_*`` on eval
    rounds).
  """
  if not isinstance(executors, ExecutorCache):
    executors = ExecutorCache(executors)
  server_update = jax.jit(algorithm.server_update)
  history = list(history or [])
  log = None
  is_main = jax.process_index() == 0
  if log_path and is_main:
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    log = open(log_path, "a", encoding="utf-8")
  sink = scalars.open_sink(tensorboard_dir) if is_main else None
  bar = None
  if progress and is_main:
    import tqdm  # pylint: disable=g-import-not-at-top

    bar = tqdm.tqdm(total=num_rounds, desc=f"{algorithm.name} rounds", unit="round")
  try:
    for _ in range(num_rounds):
      r = int(state.round)
      t0 = time.perf_counter()
      with CompileCounter() as compiles:
        plan = algorithm.plan_round(state)
        cohort = sampler.sample(r)
        round_key = jax.random.fold_in(jax.random.key(int(state.seed)), r)
        executor = executors(plan.program)
        aggregate, metrics = executor(plan.client_input, store, cohort, round_key)
        if plan.finish is not None:
          aggregate = plan.finish(aggregate)
        state, server_metrics = server_update(state, aggregate)
        jax.block_until_ready(state)
      if metrics["num_failed_clients"]:
        absl_logging.warning(
          "round %d: dropped %d of %d clients with a non-finite loss or delta",
          r,
          int(metrics["num_failed_clients"]),
          len(cohort),
        )
      dt = time.perf_counter() - t0
      metrics = {  # later entries win: measured costs over the plan's estimates
        "round": r,
        **metrics,
        **plan.metrics,
        **_host(server_metrics),
        **_program_costs(executor),
        "compilations": compiles.count,
        "compile_seconds": compiles.seconds,
        "client_programs": executors.programs,
        "seconds": dt,
        "clients_per_s": metrics["num_clients"] / dt,
        "examples_per_s": metrics["num_examples"] / dt,
      }
      if eval_fn is not None and eval_every and (r + 1) % eval_every == 0:
        evaluated = eval_fn(algorithm.model_params(state), r + 1)
        metrics.update({f"eval_{k}": float(v) for k, v in evaluated.items()})
      history.append(metrics)
      if log is not None:
        log.write(json.dumps(metrics) + "\n")
        log.flush()
      if sink is not None:
        sink.write(metrics, r + 1, skip=("round",))
      if checkpointer is not None:
        checkpointer.save(state, history)
      if bar is not None:
        bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", cps=f"{metrics['clients_per_s']:.1f}")
        bar.update(1)
      if on_round is not None:
        on_round(state, metrics)
  finally:
    if bar is not None:
      bar.close()
    if log is not None:
      log.close()
    if sink is not None:
      sink.close()
  return state, history


def compile_totals(history: list[Mapping[str, Any]]) -> dict[str, float]:
  """``{compilations, compile_seconds}`` summed over round records of ``run_rounds`` (of the
  rounds this process ran: a resumed run's earlier rounds are not counted again)."""
  return {
    "compilations": int(sum(h.get("compilations", 0) for h in history)),
    "compile_seconds": float(sum(h.get("compile_seconds", 0.0) for h in history)),
  }


def _program_costs(executor) -> dict[str, float]:
  """Measured costs of the client program the executor last ran (if it measures them)."""
  costs = getattr(executor, "last_costs", None)
  return dict(costs) if costs else {}
