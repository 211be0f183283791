"""Conformer building blocks that are fast on CPU and exact under padding.

Shapes: B = batch, T = frames, d = channels, K = kernel size, H = heads.
Each layer keeps the parameter names / shapes of the Flax layer it replaces
(``nn.Conv``, ``nn.Dropout`` semantics), so checkpoints and the pruning code
see the layout documented in docs/architecture.md.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def rel_positional_embedding(length: int, dim: int) -> Array:
  """Sinusoidal embeddings of relative distances T-1, T-2, ..., -(T-1).

  Returns f32[2T-1, dim]; row c encodes distance r = (T-1) - c.  The value for
  a given r does not depend on ``length`` (needed for padding invariance).
  """
  r = jnp.arange(length - 1, -length, -1, dtype=jnp.float32)
  inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  ang = r[:, None] * inv_freq[None, :]
  return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)


def rel_shift(x: Array) -> Array:
  """Aligns relative-position scores to absolute (query, key) positions.

  x: [..., T, 2T-1] with column c = distance (T-1) - c.  Returns [..., T, T]
  with out[i, j] = x[i, (T-1) - i + j], i.e. the score for distance i - j.
  Uses the pad-reshape trick (no gather): a left zero column, a reshape that
  skews each row by one, dropping the first row.
  """
  *lead, t, w = x.shape
  x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])  # [..., T, 2T]
  x = x.reshape(*lead, 2 * t, t)[..., 1:, :]  # [..., 2T-1, T]
  x = x.reshape(*lead, t, w)  # [..., T, 2T-1]
  return x[..., :t]


class Dropout(nn.Module):
  """Inverted dropout drawing 16 random bits per element from the 'dropout' rng.

  Same semantics as ``nn.Dropout`` (rate quantised to 1/65536), but one
  32-bit threefry draw serves two elements: on CPU, random-bit generation was
  the largest cost of dropout in the Conformer train step.
  """

  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    rng = self.make_rng("dropout")
    n = x.size
    bits = jax.random.bits(rng, ((n + 1) // 2,), jnp.uint32)
    b16 = jax.lax.bitcast_convert_type(bits, jnp.uint16).reshape(-1)[:n]
    threshold = int(round(self.rate * 65536))
    keep = b16.reshape(x.shape) >= threshold
    scale = jnp.asarray(65536.0 / (65536 - threshold), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros_like(x))


def _shift_sum(xp: Array, w: Array, t: int) -> Array:
  """sum_k xp[:, k:k+t] * w[k]; xp: [B, t+K-1, d], w: [K, d] -> [B, t, d]."""
  y = xp[:, 0:t] * w[0]
  for i in range(1, w.shape[0]):
    y = y + xp[:, i : i + t] * w[i]
  # Materialise: consumers that read y several times (GroupNorm statistics)
  # would otherwise each recompute the K-term sum.
  return jax.lax.optimization_barrier(y)


def _pad_time(x: Array, k: int) -> Array:
  # The barrier materialises the padded tensor once; without it XLA fuses the
  # producers (GLU, masking, GroupNorm backward) into each of the K shifted
  # reads and recomputes them K times.
  return jax.lax.optimization_barrier(jnp.pad(x, ((0, 0), (k // 2, k // 2), (0, 0))))


@jax.custom_vjp
def depthwise_conv1d(x: Array, w: Array) -> Array:
  """'Same' depthwise conv over time without bias.

  x: [B, T, d], w: [K, d] (K odd) -> y[b, t, c] = sum_k w[k, c] x[b, t+k-K//2, c],
  frames outside [0, T) read as zero.  Shift-and-add forward and backward
  (XLA's grouped convolution is several times slower on CPU).
  """
  return _shift_sum(_pad_time(x, w.shape[0]), w, x.shape[1])


def _dw_fwd(x, w):
  xp = _pad_time(x, w.shape[0])
  return _shift_sum(xp, w, x.shape[1]), (xp, w)


def _dw_bwd(res, g):
  xp, w = res
  k, t = w.shape[0], g.shape[1]
  dx = _shift_sum(_pad_time(g, k), w[::-1], t)  # correlation with flipped w
  dw = jnp.stack([jnp.sum(xp[:, i : i + t] * g, axis=(0, 1), dtype=jnp.float32) for i in range(k)])
  return dx, dw.astype(w.dtype)


depthwise_conv1d.defvjp(_dw_fwd, _dw_bwd)


class DepthwiseConv1D(nn.Module):
  """Depthwise conv over time with ``nn.Conv``'s params: kernel [K, 1, d], bias [d].

  Equivalent to ``nn.Conv(d, (K,), padding=((K//2, K//2),),
  feature_group_count=d)`` (see ``depthwise_conv1d``).
  """

  kernel_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, T, d] -> [B, T, d]."""
    k, d = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, 1, d))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    y = depthwise_conv1d(x.astype(self.dtype), kernel[:, 0, :].astype(self.dtype))
    return y + bias.astype(self.dtype)


class Conv2DStride2(nn.Module):
  """3x3 stride-2 Conv2D with explicit (1, 1) padding, as im2col + one matmul.

  Params as ``nn.Conv``: kernel [3, 3, Cin, Cout], bias [Cout].  Output
  (t', f') reads inputs 2t'-1..2t'+1 x 2f'-1..2f'+1 (zeros outside).  The
  im2col form is ~1.5-2x faster than XLA's strided convolution on CPU
  (forward + backward) at the cost of a 9x patch tensor.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, T, F, Cin] -> [B, ceil(T/2), ceil(F/2), Cout]."""
    b, t, f, cin = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, cin, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    to, fo = -(-t // 2), -(-f // 2)
    # One zero row/column in front (the explicit padding); enough at the end
    # for every strided window (reads there are zeros, as with (1, 1) padding).
    xp = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 2 * to + 1 - t), (1, 2 * fo + 1 - f), (0, 0)))
    patches = jnp.concatenate(
      [xp[:, i : i + 2 * to : 2, j : j + 2 * fo : 2, :] for i in range(3) for j in range(3)],
      axis=-1,
    )
    y = patches @ kernel.reshape(9 * cin, self.features).astype(self.dtype)
    return y + bias.astype(self.dtype)


class MaskedGroupNorm(nn.Module):
  """GroupNorm over (time, channels-in-group) counting real frames only.

  Per example and group g (channels g*d/G:(g+1)*d/G), mean/var use only
  unpadded frames, so removing a whole group leaves the others exact.
  """

  num_groups: int
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: Array, paddings: Array) -> Array:
    """x: [B, T, d], paddings: f32[B, T] -> f32[B, T, d]."""
    b, t, d = x.shape
    g = self.num_groups
    scale = self.param("scale", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    xf = x.astype(jnp.float32).reshape(b, t, g, d // g)
    keep = (1.0 - paddings)[:, :, None, None]
    count = jnp.maximum(jnp.sum(keep, axis=1, keepdims=True) * (d // g), 1.0)
    mean = jnp.sum(xf * keep, axis=(1, 3), keepdims=True) / count
    var = jnp.sum(jnp.square((xf - mean) * keep), axis=(1, 3), keepdims=True) / count
    y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(b, t, d)
    return y * scale + bias


# ----------------------------------------------------------------------------
# Fast initialisation

# Flax's lecun_normal: truncated normal on [-2, 2] rescaled to unit variance.
_TRUNC_STD = 0.87962566103423978


@functools.partial(jax.jit, static_argnums=1)
def _truncated_normal(rng: Array, n: int) -> Array:
  return jax.random.truncated_normal(rng, -2.0, 2.0, (n,), jnp.float32)


def init_from_shapes(shapes: Any, rng: Array) -> Any:
  """Fills a params shape tree with Flax's default initial values.

  Same distributions as the modules' initializers (``kernel``: lecun normal
  with fan_in = prod(shape[:-1]); ``bias``, ``pos_bias_*``: zeros; ``scale``:
  ones), but all kernels are cut from ONE truncated-normal draw of ``rng``:
  XLA on CPU needs seconds to compile one threefry per kernel, this needs one.
  Works on concrete keys (slicing on host) and under jit/vmap (traced keys);
  both give the same values.

  Args:
    shapes: pytree of ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
    rng: PRNG key.
  Returns:
    pytree of float32 arrays with the structure of ``shapes``.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  names = [str(getattr(path[-1], "key", path[-1])) for path, _ in leaves]
  sizes = [int(np.prod(s.shape)) for _, s in leaves]
  n = sum(sz for name, sz in zip(names, sizes) if name == "kernel")
  draw = _truncated_normal(rng, max(n, 1))
  traced = isinstance(draw, jax.core.Tracer)
  xp = jnp if traced else np
  if not traced:
    draw = np.asarray(draw)
  out, offset = [], 0
  for (path, s), name, sz in zip(leaves, names, sizes):
    if name == "kernel":
      std = np.float32(1.0 / math.sqrt(max(sz // s.shape[-1], 1)) / _TRUNC_STD)
      val = draw[offset : offset + sz].reshape(s.shape) * std
      offset += sz
    elif name in ("bias", "pos_bias_u", "pos_bias_v"):
      val = xp.zeros(s.shape, xp.float32)
    elif name == "scale":
      val = xp.ones(s.shape, xp.float32)
    else:
      raise ValueError(
        f"init_from_shapes: no initializer rule for param {jax.tree_util.keystr(path)}"
      )
    out.append(val if traced else jnp.asarray(val))
  return jax.tree_util.tree_unflatten(treedef, out)
