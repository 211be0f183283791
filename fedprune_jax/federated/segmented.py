"""A client update over K scan segments of different shapes (``SpeakerClientStore(segments=K)``).

``client.make_client_update`` scans one ``[S, B, T, ...]`` dict, so every local step pays for
the client's longest utterance. Here the client's data is a tuple of K such dicts (length-sorted
steps, each segment padded to its own T_k); the segments are scanned one after the other with
the parameters and the optimizer state carried through, i.e. still one optimizer run over one
epoch. With K = 1 it computes exactly what ``client.make_client_update`` computes (same step
keys, same shuffle key), which the tests check.

This lives beside client.py while that module is being refactored; it is meant to be folded
into ``make_client_update`` (a single dict being the K = 1 case).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from fedprune_jax.federated.client import (
  Batch,
  ClientOutput,
  LossFn,
  PyTree,
  _shuffle_real_examples,
  client_finite,
)
from fedprune_jax.pruning.masks import apply_mask


def make_segmented_client_update(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  num_epochs: int = 1,
  shuffle: bool = False,
) -> Callable[..., ClientOutput]:
  """Builds ``client_update(params, segments, rng, mask=None) -> ClientOutput``.

  Args: as ``client.make_client_update``; ``segments`` is a tuple of K dicts of ``[S_k, B,
  ...]`` arrays (or one dict). Step ``s`` of segment ``k`` gets the key ``fold_in(fold_in(rng,
  epoch), sum(S_<k) + s)``; with ``shuffle`` each segment's real examples are permuted within
  the segment (key ``fold_in(epoch_key, S + k)``, S = total steps), so a step keeps its length
  class. All-padding steps are exact no-ops, as in client.py.
  """
  if num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def client_update(
    params: PyTree, segments: Batch | Sequence[Batch], rng: jax.Array, mask: PyTree | None = None
  ) -> ClientOutput:
    segments = (segments,) if isinstance(segments, dict) else tuple(segments)
    if any("weights" not in seg for seg in segments):
      raise KeyError("client data needs a 'weights' field in every segment")
    params_start = apply_mask(params, mask)
    sizes = [seg["weights"].shape[0] for seg in segments]
    total = sum(sizes)

    def step(carry, xs):
      p, opt_state, loss_sum, n_sum, steps = carry
      batch, key = xs
      n = jnp.sum(batch["weights"])
      (loss, _), grads = grad_fn(p, batch, key)
      grads = apply_mask(grads, mask)
      updates, new_opt_state = optimizer.update(grads, opt_state, p)
      new_p = apply_mask(optax.apply_updates(p, apply_mask(updates, mask)), mask)
      live = n > 0
      p, opt_state = jax.tree_util.tree_map(
        lambda a, b: jnp.where(live, a, b), (new_p, new_opt_state), (p, opt_state)
      )
      loss_sum = loss_sum + jnp.where(live, loss * n, 0.0)
      return (p, opt_state, loss_sum, n_sum + n, steps + live.astype(jnp.float32)), None

    def epoch(carry, e):
      ekey = jax.random.fold_in(rng, e)
      offset = 0
      for k, (seg, size) in enumerate(zip(segments, sizes)):
        if shuffle:
          seg = _shuffle_real_examples(seg, jax.random.fold_in(ekey, total + k))
        keys = jax.vmap(lambda s: jax.random.fold_in(ekey, s))(offset + jnp.arange(size))
        carry, _ = jax.lax.scan(step, carry, (seg, keys))
        offset += size
      return carry, None

    zero = jnp.zeros((), jnp.float32)
    init = (params_start, optimizer.init(params_start), zero, zero, zero)
    (p_end, _, loss_sum, n_sum, steps), _ = jax.lax.scan(epoch, init, jnp.arange(num_epochs))
    loss = loss_sum / jnp.maximum(n_sum, 1e-12)
    ok = client_finite(loss, p_end)
    delta = jax.tree_util.tree_map(
      lambda a, b: jnp.where(ok, a - b, jnp.zeros_like(a)), params_start, p_end
    )
    return ClientOutput(
      delta=delta,
      num_examples=sum(jnp.sum(seg["weights"]) for seg in segments).astype(jnp.float32),
      metrics={
        "loss": jnp.where(ok, loss, 0.0),
        "num_steps": steps,
        "failed": 1.0 - ok.astype(jnp.float32),
      },
    )

  return client_update
