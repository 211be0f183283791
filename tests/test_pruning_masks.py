"""Masks (paths, apply, counts, serialisation) and score functions."""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from fedprune_jax import pruning
from fedprune_jax.pruning import masks as masks_lib
from fedprune_jax.pruning import scores as scores_lib


def conformer_like(seed=0, d=4, h=2):
  """A synthetic params pytree with the documented Conformer naming."""
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.standard_normal(s).astype(np.float32)
  blk = {
    "ffn1": {
      "norm": {"scale": r(d), "bias": r(d)},
      "dense_in": {"kernel": r(d, 4 * d), "bias": r(4 * d)},
      "dense_out": {"kernel": r(4 * d, d), "bias": r(d)},
    },
    "mhsa": {
      "norm": {"scale": r(d), "bias": r(d)},
      **{k: {"kernel": r(d, d), "bias": r(d)} for k in ("query", "key", "value", "out")},
      "pos": {"kernel": r(d, d)},
      "pos_bias_u": r(h, d // h),
      "pos_bias_v": r(h, d // h),
    },
    "conv": {
      "norm": {"scale": r(d), "bias": r(d)},
      "pointwise_in": {"kernel": r(d, 2 * d), "bias": r(2 * d)},
      "depthwise": {"kernel": r(3, 1, d), "bias": r(d)},
      "group_norm": {"scale": r(d), "bias": r(d)},
      "pointwise_out": {"kernel": r(d, d), "bias": r(d)},
    },
    "final_norm": {"scale": r(d), "bias": r(d)},
  }
  return {
    "encoder": {"subsample": {"conv1": {"kernel": r(3, 3, 1, 2), "bias": r(2)}}, "block_0": blk},
    "ctc_head": {"kernel": r(d, 5), "bias": r(5)},
  }


def test_default_prunable_set():
  m = pruning.init_mask(conformer_like())
  prunable = sorted(p for p, v in masks_lib.flatten_with_paths(m) if v is not None)
  assert prunable == sorted(
    [
      "encoder/subsample/conv1/kernel",
      *(f"encoder/block_0/ffn1/{k}/kernel" for k in ("dense_in", "dense_out")),
      *(f"encoder/block_0/mhsa/{k}/kernel" for k in ("query", "key", "value", "out", "pos")),
      *(f"encoder/block_0/conv/{k}/kernel" for k in ("pointwise_in", "depthwise", "pointwise_out")),
    ]
  )


def test_matches_regex_and_glob():
  p = "encoder/block_0/ffn1/dense_in/kernel"
  assert masks_lib.matches(p, [r"ffn\d/dense_in"])
  assert masks_lib.matches(p, ["glob:encoder/*/ffn1/*/kernel"])
  assert not masks_lib.matches(p, ["glob:*/mhsa/*"])


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 1000), st.floats(0.0, 1.0))
def test_apply_mask_zeroes_exactly_and_is_idempotent(seed, s):
  params = conformer_like(seed)
  mask = pruning.prune_mask(pruning.magnitude(params), s, allocation="uniform")
  pm = pruning.apply_mask(params, mask)
  for (path, p), (_, q), (_, m) in zip(
    masks_lib.flatten_with_paths(params),
    masks_lib.flatten_with_paths(pm),
    masks_lib.flatten_with_paths(jax.tree.map(lambda a, b: b, params, mask)),
  ):
    p, q = np.asarray(p), np.asarray(q)
    if m is None:
      np.testing.assert_array_equal(p, q)
    else:
      m = np.asarray(m)
      assert np.all(q[~m] == 0.0) and not np.signbit(q[~m]).any()
      np.testing.assert_array_equal(q[m], p[m])
  again = pruning.apply_mask(pm, mask)
  jax.tree.map(np.testing.assert_array_equal, again, pm)


def test_counts_and_sparsity():
  m = {
    "a": {"kernel": jnp.array([[True, False], [False, False]])},
    "b": {"kernel": jnp.ones((2, 3), bool), "bias": None},
  }
  assert pruning.count_total(m) == 10
  assert int(pruning.count_kept(m)) == 7
  assert float(pruning.sparsity(m)) == pytest.approx(0.3)
  params = {
    "a": {"kernel": jnp.ones((2, 2))},
    "b": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
  }
  assert pruning.param_count(params) == 13
  assert pruning.param_count(params, m) == 10


def test_save_load_roundtrip_and_errors(tmp_path):
  params = conformer_like()
  mask = pruning.prune_mask(pruning.magnitude(params), 0.6, pattern="column")
  f = tmp_path / "sub" / "mask.npz"
  pruning.save_mask(f, mask)
  assert [p.name for p in f.parent.iterdir()] == ["mask.npz"]  # no temp left
  back = pruning.load_mask(f, params)
  for (pa, a), (pb, b) in zip(
    masks_lib.flatten_with_paths(mask), masks_lib.flatten_with_paths(back)
  ):
    assert pa == pb and (a is None) == (b is None)
    if a is not None:
      np.testing.assert_array_equal(a, b)
  flat = pruning.mask_to_flat(mask)
  assert "encoder/block_0/ffn1/dense_in/kernel" in flat
  flat["encoder/block_0/ffn1/dense_in/kernel"] = np.ones((3, 3), bool)
  with pytest.raises(ValueError, match="dense_in/kernel.*shape"):
    pruning.mask_from_flat(flat, params, source="x.npz")
  with pytest.raises(ValueError, match="not in the params"):
    pruning.mask_from_flat({"nope/kernel": np.ones(2, bool)}, params)
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"garbage")
  with pytest.raises(ValueError, match="bad.npz"):
    pruning.load_mask(bad, params)


def test_scores_known_values():
  p = {"w": jnp.array([1.0, -2.0, 3.0]), "n": None}
  g = {"w": jnp.array([0.5, 0.5, -1.0]), "n": None}
  np.testing.assert_allclose(scores_lib.magnitude(p)["w"], [1, 2, 3])
  np.testing.assert_allclose(scores_lib.saliency(p, g)["w"], [0.5, 1.0, 3.0])
  # movement of a gradient g: -w * g (w = -2 with g = 0.5 moves away from zero under descent)
  np.testing.assert_allclose(scores_lib.movement(p, g)["w"], [-0.5, 1.0, 3.0])
  assert scores_lib.magnitude(p)["n"] is None


def test_random_scores_seeded():
  p = conformer_like()
  a = scores_lib.random_scores(p, jax.random.PRNGKey(3))
  b = scores_lib.random_scores(p, jax.random.PRNGKey(3))
  c = scores_lib.random_scores(p, jax.random.PRNGKey(4))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  k = a["encoder"]["block_0"]["ffn1"]["dense_in"]["kernel"]
  assert not np.array_equal(k, c["encoder"]["block_0"]["ffn1"]["dense_in"]["kernel"])
  # Different leaves of the same shape get different streams.
  assert not np.array_equal(
    a["encoder"]["block_0"]["mhsa"]["query"]["kernel"],
    a["encoder"]["block_0"]["mhsa"]["key"]["kernel"],
  )


def test_bench_mask_rows_and_tables():
  from fedprune_jax.bench import prune as bench

  params = conformer_like()
  rows = bench.mask_rows(params, ("unstructured", "column"), repeats=1)
  assert [r["pattern"] for r in rows] == ["unstructured", "column"]
  n = pruning.count_total(pruning.init_mask(params))
  assert rows[0]["prunable_params"] == n
  assert rows[0]["sparsity"] == pytest.approx(round(0.5 * n) / n)
  table = bench.format_tables(rows)
  assert table.startswith("### mask") and "| unstructured |" in table


def test_dense_mask_sparsity_is_exactly_zero():
  """Beyond 2**24 entries a float32 count rounds: the sparsity of a dense mask (and of the
  federated pruning metrics' kept/total) is still exactly 0, and one pruned entry is 1/n."""
  from fedprune_jax.algorithms import fedprune

  mask = {"a": jnp.ones((2**24 + 1,), bool), "b": None, "c": jnp.ones((2**25 + 7, 1), bool)}
  n = 3 * 2**24 + 8
  assert float(jax.jit(pruning.sparsity)(mask)) == 0.0
  kept, total = jax.jit(fedprune.mask_stats)(mask)
  assert float(jax.jit(lambda k, t: 1.0 - k / t)(kept, total)) == 0.0
  one = {**mask, "a": mask["a"].at[0].set(False)}
  assert float(pruning.sparsity(one)) == pytest.approx(1 / n, rel=1e-6)
