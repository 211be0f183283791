"""Conformer units (heads / FFN units / conv groups) and compaction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedprune_jax import pruning
from fedprune_jax.models import asr
from fedprune_jax.models import conformer
from fedprune_jax.pruning import compaction
from fedprune_jax.pruning import units


@pytest.fixture(scope="module")
def tiny():
  model = asr.make_asr_model("tiny", dropout_rate=0.0, attention_dropout_rate=0.0)
  params = model.init(jax.random.PRNGKey(0))
  return model, params


def test_unit_counts_and_sizes(tiny):
  model, params = tiny
  cfg = model.config
  d, h, dh, cpg = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_model // cfg.conv_groups
  n = units.num_units(params, cfg)["block_0"]
  assert n == {"mhsa": h, "ffn1": 4 * d, "ffn2": 4 * d, "conv": cfg.conv_groups}
  s = units.unit_sizes(params, cfg)["block_0"]
  assert s["mhsa"] == 4 * d * dh + 3 * dh + dh * d + 2 * dh
  assert s["ffn1"] == d + 1 + d
  assert s["conv"] == d * 2 * cpg + 2 * cpg + cfg.conv_kernel * cpg + cpg + 2 * cpg + cpg * d


def test_unit_scores_bruteforce(tiny):
  model, params = tiny
  cfg = model.config
  blk = jax.tree.map(np.asarray, params["encoder"]["block_1"])
  us = units.unit_scores(params, cfg)["block_1"]
  dh, d, cpg = cfg.head_dim, cfg.d_model, cfg.d_model // cfg.conv_groups
  h = 2
  cols = slice(h * dh, (h + 1) * dh)
  ref = sum(
    (blk["mhsa"][k]["kernel"][:, cols] ** 2).sum() for k in ("query", "key", "value", "pos")
  )
  ref += sum((blk["mhsa"][k]["bias"][cols] ** 2).sum() for k in ("query", "key", "value"))
  ref += (blk["mhsa"]["out"]["kernel"][cols] ** 2).sum()
  ref += (blk["mhsa"]["pos_bias_u"][h] ** 2).sum() + (blk["mhsa"]["pos_bias_v"][h] ** 2).sum()
  assert float(us["mhsa"][h]) == pytest.approx(float(ref), rel=1e-5)
  j = 17
  ref = (
    (blk["ffn2"]["dense_in"]["kernel"][:, j] ** 2).sum()
    + blk["ffn2"]["dense_in"]["bias"][j] ** 2
    + (blk["ffn2"]["dense_out"]["kernel"][j] ** 2).sum()
  )
  assert float(us["ffn2"][j]) == pytest.approx(float(ref), rel=1e-5)
  g = 3
  ch = np.arange(g * cpg, (g + 1) * cpg)
  c = blk["conv"]
  ref = (
    (c["pointwise_in"]["kernel"][:, ch] ** 2).sum()
    + (c["pointwise_in"]["kernel"][:, ch + d] ** 2).sum()
    + (c["pointwise_in"]["bias"][ch] ** 2).sum()
    + (c["pointwise_in"]["bias"][ch + d] ** 2).sum()
    + (c["depthwise"]["kernel"][..., ch] ** 2).sum()
    + (c["depthwise"]["bias"][ch] ** 2).sum()
    + (c["group_norm"]["scale"][ch] ** 2).sum()
    + (c["group_norm"]["bias"][ch] ** 2).sum()
    + (c["pointwise_out"]["kernel"][ch] ** 2).sum()
  )
  assert float(us["conv"][g]) == pytest.approx(float(ref), rel=1e-5)


def test_expand_unit_mask_consistent_across_members(tiny):
  model, params = tiny
  cfg = model.config
  um = units.unit_mask(params, cfg, 0.5, allocation="global")
  m = units.expand_unit_mask(params, cfg, um)
  dh, d, cpg = cfg.head_dim, cfg.d_model, cfg.d_model // cfg.conv_groups
  for b in ("block_0", "block_3"):
    blk, k = m["encoder"][b], {kk: np.asarray(v) for kk, v in um[b].items()}
    cols = np.repeat(k["mhsa"], dh)
    for name in ("query", "key", "value", "pos"):
      np.testing.assert_array_equal(blk["mhsa"][name]["kernel"], np.broadcast_to(cols, (d, d)))
    np.testing.assert_array_equal(
      blk["mhsa"]["out"]["kernel"], np.broadcast_to(cols[:, None], (d, d))
    )
    np.testing.assert_array_equal(blk["mhsa"]["pos_bias_u"][:, 0], k["mhsa"])
    assert blk["mhsa"]["out"]["bias"] is None and blk["mhsa"]["norm"]["scale"] is None
    np.testing.assert_array_equal(blk["ffn1"]["dense_in"]["kernel"][0], k["ffn1"])
    np.testing.assert_array_equal(blk["ffn1"]["dense_out"]["kernel"][:, 0], k["ffn1"])
    ch = np.repeat(k["conv"], cpg)
    np.testing.assert_array_equal(
      blk["conv"]["pointwise_in"]["kernel"][0], np.concatenate([ch, ch])
    )
    np.testing.assert_array_equal(blk["conv"]["depthwise"]["kernel"][0, 0], ch)
    np.testing.assert_array_equal(blk["conv"]["group_norm"]["scale"], ch)
    np.testing.assert_array_equal(blk["conv"]["pointwise_out"]["kernel"][:, 0], ch)
  assert m["ctc_head"]["kernel"] is None


def test_unit_allocation_counts(tiny):
  model, params = tiny
  cfg = model.config
  um = units.unit_mask(params, cfg, 0.5, allocation="uniform")
  for b in um:
    assert int(um[b]["mhsa"].sum()) == cfg.num_heads // 2
    assert int(um[b]["conv"].sum()) == cfg.conv_groups // 2
    assert int(um[b]["ffn1"].sum()) == 2 * cfg.d_model
  # min_keep: even at sparsity 1 every (block, kind) keeps one unit.
  um = units.unit_mask(params, cfg, 1.0, allocation="global")
  assert all(int(v.sum()) == 1 for d in um.values() for v in d.values())
  # Global: the pruned params fraction is within one unit of the target.
  um = units.unit_mask(params, cfg, 0.4, allocation="global")
  sizes = units.unit_sizes(params, cfg)
  n = units.num_units(params, cfg)
  tot = sum(n[b][k] * sizes[b][k] for b in n for k in n[b])
  pruned = sum(int((~np.asarray(um[b][k])).sum()) * sizes[b][k] for b in n for k in n[b])
  assert abs(pruned - 0.4 * tot) <= max(s for d in sizes.values() for s in d.values())
  # Heads only.
  um = units.unit_mask(params, cfg, 0.5, kinds=("mhsa",))
  assert int(um["block_0"]["ffn1"].sum()) == 4 * cfg.d_model


def test_compaction_equivalence_tiny(tiny):
  model, params = tiny
  cfg = model.config
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.standard_normal((2, 48, cfg.input_dim)), jnp.float32)
  pads = jnp.zeros((2, 48)).at[1, 33:].set(1.0)
  batch = {"features": feats, "feature_paddings": pads}
  scores = pruning.random_scores(params, jax.random.PRNGKey(1))
  for s, a in ((0.75, "global"),):  # uneven per-block sizes
    um = units.unit_mask(params, cfg, s, allocation=a, scores=scores)
    masked = pruning.apply_mask(params, units.expand_unit_mask(params, cfg, um))
    small_model, small = compaction.compact(model, masked, um)
    assert isinstance(small_model, asr.AsrModel) and small_model.head == model.head
    ref, ref_pad = jax.jit(model.logits)(masked, batch)
    got, got_pad = jax.jit(small_model.logits)(small, batch)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(got_pad, ref_pad)
    # Real param count: the dense count minus every pruned unit's params.
    sizes = units.unit_sizes(params, cfg)
    removed = sum(int((~np.asarray(um[b][k])).sum()) * sizes[b][k] for b in um for k in um[b])
    assert pruning.param_count(small) == pruning.param_count(params) - removed
    sizes = compaction.BlockSizes.of(small_model.config)
    assert sizes.heads == tuple(int(um[b]["mhsa"].sum()) for b in units.blocks(params))
    assert sizes.conv_groups == tuple(int(um[b]["conv"].sum()) for b in units.blocks(params))
    # The compacted model's own init gives exactly the compacted shapes.
    assert jax.tree.map(jnp.shape, small_model.init(jax.random.PRNGKey(2))) == jax.tree.map(
      jnp.shape, small
    )
    assert pruning.param_count(small) == conformer.analytic_param_count(
      small_model.config, model.head.vocab_size
    )
    ratio = compaction.flops(small_model.config, 48) / compaction.flops(cfg, 48)
    assert ratio == compaction.flops(cfg, 48, sizes) / compaction.flops(cfg, 48)
    assert 0.0 < ratio < 1.0


def test_compaction_rejects_empty_module(tiny):
  model, params = tiny
  um = units.unit_mask(params, model.config, 0.0)
  um["block_0"]["mhsa"] = jnp.zeros_like(um["block_0"]["mhsa"])
  with pytest.raises(ValueError, match="block_0/mhsa keeps no unit"):
    compaction.compact(model, params, um)
