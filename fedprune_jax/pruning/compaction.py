"""Compaction: unit-pruned Conformer -> a physically smaller dense Conformer.

``compact(model, params, umask)`` slices away the pruned units (heads, FFN
hidden units, conv groups; see ``units``) and returns ``(CompactModel,
small_params)``.  The compact model's encoder output equals the masked dense
model's (``apply_mask(params, expand_unit_mask(...))``) up to float rounding:
a pruned head / hidden unit / GroupNorm group contributes exactly nothing
(conv groups are normalised independently, so dropping one leaves the other
groups' statistics unchanged).

The current ``ConformerConfig`` has one size per kind for all blocks, so the
compact encoder is defined here (``CompactEncoder``) with per-block sizes,
reusing the Conformer's subsampler, relative-position helpers and masked
GroupNorm, and mirroring its block math and param names exactly.  (Proposed
follow-up: give ``ConformerConfig`` optional per-layer sizes and drop the
duplicated block code here.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedprune_jax.models import conformer as cf
from fedprune_jax.pruning import units as units_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Per-block unit counts: heads, FFN hidden widths, conv groups."""
  heads: tuple[int, ...]
  ffn1: tuple[int, ...]
  ffn2: tuple[int, ...]
  conv_groups: tuple[int, ...]

  @classmethod
  def dense(cls, cfg: cf.ConformerConfig) -> BlockSizes:
    n = cfg.num_layers
    return cls((cfg.num_heads,) * n, (cfg.ffn_mult * cfg.d_model,) * n,
               (cfg.ffn_mult * cfg.d_model,) * n, (cfg.conv_groups,) * n)


def _dense(features, name, dt, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, dtype=dt, name=name)


class _FFN(nn.Module):
  cfg: cf.ConformerConfig
  hidden: int

  @nn.compact
  def __call__(self, x):
    dt = jnp.dtype(self.cfg.dtype)
    y = nn.LayerNorm(name="norm")(x)
    y = nn.swish(_dense(self.hidden, "dense_in", dt)(y))
    return _dense(self.cfg.d_model, "dense_out", dt)(y)


class _MHSA(nn.Module):
  cfg: cf.ConformerConfig
  heads: int

  @nn.compact
  def __call__(self, x, paddings):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, t, d = x.shape
    h, dh = self.heads, cfg.head_dim
    y = nn.LayerNorm(name="norm")(x)
    q = _dense(h * dh, "query", dt)(y).reshape(b, t, h, dh)
    k = _dense(h * dh, "key", dt)(y).reshape(b, t, h, dh)
    v = _dense(h * dh, "value", dt)(y).reshape(b, t, h, dh)
    pe = cf.rel_positional_embedding(t, d).astype(dt)
    p = _dense(h * dh, "pos", dt, use_bias=False)(pe).reshape(2 * t - 1, h, dh)
    init = nn.initializers.xavier_uniform()
    u = self.param("pos_bias_u", init, (h, dh)).astype(dt)
    w = self.param("pos_bias_v", init, (h, dh)).astype(dt)
    ac = jnp.einsum("bihd,bjhd->bhij", q + u, k)
    bd = jnp.einsum("bihd,rhd->bhir", q + w, p)
    scores = (ac + cf.rel_shift(bd)).astype(jnp.float32) / math.sqrt(dh)
    scores = jnp.where((paddings < 0.5)[:, None, None, :], scores, cf._NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    o = jnp.einsum("bhij,bjhd->bihd", probs, v).reshape(b, t, h * dh)
    return _dense(d, "out", dt)(o)


class _Conv(nn.Module):
  cfg: cf.ConformerConfig
  groups: int

  @nn.compact
  def __call__(self, x, paddings):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    c = self.groups * (cfg.d_model // cfg.conv_groups)
    k = cfg.conv_kernel
    y = nn.LayerNorm(name="norm")(x)
    y = _dense(2 * c, "pointwise_in", dt)(y)
    y = y[..., :c] * jax.nn.sigmoid(y[..., c:])
    y = cf._mask(y, paddings)
    y = nn.Conv(c, (k,), padding=((k // 2, k // 2),), feature_group_count=c,
                dtype=dt, name="depthwise")(y)
    y = cf.MaskedGroupNorm(self.groups, name="group_norm")(y, paddings)
    y = nn.swish(y).astype(dt)
    return _dense(cfg.d_model, "pointwise_out", dt)(y)


class _Block(nn.Module):
  cfg: cf.ConformerConfig
  heads: int
  ffn1: int
  ffn2: int
  groups: int

  @nn.compact
  def __call__(self, x, paddings):
    x = x + 0.5 * _FFN(self.cfg, self.ffn1, name="ffn1")(x)
    x = x + _MHSA(self.cfg, self.heads, name="mhsa")(x, paddings)
    x = x + _Conv(self.cfg, self.groups, name="conv")(x, paddings)
    x = x + 0.5 * _FFN(self.cfg, self.ffn2, name="ffn2")(x)
    return nn.LayerNorm(name="final_norm")(x)


class CompactEncoder(nn.Module):
  """Inference-only Conformer encoder with per-block unit counts."""
  cfg: cf.ConformerConfig
  sizes: BlockSizes

  @nn.compact
  def __call__(self, features, paddings):
    """f32[B, T, F], f32[B, T] -> (f32[B, T', d], f32[B, T'])."""
    paddings = paddings.astype(jnp.float32)
    x, paddings = cf.Subsample(self.cfg, name="subsample")(features, paddings, False)
    s = self.sizes
    for i in range(self.cfg.num_layers):
      x = _Block(self.cfg, s.heads[i], s.ffn1[i], s.ffn2[i], s.conv_groups[i],
                 name=f"block_{i}")(x, paddings)
    return cf._mask(x.astype(jnp.float32), paddings), paddings


@dataclasses.dataclass(frozen=True)
class CompactModel:
  """A compacted ASR model: same head and batch API as ``AsrModel`` for inference."""
  base: Any            # the AsrModel the params came from
  sizes: BlockSizes

  @property
  def config(self) -> cf.ConformerConfig:
    return self.base.config

  def apply_features(self, params, features, paddings, rng=None, train=False):
    if train:
      raise ValueError("CompactModel is inference-only (train=False)")
    return CompactEncoder(self.config, self.sizes).apply(
        {"params": params["encoder"]}, features, paddings)

  def logits(self, params, batch):
    enc, pad = self.apply_features(params, batch["features"], batch["feature_paddings"])
    head = self.base.head
    return head.logits(params[head.name], enc), pad


def compact(model, params: PyTree, umask) -> tuple[CompactModel, PyTree]:
  """Slices pruned units out of ``params``.

  Args:
    model: the ``AsrModel`` (its config gives channels per conv group).
    params: its params (masked or not; pruned units are dropped either way).
    umask: unit mask from ``units.unit_mask`` (True = keep); every
      (block, kind) must keep at least one unit.
  Returns:
    (CompactModel, small params with the same naming).
  """
  cfg = model.config
  cpg = cfg.d_model // cfg.conv_groups
  keep = units_lib.kept_indices(umask)
  out = jax.tree.map(lambda x: x, params)  # shallow copy of the dict tree
  enc = dict(out["encoder"])
  out["encoder"] = enc
  sizes = {"heads": [], "ffn1": [], "ffn2": [], "conv_groups": []}
  for b in units_lib.blocks(params):
    blk = params["encoder"][b]
    new = jax.tree.map(lambda x: x, blk)
    for kind in units_lib.KINDS:
      idx = keep[b][kind]
      if idx.size == 0:
        raise ValueError(f"compact: encoder/{b}/{kind} keeps no unit; use min_keep >= 1")
      for path, view in units_lib._members(blk, kind, cpg):
        x = units_lib._get(blk, path)
        # Entries owned by kept units, in the original order.
        owner = np.asarray(view(np.arange(x.size).reshape(x.shape)))
        sel = np.sort(owner[idx].reshape(-1))
        taken = np.asarray(x).reshape(-1)[sel]
        _set(new, path, jnp.asarray(taken.reshape(_new_shape(x.shape, path, idx.size, blk, cpg))))
    enc[b] = new
    n = units_lib.num_units({"encoder": {b: new}}, cpg)[b]
    sizes["heads"].append(n["mhsa"])
    sizes["ffn1"].append(n["ffn1"])
    sizes["ffn2"].append(n["ffn2"])
    sizes["conv_groups"].append(n["conv"])
  return CompactModel(model, BlockSizes(**{k: tuple(v) for k, v in sizes.items()})), out


def _new_shape(shape, path, units, blk, cpg):
  name = path[-2] if path[-1] in ("kernel", "bias", "scale") else path[-1]
  if path[0] == "mhsa":
    dh = blk["mhsa"]["pos_bias_u"].shape[1]
    if name in ("pos_bias_u", "pos_bias_v"):
      return (units, dh)
    if name == "out":
      return (units * dh, shape[-1])
    return (shape[0], units * dh) if path[-1] == "kernel" else (units * dh,)
  if path[0] in ("ffn1", "ffn2"):
    if name == "dense_out":
      return (units, shape[-1])
    return (shape[0], units) if path[-1] == "kernel" else (units,)
  c = units * cpg
  if name == "pointwise_in":
    return (shape[0], 2 * c) if path[-1] == "kernel" else (2 * c,)
  if name == "pointwise_out":
    return (c, shape[-1])
  if name == "depthwise" and path[-1] == "kernel":
    return tuple(shape[:-1]) + (c,)
  return (c,)


def _set(tree, path, value):
  for k in path[:-1]:
    tree[k] = dict(tree[k])
    tree = tree[k]
  tree[path[-1]] = value


def flops(cfg: cf.ConformerConfig, frames: int, sizes: BlockSizes | None = None) -> float:
  """Forward FLOPs (2 * multiply-adds) of the encoder for one utterance of
  ``frames`` input frames: dense/conv matmuls plus attention score/value
  products; norms and activations ignored."""
  sizes = sizes or BlockSizes.dense(cfg)
  d, c, t = cfg.d_model, cfg.subsample_channels, frames
  t1 = -(-t // 2)
  t2 = -(-t1 // 2)
  f1 = -(-cfg.input_dim // 2)
  f2 = cfg.subsampled_dim
  total = 2 * t1 * f1 * 9 * c + 2 * t2 * f2 * 9 * c * c + 2 * t2 * f2 * c * d
  cpg = d // cfg.conv_groups
  for i in range(cfg.num_layers):
    hd = sizes.heads[i] * cfg.head_dim
    ch = sizes.conv_groups[i] * cpg
    total += 2 * t2 * (d * sizes.ffn1[i] * 2 + d * sizes.ffn2[i] * 2)     # FFNs
    total += 2 * t2 * (3 * d * hd + hd * d) + 2 * (2 * t2 - 1) * d * hd   # q,k,v,out,pos
    total += 2 * (2 * t2 * t2 * hd + t2 * (2 * t2 - 1) * hd)             # scores, values
    total += 2 * t2 * (d * 2 * ch + cfg.conv_kernel * ch + ch * d)       # conv module
  return float(total)
