"""Speakers as clients over a FeatureSet; federated training of a micro
Conformer lowers the loss."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import MICRO_MODEL
from fedprune_jax.data import batching, feature_sets
from fedprune_jax.algorithms import build
from fedprune_jax.federated import speakers


def _feature_set(seed=0, num_speakers=6):
  rng = np.random.default_rng(seed)
  exs, utt, spk = [], [], []
  for s in range(num_speakers):
    for u in range(int(rng.integers(1, 8))):
      t, l = int(rng.integers(12, 40)), int(rng.integers(1, 5))
      y = rng.integers(3, 29, size=l).astype(np.int32)
      feats = rng.normal(size=(t, 80)) * 0.5 + (y[0] - 15) * 0.1
      exs.append(batching.Example(feats.astype(np.float32), y))
      utt.append(f"{100 + s}-1-{u:04d}")
      spk.append(str(100 + s))
  order = rng.permutation(len(exs))  # speakers interleaved in the set
  return (
    feature_sets.pack_examples(
      [exs[i] for i in order], [utt[i] for i in order], [spk[i] for i in order]
    ),
    exs,
    spk,
  )


def test_speaker_store_packs_each_speakers_utterances():
  fs, _, _ = _feature_set()
  store = speakers.SpeakerClientStore(fs, batch_size=2, num_buckets=3, round_to=8)
  names = store.client_names()
  assert names == sorted(set(fs.speaker_ids.tolist()))
  frames = np.diff(fs.frame_offsets)
  slots = 0
  for cid, name in enumerate(names):
    utts = np.flatnonzero(fs.speaker_ids == name)
    assert store.num_examples()[cid] == len(utts)
    got = store.get(np.array([cid, -1]))
    assert got["weights"][1].sum() == 0
    bucket = store.buckets[store.bucket_of(np.array([cid]))[0]]
    slots += bucket.slots * bucket.shapes["features"][0]
    flat = {k: v[0].reshape((-1,) + v.shape[3:]) for k, v in got.items()}
    for k, u in enumerate(utts):
      ex = fs.example(u)
      t, l = len(ex.features), len(ex.tokens)
      np.testing.assert_array_equal(flat["features"][k, :t], ex.features)
      assert not flat["features"][k, t:].any()
      assert flat["feature_paddings"][k, :t].sum() == 0
      assert flat["feature_paddings"][k, t:].all()
      np.testing.assert_array_equal(flat["labels"][k, :l], ex.tokens)
      assert flat["weights"][k] == 1.0
    assert flat["weights"][len(utts) :].sum() == 0
  np.testing.assert_allclose(store.padding_fraction(), 1 - frames.sum() / slots)
  capped = speakers.SpeakerClientStore(fs, batch_size=2, max_steps=1)
  assert capped.num_examples().max() == 2
  assert capped.num_truncated == sum(max(0, int((fs.speaker_ids == n).sum()) - 2) for n in names)
  short = speakers.SpeakerClientStore(fs, batch_size=2, max_frames=25)
  assert short.num_dropped == int((frames > 25).sum())
  assert short.num_examples().sum() == int((frames <= 25).sum())
  assert all(b.shapes["features"][0] <= 32 for b in short.buckets)
  with pytest.raises(ValueError, match="not in the feature set"):
    speakers.SpeakerClientStore(fs, batch_size=2, speakers=["nobody"])


def test_federated_micro_conformer_lowers_loss():
  from fedprune_jax.models import asr  # pylint: disable=g-import-not-at-top

  fs, _, _ = _feature_set(1, num_speakers=4)
  store = speakers.SpeakerClientStore(fs, batch_size=4, num_buckets=1, max_steps=2)
  model = asr.make_asr_model("tiny", **MICRO_MODEL)
  params = model.init(jax.random.key(0))
  loss = lambda p, b, r: model.loss(p, b, r, train=True)
  cfg = {
    "rounds": 4,
    "cohort_size": 4,
    "seed": 0,
    "client": {"optimizer": "adam", "learning_rate": 3e-3, "num_epochs": 2},
    "server": {"optimizer": "fedavg"},
    "engine": {"chunk_size": 2, "vmap_size": 1},
  }
  state, hist = build.run_federated(cfg, loss, params, store, progress=False)
  # every round trains all 4 speakers, so the mean local training loss of
  # round r measures the server model of round r on the same data
  assert int(state.round) == 4
  assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"], hist
