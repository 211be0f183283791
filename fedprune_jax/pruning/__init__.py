"""fedprune_jax.pruning: masks, scores, patterns, allocation, schedules.

All functions are pure over params pytrees (nested dicts of arrays) and
jit-able where they compute on arrays.  Typical use::

  from fedprune_jax import pruning
  scores = pruning.magnitude(params)
  mask = pruning.prune_mask(scores, 0.5, pattern="column", allocation="global")
  params = pruning.apply_mask(params, mask)

Axis convention (see ``patterns``): a Dense kernel is ``[in, out]``; a *row*
is ``kernel[i, :]`` (an input's fan-out), a *column* is ``kernel[:, j]`` (an
output neuron's fan-in); conv kernels are viewed as ``[prod(other), out]``.
"""

from fedprune_jax.pruning.allocation import (
  ERK,
  Adaptive,
  Global,
  Uniform,
  erk_densities,
  parse_allocation,
  prune_mask,
)
from fedprune_jax.pruning.masks import (
  DEFAULT_EXCLUDE,
  DEFAULT_INCLUDE,
  STRUCTURED_EXCLUDE,
  apply_mask,
  count_kept,
  count_total,
  dense_mask,
  flatten_with_paths,
  init_mask,
  is_prunable,
  load_mask,
  load_mask_checked,
  mask_from_flat,
  mask_to_flat,
  matches,
  param_count,
  save_mask,
  sparsity,
)
from fedprune_jax.pruning.optax_wrapper import MaskedState, masked_optimizer, update_mask
from fedprune_jax.pruning.patterns import (
  COLUMN,
  HALF_COLUMN,
  HALF_ROW,
  NM,
  ROW,
  UNSTRUCTURED,
  Block,
  group_scores,
  nm_mask,
  parse_pattern,
)
from fedprune_jax.pruning.schedules import Constant, Polynomial, Step
from fedprune_jax.pruning.scores import (
  REGISTRY,
  Score,
  get_score,
  magnitude,
  movement,
  random_scores,
  saliency,
)
