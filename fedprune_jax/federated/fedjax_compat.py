"""The one place that imports fedjax (0.0.17, its last release, from 2023).

fedjax still calls ``jax.tree_map``, which JAX removed (0.6); re-creating the
alias before fedjax is used makes ``fedjax.algorithms.fed_avg`` run again.
Only the fedjax paths (interop, oracle tests, benchmarks) import this module;
the engine core never needs fedjax.
"""

from __future__ import annotations

import jax

if not hasattr(jax, "tree_map"):
  # Compatibility alias for fedjax 0.0.17 (removed from JAX in 0.6).
  jax.tree_map = jax.tree_util.tree_map

# pylint: disable=g-import-not-at-top,wrong-import-position
import fedjax  # noqa: E402
from fedjax.core import for_each_client as for_each_client_lib  # noqa: E402

__all__ = ["fedjax", "for_each_client_lib"]
