"""Centralized training on the server's data: the one training step of the project, and centralized
(pruning) training as a ``FederatedAlgorithm`` (the baseline of federated pruning and the warm
start).

One step, one mask rule (``train_step``): the model is ``apply_mask(params, mask)``, the gradient is
taken there, and the optimizer decides what happens at pruned coordinates. With a mask the
optimizer is federated pruning's server rule, ``pruning.masked_optimizer(..., pruned="freeze")``:
pruned values are kept and frozen (not zeroed), and moments reset where the mask regrows. Why
freeze: the baseline must prune exactly as federated pruning does, so that the two differ only in
whose data trains the model; under ``refinement`` a revived entry comes back with the value it had,
which a zeroing rule would lose. Without a mask (``mask=None``) the step is the plain optax step,
which is how ``fedprune train`` (``train.centralized``) trains: there the two rules coincide, so
the former zeroing variant of the trainer (no caller trained a mask with it) is gone.

The algorithm (``centralized``): a round is ``steps_per_round`` steps on the server's batches
(``ServerBatches``: the endless stream of length-bucketed epochs, epoch ``e`` shuffled with rng
``[seed, e]``; round ``r`` is steps ``[r*S, (r+1)*S)``), run as ``parts`` driver rounds ("calls")
of ``P = S / parts <= MAX_CALL_STEPS`` steps (one call when ``S`` is small). The host step
(``plan_round``) hands the call's batches, stacked ``[P, B, T, F]`` and padded to the call's
longest bucket, with the state to a program of one client (the server); the round driver runs it
like any client program on a one-client store (``SERVER_STORE``). At the start of round ``r`` (its
first call) the mask follows the *same*
``MaskPolicy`` as federated pruning, keyed by round: if ``policy.should_update(r)`` it is rescored
from the server's params or, for client-data scores (``saliency``, ``taylor``, ...), from what one
client would upload (``pruning.scores.Score``: the mean of the score's per-step terms over the
steps since the last update, the params then and the delta since). Step ``s`` overall uses the
key ``fold_in(key(seed), s + 1_000_003)``.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterator, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedprune_jax import pruning
from fedprune_jax.algorithms.mask_policy import MaskPolicy
from fedprune_jax.data import batching
from fedprune_jax.federated import server as server_lib
from fedprune_jax.federated.aggregation import Aggregate
from fedprune_jax.federated.algorithm import ClientProgram, FederatedAlgorithm, RoundPlan
from fedprune_jax.federated.client import ClientOutput, client_finite
from fedprune_jax.federated.client_data import Bucket, ClientStore

PyTree = Any
LossFn = Callable[[PyTree, dict, jax.Array], tuple[jax.Array, Any]]
STEP_KEY_OFFSET = 1_000_003  # step s trains with fold_in(key(seed), s + STEP_KEY_OFFSET)
MAX_CALL_STEPS = 64  # steps of one program call (a round's batches are its input: memory)


def train_step(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  params: PyTree,
  opt_state: PyTree,
  batch: dict,
  rng: jax.Array,
  mask: PyTree | None = None,
) -> tuple[PyTree, PyTree, jax.Array, Any, PyTree]:
  """One optimizer step at the model ``apply_mask(params, mask)`` (the module's one rule).

  Args:
    loss_fn: ``(params, batch, rng) -> (loss, aux)``; batch: ``[B, ...]`` arrays.
    optimizer: plain (``mask=None``) or ``pruning.masked_optimizer(..., pruned="freeze")``.
  Returns:
    (params, opt_state, loss float32[], aux, grads): grads at the masked model, before the
    optimizer's masking.
  """
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    pruning.apply_mask(params, mask), batch, rng
  )
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, aux, grads


def scoring_step(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  per_step: Callable[[PyTree, PyTree], PyTree] | None = None,
) -> Callable:
  """``step(params, opt_state, mask, batch, rng, acc) -> (params, opt_state, loss, acc)``:
  ``train_step``, and with ``per_step`` (a client-data score's ``Score.per_step``) ``acc`` adds
  ``per_step(model, g)`` at the model the gradient was taken at, as a client's would."""

  def step(params, opt_state, mask, batch, rng, acc):
    model = pruning.apply_mask(params, mask)
    params, opt_state, loss, _, grads = train_step(
      loss_fn, optimizer, params, opt_state, batch, rng, mask
    )
    if per_step is not None:
      acc = jax.tree.map(jnp.add, acc, per_step(model, grads))
    return params, opt_state, loss, acc

  return step


# --- the server's batches -------------------------------------------------------------------------


def batch_stream(
  examples: Sequence[batching.Example],
  batch_size: int,
  boundaries: Sequence[int],
  seed: int,
  max_labels: int,
  ids: Sequence[str] | None = None,
) -> Iterator[tuple[int, dict]]:
  """Endless ``(epoch, batch)``: epoch ``e`` is ``bucketed_batches`` shuffled with rng
  ``[seed, e]`` (batches ``[B, T_k, ...]``, ``T_k`` a bucket boundary)."""
  epoch = 0
  while True:
    rng = np.random.default_rng([seed, epoch])
    yield from (
      (epoch, b)
      for b in batching.bucketed_batches(
        examples, ids, batch_size, boundaries, rng=rng, max_labels=max_labels
      )
    )
    epoch += 1


def _pad_frames(batch: dict, frames: int) -> dict:
  """``batch`` padded to ``frames`` frames (padded frames: features 0, paddings 1)."""
  extra = frames - batch["features"].shape[1]
  if not extra:
    return batch
  out = dict(batch)
  out["features"] = np.pad(batch["features"], ((0, 0), (0, extra), (0, 0)))
  out["feature_paddings"] = np.pad(
    batch["feature_paddings"], ((0, 0), (0, extra)), constant_values=1.0
  )
  return out


class ServerBatches:
  """The server's training batches a call at a time (host side).

  A round of ``S = steps_per_round`` steps is run as ``parts`` calls of ``P = S / parts`` steps
  (the fewest parts with ``P <= max_steps_per_call``: a call's batches are one program input, so
  this bounds their memory). Call ``d`` is steps ``[d*P, min((d+1)*P, total_steps))`` of
  ``batch_stream``, padded to the call's longest bucket and stacked ``[P_d, B, T_d, ...]`` (at
  most ``num_buckets`` shapes, so at most that many compilations of the program).
  """

  def __init__(
    self,
    examples: Sequence[batching.Example],
    batch_size: int,
    num_buckets: int,
    seed: int,
    steps_per_round: int,
    total_steps: int | None = None,
    label: str = "server",
    max_steps_per_call: int = MAX_CALL_STEPS,
  ):
    if steps_per_round < 1:
      raise ValueError(f"steps_per_round must be >= 1, got {steps_per_round}")
    if not examples:
      raise ValueError("the server holds no training examples")
    self.examples = list(examples)
    self.batch_size, self.seed, self.steps_per_round = batch_size, seed, steps_per_round
    self.total_steps, self.label = total_steps, label
    self.parts = next(
      d
      for d in range(1, steps_per_round + 1)
      if steps_per_round % d == 0 and steps_per_round // d <= max(max_steps_per_call, 1)
    )
    self.steps_per_call = steps_per_round // self.parts
    frames = np.array([e.features.shape[0] for e in self.examples])
    self.boundaries = batching.bucket_boundaries(frames, num_buckets)
    self.max_labels = batching.round_up(max(len(e.tokens) for e in self.examples), 16)
    self._stream: Iterator | None = None
    self._next_step = 0

  def steps_in(self, d: int) -> int:
    """Steps of call ``d``."""
    first = d * self.steps_per_call
    last = first + self.steps_per_call
    return (last if self.total_steps is None else min(last, self.total_steps)) - first

  def call(self, d: int) -> dict[str, np.ndarray]:
    """Call ``d``'s batches ``[P_d, B, T_d, ...]`` (resumable: any ``d``, in any order)."""
    first = d * self.steps_per_call
    if self._stream is None or self._next_step != first:
      self._stream, self._next_step = self._new_stream(), 0
      for _ in range(first):
        next(self._stream)
    batches = [next(self._stream)[1] for _ in range(self.steps_in(d))]
    self._next_step = first + len(batches)
    frames = max(b["features"].shape[1] for b in batches)
    batches = [_pad_frames(b, frames) for b in batches]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

  def _new_stream(self):
    ids = [str(i) for i in range(len(self.examples))]
    return batch_stream(
      self.examples, self.batch_size, self.boundaries, self.seed, self.max_labels, ids
    )


class _ServerStore(ClientStore):
  """One client, the server, whose data travel in the round plan: what the round driver samples
  when the algorithm trains on the server's batches."""

  buckets = [Bucket(1, 1, {})]

  @property
  def num_clients(self) -> int:
    return 1

  def bucket_of(self, client_ids: np.ndarray) -> np.ndarray:
    return np.zeros(len(client_ids), np.int64)

  def num_examples(self) -> np.ndarray:
    return np.ones(1)

  def get(self, client_ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"weights": (np.asarray(client_ids) >= 0).astype(np.float32).reshape(-1, 1, 1)}


SERVER_STORE = _ServerStore()


def server_config(cfg: dict) -> dict:
  """A resolved engine config (``rounds.resolve_config``) made to run on ``SERVER_STORE``: a
  cohort of one, chunks of one client on one device (no padding clients beside the server)."""
  engine = {**cfg["engine"], "chunk_size": 1, "num_devices": 1, "vmap_size": None}
  return {
    **cfg,
    "cohort_size": 1,
    "sampling": "uniform",
    "engine": {**engine, "device_loop": False},
  }


class Sole(NamedTuple):
  """Reducer of a one-client cohort: that client's value, exactly (any dtype)."""

  def init(self, like: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), like)

  def add(self, state: PyTree, values: PyTree, weights: jax.Array) -> PyTree:
    def one(s, v):
      live = (weights > 0).reshape((-1,) + (1,) * (v.ndim - 1))
      picked = jnp.where(live, v, jnp.zeros_like(v))
      return s | jnp.any(picked, axis=0) if v.dtype == bool else s + jnp.sum(picked, axis=0)

    return jax.tree.map(one, state, values)

  def merge(self, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x | y if x.dtype == bool else x + y, a, b)

  def result(self, state: PyTree, weight_sum: jax.Array) -> PyTree:
    del weight_sum
    return state


class ServerInputs(NamedTuple):
  """What the ``centralized`` builder reads besides the config (``registry.BuildInputs.server``).

  Attributes:
    data: the server's batches.
    optimizer: the step's optimizer; None: the config's client optimizer (the baseline trains
      with the optimizer federated clients use).
    key: names ``optimizer`` for program sharing (with the loss and the policy); None: never
      shared.
  """

  data: ServerBatches
  optimizer: optax.GradientTransformation | None = None
  key: Hashable | None = None


# --- the algorithm --------------------------------------------------------------------------------


@flax.struct.dataclass
class CentralizedState:
  """Centralized training's state (one orbax-saveable pytree).

  Attributes:
    params: dense params (the model is ``apply_mask(params, mask)``).
    opt_state: the optimizer's state (mask-aware with a policy).
    round: int32 scalar, completed rounds.
    seed: int32 scalar (step keys and random scores derive from it).
    mask: the mask of the last round (bool leaves, None for unprunable params), None: dense.
    score_acc: sum of the client score's per-step terms (``policy.per_step(model, g)``) over the
      steps since the last mask update (client-data scores), or ``()``.
    score_steps: float32 scalar, the steps since the last mask update.
    score_start: the params at the last mask update (a client score's ``delta``), or ``()``.
  """

  params: PyTree
  opt_state: PyTree
  round: jax.Array
  seed: jax.Array
  mask: PyTree = None
  score_acc: PyTree = ()
  score_steps: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.float32))
  score_start: PyTree = ()


class _RoundInput(NamedTuple):
  """What the server's program receives: the state and the call's batches ``[P, B, ...]``."""

  state: CentralizedState
  batches: dict


def _next_mask(
  policy: MaskPolicy, state: CentralizedState, tracks: bool, parts: int
) -> CentralizedState:
  """The state at the start of call ``state.round`` (of ``parts`` a round): at a round's first
  call, the mask rescored if the policy says so."""
  r = state.round // parts
  key = jax.random.fold_in(jax.random.key(state.seed), r)
  scores = policy.scores(r, state.params, None, key)
  if tracks:  # a client's upload from the steps since the last update, once there was one
    mean = None
    if policy.per_step is not None:
      mean = jax.tree.map(lambda a: a / jnp.maximum(state.score_steps, 1.0), state.score_acc)
    delta = jax.tree.map(jnp.subtract, state.score_start, state.params)
    upload = policy.client_score.upload(mean, state.score_start, delta)
    data = policy.scores(r, state.params, upload, key)
    scores = server_lib.tree_select(state.score_steps > 0, data, scores)
  mask = policy.next_mask(state.mask, scores, r, state.params)
  updated = state.replace(
    mask=mask,
    opt_state=pruning.update_mask(state.opt_state, mask),
    score_acc=jax.tree.map(jnp.zeros_like, state.score_acc),
    score_steps=jnp.zeros_like(state.score_steps),
    score_start=state.params if tracks else (),
  )
  first_call = state.round % parts == 0
  return server_lib.tree_select(policy.should_update(r) & first_call, updated, state)


def centralized(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  data: ServerBatches,
  policy: MaskPolicy | None = None,
  key: Hashable | None = None,
) -> FederatedAlgorithm:
  """Centralized (pruning) training on ``data`` as a ``FederatedAlgorithm`` named
  ``centralized_{data.label}``; run it on ``SERVER_STORE`` with a cohort of one. A driver round
  is one call of ``data`` (``data.parts`` calls make a policy round: ``state.round`` counts
  calls).

  Args:
    loss_fn: ``(params, batch, rng) -> (loss, aux)``.
    optimizer: the step's optimizer (wrapped by ``masked_optimizer(pruned="freeze")`` with a
      policy).
    data: the server's batches, ``data.steps_per_round`` steps a round.
    policy: the federated mask policy, keyed by round; None: dense training.
    key: names (loss_fn, optimizer, policy) for program sharing (None: never shared).
  """
  tx = optimizer if policy is None else pruning.masked_optimizer(optimizer, pruned="freeze")
  tracks = policy is not None and policy.uses_client_scores
  per_step = policy.per_step if tracks else None  # what a step adds to score_acc
  one_step = scoring_step(loss_fn, tx, per_step)
  per_call, parts = data.steps_per_call, data.parts

  def init(params: PyTree, seed: int = 0) -> CentralizedState:
    return CentralizedState(
      params=params,
      opt_state=tx.init(params),
      round=jnp.zeros((), jnp.int32),
      seed=jnp.asarray(seed, jnp.int32),
      mask=None if policy is None else policy.init_mask(params),
      score_acc=jax.tree.map(jnp.zeros_like, params) if per_step is not None else (),
      score_start=params if tracks else (),
    )

  def client_update(round_input: _RoundInput, data: dict, rng: jax.Array) -> ClientOutput:
    del data, rng  # the server's data travel in round_input; step keys derive from the seed
    state, batches = round_input
    if policy is not None:
      state = _next_mask(policy, state, tracks, parts)
    base = jax.random.key(state.seed)
    first = state.round * per_call

    def step(carry, xs):
      params, opt_state, acc, loss_sum = carry
      batch, s = xs
      rng = jax.random.fold_in(base, first + s + STEP_KEY_OFFSET)
      params, opt_state, loss, acc = one_step(params, opt_state, state.mask, batch, rng, acc)
      return (params, opt_state, acc, loss_sum + loss * jnp.sum(batch["weights"])), None

    steps = batches["weights"].shape[0]
    zero = jnp.zeros((), jnp.float32)
    (params, opt_state, acc, loss_sum), _ = jax.lax.scan(
      step, (state.params, state.opt_state, state.score_acc, zero), (batches, jnp.arange(steps))
    )
    num_examples = jnp.sum(batches["weights"])
    loss = loss_sum / jnp.maximum(num_examples, 1e-12)
    ok = client_finite(loss, params)
    new = state.replace(
      params=params,
      opt_state=opt_state,
      score_acc=acc,
      score_steps=state.score_steps + steps,
    )
    return ClientOutput(
      update={"state": new},
      num_examples=num_examples,
      metrics={
        "loss": jnp.where(ok, loss, 0.0),
        "num_steps": jnp.asarray(steps, jnp.float32),
        "failed": 1.0 - ok.astype(jnp.float32),
      },
    )

  program = ClientProgram(
    key=None if key is None else ("centralized", key, per_call, parts),
    client_update=client_update,
    reducers={"state": Sole()},
  )

  def plan_round(state: CentralizedState) -> RoundPlan:
    batches = data.call(int(state.round))
    return RoundPlan(program, _RoundInput(state, batches), metrics={"client_path": "server"})

  def server_update(state: CentralizedState, aggregate: Aggregate):
    new = server_lib.keep_if_no_clients(aggregate.weight_sum, aggregate.update["state"], state)
    new = new.replace(round=state.round + 1, seed=state.seed)
    if policy is None:
      return new, {}
    phase = policy.phase(state.round // parts)
    return new, {"sparsity": pruning.sparsity(new.mask), "phase": phase}

  return FederatedAlgorithm(
    name=f"centralized_{data.label}",
    init=init,
    plan_round=plan_round,
    server_update=server_update,
    model_params=lambda state: pruning.apply_mask(state.params, state.mask),
  )
