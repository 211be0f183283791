"""Sparsity schedules: small pure callables ``step -> sparsity``.

Each schedule is a frozen dataclass (hashable, so it can be a static jit
argument) with

* ``__call__(step) -> float32 sparsity`` (jnp-compatible; ``step`` may be a
  traced int, e.g. the federated round),
* ``should_update(step) -> bool``: whether the mask is recomputed at ``step``
  (``begin_step <= step <= end_step`` and ``(step - begin_step) % frequency
  == 0``, and always at ``end_step``),
* ``end_step``: from then on the value is the final sparsity.

All are non-decreasing in ``step`` when ``final >= initial``.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp


def _check(initial: float, final: float, begin: int, end: int, frequency: int):
  if not (0.0 <= initial <= 1.0 and 0.0 <= final <= 1.0):
    raise ValueError(f"sparsities must lie in [0, 1], got {initial}, {final}")
  if end < begin:
    raise ValueError(f"end_step {end} < begin_step {begin}")
  if frequency < 1:
    raise ValueError(f"frequency must be >= 1, got {frequency}")


class _Base:
  begin_step: int
  end_step: int
  frequency: int

  def should_update(self, step):
    step = jnp.asarray(step)
    in_range = (step >= self.begin_step) & (step <= self.end_step)
    on_grid = ((step - self.begin_step) % self.frequency) == 0
    return in_range & (on_grid | (step == self.end_step))


@dataclasses.dataclass(frozen=True)
class Constant(_Base):
  """``target`` from ``begin_step`` on (0 before); updates every ``frequency``
  steps until ``end_step`` (default: only at ``begin_step``)."""

  target: float
  begin_step: int = 0
  end_step: int | None = None
  frequency: int = 1

  def __post_init__(self):
    if self.end_step is None:
      object.__setattr__(self, "end_step", self.begin_step)
    _check(0.0, self.target, self.begin_step, self.end_step, self.frequency)

  def __call__(self, step):
    step = jnp.asarray(step)
    return jnp.where(step >= self.begin_step, self.target, 0.0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Step(_Base):
  """Raise by ``delta`` every ``every`` steps from ``begin_step`` until ``final``.

  s(t) = initial for t < begin; min(final, initial + delta * (floor((t -
  begin) / every) + 1)) for t >= begin, so the first raise happens at
  ``begin_step``; ``end_step`` is the step that first reaches ``final``.
  Example: initial 0, delta 0.25, final 0.5, begin 0 gives 0.25, 0.5, 0.5, ...

  With ``hold_initial`` the value at ``begin_step`` is ``initial`` and the first raise
  happens ``every`` steps later: the same example gives 0, 0.25, 0.5, 0.5, ...
  """

  initial: float
  final: float
  delta: float
  every: int = 1
  begin_step: int = 0
  hold_initial: bool = False

  def __post_init__(self):
    if self.delta <= 0 or self.every < 1:
      raise ValueError(
        f"step schedule needs delta > 0 and every >= 1, got {self.delta}, {self.every}"
      )
    _check(self.initial, self.final, self.begin_step, self.end_step, self.every)

  @property
  def frequency(self) -> int:
    return self.every

  @property
  def end_step(self) -> int:
    raises = max(math.ceil((self.final - self.initial) / self.delta - 1e-9), 1)
    return self.begin_step + (raises - 1 + self.hold_initial) * self.every

  def __call__(self, step):
    step = jnp.asarray(step)
    k = jnp.floor_divide(step - self.begin_step, self.every) + (not self.hold_initial)
    s = jnp.minimum(self.final, self.initial + self.delta * k)
    s = jnp.where(step >= self.end_step, self.final, s)
    return jnp.where(step >= self.begin_step, s, self.initial).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Polynomial(_Base):
  """TFMOT polynomial decay (cubic by default):

  s_t = s_f + (s_i - s_f) * (1 - (t - t0) / n) ** power,  t clipped to
  [t0, t0 + n], with t0 = ``begin_step`` and t0 + n = ``end_step``.
  """

  initial: float
  final: float
  begin_step: int
  end_step: int
  frequency: int = 1
  power: float = 3.0

  def __post_init__(self):
    _check(self.initial, self.final, self.begin_step, self.end_step, self.frequency)

  def __call__(self, step):
    n = max(self.end_step - self.begin_step, 1)
    t = jnp.clip(jnp.asarray(step) - self.begin_step, 0, n).astype(jnp.float32)
    s = self.final + (self.initial - self.final) * (1.0 - t / n) ** self.power
    return jnp.asarray(s, jnp.float32)


Schedule = Constant | Step | Polynomial
