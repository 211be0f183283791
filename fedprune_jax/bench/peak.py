"""Matmul peak of the current backend: the denominator of utilisation ratios.

The peak is *measured* (best of several jitted square matmuls) in the same
process as the benchmark it normalises, so machine load and thread settings
affect numerator and denominator alike.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def default_matmul_size(backend: str | None = None) -> int:
  """A square size big enough to reach the backend's matmul peak."""
  backend = backend or jax.default_backend()
  return 2048 if backend == "cpu" else 8192


def measure_matmul_peak(
  dtype=jnp.float32,
  n: int | None = None,
  repeats: int = 5,
  inner: int | None = None,
  return_cpu: bool = False,
):
  """Best achieved FLOP/s of a jitted ``[n, n] @ [n, n]`` matmul.

  Args:
    dtype: operand dtype (float32 for the f32 peak, bfloat16 on accelerators).
    n: matrix size (default: ``default_matmul_size()``).
    repeats: timed calls; the best is reported.
    inner: matmuls chained inside one call (amortises dispatch on fast
      devices; default 1 on CPU, 10 elsewhere).

    return_cpu: also return FLOP per CPU-second of this process (all
      threads), a load-robust companion on shared machines.

  Returns:
    FLOP/s (2 n^3 per matmul), or (FLOP/s, FLOP/cpu-s) if ``return_cpu``.
  """
  n = n or default_matmul_size()
  inner = inner or (1 if jax.default_backend() == "cpu" else 10)
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = (jax.random.normal(kb, (n, n), jnp.float32) / n**0.5).astype(dtype)

  @jax.jit
  def chain(a, b):
    def body(_, x):
      return (x @ b).astype(dtype)

    return jax.lax.fori_loop(0, inner, body, a)

  chain(a, b).block_until_ready()  # compile + warm up
  best = best_cpu = float("inf")
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    chain(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
    best_cpu = min(best_cpu, time.process_time() - c0)
  flops = 2.0 * n**3 * inner
  return (flops / best, flops / best_cpu) if return_cpu else flops / best
