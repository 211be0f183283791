"""Sparsity schedules and the masked optax wrapper."""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

from fedprune_jax import pruning
from fedprune_jax.pruning import schedules as sched


@settings(max_examples=40, deadline=None)
@given(
  st.floats(0, 0.5), st.floats(0.5, 1.0), st.integers(0, 20), st.integers(1, 50), st.integers(1, 7)
)
def test_polynomial_monotone_known_values(si, sf, t0, n, freq):
  s = sched.Polynomial(si, sf, t0, t0 + n, freq)
  steps = np.arange(0, 128)  # fixed length: one compilation for every example
  vals = np.asarray(s(steps))
  assert np.all(np.diff(vals) >= -1e-7)
  assert vals[0] == pytest.approx(si, abs=1e-6)
  np.testing.assert_allclose(vals[t0 + n :], sf, rtol=1e-6)
  t = t0 + n // 2
  assert vals[t] == pytest.approx(sf + (si - sf) * (1 - (t - t0) / n) ** 3, abs=1e-6)
  upd = np.asarray(s.should_update(steps))
  expect = (steps >= t0) & (steps <= t0 + n) & (((steps - t0) % freq == 0) | (steps == t0 + n))
  np.testing.assert_array_equal(upd, expect)


@settings(max_examples=40, deadline=None)
@given(
  st.floats(0, 0.5),
  st.floats(0.5, 1.0),
  st.floats(0.05, 0.5),
  st.integers(1, 10),
  st.integers(0, 10),
)
def test_step_monotone_hits_final(si, sf, delta, every, begin):
  s = sched.Step(si, sf, delta, every, begin)
  assert s.end_step + 3 * every + 2 < 256
  steps = np.arange(0, 256)
  vals = np.asarray(s(steps))
  assert np.all(np.diff(vals) >= -1e-7)
  assert vals[s.end_step] == pytest.approx(sf) and vals[-1] == pytest.approx(sf)
  if s.end_step > begin:
    assert vals[s.end_step - 1] < sf
  assert vals[begin] == pytest.approx(min(sf, si + delta), abs=1e-6)
  if begin > 0:
    assert vals[begin - 1] == pytest.approx(si)
  # Raised exactly at the update steps.
  changed = np.flatnonzero(np.diff(vals) > 1e-9) + 1
  assert np.asarray(s.should_update(steps))[changed].all()


def test_constant():
  s = sched.Constant(0.7, begin_step=5)
  np.testing.assert_allclose([float(s(t)) for t in (0, 4, 5, 100)], [0, 0, 0.7, 0.7], rtol=1e-6)
  assert [bool(s.should_update(t)) for t in (4, 5, 6)] == [False, True, False]
  s2 = sched.Constant(0.5, 0, end_step=20, frequency=10)
  assert [t for t in range(25) if s2.should_update(t)] == [0, 10, 20]
  with pytest.raises(ValueError, match="sparsities"):
    sched.Constant(1.5)


def _quadratic_problem():
  target = {"a": {"kernel": jnp.arange(1.0, 13.0).reshape(3, 4)}, "b": jnp.ones(3)}
  params = {"a": {"kernel": jnp.full((3, 4), 0.5)}, "b": jnp.zeros(3)}
  loss = lambda p: sum(
    jnp.sum((x - t) ** 2) for x, t in zip(jax.tree.leaves(p), jax.tree.leaves(target))
  )
  return params, loss


def test_masked_adam_keeps_zeros_and_matches_reference():
  params, loss = _quadratic_problem()
  mask = {"a": {"kernel": jnp.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]], bool)}, "b": None}
  tx = pruning.masked_optimizer(optax.adam(0.1), initial_mask=mask)
  state = tx.init(params)
  ref_tx = optax.adam(0.1)
  ref_p = pruning.apply_mask(params, mask)
  ref_state = ref_tx.init(ref_p)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  for _ in range(5):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    k = np.asarray(params["a"]["kernel"])
    assert np.all(k[~np.asarray(mask["a"]["kernel"])] == 0.0)
    # Reference: adam on masked gradients from masked params, then masked.
    g = pruning.apply_mask(jax.grad(loss)(ref_p), mask)
    ru, ref_state = ref_tx.update(g, ref_state, ref_p)
    ref_p = pruning.apply_mask(optax.apply_updates(ref_p, ru), mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, ref_p)


def test_moments_reset_on_regrowth_only():
  params, loss = _quadratic_problem()
  full = {"a": {"kernel": jnp.ones((3, 4), bool)}, "b": None}
  tx = pruning.masked_optimizer(optax.adam(0.1))
  state = tx.init(params)
  for _ in range(3):
    u, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, u)
  mu0 = np.asarray(state.inner_state[0].mu["a"]["kernel"])
  assert np.all(mu0 != 0)
  pruned = {"a": {"kernel": jnp.arange(12).reshape(3, 4) % 2 == 0}, "b": None}
  state = pruning.update_mask(state, pruned)  # 1 -> 0: moments kept
  np.testing.assert_array_equal(state.inner_state[0].mu["a"]["kernel"], mu0)
  state = pruning.update_mask(state, full)  # 0 -> 1: odd entries regrow
  mu = np.asarray(state.inner_state[0].mu["a"]["kernel"])
  nu = np.asarray(state.inner_state[0].nu["a"]["kernel"])
  odd = np.arange(12).reshape(3, 4) % 2 == 1
  assert np.all(mu[odd] == 0) and np.all(nu[odd] == 0)
  np.testing.assert_array_equal(mu[~odd], mu0[~odd])
  assert int(state.inner_state[0].count) == 3  # non-param state untouched


def test_mask_via_update_kwarg():
  params, loss = _quadratic_problem()
  tx = pruning.masked_optimizer(
    optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
  )
  state = tx.init(params)
  mask = {"a": {"kernel": jnp.eye(3, 4, dtype=bool)}, "b": None}
  u, state = tx.update(jax.grad(loss)(params), state, params, mask=mask)
  p = optax.apply_updates(params, u)
  assert np.all(np.asarray(p["a"]["kernel"])[~np.eye(3, 4, dtype=bool)] == 0)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(jax.grad(loss)(params), state)


@pytest.mark.parametrize("begin,every", [(0, 1), (2, 3)])
def test_step_hold_initial_starts_at_initial_and_raises_one_interval_later(begin, every):
  """0 -> 0.25 -> 0.5 from ``begin``: the held schedule is the default one shifted by ``every``
  steps, with ``initial`` at ``begin`` (listed by hand for begin 0, every 1)."""
  held = sched.Step(0.0, 0.5, 0.25, every, begin, hold_initial=True)
  plain = sched.Step(0.0, 0.5, 0.25, every, begin)
  steps = np.arange(0, 20)
  expect = [float(plain(max(t - every, 0))) if t >= begin + every else 0.0 for t in steps]
  np.testing.assert_allclose(np.asarray(held(steps)), expect)
  assert held.end_step == plain.end_step + every
  if (begin, every) == (0, 1):
    np.testing.assert_allclose(np.asarray(held(np.arange(4))), [0.0, 0.25, 0.5, 0.5])
  changed = np.flatnonzero(np.diff(np.asarray(held(steps))) > 1e-9) + 1
  assert np.asarray(held.should_update(steps))[changed].all()
