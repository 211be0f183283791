"""Pruning masks: pytrees that mirror a params pytree.

A mask has the params' structure.  A leaf is either a boolean array of the
param's shape (True = weight kept, False = pruned) or ``None`` for params that
are never pruned (biases, norms, embeddings and the output layer by default).

Params are addressed by slash-joined paths such as
``"encoder/block_0/ffn1/dense_in/kernel"``.  Path patterns used to include or
exclude params are regular expressions matched with ``re.search``; a pattern
prefixed with ``"glob:"`` is a shell glob matched against the whole path
(``"glob:*/mhsa/*/kernel"``).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedprune_jax import io_utils
from fedprune_jax.errors import InputError
from fedprune_jax.pruning.spec import DEFAULT_EXCLUDE, DEFAULT_INCLUDE  # noqa: F401  (re-exported)

PyTree = Any

# Structured pruning (whole rows / columns) leaves out, besides DEFAULT_EXCLUDE, the layers where
# removing a row or column cuts the model's width: the subsampling convs and the input projection
# (``encoder/subsample/...``) and every matrix that writes into the d_model residual stream (the
# feed-forward modules' ``dense_out``, attention's ``out``, the conv module's ``pointwise_out``).
# T1's structured arms use it (``pruning.exclude``).
STRUCTURED_EXCLUDE: tuple[str, ...] = DEFAULT_EXCLUDE + (
  r"(^|/)subsample/",
  r"(^|/)dense_out/",
  r"(^|/)mhsa/out/",
  r"(^|/)pointwise_out/",
)


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path: Sequence[Any]) -> str:
  """Joins a jax key path into ``"a/b/c"``."""
  return "/".join(_key_str(k) for k in path)


def flatten_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  """Leaves of ``tree`` with their slash paths, in jax's flatten order.

  ``None`` leaves are kept (as ``None``), so a mask and its params flatten to
  the same list of paths.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return [(path_str(p), v) for p, v in leaves]


def map_with_paths(fn, tree: PyTree, *rest: PyTree) -> PyTree:
  """``jax.tree.map`` whose ``fn(path, leaf, *rest_leaves)`` sees slash paths.

  ``None`` leaves of ``tree`` are passed to ``fn`` as ``None``.
  """
  return jax.tree_util.tree_map_with_path(
    lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest, is_leaf=lambda x: x is None
  )


def matches(path: str, patterns: Iterable[str]) -> bool:
  """True if ``path`` matches any regex (or ``glob:``-prefixed glob)."""
  for pat in patterns:
    if pat.startswith("glob:"):
      if fnmatch.fnmatchcase(path, pat[5:]):
        return True
    elif re.search(pat, path):
      return True
  return False


def is_prunable(
  path: str,
  leaf: Any,
  include: Iterable[str] = DEFAULT_INCLUDE,
  exclude: Iterable[str] = DEFAULT_EXCLUDE,
) -> bool:
  """Whether the param at ``path`` is pruned under the include/exclude rules."""
  if leaf is None or np.ndim(leaf) < 1:
    return False
  return matches(path, include) and not matches(path, exclude)


def init_mask(
  params: PyTree, include: Iterable[str] = DEFAULT_INCLUDE, exclude: Iterable[str] = DEFAULT_EXCLUDE
) -> PyTree:
  """All-kept mask: ``True`` arrays for prunable params, ``None`` elsewhere."""
  include, exclude = tuple(include), tuple(exclude)
  return map_with_paths(
    lambda p, x: jnp.ones(np.shape(x), bool) if is_prunable(p, x, include, exclude) else None,
    params,
  )


@jax.jit
def apply_mask(params: PyTree, mask: PyTree | None) -> PyTree:
  """Zeroes pruned weights (exact zeros; ``None`` mask leaves pass through).

  ``mask`` leaves may be boolean or 0/1 arrays; ``mask=None`` returns ``params`` unchanged.  Also
  used on gradients and optimizer updates (the trainer and the federated client update).
  """
  if mask is None:
    return params
  return jax.tree.map(
    lambda p, m: p if m is None else jnp.where(m, p, jnp.zeros_like(p)), params, mask
  )


def dense_mask(mask: PyTree, params: PyTree) -> PyTree:
  """Mask with every ``None`` leaf replaced by an all-True array of the param's shape."""
  if mask is None:
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
  return jax.tree.map(
    lambda p, m: jnp.ones(jnp.shape(p), bool) if m is None else jnp.asarray(m, bool), params, mask
  )


def _mask_leaves(mask: PyTree) -> list[jax.Array]:
  return [m for m in jax.tree.leaves(mask)]


def count_kept(mask: PyTree) -> jax.Array:
  """Number of kept entries over all non-None mask leaves (int32 scalar)."""
  leaves = _mask_leaves(mask)
  return sum((jnp.sum(m, dtype=jnp.int32) for m in leaves), jnp.int32(0))


def count_total(mask: PyTree) -> int:
  """Number of entries over all non-None mask leaves (static int)."""
  return int(sum(int(np.prod(np.shape(m))) for m in _mask_leaves(mask)))


def sparsity(mask: PyTree) -> jax.Array:
  """Global sparsity: pruned / total over the prunable (non-None) leaves (float32 scalar).

  The pruned count is an exact integer, so a dense mask has sparsity exactly 0 (``1 - kept /
  total`` in float32 is not: kept summed in float32 rounds beyond 2**24 entries).
  """
  total = count_total(mask)
  if total == 0:
    return jnp.float32(0.0)
  return (total - count_kept(mask)).astype(jnp.float32) / jnp.float32(total)


def param_count(params: PyTree, mask: PyTree | None = None) -> int:
  """Number of params left after masking (all params when ``mask`` is None)."""
  if mask is None:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))
  counts = jax.tree.map(
    lambda p, m: int(np.size(p)) if m is None else int(np.sum(np.asarray(m))), params, mask
  )
  return int(sum(jax.tree.leaves(counts)))


# ---------------------------------------------------------------- serialise


def mask_to_flat(mask: PyTree) -> dict[str, np.ndarray]:
  """``{path: bool ndarray}`` for every non-None leaf."""
  return {p: np.asarray(m, dtype=bool) for p, m in flatten_with_paths(mask) if m is not None}


def mask_from_flat(
  flat: Mapping[str, np.ndarray], like: PyTree, source: str = "<flat mask>"
) -> PyTree:
  """Rebuilds a mask with ``like``'s structure (params or a mask).

  Paths absent from ``flat`` become ``None``.  Raises ``ValueError`` naming
  ``source`` and the path when a shape does not match or a key is unknown.
  """
  flat = dict(flat)
  known = set()

  def build(path, leaf):
    known.add(path)
    if path not in flat:
      return None
    arr = np.asarray(flat[path])
    if leaf is not None and tuple(arr.shape) != tuple(np.shape(leaf)):
      raise ValueError(
        f"{source}: mask entry {path!r} has shape {arr.shape}, expected {tuple(np.shape(leaf))}"
      )
    return jnp.asarray(arr, bool)

  out = map_with_paths(build, like)
  unknown = sorted(set(flat) - known)
  if unknown:
    raise ValueError(f"{source}: mask entries not in the params: {unknown[:5]}")
  return out


def save_mask(path: str | os.PathLike, mask: PyTree) -> None:
  """Writes ``mask`` as an ``.npz`` keyed by param path; atomic (tmp + rename)."""
  io_utils.save_npz_atomic(path, mask_to_flat(mask))


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an ``.npz`` file; InputError naming the file if it is not one."""
  import zipfile  # pylint: disable=g-import-not-at-top

  try:
    with open(path, "rb") as f:
      if f.read(2) != b"PK":  # a zip archive (an empty one starts PK\x05\x06)
        raise ValueError("not an .npz file (a mask is the mask.npz a run writes)")
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise InputError(f"{path}: cannot read mask file ({e})") from e


def load_mask(path: str | os.PathLike, like: PyTree) -> PyTree:
  """Reads a mask written by ``save_mask`` into ``like``'s structure (absent paths: None)."""
  path = os.fspath(path)
  return mask_from_flat(_read_npz(path), like, source=path)


def load_mask_checked(path: str | os.PathLike, like_mask: PyTree) -> PyTree:
  """Reads a mask for a model whose all-kept mask is ``like_mask`` (None = never pruned), checked.

  Every prunable leaf must be in the file, as a bool array of the param's shape, with no entry
  the model lacks, and the mask must keep at least one weight (like ``target_sparsity < 1``), so
  the mask a run trains with is the file's and its sparsity counts every prunable weight.
  Raises InputError naming the file and the first bad entry.
  """
  path = os.fspath(path)
  flat = _read_npz(path)
  prunable = {p: leaf for p, leaf in flatten_with_paths(like_mask) if leaf is not None}
  missing = sorted(set(prunable) - set(flat))
  unknown = sorted(set(flat) - set(prunable))
  if unknown:
    raise InputError(
      f"{path}: mask entries the model has no prunable param for: {unknown[:3]}"
      f"{' ...' if len(unknown) > 3 else ''} (a mask of another model?)"
    )
  if missing:
    raise InputError(
      f"{path}: mask has no entry for {len(missing)} of the model's {len(prunable)} prunable "
      f"params, e.g. {missing[0]!r} (a mask of another model?)"
    )
  for name, leaf in prunable.items():
    arr = flat[name]
    if arr.dtype != np.bool_:
      raise InputError(f"{path}: mask entry {name!r} has dtype {arr.dtype}, expected bool")
    if tuple(arr.shape) != tuple(np.shape(leaf)):
      raise InputError(
        f"{path}: mask entry {name!r} has shape {arr.shape}, expected {tuple(np.shape(leaf))}"
      )
  if not any(flat[name].any() for name in prunable):
    raise InputError(f"{path}: the mask prunes every weight (sparsity 1.0 is not trainable)")
  return mask_from_flat(flat, like_mask, source=path)
