"""Cohort sampling: which clients take part in a round.

The cohort of round ``r`` is a pure function of ``(seed, r)`` and the client
population, so a resumed run re-draws exactly the same cohorts and no sampler
state beyond ``(seed, round)`` needs saving.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class CohortSampler:
  """Samples a cohort of distinct clients per round.

  Attributes:
    num_clients: size of the population; client ids are ``0..num_clients-1``.
    cohort_size: clients per round, ``1 <= cohort_size <= num_clients``.
    seed: base seed; round ``r`` draws from ``np.random.default_rng([seed, r])``.
    weights: optional float[num_clients] sampling weights (e.g. #examples);
      ``None`` samples uniformly. Sampling is without replacement within a round
      (successive draws proportional to the remaining weights).
  """

  num_clients: int
  cohort_size: int
  seed: int = 0
  weights: np.ndarray | None = None

  def __post_init__(self):
    if self.num_clients < 1:
      raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
    if not 1 <= self.cohort_size <= self.num_clients:
      raise ValueError(
        f"cohort_size must be in [1, num_clients={self.num_clients}], got {self.cohort_size}"
      )
    if self.weights is not None:
      w = np.asarray(self.weights, np.float64)
      if w.shape != (self.num_clients,):
        raise ValueError(f"weights must have shape ({self.num_clients},), got {w.shape}")
      if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite and >= 0")
      if np.count_nonzero(w) < self.cohort_size:
        raise ValueError(
          f"only {np.count_nonzero(w)} clients have positive weight, fewer "
          f"than cohort_size={self.cohort_size}"
        )
      object.__setattr__(self, "weights", w)

  def sample(self, round_num: int) -> np.ndarray:
    """Returns int64[cohort_size] distinct client ids for ``round_num``."""
    return sample_cohort(self.num_clients, self.cohort_size, self.seed, round_num, self.weights)

  def state(self, round_num: int) -> dict[str, np.ndarray]:
    """The sampler state as an orbax-saveable pytree (seed and next round)."""
    return {"seed": np.asarray(self.seed, np.int64), "round": np.asarray(round_num, np.int64)}


def sample_cohort(
  num_clients: int,
  cohort_size: int,
  seed: int,
  round_num: int,
  weights: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
  """Draws ``cohort_size`` distinct ids from ``range(num_clients)``.

  Args:
    num_clients: population size.
    cohort_size: number of clients to draw (up to ``num_clients``).
    seed: experiment seed.
    round_num: round index; together with ``seed`` it fixes the draw.
    weights: optional non-negative float[num_clients]; ``None`` = uniform.

  Returns:
    int64[cohort_size] client ids, in draw order.
  """
  if round_num < 0:
    raise ValueError(f"round_num must be >= 0, got {round_num}")
  rng = np.random.default_rng([int(seed), int(round_num)])
  if weights is None:
    if cohort_size == num_clients:
      return rng.permutation(num_clients).astype(np.int64)
    return rng.choice(num_clients, size=cohort_size, replace=False).astype(np.int64)
  p = np.asarray(weights, np.float64)
  p = p / p.sum()
  return rng.choice(num_clients, size=cohort_size, replace=False, p=p).astype(np.int64)
