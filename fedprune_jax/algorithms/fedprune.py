"""Federated pruning (Lin et al., Interspeech 2022) as a ``FederatedAlgorithm``.

The server holds the dense params, the mask and the (mask-aware) server optimizer state. Each
round it broadcasts the masked model and the mask; clients train the reduced model (pruned weights
stay exactly zero) and, when the next mask update scores with client data, also return importance
scores; the server applies the aggregated delta and, when the policy says so, computes the next
mask (``mask_policy.MaskPolicy``).

Server optimizer and the mask (the documented rule, tested in tests/test_fedprune.py):

* the server optimizer is ``pruning.masked_optimizer(inner, pruned="freeze")``: at pruned
  coordinates the gradient fed to FedAdam/FedYogi is 0 and the update is 0, so a pruned weight
  does not drift (its value is kept for re-scoring) and its moments only decay;
* on regrowth (refining) the weight resumes from its kept value with moments reset to zero
  (``pruning.update_mask``);
* clients train ``apply_mask(params, mask)``; their delta is 0 at pruned coordinates.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedprune_jax import pruning
from fedprune_jax.algorithms.mask_policy import MaskPolicy
from fedprune_jax.federated import aggregation as agg_lib
from fedprune_jax.federated import server as server_lib
from fedprune_jax.federated.aggregation import Aggregate
from fedprune_jax.federated.algorithm import FederatedAlgorithm
from fedprune_jax.federated.client import ClientOutput
from fedprune_jax.federated.server import ServerState

PyTree = Any


def mask_stats(mask: PyTree) -> tuple[jax.Array, jax.Array]:
  """(kept, total) prunable entries of ``mask`` as float32 scalars (counted exactly by
  ``pruning.count_kept``, so a dense mask has kept == total)."""
  return pruning.count_kept(mask).astype(jnp.float32), jnp.float32(pruning.count_total(mask))


def federated_pruning(
  local_update: Callable[..., ClientOutput],
  server_optimizer: optax.GradientTransformation,
  policy: MaskPolicy,
  cohort_size: int,
  round_costs: Callable[[ServerState], dict] | None = None,
  initial_mask: PyTree | None = None,
) -> FederatedAlgorithm:
  """Federated pruning.

  Args:
    local_update: ``client.make_client_update(..., grad_stats=policy.uses_client_scores)``:
      ``(params, data, rng, mask) -> ClientOutput``.
    server_optimizer: the inner server optimizer (FedAvg/FedAdam/FedYogi); wrapped mask-aware.
    policy: the mask policy (step = round).
    cohort_size: clients per round (sets the trimmed mean's trim count).
    round_costs: per-client cost accounting of a state's next round (``costs.py``), or None.
    initial_mask: start from this mask (``policy.init_mask``'s structure) instead of the dense
      one; with ``policy.frozen`` it is the reduced model trained in every round.
  """
  tx = pruning.masked_optimizer(server_optimizer, pruned="freeze")
  reducers = {}
  if policy.uses_client_scores and policy.client_aggregation == "trimmed_mean":
    reducers["scores"] = agg_lib.TrimmedMean(int(policy.trim_fraction * cohort_size))

  # A mask for round 0 (one-shot pruning) can only come from server scores. (A Python bool, so
  # that ``init`` traces under jit.)
  round0_from_clients = bool(policy.scores_from_clients(0))

  def init(params: PyTree, seed: int = 0) -> ServerState:
    mask = policy.init_mask(params) if initial_mask is None else initial_mask
    kept, total = mask_stats(mask)
    opt_state = tx.init(params)
    state = ServerState(
      params=params,
      opt_state=opt_state if initial_mask is None else pruning.update_mask(opt_state, mask),
      round=jnp.zeros((), jnp.int32),
      seed=jnp.asarray(seed, jnp.int32),
      mask=mask,
      sparsity=1.0 - kept / jnp.maximum(total, 1.0),
      phase=policy.phase(0),
    )
    if not round0_from_clients:
      state = _update_mask(state, None, 0)
    return state

  def _update_mask(state: ServerState, client_scores: PyTree | None, step) -> ServerState:
    """The state with the mask for ``step`` (if the policy updates it then)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(state.seed), step), 1)
    do = policy.should_update(step)

    def compute(_):
      scores = policy.scores(step, state.params, client_scores, key)
      return policy.next_mask(state.mask, scores, step, state.params)

    mask = jax.lax.cond(do, compute, lambda _: state.mask, None)
    return state.replace(
      mask=mask,
      opt_state=pruning.update_mask(state.opt_state, mask),
      sparsity=jnp.where(do, policy.target(step), state.sparsity),
      phase=policy.phase(step),
    )

  def broadcast(state: ServerState) -> dict:
    nxt = state.round + 1
    return {
      "params": pruning.apply_mask(state.params, state.mask),
      "mask": state.mask,
      # the scores of this round's clients feed the mask update after it
      "want_scores": policy.should_update(nxt) & policy.scores_from_clients(nxt),
      "sparsity": policy.target(nxt),
    }

  def client_update(msg: dict, data: dict, rng: jax.Array) -> ClientOutput:
    out = local_update(msg["params"], data, rng, msg["mask"])
    update = {"delta": out.update["delta"]}
    if policy.uses_client_scores:
      if policy.client_score == "saliency":
        scores = out.update["grad_abs"]
      else:
        scores = jax.tree.map(jnp.abs, out.update["delta"])
      if policy.client_aggregation == "vote":
        local = scores
        if policy.client_score == "saliency":
          local = jax.tree.map(lambda w, g: jnp.abs(w) * g, msg["params"], scores)
        scores = policy.local_vote(local, msg["mask"], msg["sparsity"])
      update["scores"] = jax.tree.map(lambda s: jnp.where(msg["want_scores"], s, 0.0), scores)
    return out._replace(update=update)

  def server_update(state: ServerState, aggregate: Aggregate) -> tuple[ServerState, dict]:
    updates, opt_state = tx.update(aggregate.update["delta"], state.opt_state, state.params)
    new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    new = server_lib.keep_if_no_clients(aggregate.weight_sum, new, state)
    nxt = state.round + 1
    has_scores = aggregate.weight_sum > 0
    stepped = _update_mask(new, aggregate.update.get("scores"), nxt)
    # without surviving clients there are no client scores: keep the mask then
    skip = policy.scores_from_clients(nxt) & ~has_scores
    stepped = server_lib.tree_select(skip, new.replace(phase=policy.phase(nxt)), stepped)
    kept, total = mask_stats(state.mask)
    revived = sum(
      jnp.sum(n & ~o, dtype=jnp.float32)
      for n, o in zip(jax.tree.leaves(stepped.mask), jax.tree.leaves(state.mask))
    )
    metrics = {  # of the mask this round trained, and what changed for the next round
      "sparsity": 1.0 - kept / jnp.maximum(total, 1.0),
      "target_sparsity": state.sparsity,
      "phase": state.phase,
      "mask_updated": jnp.any(
        jnp.asarray(
          [jnp.any(n != o) for n, o in zip(*map(jax.tree.leaves, (stepped.mask, state.mask)))]
        )
      ).astype(jnp.float32),
      "revived_next": revived,
    }
    return stepped.replace(round=nxt), metrics

  return FederatedAlgorithm(
    name="fedprune",
    init=init,
    broadcast=broadcast,
    client_update=client_update,
    server_update=server_update,
    reducers=reducers,
    model_params=lambda state: pruning.apply_mask(state.params, state.mask),
    round_costs=round_costs,
    # what client_update and the reducers read of the policy and the cohort
    client_key=(
      "fedprune",
      policy.uses_client_scores,
      policy.client_score,
      policy.client_aggregation,
      tuple(sorted((k, type(r).__name__, r) for k, r in reducers.items())),
    ),
  )
