"""A corpus's identity: the same for a byte-identical copy made later, different for other
contents; the suite refuses cached runs of a corpus rebuilt with other contents, and a run
refuses a cached warm start trained on another corpus."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from conftest import fake_results, toy_experiment, write_finished_run
from fedprune_jax import config as config_lib
from fedprune_jax import suite, warm_start
from fedprune_jax.data import corpus_identity, feature_sets
from fedprune_jax.data import features as features_lib
from fedprune_jax.data import tokenizer
from fedprune_jax.errors import ConfigError, InputError

FILES = {  # a LibriSpeech-layout corpus in miniature (the audio need not be audio here)
  "train/1/10/1-10-0000.flac": b"\x01" * 7,
  "train/1/10/1-10.trans.txt": b"1-10-0000 ONE TWO\n",
  "train/2/20/2-20-0000.flac": b"\x02" * 9,
  "train/2/20/2-20.trans.txt": b"2-20-0000 THREE\n",
  "dev/3/30/3-30-0000.flac": b"\x03" * 5,
  "dev/3/30/3-30.trans.txt": b"3-30-0000 FOUR\n",
  "test/4/40/4-40-0000.flac": b"\x04" * 6,
  "test/4/40/4-40.trans.txt": b"4-40-0000 FIVE\n",
  "SPEAKERS.TXT": b"1 | F | train | 0.1 | espeak en\n",
}
SPLITS = ("train", "dev", "test")


def _write(root: pathlib.Path, files=FILES, mtime: int | None = None) -> pathlib.Path:
  for rel, data in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
      os.utime(path, ns=(mtime, mtime))
  return root


def _reference(root: pathlib.Path) -> str:
  """The identity by hand, from the module's documented format."""
  h = hashlib.sha256(b"corpus v1")
  h.update(hashlib.sha256(FILES["SPEAKERS.TXT"]).digest())
  for split in SPLITS:
    h.update(f"#{split}".encode())
    for rel in sorted(r for r in FILES if r.startswith(split + "/")):
      data = FILES[rel]
      h.update(f"|{rel[len(split) + 1 :]}:{len(data)}".encode())
      if rel.endswith(".txt"):
        h.update(hashlib.sha256(data).digest())
  return h.hexdigest()


def test_identity_by_hand_and_what_changes_it(tmp_path):
  a = _write(tmp_path / "a", mtime=1_000_000_000)
  ident = corpus_identity.identity(str(a), SPLITS)
  assert ident == _reference(a)
  # a byte-identical copy made at another time, elsewhere: the same corpus
  b = _write(tmp_path / "b", mtime=2_000_000_000)
  assert corpus_identity.identity(str(b), SPLITS) == ident
  assert (
    corpus_identity.of_data_config(
      {"root": str(b), "train_split": "train", "dev_split": "dev", "test_split": "test"}
    )
    == ident
  )
  assert corpus_identity.of_data_config({"source": "tfds", "root": str(b)}) is None
  changes = {
    "a transcript": {"train/2/20/2-20.trans.txt": b"2-20-0000 THREE TWO\n"},
    "a resized audio file": {"dev/3/30/3-30-0000.flac": b"\x03" * 6},
    "an added file": {"test/4/40/4-40-0001.flac": b"\x05"},
    "the speakers' metadata": {"SPEAKERS.TXT": b"1 | F | train | 0.1 | espeak en-us\n"},
  }
  for what, change in changes.items():
    c = _write(tmp_path / what.replace(" ", "_"), {**FILES, **change})
    assert corpus_identity.identity(str(c), SPLITS) != ident, what
  removed = _write(tmp_path / "removed")
  (removed / "train/1/10/1-10-0000.flac").unlink()
  assert corpus_identity.identity(str(removed), SPLITS) != ident
  # the order of the splits is part of it (train+dev is not dev+train)
  assert corpus_identity.identity(str(a), ("dev", "train", "test")) != ident


def test_feature_cache_fingerprint_unchanged_and_sees_mtimes(tmp_path):
  """``feature_sets.split_fingerprint`` walks the same way, with mtimes: a rewritten file of the
  same size has the same corpus identity but a new feature cache key."""
  a = _write(tmp_path / "a", mtime=1_000_000_000)
  config, extra = features_lib.DEFAULT_CONFIG, np.dtype(np.float32).str
  h = hashlib.sha256(
    f"v{feature_sets.CACHE_VERSION}|{config!r}|{tokenizer.VOCAB!r}|{extra}".encode()
  )
  for rel in sorted(r for r in FILES if r.startswith("train/")):
    h.update(f"|{rel[len('train/') :]}:{len(FILES[rel])}:1000000000".encode())
    if rel.endswith(".txt"):
      h.update(hashlib.sha256(FILES[rel]).digest())
  assert feature_sets.split_fingerprint(str(a / "train"), config, extra) == h.hexdigest()
  before = corpus_identity.identity(str(a), SPLITS)
  _write(a, {"train/1/10/1-10-0000.flac": b"\x09" * 7}, mtime=1_000_000_001)
  assert corpus_identity.identity(str(a), SPLITS) == before
  assert feature_sets.split_fingerprint(str(a / "train"), config, extra) != h.hexdigest()
  with pytest.raises(Exception, match="does not exist"):
    corpus_identity.identity(str(a), ("train", "nope"))


ARMS = (
  suite.Arm("dense", {"pruning": None}, row="dense"),
  suite.Arm("pruned", {"pruning.target_sparsity": 0.5}, row="pruned"),
)
SETS = ["data.train_split=train", "data.dev_split=dev", "data.test_split=test"]


def _suite(runs: pathlib.Path, root: pathlib.Path, record: bool = True) -> list:
  """The toy experiment with a fake runner that records the identity of the corpus it 'read'."""
  calls = []

  def runner(kind, cfg):
    calls.append(pathlib.Path(cfg.workdir).name)
    results = fake_results(0.3)
    if record:
      results["corpus"] = corpus_identity.of_data_config(cfg.data)
    write_finished_run(cfg.workdir, results)
    return {}

  suite.run_experiment(
    toy_experiment(ARMS, seeds=(0,)),
    runs,
    data_root=str(root),
    overrides=SETS,
    runner=runner,
    log=lambda s: None,
  )
  return calls


def test_the_suite_refuses_cached_runs_of_a_rebuilt_corpus(tmp_path):
  root, runs = tmp_path / "data", tmp_path / "runs"
  _write(root, mtime=1_000_000_000)
  assert len(_suite(runs, root)) == 2
  recorded = json.loads(next((runs / "runs").glob("*/results.json")).read_text())["corpus"]
  assert recorded == _reference(root)
  # synthesized again byte for byte (new mtimes): the cached runs stand
  shutil.rmtree(root)
  _write(root, mtime=2_000_000_000)
  assert _suite(runs, root) == []
  # rebuilt with another transcript: one error naming both runs, and nothing runs
  _write(root, {"dev/3/30/3-30.trans.txt": b"3-30-0000 FOUR FIVE\n"})
  with pytest.raises(InputError, match="2 finished run.s. .* another corpus") as err:
    _suite(runs, root)
  assert all(f"runs/{d.name}" in str(err.value) for d in (runs / "runs").iterdir())
  # runs that recorded no identity (finished before runs recorded it) are taken as they are
  old = tmp_path / "old_runs"
  assert len(_suite(old, root, record=False)) == 2
  _write(root, {"dev/3/30/3-30.trans.txt": b"3-30-0000 SIX\n"})
  assert _suite(old, root) == []


def test_a_cached_warm_start_of_another_corpus_is_refused(tmp_path):
  cfg = config_lib.load_config("fedprune_tiny", [f"data.root={tmp_path}"], validate=False)
  path = tmp_path / "warm_start"
  record = path.with_name("warm_start.json")
  record.write_text(json.dumps({"inputs": warm_start.inputs_of(cfg), "corpus": "a" * 64}))
  warm_start.check_record(path, cfg, "a" * 64)
  warm_start.check_record(path, cfg, None)  # a TFDS corpus has no identity
  with pytest.raises(ConfigError, match="another corpus than the one now at data.root"):
    warm_start.check_record(path, cfg, "b" * 64)
  record.write_text(json.dumps({"inputs": warm_start.inputs_of(cfg)}))  # an older record
  warm_start.check_record(path, cfg, "b" * 64)


def test_walk_once_lists_each_split_once_with_the_same_hashes(tmp_path, monkeypatch):
  """Inside ``walk_once`` the feature cache key and the identity come from one listing of the
  split and equal the ones from separate walks; after it a changed file is seen again."""
  a = _write(tmp_path / "a", mtime=1_000_000_000)
  config, extra = features_lib.DEFAULT_CONFIG, np.dtype(np.float32).str
  key = feature_sets.split_fingerprint(str(a / "train"), config, extra)
  ident = corpus_identity.identity(str(a), SPLITS)
  walked = []
  real_walk = os.walk
  monkeypatch.setattr(
    corpus_identity.os, "walk", lambda d, *args: walked.append(d) or real_walk(d, *args)
  )
  with corpus_identity.walk_once():
    assert feature_sets.split_fingerprint(str(a / "train"), config, extra) == key
    assert corpus_identity.identity(str(a), SPLITS) == ident
  assert sorted(os.path.basename(d) for d in walked) == ["dev", "test", "train"]
  _write(a, {"train/1/10/1-10-0000.flac": b"\x09" * 7}, mtime=1_000_000_001)
  assert feature_sets.split_fingerprint(str(a / "train"), config, extra) != key
  assert len(walked) == 4
