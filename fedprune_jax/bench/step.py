"""`fedprune bench step`: one full Conformer train step per preset (and head).

The step is value_and_grad of ``AsrModel.loss`` + an optax Adam update,
jitted with params/optimizer state donated.  For each preset it reports the
step time, FLOP/s achieved with two FLOP counts -- XLA's cost analysis of the
compiled step (everything XLA executes) and the analytic encoder FLOPs
(matmuls/convs only, i.e. MFU) -- and both as a fraction of the f32 matmul
peak measured in the same run.  Memory is XLA's buffer assignment of the
compiled step (arguments + outputs + temporaries - donated aliases), i.e. the
step's peak device memory.  With ``--heads ctc,rnnt`` every preset runs with
both heads and the RNN-T rows give step time and memory relative to CTC.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedprune_jax import io_utils
from fedprune_jax.algorithms import centralized
from fedprune_jax.models import flops as flops_lib
from fedprune_jax.bench import peak as peak_lib
from fedprune_jax.models import asr
from fedprune_jax.models import conformer


def synthetic_batch(
  batch_size: int,
  frames: int,
  input_dim: int = 80,
  vocab_size: int = 29,
  seed: int = 0,
  labels_len: int | None = None,
) -> dict[str, jax.Array]:
  """A random batch in the project's batch format (default ~1 label per 4 output frames)."""
  rng = np.random.default_rng(seed)
  labels_len = labels_len or max(1, frames // 16)
  # Lengths between 75% and 100% of the frames so padding is exercised.
  lengths = rng.integers(int(0.75 * frames), frames + 1, batch_size)
  fpad = (np.arange(frames)[None, :] >= lengths[:, None]).astype(np.float32)
  feats = rng.normal(size=(batch_size, frames, input_dim)).astype(np.float32)
  return {
    "features": jnp.asarray(feats * (1.0 - fpad[..., None])),
    "feature_paddings": jnp.asarray(fpad),
    "labels": jnp.asarray(rng.integers(1, vocab_size, (batch_size, labels_len)), jnp.int32),
    "label_paddings": jnp.zeros((batch_size, labels_len), jnp.float32),
    "weights": jnp.ones((batch_size,), jnp.float32),
  }


def make_train_step(model: asr.AsrModel, optimizer: optax.GradientTransformation):
  """(params, opt_state, batch, rng) -> (params, opt_state, loss); donated, jitted (the
  project's one training step, ``centralized.train_step``, on the model's loss, no SpecAugment)."""

  def step(params, opt_state, batch, rng):
    loss_fn = lambda p, b, r: model.loss(p, b, r, True)  # noqa: E731
    params, opt_state, loss, _, _ = centralized.train_step(
      loss_fn, optimizer, params, opt_state, batch, rng
    )
    return params, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def memory_bytes(compiled) -> int | None:
  """Peak memory of a compiled computation from XLA's buffer assignment (None if unknown)."""
  try:
    m = compiled.memory_analysis()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  if m is None:
    return None
  return int(
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def bench_preset(
  model: asr.AsrModel,
  batch_size: int,
  frames: int,
  steps: int,
  warmup: int = 1,
  seed: int = 0,
  labels: int | None = None,
) -> dict:
  """Times ``steps`` train steps of ``model`` (after compile + warm-up)."""
  batch = synthetic_batch(batch_size, frames, model.config.input_dim, seed=seed, labels_len=labels)
  params = model.init(jax.random.PRNGKey(seed))
  optimizer = optax.adam(1e-4)
  opt_state = optimizer.init(params)
  step = make_train_step(model, optimizer)
  rng = jax.random.PRNGKey(seed + 1)

  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  xla_flops = flops_lib.cost_analysis_flops(compiled)
  model_flops = flops_lib.conformer_flops(model.config, batch_size, frames, train=True)
  for i in range(warmup):
    params, opt_state, loss = compiled(params, opt_state, batch, jax.random.fold_in(rng, i))
  loss.block_until_ready()
  times, cpu_times = [], []
  for i in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    params, opt_state, loss = compiled(
      params, opt_state, batch, jax.random.fold_in(rng, warmup + i)
    )
    loss.block_until_ready()
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  step_s = float(np.median(times))
  return {
    "params": conformer.count_params(params),
    "batch_size": batch_size,
    "frames": frames,
    "labels": int(batch["labels"].shape[1]),
    "memory_bytes": memory_bytes(compiled),
    "compile_s": compile_s,
    "step_s": step_s,
    "step_s_min": float(min(times)),
    # CPU seconds of this process per step (all threads): on a shared
    # machine, wall time inflates with other jobs' load, CPU time much less.
    "step_cpu_s": float(np.median(cpu_times)),
    "loss": float(loss),
    "xla_flops": xla_flops,
    "model_flops": model_flops,
    "xla_flop_s": xla_flops / step_s if xla_flops else None,
    "model_flop_s": model_flops / step_s,
  }


def run(
  presets: Sequence[str] = ("tiny", "s"),
  batch_size: int = 8,
  frames: int = 800,
  steps: int = 5,
  *,
  dtype: str = "float32",
  peak_n: int | None = None,
  config_overrides: dict | None = None,
  heads: Sequence[str] = ("ctc",),
  head_options: dict | None = None,
  labels: int | None = None,
  verbose: bool = True,
) -> list[dict]:
  """Benchmarks one train step per preset and head; returns one dict per (preset, head).

  Args:
    presets: Conformer preset names (or ConformerConfig objects).
    batch_size, frames: batch shape (frames of 10 ms; 800 = 8 s of audio).
    steps: timed steps (median reported).
    dtype: compute dtype of the model ('float32' or 'bfloat16').
    peak_n: matmul size of the peak measurement (default per backend).
    config_overrides: extra ConformerConfig fields for every preset.
    heads: output heads ('ctc', 'rnnt'); non-CTC rows get ``step_vs_ctc`` and
      ``memory_vs_ctc`` ratios when 'ctc' is also benchmarked.
    head_options: fields of the RNN-T head (``RnntHead``), e.g. {'joint_chunk': 0}.
    labels: label positions per example (default frames // 16).
    verbose: print a table.
  """
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  peak_dtype = jnp.float32 if dtype == "float32" else jnp.bfloat16
  peak, peak_cpu = peak_lib.measure_matmul_peak(peak_dtype, n=peak_n, return_cpu=True)
  rows = []
  for preset, head in itertools.product(presets, heads):
    opts = head_options if head != "ctc" else None
    model = asr.make_asr_model(
      preset, head=head, head_options=opts, dtype=dtype, **(config_overrides or {})
    )
    row = {
      "preset": preset if isinstance(preset, str) else "custom",
      "head": head,
      "dtype": dtype,
      "backend": jax.default_backend(),
      "load_avg_1min": load,
    }
    row.update(bench_preset(model, batch_size, frames, steps, labels=labels))
    row["peak_flop_s"] = peak
    row["model_vs_peak"] = row["model_flop_s"] / peak
    # Same ratio on process CPU time (numerator and denominator), robust to load.
    row["peak_flop_cpu_s"] = peak_cpu
    row["model_vs_peak_cpu"] = (row["model_flops"] / row["step_cpu_s"]) / peak_cpu
    row["xla_vs_peak"] = row["xla_flop_s"] / peak if row["xla_flop_s"] else None
    rows.append(row)
  peak_after = peak_lib.measure_matmul_peak(peak_dtype, n=peak_n)
  load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  for row in rows:
    row["peak_flop_s_after"] = peak_after
    row["load_avg_1min_after"] = load_after
    ctc = [r for r in rows if r["head"] == "ctc" and r["preset"] == row["preset"]]
    if row["head"] != "ctc" and ctc:
      row["step_vs_ctc"] = row["step_s"] / ctc[0]["step_s"]
      mem, ctc_mem = row["memory_bytes"], ctc[0]["memory_bytes"]
      row["memory_vs_ctc"] = mem / ctc_mem if mem and ctc_mem else None
  if verbose:
    print(format_table(rows))
  return rows


def format_table(rows: Sequence[dict]) -> str:
  """Markdown table of ``run`` results."""
  g = lambda x: "-" if x is None else f"{x / 1e9:.1f}"  # noqa: E731
  pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
  mib = lambda x: "-" if x is None else f"{x / 2**20:.0f}"  # noqa: E731
  ratio = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
  out = [
    "| preset | head | params | B x T x U | compile s | step s | step vs CTC | memory MiB | "
    "memory vs CTC | model GFLOP/step | model GFLOP/s | XLA GFLOP/s | peak GFLOP/s | "
    "model/peak | XLA/peak | CPU s/step | model/peak (CPU time) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    out.append(
      f"| {r['preset']} | {r.get('head', 'ctc')} | {r['params'] / 1e6:.2f}M | "
      f"{r['batch_size']}x{r['frames']}x{r.get('labels', '-')} | "
      f"{r['compile_s']:.1f} | {r['step_s']:.3f} | {ratio(r.get('step_vs_ctc'))} | "
      f"{mib(r.get('memory_bytes'))} | {ratio(r.get('memory_vs_ctc'))} | "
      f"{r['model_flops'] / 1e9:.1f} | "
      f"{g(r['model_flop_s'])} | {g(r['xla_flop_s'])} | {g(r['peak_flop_s'])} | "
      f"{pct(r['model_vs_peak'])} | {pct(r['xla_vs_peak'])} | "
      f"{r['step_cpu_s']:.2f} | {pct(r['model_vs_peak_cpu'])} |"
    )
  if rows:
    r = rows[0]
    out.append(
      f"\nbackend={r['backend']} dtype={r['dtype']} load(1min) before/after="
      f"{r['load_avg_1min']}/{r['load_avg_1min_after']} "
      f"peak before/after={g(r['peak_flop_s'])}/{g(r['peak_flop_s_after'])} GFLOP/s"
    )
  return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(prog="fedprune bench step", description=__doc__.split("\n")[0])
  p.add_argument("--presets", default="tiny,s", help="comma-separated preset names")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--frames", type=int, default=800)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--peak-n", type=int, default=None)
  p.add_argument("--heads", default="ctc", help="comma-separated heads: ctc, rnnt")
  p.add_argument("--labels", type=int, default=None, help="labels per example (frames // 16)")
  p.add_argument(
    "--joint-chunk",
    type=int,
    default=None,
    help="RNN-T joint frames per chunk (default: fit the head's budget; 0 = unchunked)",
  )
  p.add_argument("--json", default=None, help="write the rows to this JSON file")
  args = p.parse_args(argv)
  rows = run(
    args.presets.split(","),
    args.batch_size,
    args.frames,
    args.steps,
    dtype=args.dtype,
    peak_n=args.peak_n,
    heads=args.heads.split(","),
    head_options=None if args.joint_chunk is None else {"joint_chunk": args.joint_chunk},
    labels=args.labels,
  )
  if args.json:
    io_utils.write_json_atomic(args.json, rows)
  return rows


if __name__ == "__main__":
  main()
