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
  sizes, idx = index_plan(params, model.config.conv_group_channels, umask)
  small_cfg = model.config.replace(layer_sizes=sizes.layer_sizes())
  return dataclasses.replace(model, config=small_cfg), gather(params, idx)


def index_plan(params: PyTree, cfg_or_cpg, selection) -> tuple[BlockSizes, PyTree]:
  """Where the selected units' entries live in the dense params.

  Args:
    params: dense Conformer params (only shapes are read).
    cfg_or_cpg: ``ConformerConfig`` or channels per conv group.
    selection: unit mask ``{block: {kind: bool[U]}}`` of the units to keep (True).
  Returns:
    (sizes, idx): the selected unit counts per block, and a tree with the params' structure whose
    leaves are int32 arrays of the compacted leaf's shape holding flat indices into the dense
    leaf (unit members), or None (leaves no unit owns: kept whole).
  """
  cpg = units_lib._cpg(cfg_or_cpg)
  keep = units_lib.kept_indices(selection)
  idx = jax.tree.map(lambda _: None, params)
  enc = dict(idx["encoder"])
  idx["encoder"] = enc
  sizes = {"heads": [], "ffn1": [], "ffn2": [], "conv_groups": []}
  names = {"mhsa": "heads", "ffn1": "ffn1", "ffn2": "ffn2", "conv": "conv_groups"}
  for b in units_lib.blocks(params):
    blk = params["encoder"][b]
    new = jax.tree.map(lambda _: None, blk)
    for kind in units_lib.KINDS:
      sel = keep[b][kind]
      if sel.size == 0:
        raise ValueError(f"compact: encoder/{b}/{kind} keeps no unit; use min_keep >= 1")
      for path, view in units_lib._members(blk, kind, cpg):
        x = units_lib._get(blk, path)
        # Entries owned by the selected units, in the original order.
        owner = np.asarray(view(np.arange(x.size).reshape(x.shape)))
        flat = np.sort(owner[sel].reshape(-1)).astype(np.int32)
        _set(new, path, flat.reshape(_new_shape(x.shape, path, sel.size, blk, cpg)))
      sizes[names[kind]].append(int(sel.size))
    enc[b] = new
  return BlockSizes(**{k: tuple(v) for k, v in sizes.items()}), idx


def _none_leaf(x) -> bool:
  return x is None


def gather(tree: PyTree, idx: PyTree) -> PyTree:
  """The compacted tree: ``tree``'s leaves taken at ``idx`` (``index_plan``); jit-able.

  ``tree`` has the params' structure (params, a mask, a delta); None leaves stay None.
  """
  return jax.tree.map(
    lambda i, x: x if i is None or x is None else jnp.asarray(x).reshape(-1)[i],
    idx,
    tree,
    is_leaf=_none_leaf,
  )


def scatter(small: PyTree, idx: PyTree, like: PyTree) -> PyTree:
  """Inverse of ``gather`` into zeros: a tree shaped like ``like`` that equals ``small`` at the
  selected entries and is 0 elsewhere; jit-able."""

  def put(i, x, ref):
    if i is None:
      return x
    flat = jnp.zeros((np.prod(np.shape(ref), dtype=int),), x.dtype)
    return flat.at[i.reshape(-1)].set(x.reshape(-1)).reshape(np.shape(ref))

  return jax.tree.map(put, idx, small, like, is_leaf=_none_leaf)


def unit_mask_of(params: PyTree, mask: PyTree, cfg_or_cpg) -> dict | None:
  """The unit mask of a params-shaped ``mask`` if it is unit-structured, else None.

  Unit-structured: every member entry of a unit (see ``units``) has a mask (not None) and a
  unit's entries are all kept or all pruned, and every other prunable leaf is fully kept; then
  ``apply_mask(params, mask)`` is the model ``compact`` builds. Host-side (numpy).
  """
  cpg = units_lib._cpg(cfg_or_cpg)
  if not isinstance(params, dict) or "encoder" not in params:
    return None
  mask = jax.device_get(mask)
  members = set()
  out = {}
  for b in units_lib.blocks(params):
    blk, mblk = params["encoder"][b], mask["encoder"][b]
    out[b] = {}
    for kind in units_lib.KINDS:
      kept = None
      for path, view in units_lib._members(blk, kind, cpg):
        members.add(("encoder", b) + path)
        m = units_lib._get(mblk, path)
        if m is None:
          return None
        v = np.asarray(view(np.asarray(m)))
        per_unit = v.reshape(v.shape[0], -1)
        whole = per_unit.all(axis=1)
        if np.any(whole != per_unit.any(axis=1)) or (kept is not None and np.any(kept != whole)):
          return None
        kept = whole
      out[b][kind] = kept
  for path, m in jax.tree_util.tree_flatten_with_path(mask, is_leaf=_none_leaf)[0]:
    names = tuple(getattr(k, "key", k) for k in path)
    if names not in members and m is not None and not np.all(m):
      return None
  return out


def select_units(umask, quantum: float) -> dict:
  """A superset of the kept units with few distinct shapes (host-side).

  Per block, the *level* is the largest kept fraction of its kinds rounded up to a multiple of
  ``quantum`` (at most 1); every kind of the block then keeps ``ceil(level * U)`` units (at least
  its kept count and 1), the extra units being its pruned ones of lowest index. So a block takes
  at most ``ceil(1 / quantum)`` shapes, and under uniform allocation (every block alike) a whole
  run compiles at most that many compacted programs; a smaller quantum pads less.
  """
  if not 0.0 < quantum <= 1.0:
    raise ValueError(f"compaction quantum must be in (0, 1], got {quantum}")
  out = {}
  for b, kinds in umask.items():
    keeps = {k: np.asarray(v, bool).copy() for k, v in kinds.items()}
    frac = max(float(v.mean()) for v in keeps.values())
    level = min(1.0, np.ceil(frac / quantum - 1e-6) * quantum)
    out[b] = {}
    for kind, keep in keeps.items():
      kept = int(keep.sum())
      want = min(keep.size, max(1, kept, int(np.ceil(level * keep.size - 1e-6))))
      keep[np.flatnonzero(~keep)[: want - kept]] = True
      out[b][kind] = keep
  return out


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
