"""The pruning inputs a federated run reads besides its data, checked against the model before
any data is loaded or anything is trained: the pruning pattern against the prunable params'
shapes, ``pruning.mask_path`` against the model (the warm start's path: ``warm_start.path_of``).

Each problem is one ``ConfigError``/``InputError`` naming the field or file (one CLI line).
"""

from __future__ import annotations

from typing import Any

from fedprune_jax import pruning
from fedprune_jax.errors import ConfigError
from fedprune_jax.pruning import patterns

PyTree = Any


def prunable_mask(pcfg: dict, policy, params: PyTree) -> PyTree:
  """The model's all-kept mask (None = never pruned), with ``pruning.pattern`` checked against
  every prunable param's shape: ConfigError if it cannot tile one (N:M whose ``m`` does not
  divide the grouped dimension)."""
  try:
    mask_like = policy.init_mask(params)
    if str(pcfg["pattern"]).strip().lower() != "units":
      pattern = patterns.parse_pattern(pcfg["pattern"])
      for path, leaf in pruning.flatten_with_paths(mask_like):
        if leaf is not None:
          patterns.check_fits(pattern, leaf.shape, path)
  except ValueError as e:
    raise ConfigError(f"config field pruning.pattern={pcfg['pattern']!r}: {e}") from e
  return mask_like


def initial_mask(pcfg: dict, mask_like: PyTree) -> PyTree | None:
  """The checked mask of ``pruning.mask_path`` (None if unset); see ``load_mask_checked``."""
  if not pcfg.get("mask_path"):
    return None
  return pruning.load_mask_checked(pcfg["mask_path"], mask_like)
