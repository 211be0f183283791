"""Issue 14's tighter client packing: (S, T) shape buckets, length-sorted scan segments, and the
segment-aware client update, each checked against brute force or the single-scan update."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from conftest import MICRO_MODEL
from fedprune_jax.data import batching, feature_sets
from fedprune_jax.federated import buckets as buckets_lib
from fedprune_jax.federated import client, speakers


def _feature_set(seed=0, num_speakers=5, max_utts=23):
  rng = np.random.default_rng(seed)
  exs, utt, spk = [], [], []
  for s in range(num_speakers):
    for u in range(int(rng.integers(1, max_utts))):
      t, n = int(rng.integers(12, 70)), int(rng.integers(1, 5))
      y = rng.integers(3, 29, size=n).astype(np.int32)
      exs.append(batching.Example(rng.normal(size=(t, 80)).astype(np.float32), y))
      utt.append(f"{100 + s}-1-{u:04d}")
      spk.append(str(100 + s))
  order = rng.permutation(len(exs))
  return feature_sets.pack_examples(
    [exs[i] for i in order], [utt[i] for i in order], [spk[i] for i in order]
  )


def _slots(shape):
  return int((shape[0::2] * shape[1::2]).sum())


def test_shape_groups_merge_cheapest_pairs():
  # 5 clients each of three shapes (S, T); two groups: merging the two short ones is cheapest
  shapes = np.array([(1, 10)] * 5 + [(1, 11)] * 5 + [(4, 100)] * 5)
  g = buckets_lib.shape_groups(shapes, 2)
  assert len(np.unique(g)) == 2
  assert len(np.unique(g[:10])) == 1 and g[10] != g[0] and len(np.unique(g[10:])) == 1
  # enough groups: every group holds one shape, i.e. no padding from grouping
  rng = np.random.default_rng(0)
  shapes = rng.integers(1, 4, size=(40, 4))
  g = buckets_lib.shape_groups(shapes, 100)
  for k in np.unique(g):
    assert len(np.unique(shapes[g == k], axis=0)) == 1
  # the greedy merge never adds more padding than the equal-cost cuts of 'cost'
  lengths = np.stack([rng.integers(1, 60, 200), rng.integers(20, 400, 200), np.ones(200)], 1)
  slots = {}
  for method in ("cost", "shape"):
    buckets, bucket_of = buckets_lib.make_buckets(lengths, 8, 4, 80, 16, method=method)
    assert len(buckets) <= 4
    slots[method] = sum(buckets[b].slots * buckets[b].shapes["features"][0] for b in bucket_of)
  assert slots["shape"] <= slots["cost"]


def test_segment_plan_brute_force():
  frames = np.sort(np.random.default_rng(1).integers(5, 90, size=21))
  shape, slots = speakers.segment_plan(frames, batch_size=4, segments=3, round_to=8)
  # 21 examples in batches of 4: 6 steps, the first holds the 1 shortest; steps 0-1 | 2-3 | 4-5
  np.testing.assert_array_equal(shape[0::2], [2, 2, 2])
  flat_step = np.array([2 * k + s for k, s, _ in slots])
  np.testing.assert_array_equal(np.bincount(flat_step), [1, 4, 4, 4, 4, 4])
  assert len({(k, s, r) for k, s, r in slots}) == 21  # one slot per example
  for k in range(3):
    assert shape[2 * k + 1] == -(-frames[slots[:, 0] == k].max() // 8) * 8
  # fewer steps than segments: the empty segment gets one all-padding step
  shape, slots = speakers.segment_plan(np.array([7, 9]), batch_size=4, segments=2, round_to=8)
  np.testing.assert_array_equal(shape, [1, 8, 1, 16])
  np.testing.assert_array_equal(slots[:, 0], [1, 1])


@pytest.mark.parametrize("segments", [1, 2, 3])
def test_segmented_store_uses_every_utterance_once(segments):
  fs = _feature_set()
  store = speakers.SpeakerClientStore(
    fs, batch_size=3, num_buckets=2, round_to=8, segments=segments
  )
  frames = np.diff(fs.frame_offsets)
  slots = 0
  for cid, name in enumerate(store.client_names()):
    got = store.get(np.array([cid, -1]))
    segs = (got,) if segments == 1 else got
    assert len(segs) == segments
    bucket = store.buckets[store.bucket_of(np.array([cid]))[0]]
    bucket = (bucket,) if segments == 1 else bucket
    seen, prev_max = [], 0
    for seg, b in zip(segs, bucket):
      assert seg["features"].shape[1:4] == (b.num_steps, 3, b.shapes["features"][0])
      slots += b.slots * b.shapes["features"][0]
      assert seg["weights"][1].sum() == 0 and seg["feature_paddings"][1].all()  # padding client
      w = seg["weights"][0]
      assert set(np.unique(w)) <= {0.0, 1.0}
      real_frames = (1 - seg["feature_paddings"][0]).sum(-1)
      assert not real_frames[w == 0].any()  # padding rows hold no frame
      if segments > 1 and w.sum():  # length-sorted: segments do not overlap in length
        assert real_frames[w > 0].min() >= prev_max
        prev_max = real_frames[w > 0].max()
      for s, r in zip(*np.nonzero(w)):
        t = int(real_frames[s, r])
        match = [
          u
          for u in np.flatnonzero(fs.speaker_ids == name)
          if frames[u] == t and np.array_equal(fs.example(u).features, seg["features"][0, s, r, :t])
        ]
        assert len(match) == 1
        ex = fs.example(match[0])
        assert not seg["features"][0, s, r, t:].any()
        n = len(ex.tokens)
        np.testing.assert_array_equal(seg["labels"][0, s, r, :n], ex.tokens)
        assert (
          seg["label_paddings"][0, s, r, :n].sum() == 0 and seg["label_paddings"][0, s, r, n:].all()
        )
        seen.append(match[0])
    # every utterance of the speaker exactly once, nothing else
    np.testing.assert_array_equal(np.sort(seen), np.flatnonzero(fs.speaker_ids == name))
    assert store.num_examples()[cid] == len(seen) == sum(seg["weights"][0].sum() for seg in segs)
    assert store.useful_frames()[cid] == frames[seen].sum()
  np.testing.assert_allclose(store.padding_fraction(), 1 - frames.sum() / slots)


def test_segments_cut_padding():
  fs = _feature_set(2, num_speakers=8, max_utts=40)
  pad = {
    k: speakers.SpeakerClientStore(fs, batch_size=4, num_buckets=8, segments=k).padding_fraction()
    for k in (1, 2, 4)
  }
  assert pad[4] < pad[2] < pad[1], pad


def _micro():
  from fedprune_jax.models import asr  # pylint: disable=g-import-not-at-top

  model = asr.make_asr_model("tiny", **MICRO_MODEL)
  return model, model.init(jax.random.key(0))


def test_one_segment_tuple_is_the_plain_client_update():
  model, params = _micro()
  loss = lambda p, b, r: model.loss(p, b, r, train=True)
  store = speakers.SpeakerClientStore(_feature_set(3, num_speakers=2), batch_size=4, max_steps=2)
  data = {k: v[0] for k, v in store.get(np.array([0])).items()}
  rng = jax.random.key(7)
  ref = client.make_client_update(loss, optax.adam(1e-2), num_epochs=2, shuffle=True)
  a, b = jax.jit(ref)(params, data, rng), jax.jit(ref)(params, (data,), rng)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_segmented_update_matches_one_padded_scan():
  """K length segments train exactly like the same steps in one scan padded to the longest T."""
  model, params = _micro()
  loss = lambda p, b, r: model.loss(p, b, r, train=False)  # no dropout: exact comparison
  fs = _feature_set(4, num_speakers=3, max_utts=14)
  store = speakers.SpeakerClientStore(fs, batch_size=3, num_buckets=1, segments=3)
  segs = tuple({k: v[:1] for k, v in s.items()} for s in store.get(np.arange(3)))
  t_max = max(s["features"].shape[3] for s in segs)
  l_max = max(s["labels"].shape[3] for s in segs)

  def pad_to(s):
    out = dict(s)
    for key, pad_key, n in (
      ("features", "feature_paddings", t_max),
      ("labels", "label_paddings", l_max),
    ):
      extra = n - s[key].shape[3]
      out[key] = np.pad(s[key], [(0, 0)] * 3 + [(0, extra)] + [(0, 0)] * (s[key].ndim - 4))
      out[pad_key] = np.pad(s[pad_key], [(0, 0)] * 3 + [(0, extra)], constant_values=1.0)
    return out

  single = {k: np.concatenate([pad_to(s)[k] for s in segs], axis=1) for k in segs[0]}
  # momentum carries optimizer state across segments; SGD, unlike Adam, does not blow
  # float noise in the gradients of unused parameters up to full-size steps
  opt = optax.sgd(0.1, momentum=0.9)
  new = ref = jax.vmap(client.make_client_update(loss, opt), (None, 0, None))
  out = jax.jit(new)(params, segs, jax.random.key(1))
  ref_out = jax.jit(ref)(params, single, jax.random.key(1))
  assert float(out.num_examples[0]) == store.num_examples()[0]
  np.testing.assert_allclose(out.metrics["loss"], ref_out.metrics["loss"], rtol=1e-5)
  jax.tree_util.tree_map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
    out.update["delta"],
    ref_out.update["delta"],
  )


def test_bench_fedround_counts_useful_frames_and_parses_settings():
  from fedprune_jax.bench import fedround  # pylint: disable=g-import-not-at-top

  fs = _feature_set(5)
  batch = next(batching.bucketed_batches(fs.examples(), None, 512, [96], rng=None, max_labels=8))
  assert fedround.useful_frames(batch) == np.diff(fs.frame_offsets).sum()
  assert fedround.parse_setting("seg4@1", 8) == ("seg4", 1)
  assert fedround.parse_setting("old", 8) == ("old", 8)
  with pytest.raises(ValueError, match="unknown setting"):
    fedround.parse_setting("nope", 8)
  for kwargs in fedround.SETTINGS.values():
    store = speakers.SpeakerClientStore(fs, batch_size=4, **kwargs)
    assert store.useful_frames().sum() == np.diff(fs.frame_offsets).sum()
