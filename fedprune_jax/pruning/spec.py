"""The pruning library's values that a config names: the default prunable-path regexes, the four
allocation specs and their config-string parser.

Kept apart from ``masks`` and ``allocation`` (which compute on arrays) and importing nothing from
the package, so the config field table (``fields``) takes its defaults and checks from here while
the pruning library stays below the config layer.
"""

from __future__ import annotations

import dataclasses
from typing import Union

# Params prunable by default (``pruning.include``/``exclude``): kernels of Dense / Conv layers,
# except the output layer, embeddings and anything that is a norm.
DEFAULT_INCLUDE: tuple[str, ...] = (r"(^|/)kernel$",)
DEFAULT_EXCLUDE: tuple[str, ...] = (
  r"(^|/)ctc_head/",
  r"(^|/)output(_layer)?/",
  r"(^|/)embed[^/]*/",
  r"norm[^/]*/",
)


@dataclasses.dataclass(frozen=True)
class Uniform:
  """Every prunable layer at the target sparsity."""


@dataclasses.dataclass(frozen=True)
class Global:
  """One threshold over per-layer normalised group scores."""

  normalize: str = "mean"


@dataclasses.dataclass(frozen=True)
class Adaptive:
  """Global ranking with per-layer sparsity bounds [floor, ceil].

  ``bounds`` optionally overrides the bounds per path pattern:
  ``((regex, floor, ceil), ...)``, first match wins.
  """

  floor: float = 0.0
  ceil: float = 1.0
  normalize: str = "mean"
  bounds: tuple[tuple[str, float, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class ERK:
  """Erdos-Renyi-Kernel per-layer densities (``scale`` = ERK power, 1.0 std)."""

  scale: float = 1.0


Allocation = Union[Uniform, Global, Adaptive, ERK]


def parse_allocation(spec: str | Allocation) -> Allocation:
  """``"uniform" | "global" | "adaptive" | "adaptive:FLOOR-CEIL" | "erk"`` -> allocation object.

  Bare ``adaptive`` has the bounds [0, 1], i.e. it is ``global``; ``adaptive:0.5-0.9`` keeps
  every layer's sparsity within [50%, 90%].
  """
  if isinstance(spec, (Uniform, Global, Adaptive, ERK)):
    return spec
  text = str(spec).lower()
  if text.startswith("adaptive:"):
    try:
      floor, ceil = (float(x) for x in text.split(":", 1)[1].split("-"))
    except ValueError:
      raise ValueError(
        f"allocation {spec!r}: expected 'adaptive:FLOOR-CEIL', e.g. 'adaptive:0.5-0.9'"
      ) from None
    if not 0.0 <= floor <= ceil <= 1.0:
      raise ValueError(f"allocation {spec!r}: bounds need 0 <= FLOOR <= CEIL <= 1")
    return Adaptive(floor=floor, ceil=ceil)
  table = {"uniform": Uniform(), "global": Global(), "adaptive": Adaptive(), "erk": ERK()}
  try:
    return table[str(spec).lower()]
  except KeyError:
    raise ValueError(f"unknown allocation {spec!r}; expected one of {sorted(table)}") from None
