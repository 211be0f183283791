"""Masked-dense vs compacted clients: one federated pruning round side by side.

For each preset and unit sparsity, the same frozen unit mask (``units.unit_mask``, uniform) is
trained for a few rounds by masked-dense clients (``client.compact='off'``) and by clients that
train the compacted model (``'on'``), on the same synthetic speech-shaped clients: median round
time, examples/s, the measured client training memory (XLA memory analysis of the client program
run, ``executor.ChunkedExecutor``) and the compile seconds of the first round; ratios compacted /
masked-dense.

With ``--step``: one isolated train step of the dense and of the compacted model instead, the
ceiling of the round's speed-up (``step_ceiling``).

Run: fedprune bench fedprune --compact [--step] [--presets tiny,s --sparsities 0,0.5,0.75 --repeats 2]
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import optax

from fedprune_jax.algorithms import build
from fedprune_jax.bench import step as step_lib
from fedprune_jax.federated import client_data, rounds
from fedprune_jax.federated.algorithm import ExecutorCache
from fedprune_jax.federated.sampling import CohortSampler
from fedprune_jax.models import asr
from fedprune_jax.pruning import compaction, units


def _summary(hist: list[dict]) -> dict[str, float]:
  """Medians over the timed rounds ``hist[1:]`` (round 0 may compile)."""
  timed = hist[1:]
  return {
    "path": hist[-1]["client_path"],
    "round_s": statistics.median(h["seconds"] for h in timed),
    "examples_per_s": statistics.median(h["examples_per_s"] for h in timed),
    "client_train_memory_bytes": hist[-1].get("client_train_memory_bytes"),
    "client_program_memory_bytes": hist[-1].get("client_program_memory_bytes"),
    "compile_s": hist[0]["compile_seconds"],
    "client_params": hist[-1]["client_params"],
  }


def _paired(runs: dict[str, tuple], params, store, cfg, repeats: int) -> dict[str, dict]:
  """Rounds of each ``name: (algorithm, executors)`` (a frozen mask), interleaved: every
  algorithm's first round (it may compile), then ``repeats`` timed rounds of each in turn, the
  order reversed every other time (ABBA), so a drift in the machine's speed (this VM's rounds of
  one program varied by 30 % over minutes) falls on both paths alike. ``executors`` is shared by
  the runs of one path (the masked-dense program is the same at every sparsity)."""
  states, hists = {}, {name: [] for name in runs}
  sampler = CohortSampler(store.num_clients, cfg["cohort_size"], seed=0)
  for name in abba(list(runs), repeats):
    alg, executors = runs[name]
    if name not in states:
      states[name] = jax.jit(alg.init)(params, 0)
    states[name], hist = rounds.run_rounds(
      alg, states[name], store, executors, sampler, 1, progress=False
    )
    hists[name] += hist
  return {name: _summary(h) for name, h in hists.items()}


def abba(names: list[str], repeats: int) -> list[str]:
  """Each name ``repeats + 1`` times, the order reversed every other time (A B B A A B ...)."""
  return [n for i in range(repeats + 1) for n in (names if i % 2 == 0 else names[::-1])]


def step_ceiling(preset: str, sparsities: list[float], args) -> list[dict[str, Any]]:
  """One isolated train step (grad + Adam + apply, ``bench.step``) of the dense model (what a
  masked-dense client executes, less its mask multiply) and of the compacted model at each unit
  sparsity, on one ``[batch_size, frames]`` batch, interleaved ABBA; medians of the steps after
  each model's first. The ratio is the ceiling of a compacted round's speed-up."""
  model = asr.make_asr_model(preset)
  params = jax.jit(model.init)(jax.random.key(0))
  cpg = model.config.conv_group_channels
  batch = step_lib.synthetic_batch(args.batch_size, args.frames, model.config.input_dim)
  rows = []
  for s in sparsities:
    small_model, small = compaction.compact(model, params, units.unit_mask(params, cpg, s))
    steps = {}
    for name, (m, p) in {"dense": (model, params), "compact": (small_model, small)}.items():
      p = jax.tree.map(lambda x: x.copy(), p)  # the step donates its params
      opt = optax.adam(1e-4)
      st = opt.init(p)
      fn = step_lib.make_train_step(m, opt).lower(p, st, batch, jax.random.key(1)).compile()
      steps[name] = [fn, p, st, []]
    for i, name in enumerate(abba(list(steps), args.repeats)):
      fn, p, st, times = steps[name]
      t0 = time.perf_counter()
      p, st, loss = fn(p, st, batch, jax.random.key(i))
      loss.block_until_ready()
      steps[name][1:3] = p, st
      times.append(time.perf_counter() - t0)
    dense_s, compact_s = (statistics.median(steps[n][3][1:]) for n in ("dense", "compact"))
    row = {"preset": preset, "sparsity": s, "dense_step_s": dense_s, "compact_step_s": compact_s}
    row["speedup"] = dense_s / compact_s
    print(
      f"| {preset} | {s:.0%} | {dense_s * 1e3:.0f} | {compact_s * 1e3:.0f} | "
      f"{row['speedup']:.2f}x |",
      flush=True,
    )
    rows.append(row)
  return rows


def compare(preset: str, sparsities: list[float], args) -> list[dict[str, Any]]:
  """One row per sparsity: masked-dense and compacted round costs of ``preset``."""
  model = asr.make_asr_model(preset)
  params = jax.jit(model.init)(jax.random.key(0))
  loss_fn = lambda p, b, r: model.loss(p, b, r, True)  # noqa: E731
  cpg = model.config.conv_group_channels
  store = client_data.SyntheticClientStore(
    args.cohort,
    batch_size=args.batch_size,
    min_examples=args.max_examples,
    max_examples=args.max_examples,
    num_frames=args.frames,
    feature_dim=model.config.input_dim,
    label_len=4,
    num_classes=28,
  )
  policy = build.policy_from_config(
    build.resolve_pruning({"pattern": "units", "mask_path": "given", "pruning_rounds": 1}), cpg
  )
  cm = build.compact_model_for(model, loss_fn, lambda m: lambda p, b, r: m.loss(p, b, r, True))
  caches = {}
  rows = []
  for s in sparsities:
    mask = units.expand_unit_mask(params, cpg, units.unit_mask(params, cpg, s))
    row = {"preset": preset, "sparsity": s}
    runs = {}
    for mode, name in (("off", "masked"), ("on", "compact")):
      cfg = rounds.resolve_config(
        {
          "cohort_size": args.cohort,
          "client": {"optimizer": "adam", "learning_rate": 1e-3, "compact": mode},
          "server": {"optimizer": "fedadam", "learning_rate": 1e-3},
          "engine": {"chunk_size": args.cohort, "vmap_size": 1},
        }
      )
      alg = build.build_algorithm(cfg, loss_fn, policy, initial_mask=mask, compact_model=cm)
      executors = caches.setdefault(name, ExecutorCache(build.executor_factory_for(cfg["engine"])))
      runs[name] = alg, executors
    row.update(_paired(runs, params, store, cfg, args.repeats))
    m, c = row["masked"], row["compact"]
    row["speedup"] = m["round_s"] / c["round_s"]
    if m["client_train_memory_bytes"] and c["client_train_memory_bytes"]:
      row["memory_ratio"] = c["client_train_memory_bytes"] / m["client_train_memory_bytes"]
    rows.append(row)
    print(format_row(row), flush=True)
  return rows


HEADER = (
  "| preset | unit sparsity | path | round s | examples/s | client train memory MiB "
  "| compile s | params trained |\n|---|---:|---|---:|---:|---:|---:|---:|"
)


def format_row(row: dict[str, Any]) -> str:
  lines = []
  for name in ("masked", "compact"):
    r = row[name]
    mem = r["client_train_memory_bytes"]
    lines.append(
      f"| {row['preset']} | {row['sparsity']:.0%} | {r['path']} | {r['round_s']:.2f} | "
      f"{r['examples_per_s']:.1f} | {'n/a' if mem is None else f'{mem / 2**20:.0f}'} | "
      f"{r['compile_s']:.1f} | {r['client_params']:,.0f} |"
    )
  ratio = f"{row['memory_ratio']:.2f}x" if "memory_ratio" in row else "n/a"
  lines.append(
    f"| {row['preset']} | {row['sparsity']:.0%} | compact / masked | {1 / row['speedup']:.2f}x "
    f"(speedup {row['speedup']:.2f}x) | | {ratio} | | |"
  )
  return "\n".join(lines)


STEP_HEADER = (
  "| preset | unit sparsity | dense step ms | compacted step ms | speedup (ceiling) |\n"
  "|---|---:|---:|---:|---:|"
)


def main(args) -> dict[str, Any]:
  sparsities = [float(s) for s in args.sparsities.split(",")]
  if args.step:
    print(STEP_HEADER, flush=True)
    return {"step": [r for p in args.presets.split(",") for r in step_ceiling(p, sparsities, args)]}
  print(HEADER, flush=True)
  rows = []
  for preset in args.presets.split(","):
    rows += compare(preset, sparsities, args)
  return {"compact": rows}
