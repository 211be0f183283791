"""Centralized (pruning) training on a set of utterances: the baseline of federated pruning and
the server-side warm start.

With a ``MaskPolicy`` the mask follows the *same* policy object as federated pruning, keyed by
steps instead of rounds: training step ``s`` is policy step ``s // steps_per_round``, and the mask
is updated at the first training step of every policy step that ``policy.should_update``. The
server optimizer rule is the federated one (``pruning.masked_optimizer(..., pruned="freeze")``:
the model is ``apply_mask(params, mask)``, pruned values are kept and frozen, moments reset on
regrowth), and data scores (``saliency``, ``taylor``, ...) are made as one client's would be
(``pruning.scores.Score``): the mean of the score's per-step terms (``per_step(masked params,
g)``) over the steps since the last mask update, and the upload from that mean, the params at the
last mask update and the delta since (``update`` scores that delta). Without a policy it is plain
(dense) training.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedprune_jax import programs
from fedprune_jax import pruning
from fedprune_jax.algorithms.mask_policy import MaskPolicy
from fedprune_jax.data import batching

PyTree = Any


def make_step(
  loss_fn: Callable,
  tx: optax.GradientTransformation,
  per_step: Callable[[PyTree, PyTree], PyTree] | None = None,
) -> Callable:
  """Jitted ``step(params, opt_state, mask, batch, rng, acc) -> (params, opt_state, loss, acc)``.

  The gradient ``g`` is taken at the masked model; with ``per_step`` (a client-data score's
  ``Score.per_step``) ``acc`` accumulates ``per_step(masked params, g)``, else it is returned as
  given.
  """

  def step(params, opt_state, mask, batch, rng, acc):
    model = pruning.apply_mask(params, mask)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(model, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    if per_step is not None:
      acc = jax.tree.map(jnp.add, acc, per_step(model, grads))
    return optax.apply_updates(params, updates), opt_state, loss, acc

  return jax.jit(step)


def train(
  loss_fn: Callable,
  params: PyTree,
  examples: Sequence[batching.Example],
  *,
  steps: int,
  optimizer: optax.GradientTransformation,
  batch_size: int,
  num_buckets: int = 4,
  seed: int = 0,
  policy: MaskPolicy | None = None,
  steps_per_round: int = 1,
  progress: bool = True,
  desc: str = "centralized",
  eval_fn: Callable[[PyTree], dict] | None = None,
  eval_every: int = 0,
  optimizer_key: Hashable | None = None,
) -> tuple[PyTree, PyTree | None, list[dict]]:
  """Trains ``steps`` steps on length-bucketed batches of ``examples``.

  Args:
    loss_fn: ``(params, batch, rng) -> (loss, aux)`` (``task.make_training_loss``).
    params: initial params.
    examples: the training utterances (e.g. the server-side speakers', or all clients' pooled).
    policy: optional mask policy (the federated one); ``steps_per_round`` training steps make one
      policy step.
    eval_fn: ``eval_fn(model_params) -> {name: value}``, run every ``eval_every`` steps and at the
      end (``model_params = apply_mask(params, mask)``); its values go into the history.
    optimizer_key: a hashable name of ``optimizer``'s config; calls of this process with the same
      ``loss_fn`` and an equal key reuse one traced step (``programs.shared``).
  Returns:
    (final dense params, final mask or None, history of {step, loss, sparsity}). The model is
    ``apply_mask(params, mask)``.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  if steps_per_round < 1:
    raise ValueError(f"steps_per_round must be >= 1, got {steps_per_round}")
  tx = pruning.masked_optimizer(optimizer, pruned="freeze")
  opt_state = tx.init(params)
  mask = policy.init_mask(params) if policy is not None else None
  per_step = None if policy is None else policy.per_step
  step_fn = programs.shared(
    None if optimizer_key is None else ("centralized_step", loss_fn, optimizer_key, per_step),
    lambda: make_step(loss_fn, tx, per_step),
  )
  frames = np.array([e.features.shape[0] for e in examples])
  boundaries = batching.bucket_boundaries(frames, num_buckets)
  max_labels = batching.round_up(max(len(e.tokens) for e in examples), 16)
  ids = [str(i) for i in range(len(examples))]
  zero = jax.tree.map(jnp.zeros_like, params)
  acc, acc_steps, start = zero, 0, params  # since the last mask update
  history: list[dict] = []
  key = jax.random.key(seed)
  epoch, step = 0, 0
  bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)
  while step < steps:
    rng = np.random.default_rng([seed, epoch])
    for batch in batching.bucketed_batches(
      examples, ids, batch_size, boundaries, rng=rng, max_labels=max_labels
    ):
      if step >= steps:
        break
      if policy is not None and step % steps_per_round == 0:
        r = step // steps_per_round
        if bool(policy.should_update(r)):
          data_scores = None
          if bool(policy.scores_from_clients(r)) and acc_steps:
            mean = jax.tree.map(lambda a: a / acc_steps, acc) if per_step is not None else None
            delta = jax.tree.map(jnp.subtract, start, params)
            data_scores = policy.client_score.upload(mean, start, delta)
          scores = policy.scores(r, params, data_scores, jax.random.fold_in(key, r))
          mask = policy.next_mask(mask, scores, r, params)
          opt_state = pruning.update_mask(opt_state, mask)
          acc, acc_steps, start = zero, 0, params
      params, opt_state, loss, acc = step_fn(
        params, opt_state, mask, batch, jax.random.fold_in(key, step + 1_000_003), acc
      )
      acc_steps += 1
      step += 1
      bar.update(1)
      evaluate = eval_fn is not None and (step == steps or eval_every and step % eval_every == 0)
      if step % 25 == 0 or step == steps or evaluate:
        record = {"step": step, "loss": float(loss)}
        if mask is not None:
          record["sparsity"] = float(pruning.sparsity(mask))
        if evaluate:
          record.update(eval_fn(pruning.apply_mask(params, mask)))
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
    epoch += 1
  bar.close()
  return params, mask, history
