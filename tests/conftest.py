"""Shared fixtures: a tiny synthetic corpus (data we make, read by the real loaders)."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):  # pylint: disable=unused-argument
  """XLA's persistent compilation cache for every test, as the CLI has it (each xdist worker and
  each subprocess share it): the suite is compile-bound, its micro models compile the same
  small programs in many tests, and a second ``make test`` finds all of them compiled. Programs
  that compile in under 2 s (nearly all here) are kept too. ``FEDPRUNE_JAX_CACHE=<empty dir>``
  measures a cold run, ``FEDPRUNE_JAX_CACHE=`` turns the cache off. A cache hit returns the
  executable XLA compiled for the same program, so no result depends on it."""
  from fedprune_jax import programs  # pylint: disable=g-import-not-at-top

  os.environ.setdefault("FEDPRUNE_JAX_CACHE_MIN_SECONDS", "0")
  programs.enable_compilation_cache()
  import jax  # pylint: disable=g-import-not-at-top

  if jax.config.jax_compilation_cache_dir:  # subprocesses that are not the CLI (JAX reads these)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  # Under xdist (`make test`: -n 2) a worker takes a whole test file at a time, in the order of
  # SLOW_FIRST: a module-scoped fixture is built once, and the longest files start first.
  if getattr(config.option, "dist", "no") == "load":
    config.option.dist = "loadfile"
    config.option.loadscopereorder = False  # keep our order (xdist's own: most tests first)


# The test files with the most seconds, most first (measured one file at a time on 2 cores; the
# rest follow in collection order). With `pytest -n 2` each worker takes the next file when it is
# almost done with its last one, so the long files start first and the many short ones fill in
# behind them: neither worker is left alone with a long file at the end (the longest-first rule).
SLOW_FIRST = (
  "test_compact_clients.py",
  "test_federated_job.py",
  "test_paper_design.py",
  "test_suite.py",
  "test_reliability.py",
  "test_asr.py",
  "test_conformer.py",
  "test_federated_distributed.py",
  "test_federated_faults.py",
  "test_rnnt_train.py",
  "test_federated_engine.py",
  "test_fedprune.py",
  "test_rnnt.py",
  "test_bench_step.py",
  "test_cli.py",
)


def _rank(item) -> int:
  name = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
  return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Longest files first (``SLOW_FIRST``), each file's tests in their order."""
  items.sort(key=_rank)  # stable


def pytest_runtest_teardown(item, nextitem):
  """After a test file's last test (in this process), the process forgets its programs: shared
  run programs and JAX's in-memory executables (``programs.release``, which a suite worker over
  its memory budget calls too). Without this an xdist worker holds every program of every file it ran: 6.5 GB resident by
  mid-suite, and two suites side by side (plus one training run) were OOM-killed on a 24 GB
  machine. The next file that needs a program finds it in XLA's persistent cache."""
  if nextitem is not None and nextitem.path == item.path:
    return
  from fedprune_jax import programs  # pylint: disable=g-import-not-at-top

  programs.release()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
  """6 speakers x 4 utterances in LibriSpeech layout: 4 train, 1 dev, 1 test speaker."""
  from fedprune_jax.data import synth  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("corpus") / "synth"
  return synth.synthesize_corpus(root, speakers=6, utterances=4, seed=3, workers=1, progress=False)


@pytest.fixture(scope="session")
def small_vocab_corpus(tmp_path_factory):
  """40 speakers x 8 utterances over a 30-word vocabulary: 32 train, 4 dev, 4 test speakers.

  Small enough for a test to learn words (not only characters) on CPU within a minute.
  """
  from fedprune_jax.data import synth  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("corpus_v30") / "synth"
  return synth.synthesize_corpus(
    root, speakers=40, utterances=8, seed=5, workers=2, progress=False, vocab_size=30
  )


# A Conformer small enough that a test compiles it in seconds.
MICRO_MODEL = dict(
  d_model=32,
  num_layers=1,
  num_heads=2,
  conv_kernel=3,
  conv_groups=4,
  subsample_channels=8,
  dropout_rate=0.0,
)

# Between MICRO_MODEL and the `tiny` preset: learns words of a small vocabulary in ~100 rounds.
MINI_MODEL = dict(
  d_model=64,
  num_layers=2,
  num_heads=4,
  conv_kernel=3,
  conv_groups=4,
  subsample_channels=16,
  dropout_rate=0.0,
)


def toy_store(num_clients: int, seed: int = 0, min_examples: int = 2, **kw):
  """Synthetic clients for the toy model: 3 examples a step, 5 frames x 4 features, 3 classes."""
  from fedprune_jax.federated import client_data  # pylint: disable=g-import-not-at-top

  args = dict(
    batch_size=3,
    min_examples=min_examples,
    max_examples=7,
    num_frames=5,
    feature_dim=4,
    label_len=2,
    num_classes=3,
    seed=seed,
  )
  return client_data.SyntheticClientStore(num_clients, **{**args, **kw})


def read_scalars(logdir) -> dict[str, dict[int, float]]:
  """TensorBoard scalars of every event file in ``logdir``: {tag: {step: value}} (a later event
  of the same tag and step wins). Reads the TFRecord framing (length, crc, event, crc) itself."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top

  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  out: dict[str, dict[int, float]] = {}
  for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def write_finished_run(workdir, results: dict) -> None:
  """What a finished run leaves for the suite and the report (for tests' fake runners):
  ``results.json``, the final checkpoint's metadata, a (placeholder) ``mask.npz`` that other
  arms may start from, and the completion marker."""
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top

  from fedprune_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  (workdir / "checkpoint").mkdir(parents=True, exist_ok=True)
  (workdir / "checkpoint" / "_CHECKPOINT_METADATA").write_text("{}")
  (workdir / "mask.npz").write_bytes(b"")
  (workdir / "results.json").write_text(json.dumps(results))
  workdir_lib.mark_done(workdir)


def fake_results(test_wer: float, sparsity: float = 0.0) -> dict:
  """A run's ``results.json`` with the fields the suite and the report read."""
  final = {s: {"wer": test_wer, "cer": test_wer / 2, "loss": 1.0} for s in ("dev", "test")}
  return {"final": final, "train": {"sparsity": sparsity}, "history": []}


def toy_experiment(arms, **kw):
  """An experiment of the small setting with the given arms (for the suite's tests)."""
  from fedprune_jax import suite  # pylint: disable=g-import-not-at-top

  return suite.Experiment(
    name="toy", title="toy", question="?", base=suite.setting_config("small"), arms=arms, **kw
  )
