"""Tests for fedprune_jax.models.conformer (tiny shapes, CPU)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedprune_jax.models import conformer as C

MICRO = C.ConformerConfig(
  d_model=32,
  num_layers=2,
  num_heads=2,
  conv_kernel=5,
  conv_groups=4,
  subsample_channels=8,
  input_dim=16,
  dropout_rate=0.2,
  attention_dropout_rate=0.2,
)


def _init(cfg=MICRO, t=12, seed=0):
  enc = C.ConformerEncoder(cfg)
  x = jnp.zeros((1, t, cfg.input_dim))
  shapes = jax.eval_shape(
    lambda k: enc.init(k, x, jnp.zeros((1, t)), False), jax.random.PRNGKey(seed)
  )
  params = C.init_from_shapes(shapes["params"], jax.random.PRNGKey(seed))
  # Non-zero biases / norm offsets so that tests exercise them.
  params = jax.tree_util.tree_map(
    lambda a: a + 0.1 * jnp.asarray(np.random.default_rng(a.size).normal(size=a.shape), a.dtype),
    params,
  )
  return enc, params


def test_init_from_shapes_matches_flax_distributions():
  cfg = MICRO.replace(d_model=64, num_heads=4, conv_groups=8)
  block = C.ConformerBlock(cfg)
  x = jnp.zeros((1, 4, 64))
  flax_params = block.init(jax.random.PRNGKey(0), x, jnp.zeros((1, 4)), False)["params"]
  shapes = jax.eval_shape(lambda: flax_params)
  fast = C.init_from_shapes(shapes, jax.random.PRNGKey(0))
  jitted = jax.jit(lambda k: C.init_from_shapes(shapes, k))(jax.random.PRNGKey(0))
  for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # host == traced path
  assert jax.tree_util.tree_structure(fast) == jax.tree_util.tree_structure(flax_params)
  for path, a in jax.tree_util.tree_leaves_with_path(fast):
    ref = np.asarray(_get(flax_params, path))
    a = np.asarray(a)
    assert a.shape == ref.shape and a.dtype == ref.dtype
    name = str(path[-1].key)
    if name == "kernel" and a.size >= 1000:  # same std as flax's lecun_normal
      np.testing.assert_allclose(a.std(), ref.std(), rtol=0.1)
      fan_in = a.size // a.shape[-1]
      np.testing.assert_allclose(a.std(), 1 / np.sqrt(fan_in), rtol=0.1)
      assert np.abs(a).max() <= 2 / np.sqrt(fan_in) / 0.87962566 * 1.0001  # truncated at 2 sigma
    elif name != "kernel":
      np.testing.assert_array_equal(a, ref)


def _get(tree, path):
  for p in path:
    tree = tree[p.key]
  return tree


def _features(b, t, f, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, f)), jnp.float32)


def test_rel_shift_matches_gather():
  for t in (1, 2, 5, 8):
    x = np.random.default_rng(t).normal(size=(2, 3, t, 2 * t - 1)).astype(np.float32)
    ref = np.empty((2, 3, t, t), np.float32)
    for i in range(t):
      for j in range(t):
        ref[..., i, j] = x[..., i, (t - 1) - i + j]
    np.testing.assert_array_equal(np.asarray(C.rel_shift(jnp.asarray(x))), ref)


def test_rel_positional_embedding_independent_of_length():
  short, long = C.rel_positional_embedding(4, 16), C.rel_positional_embedding(9, 16)
  # Row c encodes distance (T-1)-c; distances 3..-3 sit at rows 0..6 (T=4), 5..11 (T=9).
  np.testing.assert_allclose(np.asarray(short), np.asarray(long[5:12]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(long[8]), np.r_[np.zeros(8), np.ones(8)], atol=1e-7)


@pytest.mark.parametrize("t", [1, 2, 7, 8, 13])
def test_shapes(t):
  enc, params = _init()
  out, pad = jax.eval_shape(
    lambda x: enc.apply({"params": params}, x, jnp.zeros((2, t)), False), _features(2, t, 16)
  )
  tp = -(-(-(-t // 2)) // 2)
  assert out.shape == (2, tp, 32) and pad.shape == (2, tp)
  assert out.dtype == jnp.float32


def test_padding_invariance_across_pad_amounts():
  enc, params = _init()
  apply = jax.jit(lambda f, p: enc.apply({"params": params}, f, p, False))
  for length, extras in ((13, (1, 6)), (14, (3,))):
    x = _features(1, length, 16, seed=length)
    ref, ref_pad = apply(x, jnp.zeros((1, length)))
    n = ref.shape[1]
    assert float(ref_pad.sum()) == 0
    for extra in extras:
      xp = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
      pp = jnp.pad(jnp.zeros((1, length)), ((0, 0), (0, extra)), constant_values=1.0)
      out, pad = apply(xp, pp)
      np.testing.assert_array_equal(np.asarray(pad[0, :n]), 0.0)
      np.testing.assert_array_equal(np.asarray(pad[0, n:]), 1.0)
      np.testing.assert_allclose(np.asarray(out[0, :n]), np.asarray(ref[0]), atol=1e-5)
      np.testing.assert_array_equal(np.asarray(out[0, n:]), 0.0)


def test_padding_invariance_garbage_in_padded_frames():
  """Non-zero values in padded frames must not leak into real frames."""
  enc, params = _init()
  lengths = [9, 16, 4]
  t = 16
  x = _features(3, t, 16, seed=5)
  pad = jnp.asarray([[0.0] * n + [1.0] * (t - n) for n in lengths])
  apply = jax.jit(lambda f, p: enc.apply({"params": params}, f, p, False))
  out, out_pad = apply(x, pad)
  for i, n in enumerate(lengths):
    single, _ = apply(x[i : i + 1, :n], jnp.zeros((1, n)))
    m = single.shape[1]
    assert float((1 - out_pad[i]).sum()) == m
    np.testing.assert_allclose(np.asarray(out[i, :m]), np.asarray(single[0]), atol=1e-5)


def test_masked_group_norm_matches_reference():
  gn = C.MaskedGroupNorm(num_groups=3)
  x = _features(2, 7, 12, seed=3)
  pad = jnp.asarray([[0, 0, 0, 0, 1, 1, 1], [0] * 7], jnp.float32)
  params = gn.init(jax.random.PRNGKey(0), x, pad)
  params = jax.tree_util.tree_map(lambda p: p + jnp.arange(p.size, dtype=p.dtype) * 0.1, params)
  y = np.asarray(gn.apply(params, x, pad))
  xs, ps = np.asarray(x), np.asarray(pad)
  scale, bias = (np.asarray(params["params"][k]) for k in ("scale", "bias"))
  for b in range(2):
    real = xs[b][ps[b] == 0]  # [n, 12]
    for g in range(3):
      block = real[:, 4 * g : 4 * g + 4]
      ref = (block - block.mean()) / np.sqrt(block.var() + 1e-5)
      ref = ref * scale[4 * g : 4 * g + 4] + bias[4 * g : 4 * g + 4]
      np.testing.assert_allclose(y[b][ps[b] == 0][:, 4 * g : 4 * g + 4], ref, atol=1e-5)


def test_dropout_determinism_per_rng():
  enc, params = _init()
  x, p = _features(2, 12, 16), jnp.zeros((2, 12))
  train = jax.jit(lambda key: enc.apply({"params": params}, x, p, True, rngs={"dropout": key})[0])
  run = lambda seed: np.asarray(train(jax.random.PRNGKey(seed)))  # noqa: E731
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3
  ev = jax.jit(lambda: enc.apply({"params": params}, x, p, False)[0])
  evals = [np.asarray(ev()) for _ in range(2)]
  np.testing.assert_array_equal(*evals)
  assert np.abs(evals[0] - a).max() > 1e-3


def test_params_naming_and_shapes():
  cfg = MICRO
  _, params = _init()
  d, c, k = cfg.d_model, cfg.subsample_channels, cfg.conv_kernel
  s = params["subsample"]
  assert s["conv1"]["kernel"].shape == (3, 3, 1, c)
  assert s["conv2"]["kernel"].shape == (3, 3, c, c)
  assert s["proj"]["kernel"].shape == (c * cfg.input_dim // 4, d)
  blk = params["block_1"]
  assert set(blk) == {"ffn1", "mhsa", "conv", "ffn2", "final_norm"}
  for ffn in ("ffn1", "ffn2"):
    assert blk[ffn]["dense_in"]["kernel"].shape == (d, 4 * d)
    assert blk[ffn]["dense_out"]["kernel"].shape == (4 * d, d)
  for name in ("query", "key", "value", "pos", "out"):
    assert blk["mhsa"][name]["kernel"].shape == (d, d)
  assert blk["mhsa"]["pos_bias_u"].shape == (cfg.num_heads, cfg.head_dim)
  assert blk["mhsa"]["pos_bias_v"].shape == (cfg.num_heads, cfg.head_dim)
  assert blk["conv"]["pointwise_in"]["kernel"].shape == (d, 2 * d)
  assert blk["conv"]["depthwise"]["kernel"].shape == (k, 1, d)
  assert blk["conv"]["group_norm"]["scale"].shape == (d,)
  assert blk["conv"]["pointwise_out"]["kernel"].shape == (d, d)


def _layer_norm(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def test_attention_matches_bruteforce_reference():
  """Per-(head, i, j) loop over the Transformer-XL score with a key mask."""
  cfg = MICRO.replace(dropout_rate=0.0, attention_dropout_rate=0.0)
  att = C.RelPosSelfAttention(cfg)
  t, d, h, dh = 6, cfg.d_model, cfg.num_heads, cfg.head_dim
  x = _features(2, t, d, seed=7)
  pad = jnp.asarray([[0] * t, [0, 0, 0, 0, 1, 1]], jnp.float32)
  params = att.init(jax.random.PRNGKey(0), x, pad, False)["params"]
  params = jax.tree_util.tree_map(  # non-trivial biases / norm params
    lambda a: a + 0.05 * jnp.asarray(np.random.default_rng(a.size).normal(size=a.shape), a.dtype),
    params,
  )
  got = np.asarray(att.apply({"params": params}, x, pad, False))
  P = jax.tree_util.tree_map(np.asarray, params)
  dense = lambda y, n: y @ P[n]["kernel"] + P[n].get("bias", 0.0)  # noqa: E731
  for b in range(2):
    y = _layer_norm(np.asarray(x[b]), P["norm"])
    q, k, v = (dense(y, n).reshape(t, h, dh) for n in ("query", "key", "value"))
    o = np.zeros((t, h, dh))
    for hh in range(h):
      for i in range(t):
        s = np.full(t, -np.inf)
        for j in range(t):
          if pad[b, j] > 0:
            continue
          r = i - j
          e = np.asarray(C.rel_positional_embedding(t, d))[(t - 1) - r]
          p = (e @ P["pos"]["kernel"]).reshape(h, dh)[hh]
          s[j] = (
            (q[i, hh] + P["pos_bias_u"][hh]) @ k[j, hh] + (q[i, hh] + P["pos_bias_v"][hh]) @ p
          ) / np.sqrt(dh)
        a = np.exp(s - s.max())
        a /= a.sum()
        o[i, hh] = a @ v[:, hh]
    ref = dense(o.reshape(t, d), "out")
    np.testing.assert_allclose(got[b], ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "s"])
def test_count_params_matches_analytic(name):
  cfg = C.PRESETS[name]
  shapes = jax.eval_shape(
    lambda: C.ConformerEncoder(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 80)), jnp.zeros((1, 8)), False
    )
  )["params"]
  assert C.count_params(shapes) == C.analytic_param_count(cfg)


def test_preset_sizes():
  counts = {n: C.analytic_param_count(c, vocab_size=29) for n, c in C.PRESETS.items()}
  assert 0.8e6 <= counts["tiny"] <= 3e6
  assert counts["tiny"] < counts["s"] < counts["m"] < counts["l"]
  assert 110e6 <= counts["l"] <= 125e6
  shapes = jax.eval_shape(
    lambda: C.ConformerEncoder(C.PRESETS["l"]).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 80)), jnp.zeros((1, 8)), False
    )
  )
  assert C.count_params(shapes) == C.analytic_param_count(C.PRESETS["l"])


def test_config_validation():
  with pytest.raises(ValueError, match="conv_kernel"):
    MICRO.replace(conv_kernel=4)
  with pytest.raises(ValueError, match="num_heads"):
    MICRO.replace(num_heads=3)
  with pytest.raises(ValueError, match="conv_groups"):
    MICRO.replace(conv_groups=5)
  with pytest.raises(ValueError, match="unknown Conformer preset"):
    C.get_config("xl")
  enc, params = _init()
  with pytest.raises(ValueError, match="features"):
    enc.apply({"params": params}, jnp.zeros((1, 8, 10)), jnp.zeros((1, 8)), False)


def test_dense_layer_sizes_identical_to_default():
  """layer_sizes equal to the dense sizes: same params tree, shapes and outputs."""
  d, h, g = MICRO.d_model, MICRO.num_heads, MICRO.conv_groups
  cfg = MICRO.replace(layer_sizes=[[h, 4 * d, 4 * d, g]] * MICRO.num_layers)
  assert cfg.layer_sizes == ((h, 4 * d, 4 * d, g),) * MICRO.num_layers  # normalised
  hash(cfg)  # still usable as a static jit arg
  enc, params = _init()
  enc2, params2 = _init(cfg)
  assert jax.tree.map(jnp.shape, params2) == jax.tree.map(jnp.shape, params)
  for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert C.analytic_param_count(cfg) == C.analytic_param_count(MICRO)
  x, pad = _features(2, 13, MICRO.input_dim), jnp.zeros((2, 13)).at[1, 9:].set(1.0)
  rng = {"dropout": jax.random.PRNGKey(3)}
  for train in (False, True):
    ref = enc.apply({"params": params}, x, pad, train, rngs=rng)[0]
    got = enc2.apply({"params": params}, x, pad, train, rngs=rng)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_per_block_layer_sizes_shapes_and_count():
  dh, cpg = MICRO.head_dim, MICRO.conv_group_channels
  cfg = MICRO.replace(layer_sizes=((1, 7, 3, 2), (2, 128, 5, 1)))
  enc = C.ConformerEncoder(cfg)
  shapes = jax.eval_shape(
    lambda k: enc.init(k, jnp.zeros((1, 8, 16)), jnp.zeros((1, 8)), False), jax.random.PRNGKey(0)
  )["params"]
  b0, b1 = shapes["block_0"], shapes["block_1"]
  assert b0["mhsa"]["query"]["kernel"].shape == (32, dh)
  assert b0["mhsa"]["out"]["kernel"].shape == (dh, 32)
  assert b0["mhsa"]["pos_bias_u"].shape == (1, dh)
  assert b0["ffn1"]["dense_in"]["kernel"].shape == (32, 7)
  assert b0["ffn2"]["dense_out"]["kernel"].shape == (3, 32)
  assert b0["conv"]["pointwise_in"]["kernel"].shape == (32, 4 * cpg)
  assert b0["conv"]["depthwise"]["kernel"].shape == (5, 1, 2 * cpg)
  assert b1["mhsa"]["pos"]["kernel"].shape == (32, 2 * dh)
  assert b1["conv"]["group_norm"]["scale"].shape == (cpg,)
  assert C.count_params(shapes) == C.analytic_param_count(cfg)
  out, _ = jax.eval_shape(
    lambda p: enc.apply({"params": p}, jnp.zeros((2, 9, 16)), jnp.zeros((2, 9)), False), shapes
  )
  assert out.shape == (2, 3, 32)


@pytest.mark.parametrize(
  "bad",
  [
    ((2, 128, 128, 4),),  # wrong length (num_layers = 2)
    ((2, 128, 128, 4), (2, 0, 128, 4)),  # zero units
    ((2, 128, 128, 4), (2, 128, 128)),  # not a 4-tuple
    ((2, 128, 128, 4), (2, 1.5, 128, 4)),  # not an integer
    ((2, 128, 128, 4), (True, 128, 128, 4)),  # bool
    5,  # not a sequence
  ],
)
def test_bad_layer_sizes_raise_naming_the_field(bad):
  with pytest.raises(ValueError, match="ConformerConfig.layer_sizes"):
    MICRO.replace(layer_sizes=bad)


def test_depthwise_conv_matches_xla_grouped_conv_and_grads():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 9, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
  ref_fn = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
    x,
    w[:, None, :],
    (1,),
    ((2, 2),),
    dimension_numbers=("NWC", "WIO", "NWC"),
    feature_group_count=6,
  )
  np.testing.assert_allclose(
    np.asarray(C.depthwise_conv1d(x, w)), np.asarray(ref_fn(x, w)), atol=1e-5
  )
  probe = jnp.asarray(rng.normal(size=(2, 9, 6)), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)) * probe)  # noqa: E731
  got = jax.grad(loss(C.depthwise_conv1d), argnums=(0, 1))(x, w)
  ref = jax.grad(loss(ref_fn), argnums=(0, 1))(x, w)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-5)


def test_dropout_rate_and_scaling():
  drop = C.Dropout(0.25)
  x = jnp.ones((4, 1000, 8))
  y = np.asarray(drop.apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)}))
  kept = y != 0
  assert abs(kept.mean() - 0.75) < 0.01
  np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(drop.apply({}, x, True)), np.asarray(x))


def test_conv2d_stride2_matches_xla_conv():
  rng = np.random.default_rng(6)
  for t, f in ((7, 10), (8, 9)):
    x = jnp.asarray(rng.normal(size=(2, t, f, 3)), jnp.float32)
    mod = C.Conv2DStride2(4)
    params = mod.init(jax.random.PRNGKey(0), x)
    params = jax.tree_util.tree_map(lambda a: a + 0.3, params)
    ref = nn.Conv(4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))).apply(params, x)
    got = mod.apply(params, x)
    assert got.shape == ref.shape == (2, -(-t // 2), -(-f // 2), 4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
