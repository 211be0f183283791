"""FLOP counts: XLA's cost analysis of a compiled function, and an analytic
count of the Conformer's matmul/conv FLOPs (the 'model FLOPs' of MFU).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from fedprune_jax.models import conformer


def cost_analysis_flops(compiled: Any) -> float | None:
  """'flops' from ``jax.stages.Compiled.cost_analysis()``, or None.

  Depending on the JAX version / backend, cost_analysis returns a dict, a list
  of per-computation dicts (summed here) or None.
  """
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (unsupported backend)
    return None
  if ca is None:
    return None
  if isinstance(ca, dict):
    ca = [ca]
  total = sum(float(d.get("flops", 0.0)) for d in ca if d)
  return total if total > 0 else None


def jit_flops(fn: Callable[..., Any], *args, **kwargs) -> float | None:
  """FLOPs of one call of ``jax.jit(fn)(*args, **kwargs)`` per XLA (or None).

  Note: XLA counts a loop body once (e.g. the CTC recursion's scan), and it
  counts elementwise ops too; use ``conformer_flops`` for model FLOPs.
  """
  return cost_analysis_flops(jax.jit(fn).lower(*args, **kwargs).compile())


def conformer_flops(
  cfg: conformer.ConformerConfig, batch: int, frames: int, vocab_size: int = 29, train: bool = True
) -> float:
  """Analytic matmul + conv FLOPs (2 per multiply-add) of the encoder + CTC head.

  Forward pass on ``batch`` x ``frames`` input frames; ``train=True``
  multiplies by 3 (backward = 2x forward for matmuls).  Elementwise ops,
  norms, softmax and the CTC recursion are not counted.
  """
  d, c, k, f = cfg.d_model, cfg.subsample_channels, cfg.conv_kernel, cfg.input_dim
  t1, f1 = -(-frames // 2), -(-f // 2)
  t2, f2 = -(-t1 // 2), -(-f1 // 2)
  sub = 2 * t1 * f1 * 9 * c + 2 * t2 * f2 * 9 * c * c + 2 * t2 * f2 * c * d
  per_frame = (
    2 * 2 * 2 * d * cfg.ffn_mult * d  # two FFNs, in + out
    + 4 * 2 * d * d  # q, k, v, out
    + 2 * d * 2 * d
    + 2 * k * d
    + 2 * d * d
  )  # conv module
  attn = 2 * t2 * t2 * d * 2 + 2 * t2 * (2 * t2 - 1) * d  # ac, probs@v, bd
  pos = 2 * (2 * t2 - 1) * d * d  # once per batch
  block = batch * (t2 * per_frame + attn) + pos
  fwd = batch * sub + cfg.num_layers * block + batch * t2 * 2 * d * vocab_size
  return float(3 * fwd if train else fwd)
