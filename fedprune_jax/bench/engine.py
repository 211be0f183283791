"""``fedprune bench engine``: federated-round throughput, memory and scaling.

One run measures, on the same model, clients and cohort:

(a) this engine (``ChunkedExecutor``: vmap over chunks of C clients; and
    ``engine_map1``: the same with ``vmap_size=1``, i.e. ``lax.map`` over the
    chunk's clients, one dispatch per chunk),
(b) fedjax ``for_each_client`` with its jit backend (per client, per step),
(c) a plain Python loop over jitted client updates (``SequentialExecutor``),
(d) DrJAX ``map_fn`` over the whole cohort (``DrjaxExecutor``),

and prints clients/s, examples/s and the ratios to (a); the useful FLOP/s of
the engine's round over the measured matmul peak; peak RSS of rounds with
growing cohorts at a fixed chunk size (each in a fresh subprocess); and the
scaling over 1 -> 2 -> 4 forced host devices (subprocesses).

Models: ``toy`` (pooled-feature MLP, federated/toy.py) or ``conformer-tiny``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import psutil

from fedprune_jax import io_utils
from fedprune_jax.federated import client, client_data, executor, toy


def build(
  model: str, num_clients: int, batch_size: int, max_examples: int, num_frames: int, seed: int = 0
):
  """(store, loss_fn, params, flops_per_example) for a bench model."""

  def synthetic(feature_dim: int, num_classes: int) -> client_data.SyntheticClientStore:
    return client_data.SyntheticClientStore(
      num_clients,
      batch_size=batch_size,
      min_examples=1,
      max_examples=max_examples,
      num_frames=num_frames,
      feature_dim=feature_dim,
      label_len=4,
      num_classes=num_classes,
      seed=seed,
    )

  if model == "toy":
    feat, hidden, classes = 40, 256, 28
    store = synthetic(feat, classes)
    params = toy.init_params(jax.random.key(seed), feat, classes, hidden)
    return (
      store,
      toy.make_loss_fn(),
      params,
      toy.flops_per_example(feat, num_frames, hidden, classes),
    )
  if model == "conformer-tiny":
    from fedprune_jax.models import flops as flops_lib  # pylint: disable=g-import-not-at-top
    from fedprune_jax.models import asr  # pylint: disable=g-import-not-at-top

    m = asr.make_asr_model("tiny")
    store = synthetic(m.config.input_dim, 28)
    params = m.init(jax.random.key(seed))
    loss_fn = lambda p, b, r: m.loss(p, b, r, train=True)
    return (store, loss_fn, params, flops_lib.conformer_flops(m.config, 1, num_frames))
  raise ValueError(f"unknown model {model!r}; 'toy' or 'conformer-tiny'")


def _time_round(fn, repeats: int) -> float:
  fn()  # compile + warm up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def _fedjax_round(loss_fn, lr, params, store, ids, round_key):
  """FedAvg client work through fedjax.for_each_client (jit backend)."""
  from fedprune_jax.federated.fedjax_compat import fedjax  # pylint: disable=g-import-not-at-top

  opt = optax.sgd(lr)
  grad = jax.grad(lambda p, b, r: loss_fn(p, b, r)[0])

  def init(shared, rng):
    return {"params": shared, "opt": opt.init(shared), "rng": rng, "step": 0}

  def step(state, batch):
    g = grad(state["params"], batch, jax.random.fold_in(state["rng"], state["step"]))
    upd, o = opt.update(g, state["opt"], state["params"])
    return {
      "params": optax.apply_updates(state["params"], upd),
      "opt": o,
      "rng": state["rng"],
      "step": state["step"] + 1,
    }

  def final(shared, state):
    return jax.tree_util.tree_map(jnp.subtract, shared, state["params"])

  add = jax.jit(lambda acc, d, w: jax.tree_util.tree_map(lambda a, x: a + w * x, acc, d))

  def run():
    with fedjax.for_each_client_backend("jit"):
      fn = fedjax.for_each_client(init, step, final)
      clients = []
      weights = {}
      for cid in ids:
        data = {k: v[0] for k, v in store.get(np.array([cid])).items()}
        live = [s for s in range(data["weights"].shape[0]) if data["weights"][s].sum() > 0]
        batches = [{k: v[s] for k, v in data.items()} for s in live]
        weights[int(cid)] = float(data["weights"].sum())
        clients.append((int(cid), batches, jax.random.fold_in(round_key, int(cid))))
      acc = jax.tree_util.tree_map(jnp.zeros_like, params)
      for cid, delta in fn(params, clients):
        acc = add(acc, delta, weights[cid])
      total = sum(weights.values())
      return jax.block_until_ready(jax.tree_util.tree_map(lambda a: a / total, acc))

  return run


def compare(
  model: str = "toy",
  cohort: int = 128,
  chunk: int = 32,
  batch_size: int = 8,
  max_examples: int = 32,
  num_frames: int = 32,
  repeats: int = 2,
  lr: float = 0.05,
  skip: tuple[str, ...] = (),
) -> dict[str, Any]:
  """Throughput of the four executors on one cohort (see module doc)."""
  store, loss_fn, params, fpe = build(model, cohort, batch_size, max_examples, num_frames)
  # pre-packed host arrays: time the executors, not the synthetic generator
  store = store.materialize()
  cu = client.make_client_update(loss_fn, optax.sgd(lr))
  ids = np.arange(cohort)
  key = jax.random.key(1)
  n_examples = float(store.num_examples()[ids].sum())
  runners = {
    "engine": lambda ex=executor.ChunkedExecutor(cu, chunk): ex(params, store, ids, key),
    "engine_map1": lambda ex=executor.ChunkedExecutor(cu, chunk, vmap_size=1): ex(
      params, store, ids, key
    ),
    "python_loop": lambda ex=executor.SequentialExecutor(cu): ex(params, store, ids, key),
    "drjax_map_fn": lambda ex=executor.DrjaxExecutor(cu): ex(params, store, ids, key),
  }
  if "fedjax_jit" not in skip:  # imports fedjax (and TensorFlow) only if run
    runners["fedjax_jit"] = _fedjax_round(loss_fn, lr, params, store, ids, key)
  out = {
    "model": model,
    "cohort": cohort,
    "chunk": chunk,
    "examples": n_examples,
    "backend": jax.default_backend(),
    "results": {},
  }
  for name, fn in runners.items():
    if name in skip:
      continue
    dt = _time_round(fn, repeats)
    out["results"][name] = {
      "seconds": dt,
      "clients_per_s": cohort / dt,
      "examples_per_s": n_examples / dt,
    }
  base = out["results"]["engine"]["seconds"]
  for r in out["results"].values():
    r["engine_speedup"] = r["seconds"] / base
  # useful model FLOPs (real examples only) of the engine's round vs peak
  useful = fpe * n_examples
  best = min(out["results"][k]["seconds"] for k in ("engine", "engine_map1") if k in out["results"])
  out["engine_flops_per_s"] = useful / best
  try:
    from fedprune_jax.bench import peak  # pylint: disable=g-import-not-at-top

    out["matmul_peak_flops_per_s"] = peak.measure_matmul_peak()
    out["engine_fraction_of_peak"] = out["engine_flops_per_s"] / out["matmul_peak_flops_per_s"]
  except ImportError:
    pass
  return out


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_child(
  model: str,
  cohort: int,
  chunk: int,
  batch_size: int,
  max_examples: int,
  num_frames: int,
  mesh_devices: int = 0,
  materialize: bool = False,
) -> dict[str, Any]:
  """One round of ``cohort`` clients (run in a fresh process).

  The store is the lazy synthetic one (memory stays bounded) unless
  ``materialize`` (pre-packed host arrays: times the devices, not the
  generator; used for the scaling runs).
  """
  store, loss_fn, params, _ = build(model, cohort, batch_size, max_examples, num_frames)
  if materialize:
    store = store.materialize()
  cu = client.make_client_update(loss_fn, optax.sgd(0.05))
  mesh = None
  if mesh_devices:
    from fedprune_jax.federated import multihost  # pylint: disable=g-import-not-at-top

    mesh = multihost.client_mesh(jax.devices()[:mesh_devices])
  ex = executor.ChunkedExecutor(cu, chunk, mesh=mesh)
  # warm up (compile) on one chunk, so the RSS delta is the round's own
  ex(params, store, np.arange(min(chunk, cohort)), jax.random.key(0))
  rss_before = _rss_gib()
  t0 = time.perf_counter()
  _, m = ex(params, store, np.arange(cohort), jax.random.key(1))
  dt = time.perf_counter() - t0
  return {
    "cohort": cohort,
    "chunk": chunk,
    "seconds": dt,
    "clients_per_s": cohort / dt,
    "examples_per_s": m["num_examples"] / dt,
    "peak_rss_gib": _rss_gib(),
    "rss_after_warmup_gib": rss_before,
    "rss_now_gib": psutil.Process().memory_info().rss / 2**30,
    "devices": jax.device_count(),
  }


def _spawn(args: list[str], devices: int = 1) -> dict[str, Any]:
  env = dict(os.environ)
  if jax.default_backend() == "cpu" or devices > 1:
    env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    )
  res = subprocess.run(
    [sys.executable, "-m", "fedprune_jax.bench.engine", "--child"] + args,
    env=env,
    check=True,
    capture_output=True,
    text=True,
  )
  return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(prog="fedprune bench engine", description=__doc__.split("\n")[0])
  p.add_argument("--model", default="toy", choices=["toy", "conformer-tiny"])
  p.add_argument("--cohort", type=int, default=128)
  p.add_argument("--chunk", type=int, default=32)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--max-examples", type=int, default=32)
  p.add_argument("--frames", type=int, default=32)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--memory-cohorts", default="64,512,4096", help="comma list; empty to skip")
  p.add_argument(
    "--big-cohort", type=int, default=10000, help="one round of this many clients; 0 to skip"
  )
  p.add_argument(
    "--scaling-devices", default="1,2,4", help="forced host device counts; empty to skip"
  )
  p.add_argument("--skip", default="", help="comma list of executors to skip")
  p.add_argument("--json", default=None, help="write all results here")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--mesh-devices", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--materialize", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  shape = (a.batch_size, a.max_examples, a.frames)
  if a.child:
    print(
      json.dumps(
        memory_child(
          a.model, a.cohort, a.chunk, *shape, mesh_devices=a.mesh_devices, materialize=a.materialize
        )
      )
    )
    return {}
  report: dict[str, Any] = {"uptime": os.getloadavg()}
  print(f"load average (1, 5, 15 min): {report['uptime']}")
  cmp_ = compare(
    a.model,
    a.cohort,
    a.chunk,
    *shape,
    repeats=a.repeats,
    skip=tuple(s for s in a.skip.split(",") if s),
  )
  report["compare"] = cmp_
  print(
    f"\n== one round: {a.model}, cohort {a.cohort}, chunk {a.chunk}, "
    f"{cmp_['examples']:.0f} examples, backend {cmp_['backend']}"
  )
  print(
    f"{'executor':<14}{'seconds':>10}{'clients/s':>12}{'examples/s':>13}"
    f"{'x slower than engine':>22}"
  )
  for name, r in cmp_["results"].items():
    print(
      f"{name:<14}{r['seconds']:>10.3f}{r['clients_per_s']:>12.1f}"
      f"{r['examples_per_s']:>13.1f}{r['engine_speedup']:>22.2f}"
    )
  if "matmul_peak_flops_per_s" in cmp_:
    print(
      f"best engine useful FLOP/s {cmp_['engine_flops_per_s']:.3e} / matmul "
      f"peak {cmp_['matmul_peak_flops_per_s']:.3e} = "
      f"{100 * cmp_['engine_fraction_of_peak']:.3f}%"
    )
  base = [
    "--model",
    a.model,
    "--chunk",
    str(a.chunk),
    "--batch-size",
    str(a.batch_size),
    "--max-examples",
    str(a.max_examples),
    "--frames",
    str(a.frames),
  ]
  cohorts = [int(c) for c in a.memory_cohorts.split(",") if c]
  if a.big_cohort:
    cohorts.append(a.big_cohort)
  if cohorts:
    print(f"\n== memory: one round per fresh process, chunk {a.chunk}")
    print(
      f"{'cohort':>8}{'seconds':>10}{'clients/s':>12}{'peak RSS GiB':>14}"
      f"{'peak after warm-up':>20}{'RSS at end':>12}"
    )
    report["memory"] = []
    for c in cohorts:
      r = _spawn(base + ["--cohort", str(c)])
      report["memory"].append(r)
      print(
        f"{c:>8}{r['seconds']:>10.2f}{r['clients_per_s']:>12.1f}"
        f"{r['peak_rss_gib']:>14.3f}{r['rss_after_warmup_gib']:>20.3f}"
        f"{r['rss_now_gib']:>12.3f}"
      )
  devs = [int(d) for d in a.scaling_devices.split(",") if d]
  if devs:
    print(f"\n== scaling over forced host devices, cohort {a.cohort}")
    report["scaling"] = []
    for d in devs:
      chunk = -(-a.chunk // d) * d
      r = _spawn(
        base[:2]
        + ["--chunk", str(chunk)]
        + base[4:]
        + ["--cohort", str(a.cohort), "--mesh-devices", str(d), "--materialize"],
        devices=d,
      )
      report["scaling"].append(r)
      print(f"devices {d}: {r['seconds']:.3f} s, {r['clients_per_s']:.1f} clients/s")
  if a.json:
    io_utils.write_json_atomic(a.json, report)
  return report


if __name__ == "__main__":
  main()
