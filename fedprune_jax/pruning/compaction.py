"""Compaction: unit-pruned Conformer -> a physically smaller dense Conformer.

``compact(model, params, umask)`` slices away the pruned units (heads, FFN
hidden units, conv groups; see ``units``) and returns ``(small_model,
small_params)``: ``small_model`` is a regular ``AsrModel`` whose
``ConformerConfig.layer_sizes`` holds the kept unit counts of every block, so
it trains, evaluates and decodes like any other model.  Its encoder output
equals the masked dense model's (``apply_mask(params, expand_unit_mask(...))``)
up to float rounding: a pruned head / hidden unit / GroupNorm group
contributes exactly nothing (conv groups are normalised independently, so
dropping one leaves the other groups' statistics unchanged).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedprune_jax.models import asr
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
    """The unpruned sizes of ``cfg`` (ignoring ``cfg.layer_sizes``)."""
    return cls.of(cfg.replace(layer_sizes=None))

  @classmethod
  def of(cls, cfg: cf.ConformerConfig) -> BlockSizes:
    """The sizes of ``cfg``'s blocks (``cfg.layer_sizes`` if set, else dense)."""
    rows = [cfg.block_sizes(i) for i in range(cfg.num_layers)]
    return cls(*(tuple(col) for col in zip(*rows)))

  def layer_sizes(self) -> tuple[tuple[int, int, int, int], ...]:
    """As ``ConformerConfig.layer_sizes``: per block (heads, ffn1, ffn2, conv_groups)."""
    return tuple(zip(self.heads, self.ffn1, self.ffn2, self.conv_groups))


def compact(model: asr.AsrModel, params: PyTree, umask) -> tuple[asr.AsrModel, PyTree]:
  """Slices pruned units out of ``params``.

  Args:
    model: the ``AsrModel`` (its config gives channels per conv group).
    params: its params (masked or not; pruned units are dropped either way).
    umask: unit mask from ``units.unit_mask`` (True = keep); every
      (block, kind) must keep at least one unit.
  Returns:
    (small_model, small_params): ``model`` with ``config.layer_sizes`` set to
    the kept unit counts, and its params (same naming, smaller shapes).
  """
  cfg = model.config
  cpg = cfg.conv_group_channels
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
  block_sizes = BlockSizes(**{k: tuple(v) for k, v in sizes.items()})
  small_cfg = cfg.replace(layer_sizes=block_sizes.layer_sizes())
  return dataclasses.replace(model, config=small_cfg), out


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
  products; norms and activations ignored.  Block sizes: ``sizes`` if given,
  else ``cfg``'s own (``cfg.layer_sizes`` or dense)."""
  sizes = sizes or BlockSizes.of(cfg)
  d, c, t = cfg.d_model, cfg.subsample_channels, frames
  t1 = -(-t // 2)
  t2 = -(-t1 // 2)
  f1 = -(-cfg.input_dim // 2)
  f2 = cfg.subsampled_dim
  total = 2 * t1 * f1 * 9 * c + 2 * t2 * f2 * 9 * c * c + 2 * t2 * f2 * c * d
  cpg = cfg.conv_group_channels
  for i in range(cfg.num_layers):
    hd = sizes.heads[i] * cfg.head_dim
    ch = sizes.conv_groups[i] * cpg
    total += 2 * t2 * (d * sizes.ffn1[i] * 2 + d * sizes.ffn2[i] * 2)  # FFNs
    total += 2 * t2 * (3 * d * hd + hd * d) + 2 * (2 * t2 - 1) * d * hd  # q,k,v,out,pos
    total += 2 * (2 * t2 * t2 * hd + t2 * (2 * t2 - 1) * hd)  # scores, values
    total += 2 * t2 * (d * 2 * ch + cfg.conv_kernel * ch + ch * d)  # conv module
  return float(total)
