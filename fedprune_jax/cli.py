"""The ``fedprune`` command line: corpus, train, eval, federated, bench, presets, demo.

Heavy modules (JAX, Flax, TensorFlow) are imported inside each command so that ``--help`` is
instant and the core never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import signal
import sys
import threading
from typing import Callable, Sequence


def _add_fresh_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--fresh",
    action="store_true",
    help="start over: discard the workdir's run state (checkpoints, log, results); needed to "
    "rerun a workdir with a different config (default: resume a run of the same config)",
  )


def _add_config_args(parser: argparse.ArgumentParser, default_config: str | None) -> None:
  parser.add_argument(
    "--config",
    default=default_config,
    help="config file (Python, defines get_config()) or a name in experiments/configs/ "
    + (
      f"(default: {default_config})"
      if default_config
      else "(default: the run's saved config.json beside the checkpoint, else tiny_centralized)"
    ),
  )
  parser.add_argument(
    "--set",
    dest="overrides",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override a config field, e.g. --set train.steps=200 (repeatable; `fedprune fields` "
    "lists every field with its default and allowed values)",
  )
  parser.add_argument(
    "--workdir", default=None, help="output directory (metrics.jsonl, checkpoints)"
  )
  parser.add_argument("--data", default=None, help="corpus root directory (overrides data.root)")


def _load(args: argparse.Namespace, writes_workdir: bool = True):
  """The validated config of a command; its workdir is created and proven writable up front."""
  from fedprune_jax import config as config_lib
  from fedprune_jax import io_utils

  cfg = config_lib.load_config(args.config, args.overrides)
  if getattr(args, "data", None):
    cfg.data.root = args.data
  if getattr(args, "workdir", None):
    cfg.workdir = args.workdir
  if writes_workdir:
    io_utils.ensure_writable_dir(cfg.workdir, "workdir")
  return cfg


# --- corpus -------------------------------------------------------------------------------------


def cmd_corpus_synth(args: argparse.Namespace) -> int:
  from fedprune_jax.data import synth

  # sizes not given on the command line are absent (argparse.SUPPRESS): the library's defaults
  sizes = {k: getattr(args, k) for k in ("speakers", "utterances", "vocab_size") if k in args}
  out = synth.synthesize_corpus(
    args.out, seed=args.seed, workers=args.workers, progress=not args.quiet, **sizes
  )
  print(f"corpus ready: {out}")
  return 0


def cmd_corpus_stats(args: argparse.Namespace) -> int:
  from fedprune_jax.data import librispeech

  print(f"{'split':<12} {'speakers':>8} {'utterances':>10}")
  for split_dir in librispeech.corpus_splits(args.dir):
    infos = librispeech.scan_split(split_dir)
    speakers = {info.speaker_id for info in infos}
    print(f"{split_dir.name:<12} {len(speakers):>8} {len(infos):>10}")
  return 0


# --- training / evaluation ----------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
  from fedprune_jax.train import centralized

  cfg = _load(args)
  result = centralized.train_and_evaluate(cfg, fresh=args.fresh)
  print(json.dumps(result["final"], indent=2, sort_keys=True))
  return 0


def cmd_eval(args: argparse.Namespace) -> int:
  from fedprune_jax import config as config_lib
  from fedprune_jax import task
  from fedprune_jax import validation
  from fedprune_jax.errors import InputError

  checkpoint = pathlib.Path(args.checkpoint)
  if not checkpoint.is_dir():
    what = "does not exist" if not checkpoint.exists() else "is not a directory"
    raise InputError(f"--checkpoint {str(checkpoint)!r} {what} (pass a checkpoint directory)")
  # The run's own config (model preset and overrides) when the checkpoint sits in a workdir.
  workdir = pathlib.Path(args.workdir or checkpoint.absolute().parent)
  saved = task.load_run_config(workdir)  # ConfigError if config.json is unreadable
  if saved is not None and args.config is None:
    cfg = saved
    source = str(workdir / "config.json")
    config_lib.apply_overrides(cfg, args.overrides, source=source)
    validation.validate(cfg, source=source)
    if args.data:
      cfg.data.root = args.data
  else:
    args.config = args.config or "tiny_centralized"
    cfg = _load(args, writes_workdir=False)
  metrics = task.evaluate_checkpoint(cfg, args.checkpoint, splits=args.splits)
  print(json.dumps(metrics, indent=2, sort_keys=True))
  return 0


def cmd_federated(args: argparse.Namespace) -> int:
  from fedprune_jax import job

  cfg = _load(args)
  result = job.run(cfg, fresh=args.fresh)
  print(json.dumps(result.get("final", {}), indent=2, sort_keys=True))
  return 0


def cmd_baseline(args: argparse.Namespace) -> int:
  from fedprune_jax import job

  result = job.run_baseline(_load(args), fresh=args.fresh)
  print(json.dumps(result["final"], indent=2, sort_keys=True))
  return 0


def cmd_presets(args: argparse.Namespace) -> int:
  from fedprune_jax.models import conformer

  print(conformer.param_table())
  return 0


def cmd_fields(args: argparse.Namespace) -> int:
  from fedprune_jax import fields

  print(fields.markdown_table() if args.markdown else fields.reference())
  return 0


def cmd_demo(args: argparse.Namespace) -> int:
  """Synthesizes the embedded corpus, runs dense federated training and federated pruning from
  one warm start, prints the comparison table."""
  from fedprune_jax import demo
  from fedprune_jax import job

  results = demo.run(args.workdir, args.data, args.overrides, fresh=args.fresh)
  print()
  print(job.format_comparison(results))
  return 0


# --- the paper's experiments --------------------------------------------------------------------


def cmd_experiment(args: argparse.Namespace) -> int:
  """Runs (resumes) experiments of the paper; prints the report of what is done."""
  from fedprune_jax import report
  from fedprune_jax import suite

  failed_by_experiment = suite.run_experiments(
    suite.EXPERIMENTS if args.names == ["all"] else args.names,
    args.runs,
    setting=args.setting,
    quick=args.quick,
    seeds=None if args.seeds is None else _parse_seeds(args.seeds),
    data_root=args.data,
    overrides=args.overrides,
    workers=args.workers,
    archive=args.archive,
  )
  failed = sum(failed_by_experiment.values())
  print(report.render(args.runs, args.report_dir))
  if failed:
    print(f"{failed} run(s) failed: see 'error' in {args.runs}/<experiment>.json", file=sys.stderr)
  return 1 if failed else 0


def _parse_seeds(text: str) -> list[int]:
  """``--seeds 0,1,2`` -> [0, 1, 2]; InputError for anything but non-negative integers."""
  from fedprune_jax.errors import InputError

  parts = [p.strip() for p in text.split(",")]
  if not all(p.isdigit() for p in parts):
    raise InputError(f"--seeds {text!r}: expected comma-separated integers >= 0, e.g. 0,1,2")
  return list(dict.fromkeys(int(p) for p in parts))


def cmd_archive(args: argparse.Namespace) -> int:
  from fedprune_jax import suite_archive

  counts = suite_archive.archive(args.runs, args.out)
  print(
    f"{args.out}: {counts['copied']} finished runs copied, {counts['present']} already there; "
    f"{counts['unfinished']} not finished in {args.runs}"
  )
  return 0


def cmd_report(args: argparse.Namespace) -> int:
  from fedprune_jax import report

  print(report.render(args.runs, args.out))
  return 0


# --- benchmarks ---------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
  import importlib

  module = importlib.import_module(f"fedprune_jax.bench.{args.which}")
  module.main(args.bench_args)
  return 0


# --- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="fedprune", description="Federated pruning of Conformer speech recognizers (JAX/Flax)."
  )
  sub = parser.add_subparsers(dest="command", required=True)

  corpus = sub.add_parser("corpus", help="make or inspect a LibriSpeech-layout corpus")
  corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True)
  synth_p = corpus_sub.add_parser("synth", help="write the embedded synthetic multi-speaker corpus")
  synth_p.add_argument(
    "--out", required=True, help="output root (gets train/ dev/ test/ SPEAKERS.TXT)"
  )
  synth_p.add_argument(
    "--speakers", type=int, default=argparse.SUPPRESS, help="number of speakers (default: 48)"
  )
  synth_p.add_argument(
    "--utterances", type=int, default=argparse.SUPPRESS, help="utterances per speaker (default: 40)"
  )
  synth_p.add_argument(
    "--vocab-size",
    type=int,
    default=argparse.SUPPRESS,
    help="words in the Zipfian vocabulary (default: 2000; e.g. 30 for a quick-to-learn corpus)",
  )
  synth_p.add_argument("--seed", type=int, default=0)
  synth_p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
  synth_p.add_argument("--quiet", action="store_true", help="no progress bar")
  synth_p.set_defaults(func=cmd_corpus_synth)
  stats_p = corpus_sub.add_parser("stats", help="count speakers and utterances per split")
  stats_p.add_argument("dir", help="corpus root or one split directory")
  stats_p.set_defaults(func=cmd_corpus_stats)

  train_p = sub.add_parser("train", help="centralized training + dev/test evaluation")
  _add_config_args(train_p, "tiny_centralized")
  _add_fresh_arg(train_p)
  train_p.set_defaults(func=cmd_train)

  eval_p = sub.add_parser("eval", help="evaluate a checkpoint (WER/CER)")
  _add_config_args(eval_p, None)
  eval_p.add_argument("--checkpoint", required=True, help="checkpoint directory written by train")
  eval_p.add_argument("--splits", nargs="+", default=["dev", "test"])
  eval_p.set_defaults(func=cmd_eval)

  fed_p = sub.add_parser("federated", help="federated training rounds (vmap executor)")
  _add_config_args(fed_p, "tiny_federated")
  _add_fresh_arg(fed_p)
  fed_p.set_defaults(func=cmd_federated)

  base_p = sub.add_parser(
    "baseline", help="centralized pruning with a federated pruning config's policy (by steps)"
  )
  _add_config_args(base_p, "fedprune_tiny")
  _add_fresh_arg(base_p)
  base_p.set_defaults(func=cmd_baseline)

  presets_p = sub.add_parser("presets", help="print Conformer presets and their parameter counts")
  presets_p.set_defaults(func=cmd_presets)

  fields_p = sub.add_parser("fields", help="every config field: default, allowed values, meaning")
  fields_p.add_argument("--markdown", action="store_true", help="the README's table")
  fields_p.set_defaults(func=cmd_fields)

  demo_p = sub.add_parser("demo", help="synthesize the corpus, train, print the WER table")
  demo_p.add_argument("--data", default="data", help="where the corpus is written (default: data/)")
  demo_p.add_argument("--workdir", default="runs/demo")
  demo_p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  _add_fresh_arg(demo_p)
  demo_p.set_defaults(func=cmd_demo)

  exp_p = sub.add_parser(
    "experiment", help="run (resume) the paper's tables T1-T6 as a cached suite of runs"
  )
  exp_p.add_argument(
    "names", nargs="+", help="experiments (t1_pattern ... t6_data, see experiments/configs) or all"
  )
  exp_p.add_argument(
    "--runs", default="runs/paper", help="runs directory (cache; default: %(default)s)"
  )
  exp_p.add_argument(
    "--data",
    default=None,
    help="small setting: where the embedded corpus is (made if absent; default data/); "
    "full setting: the LibriSpeech root",
  )
  exp_p.add_argument("--setting", default="small", choices=["small", "full"])
  exp_p.add_argument("--quick", action="store_true", help="1 seed, 4 rounds, short warm start")
  exp_p.add_argument(
    "--seeds",
    default=None,
    help="comma-separated seeds (default: the experiment's seeds and, for the claims' arms, its "
    "claim seeds; every split replicate)",
  )
  exp_p.add_argument(
    "--workers",
    type=int,
    default=1,
    help="runs side by side, each in a process pinned to its own CPU cores (default: 1; on a "
    "CPU, one per core is fastest for the small setting; on an accelerator keep 1)",
  )
  exp_p.add_argument("--report-dir", default=None, help="default: RUNS/report")
  exp_p.add_argument(
    "--archive",
    default=None,
    help="a `fedprune archive` directory (e.g. in git): its finished runs are restored into "
    "RUNS first, and each run is archived there as it finishes (same --data path: it is in the "
    "runs' keys)",
  )
  exp_p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  exp_p.set_defaults(func=cmd_experiment)

  report_p = sub.add_parser("report", help="markdown tables and PNG plots of a runs directory")
  report_p.add_argument("runs", help="runs directory of `fedprune experiment`")
  report_p.add_argument("--out", default=None, help="output directory (default: RUNS/report)")
  report_p.set_defaults(func=cmd_report)
  archive_p = sub.add_parser(
    "archive",
    help="slim copies of a runs directory's finished runs (results, no checkpoints): to keep in "
    "git, render with `fedprune report`, or put back into a runs directory to resume a suite",
  )
  archive_p.add_argument("runs", help="runs directory (or archive) to copy from")
  archive_p.add_argument("--out", required=True, help="archive (or runs directory) to copy into")
  archive_p.set_defaults(func=cmd_archive)

  bench_p = sub.add_parser("bench", help="benchmarks (each prints ratios measured in one run)")
  bench_p.add_argument(
    "which",
    choices=["step", "prune", "engine", "synth", "fedprune", "fedround"],
    help="step: train-step FLOP/s vs matmul peak; prune: mask computation speed; "
    "engine: federated executors side by side; synth: corpus synthesis speed; "
    "fedprune: federated pruning round and mask update vs dense FedAvg; "
    "fedround: useful frames/s of a federated round vs a centralized step",
  )
  bench_p.add_argument(
    "bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see --help)"
  )
  bench_p.set_defaults(func=cmd_bench)
  return parser


def error_line(exc: BaseException) -> str | None:
  """The one line a bad-input exception is reported as, or None for a bug (keeps its traceback).

  Bad input is one of our error types (config, corpus, arguments and outputs), a missing file,
  or an operating-system error behind any exception (disk full, read-only or odd path), which
  libraries such as orbax wrap in their own exceptions.
  """
  from fedprune_jax import config as config_lib
  from fedprune_jax import errors
  from fedprune_jax.data.records import CorpusError

  if isinstance(exc, (config_lib.ConfigError, CorpusError, errors.InputError)):
    return str(exc).replace("\n", " ")
  return errors.environment_failure(exc)


class _ReportedByMain(logging.Filter):
  """Drops a library's log record of an exception that ``main`` reports as one line anyway.

  orbax logs a failed background write (disk full) with its traceback before re-raising it.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return exc is None or error_line(exc) is None


INTERRUPTED = "fedprune: interrupted"


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
  """Runs a command; bad input becomes one ``fedprune: error:`` line and exit code 2."""
  log_filter = _ReportedByMain()
  loggers = [logging.getLogger(), logging.getLogger("absl")]
  for logger in loggers:
    logger.addFilter(log_filter)
  try:
    return func(args)
  except KeyboardInterrupt:
    print(INTERRUPTED, file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    line = error_line(e)
    if line is None:
      raise
    print(f"fedprune: error: {line}", file=sys.stderr)
    return 2
  finally:
    for logger in loggers:
      logger.removeFilter(log_filter)


def _exit_on_interrupt(signum, frame) -> None:
  """SIGINT handler: one line and exit 130, wherever the process is (a KeyboardInterrupt raised
  inside a library's callback, e.g. JAX's garbage-collection hook, would be swallowed there).
  Files are written atomically and the workdir lock dies with the process."""
  del signum, frame
  sys.stderr.write(INTERRUPTED + "\n")
  sys.stderr.flush()
  os._exit(130)


def main(argv: Sequence[str] | None = None) -> int:
  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGINT, _exit_on_interrupt)
  try:
    code = _main(argv)
  finally:
    if previous is not None:
      signal.signal(signal.SIGINT, previous)
  if code and argv is None:
    # the program ends here: what background threads of a failed write (orbax after a full
    # disk) still print while the process exits would follow the one error line; drop it
    sys.stderr.flush()
    logging.disable(logging.CRITICAL)
    sys.stderr = open(os.devnull, "w", encoding="utf-8")  # pylint: disable=consider-using-with
  return code


def _main(argv: Sequence[str] | None) -> int:
  try:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in ("corpus",):
      from fedprune_jax import programs  # pylint: disable=g-import-not-at-top

      programs.enable_compilation_cache()
    return run_command(args.func, args)
  except KeyboardInterrupt:  # Ctrl-C before the command runs (e.g. while JAX is imported)
    print(INTERRUPTED, file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
