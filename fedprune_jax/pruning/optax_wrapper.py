"""An optax wrapper that keeps pruned weights exactly zero.

``masked_optimizer(inner)`` returns a ``GradientTransformationExtraArgs``:

* gradients of pruned entries are zeroed before ``inner`` sees them, so the
  inner moments never accumulate for pruned weights;
* the returned update of a pruned entry is ``-param``, so
  ``optax.apply_updates(params, updates)`` gives exactly 0.0 there (also on
  the first step, when the params were not masked yet); with
  ``pruned="freeze"`` it is 0 instead: a pruned weight keeps its last value
  (a server that re-scores its weights can then revive it with that value);
* when the mask changes, every part of the inner state that has the params'
  structure (adam's ``mu``/``nu``, momentum traces, ...) is reset to zero
  for the entries that regrow (mask 0 -> 1), so a regrown weight starts with
  fresh moments.

Where the mask comes from: the state holds it, ``initial_mask`` at init
(all-kept if None), replaced either by ``update_mask(state, new_mask)``
(server-side mask update between rounds) or by passing ``mask=new_mask`` to
``update``.

Masks may contain ``None`` leaves (never pruned); the state stores a dense
bool mask (None -> all True) so its structure stays fixed under jit/scan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedprune_jax.pruning import masks as masks_lib

PyTree = Any


class MaskedState(NamedTuple):
  inner_state: Any
  mask: PyTree  # dense bool mask, params' structure


def _same_layout(node, ref_def, ref_shapes) -> bool:
  if jax.tree.structure(node) != ref_def:
    return False
  return [jnp.shape(x) for x in jax.tree.leaves(node)] == ref_shapes


def reset_params_like(state: Any, like: PyTree, fn: Callable[..., Any], *rest: PyTree) -> Any:
  """Applies ``fn(leaf, *rest_leaves)`` to every subtree of ``state`` that has
  the structure and leaf shapes of ``like`` (e.g. adam's mu and nu); other
  parts (counts, scalars) are returned unchanged."""
  ref_def = jax.tree.structure(like)
  ref_shapes = [jnp.shape(x) for x in jax.tree.leaves(like)]

  def visit(node):
    if _same_layout(node, ref_def, ref_shapes):
      return jax.tree.map(fn, node, *rest)
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if treedef.num_nodes == 1:  # a leaf (array, None, scalar)
      return node
    return jax.tree.unflatten(treedef, [visit(c) for c in children])

  return visit(state)


def masked_optimizer(
  inner: optax.GradientTransformation,
  initial_mask: PyTree | None = None,
  pruned: str = "zero",
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that masked params stay exactly zero, or frozen (see module doc)."""
  if pruned not in ("zero", "freeze"):
    raise ValueError(f"pruned must be 'zero' or 'freeze', got {pruned!r}")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return MaskedState(inner.init(params), masks_lib.dense_mask(initial_mask, params))

  def update_fn(updates, state, params=None, *, mask=None, **extra):
    if params is None:
      raise ValueError(
        "masked_optimizer: update() needs params (to keep pruned weights at exactly zero)"
      )
    if mask is not None:
      state = _set_mask(state, mask)
    m = state.mask
    grads = jax.tree.map(lambda g, k: jnp.where(k, g, jnp.zeros_like(g)), updates, m)
    new_updates, inner_state = inner.update(grads, state.inner_state, params, **extra)
    new_updates = jax.tree.map(
      lambda u, k, p: jnp.where(k, u, 0 if pruned == "freeze" else -p).astype(u.dtype),
      new_updates,
      m,
      params,
    )
    return new_updates, MaskedState(inner_state, m)

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return tx


def _set_mask(state: MaskedState, new_mask: PyTree) -> MaskedState:
  new_mask = jax.tree.map(
    lambda old, new: jnp.ones(jnp.shape(old), bool) if new is None else jnp.asarray(new, bool),
    state.mask,
    new_mask,
    is_leaf=lambda x: x is None,
  )
  regrow = jax.tree.map(lambda old, new: new & ~old, state.mask, new_mask)
  inner = reset_params_like(
    state.inner_state, state.mask, lambda x, r: jnp.where(r, jnp.zeros_like(x), x), regrow
  )
  return MaskedState(inner, new_mask)


def update_mask(state: MaskedState, new_mask: PyTree) -> MaskedState:
  """New wrapper state holding ``new_mask`` (None leaves = all kept), with the
  inner optimizer's params-shaped state zeroed where weights regrow."""
  return _set_mask(state, new_mask)
