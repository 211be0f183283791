"""Tests for fedprune_jax.data.batching (padding, bucketing)."""

from __future__ import annotations

import numpy as np
import pytest

from fedprune_jax.data import batching


def _example(t: int, labels, f: int = 80, seed: int = 0):
  x = np.random.default_rng(seed).normal(size=(t, f)).astype(np.float32)
  return batching.Example(x, np.asarray(labels, np.int32))


# ----------------------------------------------------------------- pad_batch


def test_pad_batch_layout():
  ex = [_example(5, [3, 4, 5], seed=1), _example(2, [7], seed=2)]
  b = batching.pad_batch(ex, batch_size=4, max_frames=6, max_labels=4)
  assert set(b) == set(batching.BATCH_KEYS)
  assert b["features"].shape == (4, 6, 80) and b["features"].dtype == np.float32
  assert b["labels"].shape == (4, 4) and b["labels"].dtype == np.int32
  np.testing.assert_array_equal(b["weights"], [1, 1, 0, 0])
  np.testing.assert_array_equal(
    b["feature_paddings"], [[0, 0, 0, 0, 0, 1], [0, 0, 1, 1, 1, 1], [1] * 6, [1] * 6]
  )
  np.testing.assert_array_equal(b["labels"], [[3, 4, 5, 0], [7, 0, 0, 0], [0] * 4, [0] * 4])
  np.testing.assert_array_equal(b["label_paddings"], [[0, 0, 0, 1], [0, 1, 1, 1], [1] * 4, [1] * 4])
  np.testing.assert_array_equal(b["features"][0, :5], ex[0].features)
  np.testing.assert_array_equal(b["features"][1, :2], ex[1].features)
  assert not b["features"][0, 5:].any() and not b["features"][2:].any()


def test_pad_batch_empty_is_all_padding():
  b = batching.pad_batch([], batch_size=2, max_frames=3, max_labels=2)
  assert b["features"].shape == (2, 3, 80)
  assert b["weights"].sum() == 0 and b["feature_paddings"].all()


def test_pad_batch_overflow_modes():
  ex = [_example(4, [3]), _example(9, [3, 4]), _example(3, [3, 4, 5, 6])]
  ids = ["1-2-0000", "1-2-0001", "1-2-0002"]
  with pytest.raises(ValueError, match="'1-2-0001' has 9 frames"):
    batching.pad_batch(ex, batch_size=3, max_frames=8, max_labels=4, ids=ids)
  with pytest.raises(ValueError, match="example #2"):
    batching.pad_batch(ex, batch_size=3, max_frames=9, max_labels=3)
  b = batching.pad_batch(ex, batch_size=3, max_frames=8, max_labels=3, on_overflow="drop")
  np.testing.assert_array_equal(b["weights"], [1, 0, 0])
  b = batching.pad_batch(ex, batch_size=3, max_frames=8, max_labels=3, on_overflow="truncate")
  np.testing.assert_array_equal(b["weights"], [1, 1, 1])
  np.testing.assert_array_equal(b["features"][1], ex[1].features[:8])
  np.testing.assert_array_equal(b["labels"][2], [3, 4, 5])


def test_pad_batch_bad_input_errors():
  with pytest.raises(ValueError, match="do not fit"):
    batching.pad_batch([_example(2, [3])] * 3, batch_size=2, max_frames=4, max_labels=2)
  with pytest.raises(ValueError, match="'u1' has a blank"):
    batching.pad_batch([_example(2, [3, 0])], batch_size=1, max_frames=4, max_labels=2, ids=["u1"])
  with pytest.raises(ValueError, match=r"shape \(2, 40\)"):
    batching.pad_batch(
      [_example(2, [3]), _example(2, [3], f=40)], batch_size=2, max_frames=4, max_labels=2
    )


# ------------------------------------------------------------------ buckets


def test_bucket_boundaries_known_values():
  # Quantiles of 1..100 at 1/4..4/4: 25.75, 50.5, 75.25, 100 -> ceil to /16.
  assert batching.bucket_boundaries(np.arange(1, 101), 4) == [32, 64, 80, 112]
  assert batching.bucket_boundaries([10, 10, 10, 11], 3) == [16]
  assert batching.bucket_boundaries([100], 2, multiple=8) == [104]
  with pytest.raises(ValueError):
    batching.bucket_boundaries([], 2)


def _bucketed_corpus(n=37, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(5, 150, size=n)
  # Labels encode the example index so each example is recognisable.
  examples = [
    _example(int(t), [3 + i // 26, 3 + i % 26], f=4, seed=i) for i, t in enumerate(lengths)
  ]
  ids = [f"s-c-{i:04d}" for i in range(n)]
  return examples, ids, lengths


def _recover(batch):
  rows = np.flatnonzero(batch["weights"] > 0)
  return [int((batch["labels"][r, 0] - 3) * 26 + batch["labels"][r, 1] - 3) for r in rows]


def test_bucketed_batches_cover_every_example_once_in_its_bucket():
  examples, ids, lengths = _bucketed_corpus()
  bounds = batching.bucket_boundaries(lengths, 3)
  batches = list(batching.bucketed_batches(examples, ids, 4, bounds, rng=7))
  seen = []
  shapes = set()
  for b in batches:
    t = b["features"].shape[1]
    shapes.add(b["features"].shape)
    assert t in bounds and b["labels"].shape == (4, 16)
    k = bounds.index(t)
    for r, i in zip(np.flatnonzero(b["weights"] > 0), _recover(b)):
      assert (bounds[k - 1] if k else 0) < lengths[i] <= t
      np.testing.assert_array_equal(b["features"][r, : lengths[i]], examples[i].features)
    seen += _recover(b)
  assert sorted(seen) == list(range(len(examples)))
  assert len(shapes) <= len(bounds)
  # Only the last batch of each bucket may be partial.
  partial = [b for b in batches if b["weights"].sum() < 4]
  assert len(partial) <= len(bounds)


def test_bucketed_batches_determinism_and_options():
  examples, ids, lengths = _bucketed_corpus()
  bounds = batching.bucket_boundaries(lengths, 3)
  run = lambda rng, **kw: [
    _recover(b) for b in batching.bucketed_batches(examples, ids, 4, bounds, rng, **kw)
  ]
  assert run(1) == run(1)
  assert run(1) != run(2)
  # rng=None keeps input order inside each bucket, buckets in order.
  ordered = sum(run(None), [])
  bucket = np.searchsorted(bounds, lengths)
  assert ordered == sorted(range(len(examples)), key=lambda i: (bucket[i], i))
  dropped = run(3, drop_remainder=True)
  assert all(len(b) == 4 for b in dropped)
  n_bucket = np.bincount(bucket, minlength=len(bounds))
  assert sum(map(len, dropped)) == sum(4 * (n_bucket // 4))


def test_bucketed_batches_overflow():
  examples, ids, lengths = _bucketed_corpus()
  bounds = [32, 64]
  first_long = next(i for i, t in enumerate(lengths) if t > 64)
  with pytest.raises(ValueError, match=f"'{ids[first_long]}' has"):
    list(batching.bucketed_batches(examples, ids, 4, bounds, None))
  kept = sum(
    (
      _recover(b)
      for b in batching.bucketed_batches(examples, ids, 4, bounds, None, on_overflow="drop")
    ),
    [],
  )
  assert sorted(kept) == [i for i, t in enumerate(lengths) if t <= 64]


def test_padding_fraction():
  ex = [_example(10, [3]), _example(5, [3])]
  b = batching.pad_batch(ex, batch_size=3, max_frames=10, max_labels=2)
  # padded frames: 0 + 5 + 10 (padding row) of 30.
  assert batching.padding_fraction([b]) == pytest.approx(0.5)
  b2 = batching.pad_batch([_example(20, [3])], batch_size=1, max_frames=20, max_labels=2)
  # 15 of 50 frames padded; batches weighted by their size.
  assert batching.padding_fraction([b, b2]) == pytest.approx(15 / 50)
  assert batching.padding_fraction([]) == 0.0
  # Bucketing reduces padding compared with one bucket (same data).
  examples, ids, lengths = _bucketed_corpus(n=64)
  one = batching.bucket_boundaries(lengths, 1)
  four = batching.bucket_boundaries(lengths, 4)
  pf1 = batching.padding_fraction(batching.bucketed_batches(examples, ids, 8, one, 0))
  pf4 = batching.padding_fraction(batching.bucketed_batches(examples, ids, 8, four, 0))
  assert pf4 < pf1
