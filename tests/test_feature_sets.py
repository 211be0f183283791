"""Tests for fedprune_jax.data.feature_sets (featurize, the packed split and its cache)."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import soundfile as sf

from fedprune_jax.data import feature_sets
from fedprune_jax.data import features as F
from fedprune_jax.data import tokenizer
from fedprune_jax.data.records import CorpusError, Utterance

SR = 16_000


def _utt(utt_id, text, n, seed=0, sr=SR):
  rng = np.random.default_rng(seed)
  t = np.arange(n) / sr
  audio = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.normal(size=n)
  spk, chap, _ = utt_id.split("-")
  return Utterance(utt_id, spk, chap, text, audio.astype(np.float32), sr)


def test_featurize_matches_components_and_names_bad_utterances():
  utts = [_utt("1-2-0000", "hello  world", 4000), _utt("1-2-0001", "it's", 800)]
  ex = feature_sets.featurize(utts)
  for e, u in zip(ex, utts):
    np.testing.assert_allclose(e.features, F.normalize_np(F.log_mel_np(u.audio, SR)), atol=1e-6)
    np.testing.assert_array_equal(e.tokens, tokenizer.encode(tokenizer.normalize_text(u.text)))
  assert ex[0].features.shape == (23, 80)
  np.testing.assert_allclose(ex[0].features.mean(0), 0, atol=1e-5)
  with pytest.raises(CorpusError, match="'9-9-0001'.*shorter"):
    feature_sets.featurize([_utt("9-9-0001", "A", 300)])
  with pytest.raises(CorpusError, match="'9-9-0002'.*'!'"):
    feature_sets.featurize([_utt("9-9-0002", "HI!", 1000)])
  with pytest.raises(CorpusError, match="'9-9-0003'.*8000"):
    feature_sets.featurize([_utt("9-9-0003", "A", 1000, sr=8000)])


def _write_split(root, spec):
  """LibriSpeech layout: root/SPK/CHAP/SPK-CHAP.trans.txt + SPK-CHAP-NNNN.flac."""
  for (spk, chap), items in spec.items():
    d = os.path.join(root, spk, chap)
    os.makedirs(d, exist_ok=True)
    lines = []
    for k, (text, n, seed) in enumerate(items):
      u = _utt(f"{spk}-{chap}-{k:04d}", text, n, seed)
      sf.write(os.path.join(d, f"{u.utt_id}.flac"), u.audio, SR, subtype="PCM_16")
      lines.append(f"{u.utt_id} {text}")
    with open(os.path.join(d, f"{spk}-{chap}.trans.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")


def _reader(split_dir):
  """Minimal test reader (the real one is fedprune_jax.data.librispeech)."""
  for trans in sorted(glob.glob(os.path.join(split_dir, "*", "*", "*.trans.txt"))):
    with open(trans) as f:
      for line in f:
        utt_id, text = line.rstrip("\n").split(" ", 1)
        audio, sr = sf.read(os.path.join(os.path.dirname(trans), utt_id + ".flac"), dtype="float32")
        spk, chap, _ = utt_id.split("-")
        yield Utterance(utt_id, spk, chap, text, audio, sr)


def _fail_reader(split_dir):
  raise AssertionError(f"cache miss: reader called for {split_dir}")


SPEC = {
  ("19", "198"): [("HELLO WORLD", 3000, 1), ("A B", 1200, 2)],
  ("27", "123"): [("IT'S", 2000, 3)],
}


def test_cached_features_round_trip_hit_and_invalidation(tmp_path):
  split, cache = str(tmp_path / "train-tiny"), str(tmp_path / "cache")
  _write_split(split, SPEC)
  fs = feature_sets.cached_features(split, cache, reader=_reader)
  ref_utts = list(_reader(split))
  ref = feature_sets.featurize(ref_utts)
  assert len(fs) == 3 and list(fs.utt_ids) == [u.utt_id for u in ref_utts]
  assert list(fs.speaker_ids) == ["19", "19", "27"]
  for e, r in zip(fs.examples(), ref):
    np.testing.assert_array_equal(e.features, r.features)
    np.testing.assert_array_equal(e.tokens, r.tokens)
  np.testing.assert_array_equal(fs.num_frames, [r.features.shape[0] for r in ref])
  np.testing.assert_array_equal(fs.speaker_indices()["19"], [0, 1])
  files = os.listdir(cache)
  assert len(files) == 1 and files[0].startswith("train-tiny-")
  assert files[0].endswith(".npz")

  # Second call: served from disk, the reader is not touched.
  fs2 = feature_sets.cached_features(split, cache, reader=_fail_reader)
  np.testing.assert_array_equal(fs2.features, fs.features)
  np.testing.assert_array_equal(fs2.tokens, fs.tokens)

  # Changing a transcript (same size) or the feature params gives a new key.
  trans = os.path.join(split, "27", "123", "27-123.trans.txt")
  with open(trans, "w") as f:
    f.write("27-123-0000 ITS'\n")
  fs3 = feature_sets.cached_features(split, cache, reader=_reader)
  np.testing.assert_array_equal(fs3.tokens[-4:], tokenizer.encode("ITS'"))
  cfg = F.FeatureConfig(num_mel_bins=40)
  fs4 = feature_sets.cached_features(split, cache, reader=_reader, config=cfg)
  assert fs4.features.shape[1] == 40
  assert len(os.listdir(cache)) == 3  # no temp files left behind


def test_cached_features_notice_a_same_size_rewritten_audio_file(tmp_path):
  split, cache = str(tmp_path / "train"), str(tmp_path / "cache")
  _write_split(split, {("5", "6"): [("OK", 1000, 0)]})
  flac = os.path.join(split, "5", "6", "5-6-0000.flac")
  feature_sets.cached_features(split, cache, reader=_reader)
  before = os.stat(flac)
  with open(flac, "r+b") as f:  # corrupt the last bytes in place: same size, new content
    f.seek(before.st_size - 8)
    f.write(b"\xff" * 8)
  # A filesystem with coarse timestamps may keep the old mtime within one tick: force a new one.
  os.utime(flac, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
  assert os.path.getsize(flac) == before.st_size
  with pytest.raises(AssertionError, match="cache miss"):
    feature_sets.cached_features(
      split, cache, reader=_fail_reader
    )  # not served from the stale cache


def test_cached_features_rebuilds_corrupt_file_and_float16(tmp_path):
  split, cache = str(tmp_path / "dev"), str(tmp_path / "cache")
  _write_split(split, {("5", "6"): [("OK", 1000, 0)]})
  fs = feature_sets.cached_features(split, cache, reader=_reader)
  (path,) = glob.glob(os.path.join(cache, "*.npz"))
  with open(path, "wb") as f:
    f.write(b"not a zip")
  fs2 = feature_sets.cached_features(split, cache, reader=_reader)
  np.testing.assert_array_equal(fs2.features, fs.features)
  fs16 = feature_sets.cached_features(split, cache, reader=_reader, dtype=np.float16)
  assert fs16.features.dtype == np.float16
  assert fs16.example(0).features.dtype == np.float32
  np.testing.assert_allclose(fs16.example(0).features, fs.example(0).features, atol=5e-3)
  with pytest.raises(CorpusError, match="does not exist"):
    feature_sets.cached_features(str(tmp_path / "nope"), cache, reader=_reader)


def test_cached_features_with_default_reader(tmp_path):
  pytest.importorskip("fedprune_jax.data.librispeech")
  split, cache = str(tmp_path / "test-tiny"), str(tmp_path / "cache")
  _write_split(split, SPEC)
  fs = feature_sets.cached_features(split, cache)
  ref = {u.utt_id: e for u, e in zip(_reader(split), feature_sets.featurize(_reader(split)))}
  assert sorted(fs.utt_ids) == sorted(ref)
  for i, u in enumerate(fs.utt_ids):
    np.testing.assert_allclose(fs.example(i).features, ref[u].features, atol=1e-5)


def test_concat_feature_sets_equals_packing_everything_at_once():
  rng = np.random.default_rng(0)
  examples = [
    feature_sets.Example(rng.normal(size=(n, 3)).astype(np.float32), rng.integers(1, 9, size=m))
    for n, m in ((4, 2), (6, 3), (2, 1), (5, 4))
  ]
  ids = [f"u{i}" for i in range(4)]
  spk = ["a", "a", "b", "c"]
  whole = feature_sets.pack_examples(examples, ids, spk)
  parts = [
    feature_sets.pack_examples(examples[:1], ids[:1], spk[:1]),
    feature_sets.pack_examples(examples[1:3], ids[1:3], spk[1:3]),
    feature_sets.pack_examples(examples[3:], ids[3:], spk[3:]),
  ]
  joined = feature_sets.concat_feature_sets(parts)
  for field in ("features", "frame_offsets", "tokens", "token_offsets", "utt_ids", "speaker_ids"):
    np.testing.assert_array_equal(getattr(joined, field), getattr(whole, field))
