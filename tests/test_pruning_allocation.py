"""Patterns, exact selection and allocation vs. brute-force references."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from fedprune_jax.pruning import allocation as alloc
from fedprune_jax.pruning import masks as masks_lib
from fedprune_jax.pruning import patterns as pat
from fedprune_jax.pruning import selection

# Every new (shapes, pattern) pair costs a jit compilation: keep examples few.
SETTINGS = settings(max_examples=10, deadline=None)
FEW = settings(max_examples=6, deadline=None)
BLOCKS = [pat.UNSTRUCTURED, pat.ROW, pat.COLUMN, pat.HALF_ROW, pat.HALF_COLUMN, pat.Block(2, 3)]


# ------------------------------------------------------------ references


def ref_groups(s: np.ndarray, block: pat.Block):
  """Group sums and sizes by explicit loops over the 2-D view."""
  h, w = pat.view_shape(s.shape)
  bh, bw = block.resolve((h, w))
  x = s.reshape(h, w)
  gh, gw = math.ceil(h / bh), math.ceil(w / bw)
  g = np.zeros((gh, gw), np.float64)
  n = np.zeros((gh, gw), np.int64)
  for i in range(gh):
    for j in range(gw):
      blk = x[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw]
      g[i, j], n[i, j] = blk.sum(), blk.size
  return g, n


def ref_select(scores: list[np.ndarray], sizes: list[np.ndarray], need: int):
  """Stable sort (ties by global index), prune while midpoint <= need."""
  flat = np.concatenate([s.ravel() for s in scores])
  w = np.concatenate([z.ravel() for z in sizes])
  order = np.argsort(flat, kind="stable")
  excl = np.cumsum(w[order]) - w[order]
  prune = np.zeros(flat.shape, bool)
  prune[order] = 2 * excl + w[order] <= 2 * need
  prune &= need > 0
  out, o = [], 0
  for s in scores:
    out.append(prune[o : o + s.size].reshape(s.shape))
    o += s.size
  return out


def expand(gm: np.ndarray, shape, block):
  h, w = pat.view_shape(shape)
  bh, bw = block.resolve((h, w))
  full = np.repeat(np.repeat(gm, bh, 0), bw, 1)[:h, :w]
  return full.reshape(shape)


# ------------------------------------------------------------ strategies

# A small menu of shapes (ragged for every block) keeps jit compilations few.
shape_st = st.sampled_from([(4, 6), (5, 5), (7, 3), (1, 7), (6, 1), (2, 2, 3, 4)])


@st.composite
def problem(draw):
  n = draw(st.integers(1, 2))
  shapes = [draw(shape_st) for _ in range(n)]
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  # Small integer scores: exact group sums and plenty of ties.
  tree = {
    "encoder": {
      f"layer_{i}": {"kernel": rng.integers(0, 6, s).astype(np.float32)}
      for i, s in enumerate(shapes)
    }
  }
  block = draw(st.sampled_from(BLOCKS))
  s = draw(st.floats(0.0, 1.0))
  return tree, block, s


def leaves(tree):
  return [v for _, v in masks_lib.flatten_with_paths(tree)]


# ------------------------------------------------------------ tests


@SETTINGS
@given(problem(), st.sampled_from(["sort", "radix"]))
def test_global_matches_bruteforce(prob, method):
  tree, block, s = prob
  mask = alloc.prune_mask(tree, s, pattern=block, allocation=alloc.Global("none"), method=method)
  scores = leaves(tree)
  groups = [ref_groups(x, block) for x in scores]
  total = sum(x.size for x in scores)
  need = int(np.round(np.float32(s) * np.float32(total)))
  ref = ref_select([g for g, _ in groups], [n for _, n in groups], need)
  got = leaves(mask)
  pruned = 0
  for x, m, r in zip(scores, got, ref):
    np.testing.assert_array_equal(np.asarray(m), ~expand(r, x.shape, block))
    pruned += int((~np.asarray(m)).sum())
  max_group = max(int(n.max()) for _, n in groups)
  assert abs(pruned - need) <= max_group


@SETTINGS
@given(problem(), st.sampled_from(["sort", "radix"]))
def test_uniform_per_layer_within_one_group(prob, method):
  tree, block, s = prob
  mask = alloc.prune_mask(tree, s, pattern=block, allocation="uniform", method=method)
  for x, m in zip(leaves(tree), leaves(mask)):
    g, n = ref_groups(x, block)
    need = int(np.round(np.float32(s) * np.float32(x.size)))
    (r,) = ref_select([g], [n], need)
    m = np.asarray(m)
    np.testing.assert_array_equal(m, ~expand(r, x.shape, block))
    assert abs(int((~m).sum()) - need) <= int(n.max())


@FEW
@given(problem())
def test_structured_mask_constant_within_groups(prob):
  tree, block, s = prob
  # global / uniform are compared exactly with expanded group masks above.
  for a in ("adaptive", "erk"):
    mask = alloc.prune_mask(tree, s, pattern=block, allocation=a)
    for x, m in zip(leaves(tree), leaves(mask)):
      m = np.asarray(m)
      h, w = pat.view_shape(x.shape)
      bh, bw = block.resolve((h, w))
      m2 = m.reshape(h, w)
      for i in range(0, h, bh):
        for j in range(0, w, bw):
          blk = m2[i : i + bh, j : j + bw]
          assert blk.all() or not blk.any(), (a, block, i, j)


@FEW
@given(
  st.integers(1, 4).flatmap(
    lambda m: st.tuples(
      st.integers(0, m),
      st.just(m),
      st.integers(1, 3),
      st.integers(1, 5),
      st.sampled_from(["in", "out"]),
      st.integers(0, 999),
    )
  )
)
def test_nm_exact_and_topn(args):
  n, m, rows, cols, axis, seed = args
  shape = (rows * m, cols) if axis == "in" else (cols, rows * m)
  x = np.random.default_rng(seed).integers(0, 4, shape).astype(np.float32)
  keep = np.asarray(pat.nm_mask(jnp.asarray(x), pat.NM(n, m, axis)))
  xv, kv = (x, keep) if axis == "in" else (x.T, keep.T)
  for j in range(xv.shape[1]):
    for g in range(0, xv.shape[0], m):
      col, kk = xv[g : g + m, j], kv[g : g + m, j]
      assert kk.sum() == n
      ref = np.argsort(-col, kind="stable")[:n]  # ties: lower index kept
      assert set(np.flatnonzero(kk)) == set(ref)


def test_nm_bad_dim_names_path():
  with pytest.raises(ValueError, match="enc/k"):
    pat.nm_mask(jnp.ones((6, 3)), pat.NM(2, 4), "enc/k")


_N = 257
_select_radix = jax.jit(
  lambda parts, need: selection.select_lowest(
    [selection.sortable_key(p) for p in parts], [None] * len(parts), need, method="radix"
  )
)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**16), st.floats(0, 1))
def test_select_lowest_exact_on_floats(seed, frac):
  rng = np.random.default_rng(seed)
  n = _N
  # Wide dynamic range, negatives, zeros of both signs and duplicates.
  x = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(np.float32)
  x[rng.random(n) < 0.2] = 0.0
  x[rng.random(n) < 0.1] = -0.0
  x[rng.random(n) < 0.1] = x[0]
  parts = np.split(x, [100, 200])
  need = int(round(frac * n))
  got = _select_radix([jnp.asarray(p) for p in parts], need)
  ref = ref_select(
    [p + np.float32(0.0) for p in parts], [np.ones(p.shape, int) for p in parts], need
  )
  for g, r in zip(got, ref):
    np.testing.assert_array_equal(np.asarray(g), r)
  assert sum(int(np.asarray(g).sum()) for g in got) == need


def test_ties_broken_by_index_reproducibly():
  tree = {
    "a": {"kernel": np.ones((4, 5), np.float32)},
    "b": {"kernel": np.ones((3, 3), np.float32)},
  }
  m1 = alloc.prune_mask(tree, 0.5, allocation="global")
  m2 = jax.jit(lambda t: alloc.prune_mask(t, 0.5, allocation="global"))(tree)
  need = round(0.5 * 29)
  flat = np.concatenate(
    [np.asarray(m1["a"]["kernel"]).ravel(), np.asarray(m1["b"]["kernel"]).ravel()]
  )
  np.testing.assert_array_equal(flat, np.arange(29) >= need)  # lowest indices pruned
  for k in ("a", "b"):
    np.testing.assert_array_equal(m1[k]["kernel"], m2[k]["kernel"])


def test_jit_with_traced_sparsity_matches_eager():
  rng = np.random.default_rng(0)
  tree = {
    "x": {"kernel": rng.standard_normal((6, 8)).astype(np.float32)},
    "y": {
      "kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
      "bias": rng.standard_normal(4).astype(np.float32),
    },
  }
  f = jax.jit(lambda t, s: alloc.prune_mask(t, s, pattern="column", allocation="adaptive"))
  for s in (0.0, 0.3, 0.8, 1.0):
    a, b = f(tree, s), alloc.prune_mask(tree, s, pattern="column", allocation="adaptive")
    assert a["y"]["bias"] is None
    for p in ("x", "y"):
      np.testing.assert_array_equal(a[p]["kernel"], b[p]["kernel"])


def test_global_mean_normalisation_is_scale_invariant():
  rng = np.random.default_rng(1)
  a = rng.random((8, 8)).astype(np.float32)
  b = rng.random((4, 16)).astype(np.float32)
  m1 = alloc.prune_mask({"a": {"kernel": a}, "b": {"kernel": b}}, 0.4)
  m2 = alloc.prune_mask({"a": {"kernel": a * 1024.0}, "b": {"kernel": b}}, 0.4)
  for k in ("a", "b"):
    np.testing.assert_array_equal(m1[k]["kernel"], m2[k]["kernel"])
  # Without normalisation the scaled layer keeps everything.
  m3 = alloc.prune_mask(
    {"a": {"kernel": a * 1024.0}, "b": {"kernel": b}}, 0.4, allocation=alloc.Global("none")
  )
  assert np.asarray(m3["a"]["kernel"]).all()


@FEW
@given(problem(), st.floats(0.0, 0.5), st.floats(0.5, 1.0))
def test_adaptive_bounds_and_global_target(prob, floor, ceil):
  tree, block, s = prob
  mask = alloc.prune_mask(tree, s, pattern=block, allocation=alloc.Adaptive(floor, ceil, "none"))
  scores = leaves(tree)
  total = sum(x.size for x in scores)
  lo = sum(math.ceil(floor * x.size - 1e-9) for x in scores)
  hi = sum(math.floor(ceil * x.size + 1e-9) for x in scores)
  need = min(max(int(np.round(np.float32(s) * total)), lo), hi)
  pruned = 0
  for x, m in zip(scores, leaves(mask)):
    _, n = ref_groups(x, block)
    p = int((~np.asarray(m)).sum())
    pruned += p
    assert floor * x.size - n.max() <= p <= ceil * x.size + n.max()
  max_group = max(int(ref_groups(x, block)[1].max()) for x in scores)
  assert abs(pruned - need) <= len(scores) * max_group


def test_adaptive_unbounded_equals_global():
  rng = np.random.default_rng(2)
  tree = {f"l{i}": {"kernel": rng.random((5, 7)).astype(np.float32) * (i + 1)} for i in range(3)}
  for s in (0.2, 0.55):
    a = alloc.prune_mask(tree, s, allocation=alloc.Adaptive(0.0, 1.0))
    g = alloc.prune_mask(tree, s, allocation=alloc.Global())
    for k in tree:
      np.testing.assert_array_equal(a[k]["kernel"], g[k]["kernel"])


def test_adaptive_floor_ceiling_binding():
  # Layer "big" has tiny scores (global ranking would prune it first).
  tree = {
    "big": {"kernel": np.full((10, 10), 0.01, np.float32) + np.arange(100).reshape(10, 10) * 1e-4},
    "small": {"kernel": np.arange(100, dtype=np.float32).reshape(10, 10) + 1},
  }
  m = alloc.prune_mask(tree, 0.5, allocation=alloc.Adaptive(0.2, 0.7, "none"))
  assert 1 - np.mean(m["big"]["kernel"]) == pytest.approx(0.7)
  assert 1 - np.mean(m["small"]["kernel"]) == pytest.approx(0.3)
  # The small layer prunes its 30 lowest scores.
  np.testing.assert_array_equal(np.asarray(m["small"]["kernel"]).ravel(), np.arange(100) >= 30)


def test_erk_densities_match_closed_form():
  shapes = [(64, 64), (64, 256), (3, 3, 16, 32), (8, 8)]
  d = np.asarray(alloc.erk_densities(shapes, 0.2))
  n = np.array([math.prod(s) for s in shapes], float)
  raw = np.array([sum(s) / math.prod(s) for s in shapes])
  np.testing.assert_allclose((d * n).sum() / n.sum(), 0.2, rtol=1e-5)
  free = d < 1.0 - 1e-6
  eps = d[free] / raw[free]
  np.testing.assert_allclose(eps, eps[0], rtol=1e-5)  # common epsilon
  assert d[3] == pytest.approx(1.0)  # small layer dense
  assert np.all(raw[~free] * eps[0] >= 1.0 - 1e-5)


def test_exclusion_by_path_pattern():
  tree = {
    "encoder": {
      "a": {"kernel": np.ones((4, 4), np.float32)},
      "b": {"kernel": np.ones((4, 4), np.float32)},
    },
    "ctc_head": {"kernel": np.ones((4, 3), np.float32)},
  }
  m = alloc.prune_mask(tree, 0.5, exclude=masks_lib.DEFAULT_EXCLUDE + ("glob:encoder/b/*",))
  assert m["ctc_head"]["kernel"] is None and m["encoder"]["b"]["kernel"] is None
  assert np.mean(m["encoder"]["a"]["kernel"]) == 0.5


def test_per_path_patterns_and_parse():
  assert pat.parse_pattern("half_column") == pat.Block("half", 1)
  assert pat.parse_pattern("block:2x4") == pat.Block(2, 4)
  assert pat.parse_pattern("2:4:out") == pat.NM(2, 4, "out")
  with pytest.raises(ValueError, match="unknown pruning pattern"):
    pat.parse_pattern("diagonal")
  tree = {
    "ffn": {"kernel": np.random.default_rng(0).random((8, 4)).astype(np.float32)},
    "att": {"kernel": np.random.default_rng(1).random((4, 6)).astype(np.float32)},
  }
  m = alloc.prune_mask(tree, 0.5, pattern=(("ffn", "2:4"), ("att", "column")))
  f = np.asarray(m["ffn"]["kernel"]).reshape(2, 4, 4)
  assert (f.sum(axis=1) == 2).all()
  a = np.asarray(m["att"]["kernel"])
  assert (a.all(axis=0) | ~a.any(axis=0)).all() and (~a).sum() == 12


def test_adaptive_bounds_from_a_string():
  from fedprune_jax.pruning import allocation as alloc_lib

  assert alloc_lib.parse_allocation("adaptive:0.5-0.9") == alloc_lib.Adaptive(floor=0.5, ceil=0.9)
  assert alloc_lib.parse_allocation("adaptive") == alloc_lib.Adaptive()
  for bad in ("adaptive:0.9-0.5", "adaptive:x", "adaptive:0.5"):
    with pytest.raises(ValueError, match="adaptive"):
      alloc_lib.parse_allocation(bad)
