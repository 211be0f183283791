"""Atomic writes and the JSONL / TensorBoard metric log."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest

from fedprune_jax import io_utils, scalars


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
  path = tmp_path / "out.json"
  io_utils.write_json_atomic(path, {"a": np.float32(1.5), "b": np.arange(3)})
  assert path.read_text() == '{\n  "a": 1.5,\n  "b": [\n    0,\n    1,\n    2\n  ]\n}\n'
  with pytest.raises(RuntimeError):
    with io_utils.atomic_path(path) as tmp:
      tmp.write_text("partial")
      raise RuntimeError("killed")
  assert '"a": 1.5' in path.read_text()
  assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


def test_jsonl_log_survives_truncated_last_line_and_writes_tensorboard(tmp_path):
  log_path = tmp_path / "metrics.jsonl"
  with io_utils.JsonlLogger(log_path, tensorboard_dir=tmp_path / "tb") as log:
    log.log(step=1, loss=2.0)
    log.log(step=2, loss=1.0, note="text is skipped by TensorBoard")
  with open(log_path, "a", encoding="utf-8") as f:
    f.write('{"step": 3, "lo')  # a writer killed mid-line
  records = io_utils.read_jsonl(log_path)
  assert [(r["step"], r["loss"]) for r in records] == [(1, 2.0), (2, 1.0)]
  pytest.importorskip("tensorboardX")
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
  old = os.umask(0o027)
  try:
    io_utils.write_json_atomic(tmp_path / "results.json", {"a": 1})
  finally:
    os.umask(old)
  assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o640  # 0666 & ~umask, not 0600


def test_two_scalar_sinks_opened_in_one_second_keep_both_their_scalars(tmp_path, monkeypatch):
  """A run's round-0 evaluation and its rounds each open a sink in one directory; tensorboardX
  names files by the second, so within one second the second sink used to truncate the first's."""
  from tensorboardX import event_file_writer

  from conftest import read_scalars

  monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1.7e9))
  for step, wer in ((0, 1.0), (5, 0.5)):
    sink = scalars.open_sink(tmp_path)
    sink.write({"eval_dev_wer": wer, "rounds_completed": step}, step, skip=("rounds_completed",))
    sink.close()
  assert read_scalars(tmp_path) == {"eval_dev_wer": {0: 1.0, 5: 0.5}}


class _RaisesWhenCollected:
  """An object whose finalizer raises: Python reports that through ``sys.unraisablehook``, as
  tensorstore's threads report orbax's closed event loop."""

  def __init__(self, error: BaseException):
    self.error = error

  def __del__(self):
    raise self.error


def test_stderr_held_drops_only_a_dropped_failures_output_and_its_late_noise(monkeypatch, capsys):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
  held = lambda: io_utils.stderr_held(  # noqa: E731
    drop_if=lambda e: isinstance(e, OSError), late_noise=io_utils.closed_event_loop
  )
  # a failure that is not dropped: what was held is written, the closed loop is still reported
  with pytest.raises(ValueError):
    with held():
      print("kept", file=sys.stderr)
      raise ValueError("not an environment failure")
  _RaisesWhenCollected(RuntimeError("Event loop is closed"))
  assert capsys.readouterr().err == "kept\n" and seen == ["Event loop is closed"]
  seen.clear()
  # a dropped failure: its output goes, and so does the closed loop that ends after the block
  with pytest.raises(OSError):
    with held():
      print("noise", file=sys.stderr)
      raise OSError("File too large")
  _RaisesWhenCollected(RuntimeError("Event loop is closed"))
  _RaisesWhenCollected(RuntimeError("another failure"))
  assert capsys.readouterr().err == "" and seen == ["another failure"]
