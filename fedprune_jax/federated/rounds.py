"""The round driver: sample a cohort, run it, update the server, log.

``run_federated(config, loss_fn, params, store)`` is what the CLI calls;
``run_rounds`` is the loop underneath it. Config layout (a dict or an
ml_collections ConfigDict; every key optional, defaults below)::

  seed: 0
  rounds: 10
  cohort_size: 16            # clamped to the number of clients
  sampling: 'uniform'        # or 'weighted' (by #examples)
  eval_every: 0              # 0 = no periodic eval
  log_path: None             # JSONL, one line per round (+ eval lines)
  client: {optimizer: 'sgd', learning_rate: 0.1, momentum: None,
           num_epochs: 1, shuffle: True}
  server: {optimizer: 'fedavg', learning_rate: 1.0, b1: 0.9, b2: 0.99,
           eps: 1e-3, momentum: None}
  engine: {executor: 'chunked', chunk_size: 16, num_devices: 1,
           weighting: 'num_examples', vmap_size: None, device_loop: False}
           # num_devices: int or 'all'; executor: chunked|sequential|drjax;
           # vmap_size: clients vectorised together inside a chunk (None = C;
           # 1 is fastest for conv models on CPU, see executor.py)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

from absl import logging as absl_logging
import jax
import optax

from fedprune_jax.federated import multihost
from fedprune_jax.federated.client import LossFn, make_client_update
from fedprune_jax.federated.client_data import ClientStore
from fedprune_jax.federated.executor import ChunkedExecutor, DrjaxExecutor, SequentialExecutor
from fedprune_jax.federated.sampling import CohortSampler
from fedprune_jax.federated.server import (
  ServerState,
  make_server_optimizer,
  server_init,
  server_update,
)

PyTree = Any
EvalFn = Callable[[PyTree, int], Mapping[str, float]]

DEFAULTS = {
  "seed": 0,
  "rounds": 10,
  "cohort_size": 16,
  "sampling": "uniform",
  "eval_every": 0,
  "log_path": None,
  "client": {
    "optimizer": "sgd",
    "learning_rate": 0.1,
    "momentum": None,
    "num_epochs": 1,
    "shuffle": True,
  },
  "server": {
    "optimizer": "fedavg",
    "learning_rate": 1.0,
    "b1": 0.9,
    "b2": 0.99,
    "eps": 1e-3,
    "momentum": None,
  },
  "engine": {
    "executor": "chunked",
    "chunk_size": 16,
    "num_devices": 1,
    "weighting": "num_examples",
    "vmap_size": None,
    "device_loop": False,
  },
}


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
  name = cfg["optimizer"].lower()
  lr = cfg["learning_rate"]
  if name == "sgd":
    return optax.sgd(lr, momentum=cfg.get("momentum"))
  if name == "adam":
    return optax.adam(lr)
  raise ValueError(f"unknown config field client.optimizer={name!r}; expected 'sgd' or 'adam'")


def make_executor(cfg: Mapping[str, Any], client_update):
  """Executor from the ``engine`` config section."""
  kind = cfg["executor"]
  if kind == "sequential":
    return SequentialExecutor(client_update, cfg["weighting"])
  if kind == "drjax":
    return DrjaxExecutor(client_update, cfg["weighting"])
  if kind != "chunked":
    raise ValueError(f"unknown config field engine.executor={kind!r}")
  n = cfg["num_devices"]
  mesh = None
  if n == "all" or (isinstance(n, int) and n > 1):
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
    cfg["weighting"],
    device_loop=cfg["device_loop"],
    vmap_size=vmap_size,
  )


def run_rounds(
  state: ServerState,
  store: ClientStore,
  executor,
  server_optimizer: optax.GradientTransformation,
  sampler: CohortSampler,
  num_rounds: int,
  seed: int,
  mask: PyTree | None = None,
  eval_fn: EvalFn | None = None,
  eval_every: int = 0,
  log_path: str | None = None,
  progress: bool = True,
  on_round: Callable[[ServerState, dict], None] | None = None,
) -> tuple[ServerState, list[dict]]:
  """Runs ``num_rounds`` rounds starting at ``state.round``.

  Round ``r`` uses cohort ``sampler.sample(r)`` and round key
  ``fold_in(key(seed), r)``, so a run resumed from a saved ``state`` repeats
  the uninterrupted run exactly.

  A client whose loss or delta is not finite is dropped from its round's
  aggregate and counted in ``num_failed_clients``; a round in which no client
  succeeded leaves params and server optimizer state unchanged.

  Returns:
    (final state, history) with one metrics dict per round: round,
    train_loss, num_clients, num_failed_clients, num_examples, seconds,
    clients_per_s, examples_per_s (+ eval metrics prefixed ``eval_`` on eval
    rounds).
  """
  seed_key = jax.random.key(seed)
  update = jax.jit(server_update, static_argnums=2)
  history = []
  log = None
  is_main = jax.process_index() == 0
  if log_path and is_main:
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    log = open(log_path, "a", encoding="utf-8")
  bar = None
  if progress and is_main:
    import tqdm  # pylint: disable=g-import-not-at-top

    bar = tqdm.tqdm(total=num_rounds, desc="rounds", unit="round")
  try:
    for _ in range(num_rounds):
      r = int(state.round)
      t0 = time.perf_counter()
      cohort = sampler.sample(r)
      mean_delta, metrics = executor(
        state.params, store, cohort, jax.random.fold_in(seed_key, r), mask
      )
      if metrics["weight_sum"] > 0:
        state = update(state, mean_delta, server_optimizer)
      else:
        # Every client failed (or had no data): an optimizer step on a zero
        # pseudo-gradient would still move FedAdam params, so skip it.
        state = state.replace(round=state.round + 1)
      jax.block_until_ready(state.params)
      if metrics["num_failed_clients"]:
        absl_logging.warning(
          "round %d: dropped %d of %d clients with a non-finite loss or delta",
          r,
          int(metrics["num_failed_clients"]),
          len(cohort),
        )
      dt = time.perf_counter() - t0
      metrics = dict(
        round=r,
        **metrics,
        seconds=dt,
        clients_per_s=metrics["num_clients"] / dt,
        examples_per_s=metrics["num_examples"] / dt,
      )
      if eval_fn is not None and eval_every and (r + 1) % eval_every == 0:
        metrics.update({f"eval_{k}": float(v) for k, v in eval_fn(state.params, r + 1).items()})
      history.append(metrics)
      if log is not None:
        log.write(json.dumps(metrics) + "\n")
        log.flush()
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
  return state, history


def run_federated(
  config: Mapping[str, Any] | Any,
  loss_fn: LossFn,
  params: PyTree,
  store: ClientStore,
  eval_fn: EvalFn | None = None,
  mask: PyTree | None = None,
  state: ServerState | None = None,
  progress: bool = True,
) -> tuple[ServerState, list[dict]]:
  """Federated training from a config (see the module docstring).

  Args:
    config: dict / ConfigDict; unknown top-level sections are ignored.
    loss_fn: ``loss_fn(params, batch, rng) -> (scalar, aux)``.
    params: initial server params.
    store: the clients.
    eval_fn: ``eval_fn(params, round) -> {name: value}`` run every
      ``eval_every`` rounds.
    mask: optional pruning mask applied in every client update.
    state: resume from this server state instead of ``params``.
  """
  cfg = resolve_config(config)
  client_update = make_client_update(
    loss_fn,
    make_client_optimizer(cfg["client"]),
    num_epochs=cfg["client"]["num_epochs"],
    shuffle=cfg["client"]["shuffle"],
  )
  s = cfg["server"]
  server_opt = make_server_optimizer(
    s["optimizer"], s["learning_rate"], b1=s["b1"], b2=s["b2"], eps=s["eps"], momentum=s["momentum"]
  )
  if cfg["sampling"] not in ("uniform", "weighted"):
    raise ValueError(
      f"config field sampling must be 'uniform' or 'weighted', got {cfg['sampling']!r}"
    )
  sampler = CohortSampler(
    store.num_clients,
    min(cfg["cohort_size"], store.num_clients),
    seed=cfg["seed"],
    weights=store.num_examples() if cfg["sampling"] == "weighted" else None,
  )
  if state is None:
    state = server_init(params, server_opt)
  executor = make_executor(cfg["engine"], client_update)
  remaining = max(0, cfg["rounds"] - int(state.round))
  return run_rounds(
    state,
    store,
    executor,
    server_opt,
    sampler,
    remaining,
    cfg["seed"],
    mask=mask,
    eval_fn=eval_fn,
    eval_every=cfg["eval_every"],
    log_path=cfg["log_path"],
    progress=progress,
  )
