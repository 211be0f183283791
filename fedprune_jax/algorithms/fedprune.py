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

What clients train (``plan_round``, host side, before every round): when the mask is
unit-structured (``pruning.compaction.unit_mask_of``: whole heads / FFN hidden units / conv groups
pruned) and ``CompactClients`` allows it, the clients train the *compacted* model (the pruned
units sliced away; kept unit counts rounded up to a multiple of ``quantum`` with extra pruned
units whose params are exact zeros held at zero by the client mask), and the aggregate is
scattered back to dense coordinates before the server step, so the server optimizer, the mask
policy, refinement and checkpoints see exactly what masked-dense clients would have sent (their
deltas and gradients at pruned units are exactly zero; a client's vote ranks its scores with the
pruned entries it lacks counted as zeros, ``mask_policy.local_vote``, so it is the dense client's
vote). Otherwise (or for a vote on ``movement``, whose scores are shifted by the whole tree's
minimum) clients train masked-dense. Each round's metrics say which (``client_path``). Dropout
draws masks of the trained shapes, so with dropout on the two paths are equal in distribution,
not sample by sample.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Hashable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedprune_jax import fields, pruning
from fedprune_jax.algorithms.mask_policy import ClientScoring, MaskPolicy
from fedprune_jax.federated import aggregation as agg_lib
from fedprune_jax.federated import server as server_lib
from fedprune_jax.federated.aggregation import Aggregate
from fedprune_jax.federated.algorithm import ClientProgram, FederatedAlgorithm, RoundPlan
from fedprune_jax.federated.client import ClientOutput
from fedprune_jax.pruning import compaction

PyTree = Any
COMPACT_MODES = fields.CLIENT_COMPACT


@flax.struct.dataclass
class PruningState:
  """Federated pruning's state (one orbax-saveable pytree).

  Attributes:
    params: dense params; values at pruned coordinates are kept so server re-scoring can revive
      them: the model is ``apply_mask(params, mask)``.
    opt_state: mask-aware server optimizer state.
    round: int32 scalar, completed rounds.
    seed: int32 scalar (round keys and cohorts derive from (seed, round)).
    mask: pruning mask (bool leaves for prunable params, None elsewhere).
    sparsity: float32 scalar, target sparsity of ``mask``.
    phase: int32 scalar, pruning phase of the next round (0 pruning, 1 refining, 2 fine-tuning).
  """

  params: PyTree
  opt_state: PyTree
  round: jax.Array
  seed: jax.Array
  mask: PyTree
  sparsity: jax.Array
  phase: jax.Array


class CompactClients(NamedTuple):
  """When and how clients train the compacted model.

  Attributes:
    channels_per_group: the Conformer's conv channels per group (unit structure).
    local_for: ``BlockSizes -> (key, local_update)``: the client update (``make_client_update``
      form, with a mask argument) of the model of those unit counts, and a hashable key naming it
      (equal keys: interchangeable programs; the dense sizes should give the dense update's key).
    mode: ``auto`` (compact whenever the mask is unit-structured), ``on`` (required: a mask that
      is not is an error) or ``off``.
    quantum: each block's kept fraction is rounded up to a multiple of this
      (``compaction.select_units``; bounds the compiled shapes).
    step_flops: ``BlockSizes | None -> float``, FLOPs of one local step of the model of those
      unit counts (None: the dense model), or None (not recorded).
  """

  channels_per_group: int
  local_for: Callable[[compaction.BlockSizes], tuple[Hashable, Callable[..., ClientOutput]]]
  mode: str = "auto"
  quantum: float = 1.0
  step_flops: Callable[[compaction.BlockSizes | None], float] | None = None


@functools.partial(jax.jit, static_argnames="with_mask")
def _compact_input(params: PyTree, mask: PyTree, idx: PyTree, with_mask: bool) -> tuple:
  """(compacted masked params, compacted mask or None) for clients."""
  small = compaction.gather(pruning.apply_mask(params, mask), idx)
  return small, compaction.gather(mask, idx) if with_mask else None


@jax.jit
def _scatter_aggregate(aggregate: Aggregate, idx: PyTree, like: PyTree) -> Aggregate:
  """The aggregate with every params-shaped update in dense coordinates (zeros elsewhere)."""
  update = {k: compaction.scatter(v, idx, like) for k, v in aggregate.update.items()}
  return aggregate._replace(update=update)


def _size(tree: PyTree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


@jax.jit
def mask_stats(mask: PyTree) -> tuple[jax.Array, jax.Array]:
  """(kept, total) prunable entries of ``mask`` as float32 scalars (counted exactly by
  ``pruning.count_kept``, so a dense mask has kept == total). Jitted: a masked-dense round
  counts them on the host's critical path, and op-by-op that was a dispatch per leaf."""
  return pruning.count_kept(mask).astype(jnp.float32), jnp.float32(pruning.count_total(mask))


def _client_update(
  local: Callable[..., ClientOutput],
  scoring: ClientScoring | None,
  msg: dict,
  data: dict,
  rng: jax.Array,
) -> ClientOutput:
  """One federated-pruning client: local training of ``msg['params']`` under ``msg['mask']``,
  and with ``scoring`` its scores (zeros unless ``msg['want_scores']``).

  It reads nothing but its arguments, so ``(local's key, scoring)`` names it (``_program``).
  """
  out = local(msg["params"], data, rng, msg["mask"])
  update = {"delta": out.update["delta"]}
  if scoring is not None:
    scores = scoring.client_scores(
      out.update.get("step_mean"), msg["params"], out.update["delta"], msg["mask"], msg["sparsity"]
    )
    update["scores"] = jax.tree.map(lambda s: jnp.where(msg["want_scores"], s, 0.0), scores)
  return out._replace(update=update)


def _program(
  local_key: Hashable | None,
  local: Callable[..., ClientOutput],
  scoring: ClientScoring | None,
  reducers: dict,
  *tags: Hashable,
) -> ClientProgram:
  """The client program ``_client_update(local, scoring, ...)`` with ``reducers``, keyed by
  exactly what it closes over: ``local`` by its key, ``scoring`` and the reducers by value (None:
  ``local`` is unnamed, never shared)."""
  update = functools.partial(_client_update, local, scoring)
  if local_key is None:
    return ClientProgram(None, update, reducers)
  reducers_key = tuple(sorted((k, type(r).__name__, r) for k, r in reducers.items()))
  return ClientProgram(("fedprune", local_key, scoring, reducers_key, *tags), update, reducers)


def federated_pruning(
  local_update: Callable[..., ClientOutput],
  server_optimizer: optax.GradientTransformation,
  policy: MaskPolicy,
  cohort_size: int,
  initial_mask: PyTree | None = None,
  client_key: Hashable | None = None,
  compact: CompactClients | None = None,
) -> FederatedAlgorithm:
  """Federated pruning.

  Args:
    local_update: ``client.make_client_update(..., per_step=policy.per_step)``:
      ``(params, data, rng, mask) -> ClientOutput``.
    server_optimizer: the inner server optimizer (FedAvg/FedAdam/FedYogi); wrapped mask-aware.
    policy: the mask policy (step = round).
    cohort_size: clients per round (sets the trimmed mean's trim count).
    initial_mask: start from this mask (``policy.init_mask``'s structure) instead of the dense
      one; with ``policy.frozen`` it is the reduced model trained in every round.
    client_key: names ``local_update`` (``ClientProgram.key``); None: programs never shared.
    compact: compacted client training (None: clients always train masked-dense).
  """
  scoring = policy.client_scoring  # all the client update reads of the policy
  if compact is not None:
    if compact.mode not in COMPACT_MODES:
      raise ValueError(f"config field client.compact={compact.mode!r}; expected {COMPACT_MODES}")
    if compact.mode == "on" and scoring is not None and not scoring.compactable:
      raise ValueError(
        "config field client.compact='on' cannot be used with pruning.client_aggregation='vote'"
        f" and client score {scoring.score.name!r} (its scores are shifted by the whole tree's"
        " minimum, so a pruned entry's vote depends on every other entry's score)"
      )
  tx = pruning.masked_optimizer(server_optimizer, pruned="freeze")
  reducers = {}
  if policy.uses_client_scores and policy.client_aggregation == "trimmed_mean":
    reducers["scores"] = agg_lib.TrimmedMean(int(policy.trim_fraction * cohort_size))

  # A mask for round 0 (one-shot pruning) can only come from server scores. (A Python bool, so
  # that ``init`` traces under jit.)
  round0_from_clients = bool(policy.scores_from_clients(0))

  def init(params: PyTree, seed: int = 0) -> PruningState:
    mask = policy.init_mask(params) if initial_mask is None else initial_mask
    opt_state = tx.init(params)
    state = PruningState(
      params=params,
      opt_state=opt_state if initial_mask is None else pruning.update_mask(opt_state, mask),
      round=jnp.zeros((), jnp.int32),
      seed=jnp.asarray(seed, jnp.int32),
      mask=mask,
      sparsity=pruning.sparsity(mask),
      phase=policy.phase(0),
    )
    if not round0_from_clients:
      state = _update_mask(state, None, 0)
    return state

  def _update_mask(state: PruningState, client_scores: PyTree | None, step) -> PruningState:
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

  def schedule(round_: jax.Array) -> dict:
    nxt = round_ + 1
    return {
      # the scores of this round's clients feed the mask update after it
      "want_scores": policy.should_update(nxt) & policy.scores_from_clients(nxt),
      "sparsity": policy.target(nxt),
    }

  def broadcast(state: PruningState) -> dict:
    """What masked-dense clients receive."""
    return {
      "params": pruning.apply_mask(state.params, state.mask),
      "mask": state.mask,
      **schedule(state.round),
    }

  def server_update(state: PruningState, aggregate: Aggregate) -> tuple[PruningState, dict]:
    updates, opt_state = tx.update(aggregate.update["delta"], state.opt_state, state.params)
    new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    new = server_lib.keep_if_no_clients(aggregate.weight_sum, new, state)
    nxt = state.round + 1
    has_scores = aggregate.weight_sum > 0
    stepped = _update_mask(new, aggregate.update.get("scores"), nxt)
    # without surviving clients there are no client scores: keep the mask then
    skip = policy.scores_from_clients(nxt) & ~has_scores
    stepped = server_lib.tree_select(skip, new.replace(phase=policy.phase(nxt)), stepped)
    revived = sum(
      jnp.sum(n & ~o, dtype=jnp.float32)
      for n, o in zip(jax.tree.leaves(stepped.mask), jax.tree.leaves(state.mask))
    )
    metrics = {  # of the mask this round trained, and what changed for the next round
      "sparsity": pruning.sparsity(state.mask),
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

  dense_program = _program(client_key, local_update, scoring, reducers)
  broadcast_jit, schedule_jit = jax.jit(broadcast), jax.jit(schedule)
  plans: dict = {}  # compaction index plans by unit selection (host)

  def compaction_of(state: PruningState):
    """(sizes, idx, padded) of this round's compacted model, or None (masked-dense): when the
    mask is not unit-structured, or the clients' scores cannot be computed on the compacted model
    (``ClientScoring.compactable``: a vote on a score shifted by the tree's minimum)."""
    if compact is None or compact.mode == "off":
      return None
    if scoring is not None and not scoring.compactable:
      return None
    umask = compaction.unit_mask_of(state.params, state.mask, compact.channels_per_group)
    if umask is None:
      if compact.mode == "on":
        raise ValueError(
          "config field client.compact='on' but the mask of round "
          f"{int(state.round)} is not unit-structured; use pruning.pattern='units' or 'auto'"
        )
      return None
    selection = compaction.select_units(umask, compact.quantum)
    key = tuple(np.packbits(v).tobytes() for b in selection.values() for v in b.values())
    if key not in plans:
      sizes, idx = compaction.index_plan(state.params, compact.channels_per_group, selection)
      plans.clear()  # one plan is reused while the mask does not change
      plans[key] = sizes, jax.device_put(idx)
    sizes, idx = plans[key]
    padded = any(np.any(selection[b][k] != umask[b][k]) for b in umask for k in umask[b])
    return sizes, idx, padded

  def plan_round(state: PruningState) -> RoundPlan:
    found = compaction_of(state)
    sched = schedule_jit(state.round)
    scores_up = bool(sched["want_scores"])
    if found is None:
      kept, prunable = map(float, mask_stats(state.mask))
      live = _size(state.params) - prunable + kept
      bitmap = np.ceil(prunable / 8) if kept < prunable else 0.0  # none when nothing is pruned
      metrics = {  # masked values + a bitmap down; the delta at kept coordinates (+ scores) up
        "client_path": "masked_dense",
        "client_params": float(_size(state.params)),
        "bytes_down_sent": 4.0 * live + bitmap,
        "bytes_up_sent": 4.0 * live + (4.0 * _size(state.params) if scores_up else 0.0),
      }
      if compact is not None and compact.step_flops is not None:
        metrics["client_flops_per_step"] = float(compact.step_flops(None))
      return RoundPlan(dense_program, broadcast_jit(state), metrics=metrics)
    sizes, idx, padded = found
    key, local = compact.local_for(sizes)
    # the mask goes along unless nothing is pruned at all: then the program is plain local
    # training (FedAvg's on the dense model), else one program per shape, padded or not
    plain = not padded and not policy.uses_client_scores and key == client_key
    small, small_mask = _compact_input(state.params, state.mask, idx, with_mask=not plain)
    sent = _size(small)
    metrics = {  # the compacted params (+ a bitmap of padding units) down; delta (+ scores) up
      "client_path": "compact",
      "client_params": float(sent),
      "bytes_down_sent": 4.0 * sent + (np.ceil(_size(small_mask) / 8) if padded else 0.0),
      "bytes_up_sent": 4.0 * sent * (2 if scores_up else 1),
    }
    if compact.step_flops is not None:
      metrics["client_flops_per_step"] = float(compact.step_flops(sizes))
    finish = functools.partial(_scatter_aggregate, idx=idx, like=state.params)
    if plain:
      program = ClientProgram(
        None if key is None else ("train", key),
        lambda params, data, rng: local(params, data, rng),
      )
      return RoundPlan(program, small, finish, metrics)
    # a vote ranks the dense leaves: the compacted program's scoring carries their sizes
    small_scoring = None if scoring is None else scoring.compacted(state.params)
    program = _program(key, local, small_scoring, reducers, "compact")
    return RoundPlan(program, {"params": small, "mask": small_mask, **sched}, finish, metrics)

  return FederatedAlgorithm(
    name="fedprune",
    init=init,
    plan_round=plan_round,
    server_update=server_update,
    model_params=lambda state: pruning.apply_mask(state.params, state.mask),
  )
