"""The pure client update: local optax training over padded steps.

Delta convention (same as fedjax): ``delta = params_start - params_end``, a
pseudo-gradient; the server optimizer applies the weighted mean delta as a
gradient, so FedAvg is ``optax.sgd(1.0)``. ``params_start`` is the model the
client actually received, i.e. the *masked* server params when a mask is
given; pruned coordinates therefore always have delta 0.

With ``per_step`` (a client-data importance score's ``Score.per_step``, e.g. ``|g|`` for
saliency) the client also returns ``step_mean``: the mean over its live local steps of
``per_step(params_t, g_t)``, with ``params_t`` its current reduced model and ``g_t`` the gradient
of the loss there *before* masking (so pruned coordinates get a gradient too). Federated pruning
turns it into the client's upload (``pruning.scores``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedprune_jax.federated.server import tree_select
from fedprune_jax.pruning.masks import apply_mask

PyTree = Any
Batch = dict[str, jax.Array]
LossFn = Callable[[PyTree, Batch, jax.Array], tuple[jax.Array, Any]]


class ClientOutput(NamedTuple):
  """What one client sends back (a pytree; vmapped outputs gain a [C] axis).

  Attributes:
    update: what the executors aggregate, a dict of pytrees: ``delta`` (params pytree,
      ``params_start - params_end``) and, with ``per_step``, ``step_mean``.
    num_examples: float32 scalar, sum of example weights of one epoch.
    metrics: dict of float32 scalars: ``loss`` (example-weighted mean training
      loss over all live steps), ``num_steps`` (live steps taken) and
      ``failed`` (1 when the loss or the trained params are not finite: the
      client diverged; its delta and loss are then 0 and the executors give
      it weight 0, so one bad client cannot poison the aggregate).
  """

  update: dict
  num_examples: jax.Array
  metrics: dict[str, jax.Array]


def _shuffle_real_examples(data: Batch, key: jax.Array) -> Batch:
  """Permutes the real examples among the real slots; padding stays last.

  Because packing puts real examples first, sorting random keys with padding
  pinned to +inf keeps the number of live steps (and the no-op padding steps)
  unchanged.
  """
  w = data["weights"]
  s, b = w.shape
  flat_w = w.reshape(s * b)
  r = jax.random.uniform(key, (s * b,))
  perm = jnp.argsort(jnp.where(flat_w > 0, r, 2.0 + jnp.arange(s * b)))
  return jax.tree_util.tree_map(
    lambda x: x.reshape((s * b,) + x.shape[2:])[perm].reshape(x.shape), data
  )


def make_client_update(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  num_epochs: int = 1,
  shuffle: bool = False,
  per_step: Callable[[PyTree, PyTree], PyTree] | None = None,
) -> Callable[..., ClientOutput]:
  """Builds ``client_update(params, data, rng, mask=None) -> ClientOutput``.

  Args:
    loss_fn: ``loss_fn(params, batch, rng) -> (scalar, aux)``; the batch is a
      dict of ``[B, ...]`` arrays with a ``weights`` float32[B] key. It must
      return a finite loss (e.g. 0) and zero gradients when all weights are 0.
    optimizer: local optax optimizer, re-initialised for every client.
    num_epochs: E passes over the client's ``[S, B, ...]`` data (``lax.scan``
      over epochs of a ``lax.scan`` over steps).
    shuffle: re-order the client's real examples every epoch (from the client
      rng); padding examples stay at the tail.
    per_step: ``(params_t, grads_t) -> term`` (params-shaped, pure): also return
      ``update['step_mean']``, the mean of the terms over the live local steps (zeros with no
      live step).

  The returned function is pure and vmap/jit-able. Its arguments: ``params``
  (server params pytree), ``data`` (one client: a dict of ``[S, B, ...]``, or a tuple of K such
  dicts, the length-sorted scan segments of ``SpeakerClientStore(segments=K)``, each padded to
  its own frame length and scanned one after the other with params and optimizer state carried
  through), ``rng`` (the client's key; step ``s`` of the epoch, counted across segments, gets
  ``fold_in(fold_in(rng, epoch), s)``; with ``shuffle`` segment k's real examples are permuted
  within the segment with key ``fold_in(epoch_key, S + k)``, S = total steps) and an optional
  ``mask`` pytree (see ``fedprune_jax.pruning.masks.apply_mask``). Steps whose weights are all
  zero leave params and optimizer state bit-identical, so a client padded with extra steps trains
  exactly like the unpadded client.
  """
  if num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def client_update(
    params: PyTree, data: Batch | tuple[Batch, ...], rng: jax.Array, mask: PyTree | None = None
  ) -> ClientOutput:
    segments = segments_of(data)
    if any("weights" not in seg for seg in segments):
      raise KeyError("client data needs a 'weights' field")
    params_start = apply_mask(params, mask)
    sizes = [seg["weights"].shape[0] for seg in segments]
    num_steps = sum(sizes)

    def step(carry, xs):
      p, opt_state, loss_sum, n_sum, steps, acc = carry
      batch, key = xs
      n = jnp.sum(batch["weights"])
      (loss, _), raw_grads = grad_fn(p, batch, key)
      grads = apply_mask(raw_grads, mask)
      updates, new_opt_state = optimizer.update(grads, opt_state, p)
      # p is zero at pruned coordinates and so are the masked updates: new_p stays zero there
      new_p = optax.apply_updates(p, apply_mask(updates, mask))
      live = n > 0
      if per_step is not None:  # at the params the gradient was taken at
        acc = jax.tree.map(
          lambda a, t: a + jnp.where(live, t, 0.0).astype(a.dtype), acc, per_step(p, raw_grads)
        )
      p = tree_select(live, new_p, p)
      opt_state = tree_select(live, new_opt_state, opt_state)
      loss_sum = loss_sum + jnp.where(live, loss * n, 0.0).astype(loss_sum.dtype)
      n_sum = n_sum + n.astype(n_sum.dtype)
      return (p, opt_state, loss_sum, n_sum, steps + live.astype(jnp.float32), acc), None

    def epoch(carry, e):
      ekey = jax.random.fold_in(rng, e)
      offset = 0
      for k, (seg, size) in enumerate(zip(segments, sizes)):
        if shuffle:
          seg = _shuffle_real_examples(seg, jax.random.fold_in(ekey, num_steps + k))
        keys = jax.vmap(lambda s: jax.random.fold_in(ekey, s))(offset + jnp.arange(size))
        carry, _ = jax.lax.scan(step, carry, (seg, keys))
        offset += size
      return carry, None

    # the loss and example sums in the dtype the loss is computed in: that of the float inputs
    # (float32 usually, float64 under jax_enable_x64 with float64 params or data)
    floats = [
      x for x in jax.tree.leaves((params_start, segments)) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    zero = jnp.zeros((), jnp.result_type(jnp.float32, *floats))
    acc0 = jax.tree.map(jnp.zeros_like, params_start) if per_step is not None else ()
    init = (params_start, optimizer.init(params_start), zero, zero, zero.astype(jnp.float32), acc0)
    (p_end, _, loss_sum, n_sum, steps, acc), _ = jax.lax.scan(epoch, init, jnp.arange(num_epochs))
    loss = loss_sum / jnp.maximum(n_sum, 1e-12)
    ok = client_finite(loss, (p_end, acc))
    # where() fuses with the subtraction: no extra params-sized buffer
    update = {
      "delta": jax.tree.map(
        lambda a, b: jnp.where(ok, a - b, jnp.zeros_like(a)), params_start, p_end
      )
    }
    if per_step is not None:
      live_steps = jnp.maximum(steps, 1.0)
      update["step_mean"] = jax.tree.map(lambda a: jnp.where(ok, a / live_steps, 0.0), acc)
    return ClientOutput(
      update=update,
      num_examples=sum(jnp.sum(seg["weights"]) for seg in segments).astype(jnp.float32),
      metrics={
        "loss": jnp.where(ok, loss, 0.0),
        "num_steps": steps,
        "failed": 1.0 - ok.astype(jnp.float32),
      },
    )

  return client_update


def segments_of(data: Batch | tuple[Batch, ...]) -> tuple[Batch, ...]:
  """A client's data as a tuple of scan segments (one dict = one segment)."""
  return (data,) if isinstance(data, dict) else tuple(data)


def client_finite(loss: jax.Array, params: PyTree) -> jax.Array:
  """bool scalar: the loss and every parameter are finite.

  One float32 sum per leaf: any NaN/inf entry makes it non-finite, and a
  reduction is cheaper (memory and time) than an elementwise isfinite map.
  A sum that overflows float32 also counts as failed: such a client has
  diverged anyway.
  """
  total = loss.astype(jnp.float32)
  for leaf in jax.tree_util.tree_leaves(params):
    total = total + jnp.sum(leaf, dtype=jnp.float32)
  return jnp.isfinite(total)
