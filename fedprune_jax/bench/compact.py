"""Masked-dense vs compacted clients: one federated pruning round side by side.

For each preset and unit sparsity, the same frozen unit mask (``units.unit_mask``, uniform) is
trained for a few rounds by masked-dense clients (``client.compact='off'``) and by clients that
train the compacted model (``'on'``), on the same synthetic speech-shaped clients: median round
time, examples/s, the measured client training memory (XLA memory analysis of the client program
run, ``executor.ChunkedExecutor``) and the compile seconds of the first round; ratios compacted /
masked-dense.

Run: fedprune bench fedprune --compact [--presets tiny,s --sparsities 0,0.5,0.75 --repeats 2]
"""

from __future__ import annotations

import statistics
from typing import Any

import jax

from fedprune_jax.algorithms import build
from fedprune_jax.federated import client_data, rounds
from fedprune_jax.federated.algorithm import ExecutorCache
from fedprune_jax.federated.sampling import CohortSampler
from fedprune_jax.models import asr
from fedprune_jax.pruning import units


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
  names = list(runs)
  for i in range(repeats + 1):
    for name in names if i % 2 == 0 else names[::-1]:
      alg, executors = runs[name]
      if name not in states:
        states[name] = jax.jit(alg.init)(params, 0)
      states[name], hist = rounds.run_rounds(
        alg, states[name], store, executors, sampler, 1, progress=False
      )
      hists[name] += hist
  return {name: _summary(h) for name, h in hists.items()}


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


def main(args) -> dict[str, Any]:
  sparsities = [float(s) for s in args.sparsities.split(",")]
  print(HEADER, flush=True)
  rows = []
  for preset in args.presets.split(","):
    rows += compare(preset, sparsities, args)
  return {"compact": rows}
