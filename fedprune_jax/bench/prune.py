"""``fedprune bench prune``: pruning-library throughput.

Measures, in one process (so ratios are comparable):

1. mask computation: time of a jitted ``magnitude -> prune_mask`` (global
   allocation by default) on the params of a Conformer preset (~118M params
   for ``l``; built with ``jax.eval_shape`` of the model init + random
   normals), per pattern, and params/s;
2. masked train-step overhead: one jitted CTC train step (grad + adam)
   dense vs. ``masked_optimizer(adam)`` with a 50 % column mask;
3. compaction: forward time and param bytes of the masked dense model vs.
   the physically smaller compacted model at 50 % / 75 % unit sparsity.

Run ``python -m fedprune_jax.bench.prune --preset l`` (or through the
``fedprune`` CLI).  Report ``uptime`` load with the numbers: the timings are
wall-clock on a possibly shared machine.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedprune_jax import pruning

DEFAULT_PATTERNS = ("unstructured", "column", "row", "half_column", "half_row", "block:4x4")


def build_params(preset: str = "l", seed: int = 0, vocab_size: int = 29):
  """(model, params): random-normal params with the preset's exact shapes."""
  from fedprune_jax.models import asr  # lazy: the pruning library does not need it

  model = asr.make_asr_model(
    preset, vocab_size=vocab_size, dropout_rate=0.0, attention_dropout_rate=0.0
  )
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed))
  leaves, treedef = jax.tree.flatten(shapes)
  key = jax.random.PRNGKey(seed)
  make = jax.jit(lambda k, shape: 0.05 * jax.random.normal(k, shape), static_argnums=1)
  out = [make(jax.random.fold_in(key, i), tuple(l.shape)) for i, l in enumerate(leaves)]
  return model, jax.tree.unflatten(treedef, out)


def timeit(fn: Callable[..., Any], *args, repeats: int = 3) -> tuple[float, float]:
  """(first call incl. compile, best of ``repeats`` steady calls) in seconds."""
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return first, best


def mask_rows(
  params,
  patterns: Sequence[str] = DEFAULT_PATTERNS,
  allocation: str = "global",
  sparsity: float = 0.5,
  repeats: int = 3,
) -> list[dict]:
  """One row per pattern: compile_s, time_s, params_per_s, achieved sparsity."""
  rows = []
  n = pruning.count_total(pruning.init_mask(params))
  for p in patterns:
    fn = jax.jit(
      lambda prm, s, p=p: pruning.prune_mask(
        pruning.magnitude(prm), s, pattern=p, allocation=allocation
      )
    )
    first, best = timeit(fn, params, jnp.float32(sparsity), repeats=repeats)
    mask = fn(params, jnp.float32(sparsity))
    rows.append(
      {
        "bench": "mask",
        "pattern": p,
        "allocation": allocation,
        "prunable_params": n,
        "compile_s": first - best,
        "time_s": best,
        "params_per_s": n / best,
        "sparsity": float(pruning.sparsity(mask)),
      }
    )
  return rows


def _batch(batch_size: int, frames: int, labels: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return {
    "features": jnp.asarray(rng.standard_normal((batch_size, frames, 80)), jnp.float32),
    "feature_paddings": jnp.zeros((batch_size, frames), jnp.float32),
    "labels": jnp.asarray(rng.integers(1, 29, (batch_size, labels)), jnp.int32),
    "label_paddings": jnp.zeros((batch_size, labels), jnp.float32),
    "weights": jnp.ones((batch_size,), jnp.float32),
  }


def train_step_rows(
  model, params, batch_size: int = 2, frames: int = 128, sparsity: float = 0.5, repeats: int = 3
) -> list[dict]:
  """Dense vs. masked (column, global) train step: grad + adam + apply."""
  batch = _batch(batch_size, frames, frames // 8)
  mask = pruning.prune_mask(pruning.magnitude(params), sparsity, pattern="column")
  rows = []
  for name, tx in (
    ("dense", optax.adam(1e-4)),
    ("masked", pruning.masked_optimizer(optax.adam(1e-4), initial_mask=mask)),
  ):
    state = tx.init(params)

    @jax.jit
    def step(p, s, tx=tx):
      (loss, _), g = jax.value_and_grad(model.loss, has_aux=True)(p, batch, None, False)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss

    first, best = timeit(step, params, state, repeats=repeats)
    rows.append({"bench": "train_step", "variant": name, "compile_s": first - best, "time_s": best})
  rows[1]["ratio_vs_dense"] = rows[1]["time_s"] / rows[0]["time_s"]
  return rows


def compaction_rows(
  model,
  params,
  sparsities: Sequence[float] = (0.5, 0.75),
  batch_size: int = 2,
  frames: int = 128,
  repeats: int = 3,
) -> list[dict]:
  """Masked dense forward vs. compacted forward at each unit sparsity."""
  from fedprune_jax.pruning import compaction, units

  batch = _batch(batch_size, frames, 4)
  cfg = model.config
  fwd_dense = jax.jit(
    lambda p: model.apply_features(p, batch["features"], batch["feature_paddings"])[0]
  )
  rows = []
  for s in sparsities:
    umask = units.unit_mask(params, cfg, s, scores=pruning.magnitude(params))
    masked = pruning.apply_mask(params, units.expand_unit_mask(params, cfg, umask))
    small_model, small = compaction.compact(model, masked, umask)
    fwd_small = jax.jit(
      lambda p: small_model.apply_features(p, batch["features"], batch["feature_paddings"])[0]
    )
    _, t_dense = timeit(fwd_dense, masked, repeats=repeats)
    _, t_small = timeit(fwd_small, small, repeats=repeats)
    err = float(jnp.max(jnp.abs(fwd_dense(masked) - fwd_small(small))))
    b_dense = sum(x.nbytes for x in jax.tree.leaves(masked))
    b_small = sum(x.nbytes for x in jax.tree.leaves(small))
    rows.append(
      {
        "bench": "compaction",
        "unit_sparsity": s,
        "dense_fwd_s": t_dense,
        "compact_fwd_s": t_small,
        "speedup": t_dense / t_small,
        "dense_bytes": b_dense,
        "compact_bytes": b_small,
        "bytes_ratio": b_small / b_dense,
        "max_abs_err": err,
        "compact_flops_ratio": compaction.flops(small_model.config, frames)
        / compaction.flops(cfg, frames),
      }
    )
  return rows


def run(
  preset: str = "l",
  patterns: Sequence[str] = DEFAULT_PATTERNS,
  allocation: str = "global",
  sparsity: float = 0.5,
  repeats: int = 3,
  train_step: bool = True,
  compaction: bool = True,
  step_preset: str | None = None,
) -> list[dict]:
  """All benchmark rows (see module docstring)."""
  model, params = build_params(preset)
  rows = [
    dict(r, preset=preset) for r in mask_rows(params, patterns, allocation, sparsity, repeats)
  ]
  if train_step or compaction:
    if step_preset and step_preset != preset:
      model, params = build_params(step_preset)
    p = step_preset or preset
    if train_step:
      rows += [dict(r, preset=p) for r in train_step_rows(model, params, repeats=repeats)]
    if compaction:
      rows += [dict(r, preset=p) for r in compaction_rows(model, params, repeats=repeats)]
  return rows


def _fmt(v):
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
  return str(v)


def format_tables(rows: Sequence[dict]) -> str:
  """Markdown tables, one per bench kind."""
  out = []
  for kind in dict.fromkeys(r["bench"] for r in rows):
    rs = [r for r in rows if r["bench"] == kind]
    cols = list(dict.fromkeys(k for r in rs for k in r if k != "bench"))
    out.append(f"### {kind}\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rs:
      out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    out.append("")
  return "\n".join(out)


def check_args(a: argparse.Namespace) -> None:
  """Rejects bad flags before anything is built or compiled (InputError names the flag)."""
  from fedprune_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  from fedprune_jax.models import conformer  # pylint: disable=g-import-not-at-top

  if not 0.0 <= a.sparsity <= 1.0:  # also false for NaN
    raise InputError(f"--sparsity {a.sparsity} must lie in [0, 1]")
  if a.repeats < 1:
    raise InputError(f"--repeats {a.repeats} must be >= 1")
  for flag, preset in (("--preset", a.preset), ("--step-preset", a.step_preset)):
    if preset is not None and preset not in conformer.PRESETS:
      raise InputError(f"{flag} {preset!r} is not one of {sorted(conformer.PRESETS)}")
  try:
    pruning.parse_allocation(a.allocation)
    for p in a.patterns.split(","):
      pruning.parse_pattern(p)
  except ValueError as e:
    raise InputError(f"--patterns/--allocation: {e}") from e


def main(argv: Sequence[str] | None = None) -> list[dict]:
  ap = argparse.ArgumentParser(prog="fedprune bench prune", description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="l")
  ap.add_argument("--patterns", default=",".join(DEFAULT_PATTERNS))
  ap.add_argument("--allocation", default="global")
  ap.add_argument("--sparsity", type=float, default=0.5)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no-train-step", action="store_true")
  ap.add_argument("--no-compaction", action="store_true")
  ap.add_argument(
    "--step-preset",
    default=None,
    help="preset for the train-step / compaction parts (default: --preset)",
  )
  a = ap.parse_args(argv)
  check_args(a)
  rows = run(
    a.preset,
    tuple(a.patterns.split(",")),
    a.allocation,
    a.sparsity,
    a.repeats,
    not a.no_train_step,
    not a.no_compaction,
    a.step_preset,
  )
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  print(f"devices: {jax.devices()}  cpu_count: {os.cpu_count()}  loadavg: {load}")
  print(format_tables(rows))
  return rows


if __name__ == "__main__":
  main()
