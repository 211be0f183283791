"""Flax Conformer encoder (Gulati et al., 2020) with padding-exact components.

Shapes: B = batch, T = input frames, T' = ceil(ceil(T/2)/2) subsampled frames,
d = ``d_model``, H = heads, Dh = d/H, K = depthwise kernel, G = GroupNorm groups.

Every component is *padding invariant*: the outputs at real frames do not
depend on how many padded frames follow them.  That needs (a) explicit, not
'SAME', conv padding in the subsampler, (b) padded frames zeroed before every
convolution, (c) a key-padding mask in attention and (d) GroupNorm statistics
over real frames only.  Padded output frames are zeroed.

Parameter names follow docs/architecture.md (the pruning code relies on them):
all Dense kernels are 2-D ``[in, out]``; attention head h owns columns
``h*Dh:(h+1)*Dh`` of query/key/value/pos and the same rows of ``out``.

Blocks may have individual unit counts (``ConformerConfig.layer_sizes``), e.g.
for a unit-pruned model compacted by ``fedprune_jax.pruning.compaction``: the
names stay the same, only the widths of heads / FFN hidden / conv channels change.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Re-exported: the layers used below (tests and users refer to them from here).
from fedprune_jax.models.layers import (  # noqa: F401
  Conv2DStride2,
  DepthwiseConv1D,
  Dropout,
  MaskedGroupNorm,
  depthwise_conv1d,
  init_from_shapes,
  rel_positional_embedding,
  rel_shift,
)

Array = jax.Array

_NEG_INF = -1e9  # finite, so a fully padded row still gives a finite softmax


@dataclasses.dataclass(frozen=True)
class ConformerConfig:
  """Hyper-parameters of a Conformer encoder.

  Attributes:
    d_model: model width d.
    num_layers: number of Conformer blocks.
    num_heads: attention heads H (d_model % H == 0).
    ffn_mult: FFN hidden width = ffn_mult * d_model.
    conv_kernel: depthwise conv kernel K (odd, so the conv is centred).
    conv_groups: GroupNorm groups G in the conv module (d_model % G == 0).
    subsample_channels: channels C of the two stride-2 Conv2D subsampling layers.
    dropout_rate: residual / FFN / input dropout.
    attention_dropout_rate: dropout on attention probabilities.
    input_dim: feature dimension F (80 log-mel bins).
    dtype: compute dtype of matmuls/convs ('float32' or 'bfloat16'); params,
      norms and softmax stay float32.
    remat: rematerialise each block in the backward pass (saves memory).
    layer_sizes: optional per-block unit counts, one
      ``(num_heads, ffn1_hidden, ffn2_hidden, conv_groups)`` tuple per block
      (``num_layers`` of them); None = every block dense, i.e.
      ``(num_heads, ffn_mult * d_model, ffn_mult * d_model, conv_groups)``.
      The head dim stays ``d_model // num_heads`` and the channels per conv
      group ``d_model // conv_groups`` (of this config), so a block with g
      groups has ``g * d_model // conv_groups`` conv channels.
  """

  d_model: int
  num_layers: int
  num_heads: int
  ffn_mult: int = 4
  conv_kernel: int = 31
  conv_groups: int = 8
  subsample_channels: int = 144
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  input_dim: int = 80
  dtype: str = "float32"
  remat: bool = False
  layer_sizes: tuple[tuple[int, int, int, int], ...] | None = None

  def __post_init__(self):
    def bad(field, why):
      raise ValueError(f"ConformerConfig.{field}: {why}")

    for f in (
      "d_model",
      "num_layers",
      "num_heads",
      "ffn_mult",
      "conv_kernel",
      "conv_groups",
      "subsample_channels",
      "input_dim",
    ):
      if int(getattr(self, f)) < 1:
        bad(f, f"must be >= 1, got {getattr(self, f)}")
    if self.d_model % self.num_heads:
      bad("num_heads", f"{self.num_heads} does not divide d_model={self.d_model}")
    if (self.d_model // self.num_heads) % 2:
      bad("num_heads", "head dim d_model/num_heads must be even")
    if self.d_model % 2:
      bad("d_model", "must be even (sinusoidal position embeddings)")
    if self.d_model % self.conv_groups:
      bad("conv_groups", f"{self.conv_groups} does not divide d_model={self.d_model}")
    if self.conv_kernel % 2 == 0:
      bad("conv_kernel", f"must be odd, got {self.conv_kernel}")
    for f in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= getattr(self, f) < 1.0:
        bad(f, f"must be in [0, 1), got {getattr(self, f)}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      bad("dtype", f"unsupported {self.dtype!r}")
    if self.layer_sizes is not None:
      # Normalised to a tuple of int 4-tuples (hashable: configs are static
      # jit arguments via AsrModel).
      object.__setattr__(self, "layer_sizes", self._checked_layer_sizes(bad))

  def _checked_layer_sizes(self, bad) -> tuple[tuple[int, int, int, int], ...]:
    try:
      rows = [tuple(row) for row in self.layer_sizes]
    except TypeError:
      bad(
        "layer_sizes",
        f"expected a sequence of (num_heads, ffn1_hidden, ffn2_hidden, "
        f"conv_groups) tuples, got {self.layer_sizes!r}",
      )
    if len(rows) != self.num_layers:
      bad("layer_sizes", f"has {len(rows)} entries, expected num_layers={self.num_layers}")
    out = []
    for i, row in enumerate(rows):
      if len(row) != 4:
        bad(
          "layer_sizes",
          f"entry {i} = {row!r}: expected (num_heads, ffn1_hidden, ffn2_hidden, conv_groups)",
        )
      try:
        ints = tuple(operator.index(v) for v in row)
      except TypeError:
        bad("layer_sizes", f"entry {i} = {row!r}: sizes must be integers")
      if any(isinstance(v, bool) for v in row) or min(ints) < 1:
        bad("layer_sizes", f"entry {i} = {row!r}: sizes must be integers >= 1")
      out.append(ints)
    return tuple(out)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def conv_group_channels(self) -> int:
    """Channels per GroupNorm group of the conv module: d_model // conv_groups."""
    return self.d_model // self.conv_groups

  def block_sizes(self, layer: int) -> tuple[int, int, int, int]:
    """(num_heads, ffn1_hidden, ffn2_hidden, conv_groups) of block ``layer``."""
    if self.layer_sizes is not None:
      return self.layer_sizes[layer]
    f = self.ffn_mult * self.d_model
    return (self.num_heads, f, f, self.conv_groups)

  @property
  def subsampled_dim(self) -> int:
    """F' = ceil(ceil(F/2)/2): feature bins after two stride-2 convs."""
    return -(-(-(-self.input_dim // 2)) // 2)

  def replace(self, **kw) -> ConformerConfig:
    return dataclasses.replace(self, **kw)


# Gulati et al. 2020 sizes (kernel 32 there; we use 31 so the conv is centred).
PRESETS: dict[str, ConformerConfig] = {
  # Small enough to train on 2 CPU cores in minutes (~1.1M params).
  "tiny": ConformerConfig(
    d_model=96,
    num_layers=4,
    num_heads=4,
    conv_kernel=15,
    conv_groups=8,
    subsample_channels=64,
    dropout_rate=0.1,
    attention_dropout_rate=0.0,
  ),
  "s": ConformerConfig(
    d_model=144, num_layers=16, num_heads=4, conv_kernel=31, conv_groups=8, subsample_channels=144
  ),
  "m": ConformerConfig(
    d_model=256, num_layers=16, num_heads=4, conv_kernel=31, conv_groups=8, subsample_channels=256
  ),
  "l": ConformerConfig(
    d_model=512, num_layers=17, num_heads=8, conv_kernel=31, conv_groups=16, subsample_channels=512
  ),
}


def get_config(name_or_config: str | ConformerConfig, **overrides) -> ConformerConfig:
  """Returns a preset by name (or the config itself), with field overrides."""
  if isinstance(name_or_config, ConformerConfig):
    cfg = name_or_config
  else:
    if name_or_config not in PRESETS:
      raise ValueError(
        f"unknown Conformer preset {name_or_config!r}; choose one of {sorted(PRESETS)}"
      )
    cfg = PRESETS[name_or_config]
  return cfg.replace(**overrides) if overrides else cfg


# ----------------------------------------------------------------------------
# Helpers


def _mask(x: Array, paddings: Array) -> Array:
  """Zeroes padded frames. x: [B, T, ...]; paddings: f32[B, T] (1 = pad)."""
  keep = (1.0 - paddings).astype(x.dtype)
  return x * keep.reshape(keep.shape + (1,) * (x.ndim - 2))


def _dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name)


# ----------------------------------------------------------------------------
# Modules


class Subsample(nn.Module):
  """Two 3x3 stride-2 Conv2D + ReLU, then a linear projection to d.

  Explicit time padding (1, 1) gives ceil(T/2) outputs where output t' reads
  inputs 2t'-1..2t'+1, independent of T's parity; output t' is padded iff
  input 2t' is.
  """

  cfg: ConformerConfig

  @nn.compact
  def __call__(self, x: Array, paddings: Array, train: bool):
    """x: f32[B, T, F], paddings: f32[B, T] -> (f32[B, T', d], f32[B, T'])."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    c = cfg.subsample_channels
    x = _mask(x, paddings)[..., None]  # [B, T, F, 1]
    for i in (1, 2):
      x = Conv2DStride2(c, dtype=dt, name=f"conv{i}")(x)
      x = nn.relu(x)
      paddings = paddings[:, ::2]
      x = _mask(x, paddings)
    b, t, f, _ = x.shape
    x = x.reshape(b, t, f * c)
    x = _dense(cfg.d_model, "proj", dt)(x)
    x = Dropout(cfg.dropout_rate)(x, not train)
    return x, paddings


class FeedForward(nn.Module):
  """Pre-norm FFN: LayerNorm, d->f, swish, dropout, f->d, dropout.

  f = ``hidden``, default ``ffn_mult * d_model`` (4d).
  """

  cfg: ConformerConfig
  hidden: int | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """x: [B, T, d] -> [B, T, d]."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    f = cfg.ffn_mult * cfg.d_model if self.hidden is None else self.hidden
    y = nn.LayerNorm(name="norm")(x)
    y = _dense(f, "dense_in", dt)(y)
    y = nn.swish(y)
    y = Dropout(cfg.dropout_rate)(y, not train)
    y = _dense(cfg.d_model, "dense_out", dt)(y)
    return Dropout(cfg.dropout_rate)(y, not train)


class RelPosSelfAttention(nn.Module):
  """Multi-head self-attention with Transformer-XL relative positions.

  score(i, j) = [(q_i + u) . k_j + rel_shift((q_i + v) . p_{i-j})] / sqrt(Dh),
  with p = pos(sinusoid(i - j)), u/v = pos_bias_u/pos_bias_v [H, Dh], and
  padded keys masked out.  H = ``num_heads`` (default ``cfg.num_heads``);
  Dh = ``cfg.head_dim`` always, so q/k/v/pos project d -> H*Dh.
  """

  cfg: ConformerConfig
  num_heads: int | None = None

  @nn.compact
  def __call__(self, x: Array, paddings: Array, train: bool) -> Array:
    """x: [B, T, d], paddings: f32[B, T] -> [B, T, d]."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, t, d = x.shape
    h = cfg.num_heads if self.num_heads is None else self.num_heads
    dh = cfg.head_dim
    hd = h * dh
    y = nn.LayerNorm(name="norm")(x)
    q = _dense(hd, "query", dt)(y).reshape(b, t, h, dh)
    k = _dense(hd, "key", dt)(y).reshape(b, t, h, dh)
    v = _dense(hd, "value", dt)(y).reshape(b, t, h, dh)
    pe = rel_positional_embedding(t, d).astype(dt)
    p = _dense(hd, "pos", dt, use_bias=False)(pe).reshape(2 * t - 1, h, dh)
    u = self.param("pos_bias_u", nn.initializers.zeros, (h, dh)).astype(dt)
    w = self.param("pos_bias_v", nn.initializers.zeros, (h, dh)).astype(dt)

    ac = jnp.einsum("bihd,bjhd->bhij", q + u, k)  # content
    bd = jnp.einsum("bihd,rhd->bhir", q + w, p)  # position
    scores = (ac + rel_shift(bd)).astype(jnp.float32) / math.sqrt(dh)
    key_ok = (paddings < 0.5)[:, None, None, :]  # [B, 1, 1, T]
    scores = jnp.where(key_ok, scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    probs = Dropout(cfg.attention_dropout_rate)(probs, not train)
    o = jnp.einsum("bhij,bjhd->bihd", probs, v).reshape(b, t, hd)
    o = _dense(d, "out", dt)(o)
    return Dropout(cfg.dropout_rate)(o, not train)


class ConvModule(nn.Module):
  """LayerNorm, pointwise d->2c, GLU, depthwise conv, GroupNorm, swish, pointwise c->d.

  G = ``groups`` (default ``cfg.conv_groups``) GroupNorm groups of
  ``cfg.conv_group_channels`` channels each: c = G * d_model // conv_groups
  (c = d by default).
  """

  cfg: ConformerConfig
  groups: int | None = None

  @nn.compact
  def __call__(self, x: Array, paddings: Array, train: bool) -> Array:
    """x: [B, T, d], paddings: f32[B, T] -> [B, T, d]."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    g = cfg.conv_groups if self.groups is None else self.groups
    c, k = g * cfg.conv_group_channels, cfg.conv_kernel
    y = nn.LayerNorm(name="norm")(x)
    y = _dense(2 * c, "pointwise_in", dt)(y)
    y = y[..., :c] * jax.nn.sigmoid(y[..., c:])  # GLU: channel i with i + c
    y = _mask(y, paddings)
    y = DepthwiseConv1D(k, dtype=dt, name="depthwise")(y)
    y = MaskedGroupNorm(g, name="group_norm")(y, paddings)
    y = nn.swish(y).astype(dt)
    y = _dense(cfg.d_model, "pointwise_out", dt)(y)
    return Dropout(cfg.dropout_rate)(y, not train)


class ConformerBlock(nn.Module):
  """x + FFN/2 -> + MHSA -> + Conv -> + FFN/2 -> LayerNorm.

  Unit counts are those of block ``layer`` (``cfg.block_sizes(layer)``).
  """

  cfg: ConformerConfig
  layer: int = 0

  @nn.compact
  def __call__(self, x: Array, paddings: Array, train: bool) -> Array:
    """x: [B, T', d], paddings: f32[B, T'] -> [B, T', d]."""
    cfg = self.cfg
    heads, ffn1, ffn2, groups = cfg.block_sizes(self.layer)
    x = x + 0.5 * FeedForward(cfg, ffn1, name="ffn1")(x, train)
    x = x + RelPosSelfAttention(cfg, heads, name="mhsa")(x, paddings, train)
    x = x + ConvModule(cfg, groups, name="conv")(x, paddings, train)
    x = x + 0.5 * FeedForward(cfg, ffn2, name="ffn2")(x, train)
    return nn.LayerNorm(name="final_norm")(x)


class ConformerEncoder(nn.Module):
  """Subsampling x4 followed by ``num_layers`` Conformer blocks."""

  cfg: ConformerConfig

  @nn.compact
  def __call__(self, features: Array, paddings: Array, train: bool = False):
    """features f32[B, T, F], paddings f32[B, T] -> (f32[B, T', d], f32[B, T'])."""
    cfg = self.cfg
    if features.ndim != 3 or features.shape[-1] != cfg.input_dim:
      raise ValueError(f"features: expected [B, T, {cfg.input_dim}], got {features.shape}")
    if paddings.shape != features.shape[:2]:
      raise ValueError(f"feature_paddings: expected {features.shape[:2]}, got {paddings.shape}")
    paddings = paddings.astype(jnp.float32)
    x, paddings = Subsample(cfg, name="subsample")(features, paddings, train)
    block_cls = nn.remat(ConformerBlock, static_argnums=(3,)) if cfg.remat else ConformerBlock
    for i in range(cfg.num_layers):
      x = block_cls(cfg, i, name=f"block_{i}")(x, paddings, train)
    x = _mask(x.astype(jnp.float32), paddings)
    return x, paddings


# ----------------------------------------------------------------------------
# Parameter counting


def count_params(params: Any) -> int:
  """Total number of scalars in a params pytree."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))


def analytic_param_count(cfg: ConformerConfig, vocab_size: int | None = None) -> int:
  """Closed-form parameter count of the encoder (+ CTC head if vocab_size).

  Honours ``cfg.layer_sizes`` (per-block unit counts).
  """
  d, c, k = cfg.d_model, cfg.subsample_channels, cfg.conv_kernel
  ln = 2 * d
  total = (9 * c + c) + (9 * c * c + c) + (cfg.subsampled_dim * c * d + d)  # subsample

  def ffn(f):
    return ln + (d * f + f) + (f * d + d)

  for i in range(cfg.num_layers):
    heads, ffn1, ffn2, groups = cfg.block_sizes(i)
    hd, ch = heads * cfg.head_dim, groups * cfg.conv_group_channels
    mhsa = ln + 3 * (d * hd + hd) + (hd * d + d) + d * hd + 2 * hd  # q,k,v, out, pos, u/v
    conv = ln + (d * 2 * ch + 2 * ch) + (k * ch + ch) + 2 * ch + (ch * d + d)
    total += ffn(ffn1) + ffn(ffn2) + mhsa + conv + ln
  if vocab_size is not None:
    total += d * vocab_size + vocab_size
  return total


def param_table(presets: Mapping[str, ConformerConfig] | None = None, vocab_size: int = 29) -> str:
  """A markdown table of parameter counts per preset (encoder + CTC head)."""
  presets = PRESETS if presets is None else presets
  rows = [
    "| preset | d | layers | heads | K | C | params (enc) | params (+CTC) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, cfg in presets.items():
    enc = analytic_param_count(cfg)
    rows.append(
      f"| {name} | {cfg.d_model} | {cfg.num_layers} | {cfg.num_heads} | "
      f"{cfg.conv_kernel} | {cfg.subsample_channels} | {enc / 1e6:.2f}M | "
      f"{analytic_param_count(cfg, vocab_size) / 1e6:.2f}M |"
    )
  return "\n".join(rows)


if __name__ == "__main__":
  print(param_table())
