"""Benchmark of the synthetic corpus writer: 1 worker vs N workers.

Each configuration writes a fresh corpus under ``out_dir`` (removed after
timing unless ``keep``); reports utterances/s and audio-seconds/s.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from fedprune_jax.data import synth


def _time_one(
  root: Path, *, speakers: int, utterances: int, workers: int, seed: int, keep: bool
) -> dict:
  out = root / f"w{workers}"
  shutil.rmtree(out, ignore_errors=True)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  start, cpu_start = time.perf_counter(), time.process_time()
  synth.synthesize_corpus(
    out, speakers=speakers, utterances=utterances, seed=seed, workers=workers, progress=False
  )
  seconds = time.perf_counter() - start
  # With 1 worker all rendering runs in this process, so its CPU time is the
  # load-independent cost; with N workers it would miss the workers' time.
  cpu_seconds = time.process_time() - cpu_start if workers == 1 else None
  manifest = synth.read_manifest(out)
  if not keep:
    shutil.rmtree(out, ignore_errors=True)
  n = manifest["files"]
  return {
    "workers": workers,
    "utterances": n,
    "seconds": seconds,
    "utterances_per_s": n / seconds,
    "audio_seconds": manifest["audio_seconds"],
    "audio_seconds_per_s": manifest["audio_seconds"] / seconds,
    "cpu_seconds": cpu_seconds,
    "utterances_per_cpu_s": n / cpu_seconds if cpu_seconds else None,
    "load_avg_1min_before": load,
  }


def run(
  out_dir: str | os.PathLike,
  speakers: int = synth.DEFAULT_SPEAKERS,
  utterances: int = synth.DEFAULT_UTTERANCES,
  workers: int | None = None,
  *,
  seed: int = 0,
  keep: bool = False,
  verbose: bool = True,
) -> dict:
  """Times corpus synthesis with 1 and ``workers`` processes.

  Args:
    out_dir: scratch directory (``w1/``, ``wN/`` are written below it).
    speakers, utterances: corpus size (utterances per speaker).
    workers: N (None: all CPUs).
    seed: corpus seed.
    keep: keep the written corpora.
    verbose: print a table.

  Returns:
    {"rows": [per-configuration dicts], "speedup": t1 / tN, ...}.
  """
  root = Path(out_dir)
  root.mkdir(parents=True, exist_ok=True)
  n_workers = workers or os.cpu_count() or 1
  counts = [1] if n_workers == 1 else [1, n_workers]
  rows = [
    _time_one(root, speakers=speakers, utterances=utterances, workers=w, seed=seed, keep=keep)
    for w in counts
  ]
  result = {
    "speakers": speakers,
    "utterances_per_speaker": utterances,
    "cpu_count": os.cpu_count(),
    "rows": rows,
    "speedup": rows[0]["seconds"] / rows[-1]["seconds"],
  }
  if verbose:
    print(
      f"synthetic corpus: {speakers} speakers x {utterances} utterances ({os.cpu_count()} CPUs)"
    )
    print(
      f"{'workers':>7} {'seconds':>8} {'utt/s':>8} {'audio s/s':>10} {'utt/cpu-s':>10} {'load':>5}"
    )
    for r in rows:
      per_cpu = r["utterances_per_cpu_s"]
      load = r["load_avg_1min_before"]
      print(
        f"{r['workers']:>7} {r['seconds']:>8.2f} "
        f"{r['utterances_per_s']:>8.1f} {r['audio_seconds_per_s']:>10.1f} "
        f"{'-' if per_cpu is None else f'{per_cpu:.1f}':>10} "
        f"{'-' if load is None else f'{load:.1f}':>5}"
      )
    print(f"speedup {counts[-1]} vs 1 worker: {result['speedup']:.2f}x")
  return result


def main(argv=None) -> dict:
  """``fedprune bench synth [--speakers N] [--utterances M] [--workers W] [--out DIR]``."""
  import argparse  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
    prog="fedprune bench synth", description="corpus synthesis speed, 1 worker vs N workers"
  )
  parser.add_argument("--speakers", type=int, default=synth.DEFAULT_SPEAKERS)
  parser.add_argument("--utterances", type=int, default=synth.DEFAULT_UTTERANCES)
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--out", default=None, help="scratch directory (default: a temporary one)")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="fedprune-bench-synth-") as tmp:
    return run(
      args.out or tmp, speakers=args.speakers, utterances=args.utterances, workers=args.workers
    )
