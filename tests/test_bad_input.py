"""Every kind of bad input gets one `fedprune: error:` line naming the file or field, exit 2.

The cases run in-process through `cli.main` and fail at validation, before any data is read or
anything is compiled; two run as real subprocesses to check the process's exit path too.
"""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys

import pytest

from fedprune_jax import cli

NAN_CONFIG = """
from fedprune_jax import config as config_lib


def get_config():
  c = config_lib.load_config("tiny_federated")
  c.client.learning_rate = float("nan")
  return c
"""

BROKEN_CONFIG = "def get_config():\n  return 1 / 0\n"


def _file(tmp: pathlib.Path, name: str = "afile", text: str = "x") -> str:
  path = tmp / name
  path.write_text(text)
  return str(path)


def _read_only_dir(tmp: pathlib.Path) -> str:
  """A directory this process cannot write into (root ignores mode bits: use sysfs)."""
  if os.geteuid() != 0:
    path = tmp / "ro"
    path.mkdir()
    path.chmod(0o555)
    return str(path / "run")
  path = pathlib.Path("/sys/fedprune_test_workdir")
  try:
    path.mkdir()
  except OSError:
    return str(path)
  path.rmdir()
  pytest.skip("no read-only location for root on this machine")


# (id, argv given tmp_path, texts the one line must contain)
CASES = [
  # Silent wrong behaviour before issue 15.
  ("negative-rounds", lambda t: ["federated", "--set", "rounds=-1"], ["rounds=-1", ">= 0"]),
  ("negative-steps", lambda t: ["train", "--set", "train.steps=-5"], ["train.steps=-5", ">= 1"]),
  (
    "nan-lr-in-config-file",
    lambda t: ["federated", "--config", _file(t, "nan_lr.py", NAN_CONFIG)],
    ["nan_lr.py", "client.learning_rate=nan", "finite"],
  ),
  (
    "inf-lr-override",
    lambda t: ["federated", "--set", "client.learning_rate=1e999"],
    ["client.learning_rate=inf"],
  ),
  ("sparsity-above-1", lambda t: ["bench", "prune", "--sparsity", "1.5"], ["--sparsity 1.5"]),
  # Tracebacks before issue 15.
  (
    "chunk-size-0",
    lambda t: ["federated", "--set", "engine.chunk_size=0"],
    ["engine.chunk_size=0", ">= 1"],
  ),
  (
    "unknown-preset",
    lambda t: ["train", "--set", "model.preset='xl'"],
    ["model.preset='xl'", "'tiny'"],
  ),
  (
    "unknown-server-optimizer",
    lambda t: ["federated", "--set", "server.optimizer='adamw'"],
    ["server.optimizer='adamw'", "'fedadam'"],
  ),
  (
    "unknown-pruning-pattern",
    lambda t: ["bench", "prune", "--patterns", "row,diagonal"],
    ["unknown pruning pattern 'diagonal'"],
  ),
  ("unknown-bench-preset", lambda t: ["bench", "prune", "--preset", "xl"], ["--preset 'xl'"]),
  ("workdir-is-a-file", lambda t: ["train", "--workdir", _file(t)], ["afile", "not a directory"]),
  (
    "workdir-under-a-file",
    lambda t: ["federated", "--workdir", _file(t) + "/run"],
    ["afile/run", "not writable"],
  ),
  (
    "read-only-workdir",
    lambda t: ["train", "--workdir", _read_only_dir(t)],
    ["workdir", "not writable"],
  ),
  ("corpus-stats-on-a-file", lambda t: ["corpus", "stats", _file(t)], ["afile", "not a directory"]),
  (
    "corpus-stats-missing",
    lambda t: ["corpus", "stats", str(t / "none")],
    ["none", "does not exist"],
  ),
  (
    "eval-checkpoint-is-a-file",
    lambda t: ["eval", "--checkpoint", _file(t)],
    ["--checkpoint", "afile", "not a directory"],
  ),
  (
    "eval-checkpoint-missing",
    lambda t: ["eval", "--checkpoint", str(t / "none")],
    ["--checkpoint", "does not exist"],
  ),
  # Cross-field rules.
  (
    "vmap-size-above-chunk",
    lambda t: ["federated", "--set", "engine.vmap_size=16"],
    ["engine.vmap_size=16 must be <= engine.chunk_size=1"],
  ),
  (
    "chunk-not-multiple-of-devices",
    lambda t: ["federated", "--set", "engine.num_devices=3"],
    ["engine.chunk_size=1 must be a multiple of engine.num_devices=3"],
  ),
  (
    "unknown-pruning-pattern-in-config",
    lambda t: ["federated", "--config", "fedprune_tiny", "--set", "pruning.pattern='diagonal'"],
    ["pruning.pattern='diagonal'", "unknown pruning pattern"],
  ),
  (
    "pruning-phases-longer-than-rounds",
    lambda t: ["federated", "--config", "fedprune_tiny", "--set", "pruning.refining_rounds=30"],
    ["pruning.pruning_rounds=20 + pruning.refining_rounds=30 must be <= rounds=40"],
  ),
  # Already one line before issue 15: kept so.
  ("unknown-field", lambda t: ["train", "--set", "train.stepz=1"], ["has no field 'train.stepz'"]),
  ("not-key-value", lambda t: ["train", "--set", "train.steps"], ["not of the form key=value"]),
  ("wrong-type", lambda t: ["train", "--set", "train.steps='many'"], ["train.steps"]),
  ("leaf-as-section", lambda t: ["train", "--set", "seed.x=1"], ["'seed' is not a section"]),
  (
    "missing-config",
    lambda t: ["train", "--config", "nosuch"],
    ["config file not found: 'nosuch'"],
  ),
  (
    "broken-config",
    lambda t: ["train", "--config", _file(t, "broken.py", BROKEN_CONFIG)],
    ["broken.py", "ZeroDivisionError"],
  ),
  (
    "missing-corpus",
    lambda t: ["train", "--data", str(t / "none"), "--workdir", str(t / "w")],
    ["has no split directory 'train'"],
  ),
  (
    "synth-zero-speakers",
    lambda t: ["corpus", "synth", "--out", str(t / "c"), "--speakers", "0"],
    ["speakers=0"],
  ),
  (
    "synth-out-is-a-file",
    lambda t: ["corpus", "synth", "--out", _file(t)],
    ["afile", "not a directory"],
  ),
]


@pytest.mark.parametrize("argv_of, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_it(argv_of, expected, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)  # default workdirs (runs/...) land here
  monkeypatch.setenv("FEDPRUNE_JAX_CACHE", "")
  argv = argv_of(tmp_path)
  assert cli.main(argv) == 2
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1, captured.err
  assert lines[0].startswith("fedprune: error: ")
  for text in expected:
    assert text in lines[0], lines[0]
  assert "Traceback" not in captured.err + captured.out


def test_disk_full_inside_a_library_is_one_line(tmp_path, capsys, monkeypatch):
  """A library wraps ENOSPC in its own exception: the OS error in the chain is still found."""
  from fedprune_jax.train import centralized  # pylint: disable=g-import-not-at-top

  checkpoint = tmp_path / "w" / "checkpoint"

  def full_disk(cfg, **kwargs):
    try:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(checkpoint))
    except OSError as e:
      raise RuntimeError("checkpoint save failed in a background thread") from e

  monkeypatch.setattr(centralized, "train_and_evaluate", full_disk)
  monkeypatch.setenv("FEDPRUNE_JAX_CACHE", "")
  assert cli.main(["train", "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err
  assert err == f"fedprune: error: {checkpoint}: No space left on device\n"


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
  from fedprune_jax.train import centralized  # pylint: disable=g-import-not-at-top

  def bug(cfg, **kwargs):
    raise ValueError("an internal invariant broke")

  monkeypatch.setattr(centralized, "train_and_evaluate", bug)
  monkeypatch.setenv("FEDPRUNE_JAX_CACHE", "")
  with pytest.raises(ValueError, match="internal invariant"):
    cli.main(["train", "--workdir", str(tmp_path / "w")])


@pytest.mark.parametrize(
  "argv, field",
  [
    (["federated", "--set", "rounds=-1"], "rounds=-1"),
    (["bench", "prune", "--patterns", "diagonal"], "diagonal"),
  ],
)
def test_bad_input_subprocess_exit_path(argv, field, tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "fedprune_jax.cli", *argv],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env={**os.environ, "FEDPRUNE_JAX_CACHE": ""},
    check=False,
  )
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fedprune: error: ")
  assert field in proc.stderr and "Traceback" not in proc.stderr


_SAVE_UNDER_FILE_SIZE_LIMIT = """
import resource, signal, sys
import numpy as np
from fedprune_jax import cli
from fedprune_jax import task

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
params = {"w": np.random.default_rng(0).standard_normal(300_000).astype(np.float32)}
sys.exit(cli.run_command(lambda args: task.save_params(sys.argv[1], params), None))
"""


def test_orbax_checkpoint_on_a_full_disk_is_one_line(tmp_path):
  """A real orbax save that runs out of space (a file-size limit stands in for a full disk)."""
  proc = subprocess.run(
    [sys.executable, "-c", _SAVE_UNDER_FILE_SIZE_LIMIT, str(tmp_path / "checkpoint")],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    check=False,
  )
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr  # orbax's logged traceback is dropped too
  assert lines[0].startswith("fedprune: error: File too large: ")
  assert "checkpoint" in lines[0]


def test_a_bad_cache_threshold_names_its_variable(monkeypatch, tmp_path):
  from fedprune_jax import programs  # pylint: disable=g-import-not-at-top
  from fedprune_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

  monkeypatch.setenv("FEDPRUNE_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("FEDPRUNE_JAX_CACHE_MIN_SECONDS", "soon")
  with pytest.raises(ConfigError, match="FEDPRUNE_JAX_CACHE_MIN_SECONDS='soon'"):
    programs.enable_compilation_cache()
