"""Sparsity patterns: one block-group primitive, plus N:M.

Axis convention (used everywhere in this package):

* Every prunable param is seen as a 2-D matrix ``[H, W]``.  A Dense kernel is
  already ``[in, out]``.  A conv kernel ``[kh, kw, cin, cout]`` or a depthwise
  kernel ``[K, 1, C]`` is viewed as ``[prod(all but last), last]``, i.e.
  ``[kh*kw*cin, cout]`` / ``[K, C]``.  A vector ``[n]`` is viewed as ``[1, n]``.
* A **row** is ``kernel[i, :]``: the fan-out of one input unit.  Pruning a row
  removes an input feature.
* A **column** is ``kernel[:, j]``: the fan-in of one output unit.  Pruning a
  column removes an output neuron.
* **half-row** = blocks ``(1, ceil(W/2))``; **half-column** = ``(ceil(H/2), 1)``;
  **unstructured** = ``(1, 1)``; a general block is ``(bh, bw)``.

A ``Block`` tiles the 2-D view into a grid of groups; blocks that do not divide
the matrix leave smaller (ragged) groups at the bottom/right edge, and every
group carries its true element count.  ``NM(n, m)`` keeps exactly ``n`` of
every ``m`` consecutive entries along the input axis (axis 0 of the view,
for each output column) or along the output axis.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

Dim = Union[int, str]  # an int size, "full" or "half"


@dataclasses.dataclass(frozen=True)
class Block:
  """Groups of ``(bh, bw)`` entries of the 2-D view; dims are ints, "full" or "half"."""

  bh: Dim = 1
  bw: Dim = 1

  def __post_init__(self):
    for d in (self.bh, self.bw):
      if d not in ("full", "half") and not (
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1
      ):
        raise ValueError(f"block dim must be a positive int, 'full' or 'half'; got {d!r}")

  def resolve(self, shape2d: tuple[int, int]) -> tuple[int, int]:
    """Concrete ``(bh, bw)`` for a ``[H, W]`` view."""
    return (_resolve_dim(self.bh, shape2d[0]), _resolve_dim(self.bw, shape2d[1]))


@dataclasses.dataclass(frozen=True)
class NM:
  """Keep exactly ``n`` of every ``m`` consecutive entries along ``axis``.

  ``axis="in"`` groups along axis 0 of the 2-D view (the input dim of a Dense
  kernel, as in 2:4 sparse tensor cores); ``axis="out"`` along axis 1.
  """

  n: int = 2
  m: int = 4
  axis: str = "in"

  def __post_init__(self):
    if not 0 <= self.n <= self.m or self.m < 1:
      raise ValueError(f"N:M pattern needs 0 <= n <= m, m >= 1; got {self.n}:{self.m}")
    if self.axis not in ("in", "out"):
      raise ValueError(f"N:M axis must be 'in' or 'out', got {self.axis!r}")

  @property
  def sparsity(self) -> float:
    return 1.0 - self.n / self.m


Pattern = Union[Block, NM]

UNSTRUCTURED = Block(1, 1)
ROW = Block(1, "full")
HALF_ROW = Block(1, "half")
COLUMN = Block("full", 1)
HALF_COLUMN = Block("half", 1)

_NAMED = {
  "unstructured": UNSTRUCTURED,
  "row": ROW,
  "half_row": HALF_ROW,
  "column": COLUMN,
  "half_column": HALF_COLUMN,
}


def parse_pattern(spec: str | Pattern) -> Pattern:
  """``"unstructured" | "row" | "half_row" | "column" | "half_column" |
  "block:BHxBW" | "N:M"`` (e.g. ``"2:4"``, ``"2:4:out"``) -> pattern."""
  if isinstance(spec, (Block, NM)):
    return spec
  s = str(spec).strip().lower().replace("-", "_")
  if s in _NAMED:
    return _NAMED[s]
  m = re.fullmatch(r"block:(\w+)x(\w+)", s)
  if m:
    return Block(*(int(v) if v.isdigit() else v for v in m.groups()))
  m = re.fullmatch(r"(\d+):(\d+)(?::(in|out))?", s)
  if m:
    return NM(int(m.group(1)), int(m.group(2)), m.group(3) or "in")
  raise ValueError(
    f"unknown pruning pattern {spec!r}; expected one of {sorted(_NAMED)}, 'block:BHxBW' or 'N:M'"
  )


def _resolve_dim(d: Dim, size: int) -> int:
  if d == "full":
    return max(size, 1)
  if d == "half":
    return max(-(-size // 2), 1)
  if isinstance(d, (int, np.integer)) and d >= 1:
    return int(d)
  raise ValueError(f"block dim must be a positive int, 'full' or 'half'; got {d!r}")


def view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """The 2-D view ``[H, W]`` of a param shape (see module docstring)."""
  shape = tuple(int(s) for s in shape)
  if len(shape) == 0:
    return (1, 1)
  if len(shape) == 1:
    return (1, shape[0])
  return (int(math.prod(shape[:-1])), shape[-1])


def grid_shape(shape: tuple[int, ...], block: Block) -> tuple[int, int]:
  """Number of groups ``(gh, gw)`` along each axis of the 2-D view."""
  h, w = view_shape(shape)
  bh, bw = block.resolve((h, w))
  return (-(-h // bh), -(-w // bw))


def group_sizes(shape: tuple[int, ...], block: Block) -> np.ndarray:
  """int32 ``[gh, gw]``: the number of entries in each group (edges ragged)."""
  h, w = view_shape(shape)
  bh, bw = block.resolve((h, w))
  gh, gw = grid_shape(shape, block)
  rows = np.minimum(bh, h - bh * np.arange(gh))
  cols = np.minimum(bw, w - bw * np.arange(gw))
  return (rows[:, None] * cols[None, :]).astype(np.int32)


REDUCTIONS = ("sum", "mean", "l2", "max")


def group_scores(scores: jax.Array, block: Block, reduce: str = "sum") -> jax.Array:
  """Aggregates elementwise scores into group scores.

  Args:
    scores: float [*shape], elementwise importance.
    block: the group shape over the 2-D view.
    reduce: "sum" | "mean" (sum / true group size) | "l2" (sqrt of the sum of
      squares) | "max".
  Returns:
    float32 [gh, gw].
  """
  if reduce not in REDUCTIONS:
    raise ValueError(f"group reduce must be one of {REDUCTIONS}, got {reduce!r}")
  h, w = view_shape(scores.shape)
  bh, bw = block.resolve((h, w))
  gh, gw = grid_shape(scores.shape, block)
  x = jnp.asarray(scores, jnp.float32).reshape(h, w)
  if reduce == "l2":
    x = x * x
  if (bh, bw) == (1, 1):
    g = x
  else:
    fill = -jnp.inf if reduce == "max" else 0.0
    x = jnp.pad(x, ((0, gh * bh - h), (0, gw * bw - w)), constant_values=fill)
    x = x.reshape(gh, bh, gw, bw)
    g = x.max(axis=(1, 3)) if reduce == "max" else x.sum(axis=(1, 3))
  if reduce == "mean" and (bh, bw) != (1, 1):
    g = g / jnp.asarray(group_sizes(scores.shape, block), jnp.float32)
  elif reduce == "l2":
    g = jnp.sqrt(g)
  return g


def expand_groups(gmask: jax.Array, shape: tuple[int, ...], block: Block) -> jax.Array:
  """Broadcasts a group mask ``[gh, gw]`` back to a param-shaped mask."""
  h, w = view_shape(shape)
  bh, bw = block.resolve((h, w))
  gh, gw = gmask.shape
  if (bh, bw) == (1, 1):
    return gmask.reshape(shape)
  full = jnp.broadcast_to(gmask[:, None, :, None], (gh, bh, gw, bw))
  full = full.reshape(gh * bh, gw * bw)[:h, :w]
  return full.reshape(shape)


def check_fits(pattern: Pattern, shape: tuple[int, ...], path: str = "<param>") -> None:
  """Raises ``ValueError`` naming ``path`` if ``pattern`` cannot tile a param of ``shape``:
  an N:M pattern needs its grouped axis (of the 2-D view) divisible by ``m``; blocks always fit
  (ragged edge groups)."""
  if isinstance(pattern, NM):
    h, w = view_shape(tuple(shape))
    rows = h if pattern.axis == "in" else w
    if rows % pattern.m:
      raise ValueError(
        f"{path}: N:M pattern {pattern.n}:{pattern.m} along "
        f"'{pattern.axis}' needs that dim ({rows}) divisible by {pattern.m}"
      )


def nm_mask(scores: jax.Array, pattern: NM, path: str = "<param>") -> jax.Array:
  """Keeps the ``n`` highest-scoring of every ``m`` consecutive entries.

  Ties keep the lower index.  Raises ``ValueError`` naming ``path`` when the
  grouped axis is not divisible by ``m``.

  Args:
    scores: float [*shape].
  Returns:
    bool [*shape] with exactly ``n`` True per group of ``m``.
  """
  check_fits(pattern, scores.shape, path)
  h, w = view_shape(scores.shape)
  x = jnp.asarray(scores, jnp.float32).reshape(h, w)
  if pattern.axis == "out":
    x = x.T
  rows, cols = x.shape
  x = x.reshape(rows // pattern.m, pattern.m, cols)
  # Rank within each group, descending score, stable -> lower index wins ties.
  order = jnp.argsort(-x, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1, stable=True)
  keep = (rank < pattern.n).reshape(rows, cols)
  if pattern.axis == "out":
    keep = keep.T
  return keep.reshape(scores.shape)
