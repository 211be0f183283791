"""Federated pruning vs dense FedAvg: round time on the same cohort, and the mask update's cost.

1. Rounds of the same Conformer clients (synthetic speech-shaped data) under dense FedAvg and
   under federated pruning with a mask update in *every* round (the worst case), interleaved,
   best and median of ``--repeats``; prints the overhead ratio.
2. The server update of federated pruning (optimizer step + mask update) vs FedAvg's (optimizer
   step only) on a preset's params (default ``l``, ~118M), i.e. the time one mask update adds
   inside a round, per pattern.

3. With ``--compact``: masked-dense vs compacted clients (``bench.compact``) instead.

Run: fedprune bench fedprune [--cohort 8 --chunk 8 --frames 64 --mask-preset l --json out.json]
     fedprune bench fedprune --compact [--presets tiny,s --sparsities 0,0.5,0.75]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from fedprune_jax import io_utils
from fedprune_jax.algorithms import build
from fedprune_jax.bench import engine as engine_bench
from fedprune_jax.federated import aggregation, rounds
from fedprune_jax.federated.algorithm import ExecutorCache
from fedprune_jax.federated.sampling import CohortSampler


def _engine_cfg(cohort: int, chunk: int) -> dict:
  return rounds.resolve_config(
    {
      "cohort_size": cohort,
      "client": {"optimizer": "adam", "learning_rate": 1e-3},
      "server": {"optimizer": "fedadam", "learning_rate": 1e-3},
      "engine": {"chunk_size": chunk},
    }
  )


def _policy(pattern: str, rounds_: int):
  pcfg = build.resolve_pruning(
    {
      "target_sparsity": 0.5,
      "pattern": pattern,
      "schedule": "polynomial",
      "pruning_rounds": rounds_,
      "update_every": 1,
    }
  )
  return build.policy_from_config(pcfg, channels_per_group=None)


def round_times(args) -> dict[str, Any]:
  store, loss_fn, params, _ = engine_bench.build(
    "conformer-tiny", args.cohort, args.batch_size, args.max_examples, args.frames
  )
  cfg = _engine_cfg(args.cohort, args.chunk)
  sampler = CohortSampler(store.num_clients, args.cohort, seed=0)
  runners = {}
  for name, policy in (("fedavg", None), ("fedprune", _policy("unstructured", 10_000))):
    alg = build.build_algorithm(cfg, loss_fn, policy)
    ex = ExecutorCache(build.executor_factory_for(cfg["engine"]))  # one compile per program
    runners[name] = (alg, ex, alg.init(params, 0))
  times = {name: [] for name in runners}
  for rep in range(args.repeats + 1):  # the first repeat compiles
    for name, (alg, ex, state) in runners.items():
      t0 = time.perf_counter()
      state, _ = rounds.run_rounds(alg, state, store, ex, sampler, 1, progress=False)
      jax.block_until_ready(state)
      if rep:
        times[name].append(time.perf_counter() - t0)
      runners[name] = (alg, ex, state)
  out = {name: {"best_s": min(t), "median_s": statistics.median(t)} for name, t in times.items()}
  out["overhead_best"] = out["fedprune"]["best_s"] / out["fedavg"]["best_s"] - 1.0
  out["overhead_median"] = out["fedprune"]["median_s"] / out["fedavg"]["median_s"] - 1.0
  return out


def mask_update_times(preset: str, patterns: list[str], repeats: int) -> dict[str, Any]:
  from fedprune_jax.models import asr  # pylint: disable=g-import-not-at-top

  model = asr.make_asr_model(preset)
  params = jax.jit(model.init)(jax.random.key(0))
  cfg = _engine_cfg(8, 8)
  zero = jax.tree.map(jnp.zeros_like, params)
  agg = aggregation.Aggregate({"delta": zero}, jnp.float32(1), jnp.float32(1), jnp.float32(1))
  out = {"preset": preset, "num_params": int(sum(x.size for x in jax.tree.leaves(params)))}

  def best_of(fn, state):
    jax.block_until_ready(fn(state, agg))  # compile
    ts = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(state, agg))
      ts.append(time.perf_counter() - t0)
    return min(ts)

  def fake_loss(p, b, r):
    return jnp.float32(0), {}

  dense = build.build_algorithm(cfg, fake_loss, None)
  out["fedavg_server_update_s"] = best_of(jax.jit(dense.server_update), dense.init(params, 0))
  for pattern in patterns:
    alg = build.build_algorithm(cfg, fake_loss, _policy(pattern, 100))
    state = alg.init(params, 0)
    t = best_of(jax.jit(alg.server_update), state)
    out[f"fedprune_server_update_s[{pattern}]"] = t
    out[f"mask_update_s[{pattern}]"] = t - out["fedavg_server_update_s"]
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(prog="fedprune bench fedprune", description=__doc__.split("\n")[0])
  p.add_argument("--cohort", type=int, default=8)
  p.add_argument("--chunk", type=int, default=8)
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--max-examples", type=int, default=8)
  p.add_argument("--frames", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--mask-preset", default="l", help="preset for the mask update timing ('' = skip)")
  p.add_argument("--patterns", default="unstructured,column", help="comma list")
  p.add_argument("--json", default=None)
  p.add_argument("--compact", action="store_true", help="masked-dense vs compacted clients")
  p.add_argument("--presets", default="tiny,s", help="--compact: comma list of presets")
  p.add_argument("--sparsities", default="0,0.5,0.75", help="--compact: unit sparsities")
  p.add_argument(
    "--step", action="store_true", help="--compact: isolated train steps (the ceiling) instead"
  )
  args = p.parse_args(argv)
  if args.compact:
    from fedprune_jax.bench import compact  # pylint: disable=g-import-not-at-top

    result = compact.main(args)
    if args.json:
      io_utils.write_json_atomic(args.json, result)
    return result
  result = {"round": round_times(args)}
  r = result["round"]
  print(
    f"round, conformer-tiny, cohort {args.cohort}: fedavg {r['fedavg']['best_s']:.3f} s, "
    f"fedprune (mask update every round) {r['fedprune']['best_s']:.3f} s -> overhead "
    f"{r['overhead_best']:+.1%} (best), {r['overhead_median']:+.1%} (median)"
  )
  if args.mask_preset:
    m = mask_update_times(args.mask_preset, args.patterns.split(","), max(args.repeats, 1))
    result["mask_update"] = m
    print(
      f"server update, preset {m['preset']} ({m['num_params']:,} params): fedavg "
      f"{m['fedavg_server_update_s']:.3f} s"
    )
    for pattern in args.patterns.split(","):
      print(
        f"  fedprune [{pattern}]: {m[f'fedprune_server_update_s[{pattern}]']:.3f} s "
        f"(mask update {m[f'mask_update_s[{pattern}]']:.3f} s)"
      )
  if args.json:
    io_utils.write_json_atomic(args.json, result)
  return result


if __name__ == "__main__":
  main()
