"""Atomic writes and the JSONL / TensorBoard metric log."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedprune_jax import io_utils


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
