"""The mask policy: schedule + phases + score + pattern + allocation, keyed by an abstract step.

One object serves federated pruning (step = round) and the centralized pruning baseline (step =
round-equivalent of a training step), so both prune by the same rule.

Phases (step ``t``; ``P = pruning_steps``, ``R = refining_steps``):

* **pruning** ``t < P``: at the schedule's update steps the sparsity follows the schedule; masks
  only shrink (a pruned weight stays pruned: its score is zeroed and the new mask is intersected
  with the old one);
* **refining** ``P <= t < P + R``: every ``refine_every`` steps the mask is recomputed at the
  final sparsity from the refinement scores, without the monotone rule, so pruned weights can come
  back (``refinement``: ``server`` = magnitude of the server's dense params, whose values at pruned
  coordinates are kept; ``client`` = client-data scores; ``none`` = no change);
* **fine-tuning** ``t >= P + R``: the mask is frozen.

Scores (higher = keep) are ``pruning.scores.Score`` units selected by name (``pruning.score``):
``magnitude`` |w| and ``random`` are computed by the server; ``saliency``, ``update``, ``taylor``
and ``movement`` come from the clients' data (``CLIENT_SCORES``; what a client accumulates,
uploads and how the server scores the aggregate: ``pruning/scores.py``). E.g. ``saliency`` =
``|w| * agg_c(mean_steps |g_c|)``, where the clients upload their mean absolute gradient at their
reduced model and the server multiplies by its dense weights (so a pruned weight with a large
gradient can be revived); ``update`` = ``agg_c |delta_c|`` (zero at pruned coordinates: it prunes
but cannot revive). Client scores are aggregated by ``client_aggregation``: ``mean``
(example-weighted), ``trimmed_mean`` (coordinate-wise, ``trim_fraction`` of the cohort dropped at
each end) or ``vote`` (each client votes for the entries of its own top ``1 - sparsity`` per layer;
the score is the example-weighted fraction of votes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedprune_jax import pruning
from fedprune_jax.errors import ConfigError
from fedprune_jax.fields import AGGREGATIONS, CLIENT_SCORES, REFINEMENTS, SERVER_SCORES  # noqa: F401
from fedprune_jax.fields import check as check_field
from fedprune_jax.fields import default
from fedprune_jax.pruning import scores as scores_lib
from fedprune_jax.pruning import units as units_lib

PyTree = Any
Schedule = pruning.Constant | pruning.Step | pruning.Polynomial

PRUNING, REFINING, FINE_TUNING = 0, 1, 2
PHASE_NAMES = ("pruning", "refining", "fine-tuning")


@dataclasses.dataclass(frozen=True)
class ClientScoring:
  """What a federated client reads of the policy to compute its scores (hashable: it names the
  client program, so a client update built from it cannot be confused with another's).

  Attributes:
    score: the client-data score the clients compute (``pruning.scores.Score``).
    vote: clients upload votes (``client_aggregation='vote'``) instead of their scores.
    dense_sizes: with ``vote``, for a client that trains a compacted model: the dense model's
      entry count of every leaf (flatten order), which its votes rank (``local_vote``); None:
      the client trains the dense model.
  """

  score: scores_lib.Score
  vote: bool = False
  dense_sizes: tuple[int, ...] | None = None

  def client_scores(self, step_mean: PyTree, params: PyTree, delta: PyTree, mask, sparsity):
    """A client's upload: ``score.upload``, or with ``vote`` its vote on its own scores
    (``score.finish`` at its own ``params``), ``mask``'s structure and ``sparsity`` the target."""
    upload = self.score.upload(step_mean, params, delta)
    if not self.vote:
      return upload
    return local_vote(self.score.finish(params, upload), mask, sparsity, self.dense_sizes)

  def compacted(self, dense_params: PyTree) -> ClientScoring:
    """The scoring of a client that trains a compacted model of ``dense_params`` (read for their
    shapes): with ``vote`` it carries their leaf sizes, else it is this one.

    A vote can rank a compacted client's entries as the dense client ranks them only when a
    pruned entry scores exactly 0 and no entry scores below it (``Score.zero_at_pruned``);
    otherwise a ``ValueError``.
    """
    if not self.vote:
      return self
    if not self.score.zero_at_pruned:
      raise ValueError(
        f"a client's {self.score.name!r} vote cannot be taken on the compacted model: its scores"
        " are shifted by the whole tree's minimum, so a pruned entry's score (and vote) depends on"
        " every other entry's"
      )
    sizes = tuple(math.prod(np.shape(x)) for x in jax.tree.leaves(dense_params))
    return dataclasses.replace(self, dense_sizes=sizes)

  @property
  def compactable(self) -> bool:
    """A client can compute these scores on the compacted model (``compacted``)."""
    return not self.vote or self.score.zero_at_pruned


def _vote(s: jax.Array, m, dense_size: int | None, sparsity) -> jax.Array:
  if m is None:
    return jnp.zeros_like(s)
  flat = s.reshape(-1)
  if dense_size is not None and dense_size > flat.size:
    # the entries of the dense leaf a compacted client lacks are pruned ones: score 0
    flat = jnp.concatenate([flat, jnp.zeros((dense_size - flat.size,), flat.dtype)])
  thr = jnp.quantile(flat, sparsity)
  return (s > thr).astype(s.dtype)


def local_vote(
  local_scores: PyTree, mask: PyTree, sparsity, dense_sizes: tuple[int, ...] | None = None
) -> PyTree:
  """A client's vote: 1.0 for the entries of its top ``1 - sparsity`` per prunable leaf.

  ``dense_sizes`` (``ClientScoring.dense_sizes``): ``local_scores`` are a compacted model's, whose
  leaves lack pruned entries of the dense ones; a pruned entry scores 0 and every score is >= 0
  (``Score.zero_at_pruned``), so each leaf's threshold is the quantile of its scores with the
  missing entries as zeros: the dense leaf's threshold, and the votes the dense client casts at
  these entries (its votes at pruned entries are 0, as ``compaction.scatter`` puts them).
  """
  leaves, treedef = jax.tree.flatten(local_scores)
  masks = treedef.flatten_up_to(mask)
  sizes = (None,) * len(leaves) if dense_sizes is None else dense_sizes
  if len(sizes) != len(leaves):
    raise ValueError(f"local_vote: {len(sizes)} dense sizes for {len(leaves)} leaves")
  return treedef.unflatten(
    [_vote(s, m, n, sparsity) for s, m, n in zip(leaves, masks, sizes, strict=True)]
  )


@dataclasses.dataclass(frozen=True)
class MaskPolicy:
  """When and how the mask changes (hashable: a static argument under jit).

  Attributes:
    schedule: ``pruning.Constant | Step | Polynomial``, sparsity by step in the pruning phase.
    pruning_steps: length P of the pruning phase.
    refining_steps: length R of the refining phase.
    refine_every: steps between mask recomputations in the refining phase.
    pattern: ``unstructured | row | half_row | column | half_column | block:HxW | N:M | units``.
    allocation: ``uniform | global | adaptive | erk`` (``units``: uniform, global or adaptive).
    score: pruning-phase score, a ``pruning.scores.REGISTRY`` name (``SERVER_SCORES +
      CLIENT_SCORES``).
    refinement: refining-phase scores, ``none | server | client``.
    client_aggregation: ``mean | trimmed_mean | vote``.
    trim_fraction: for ``trimmed_mean``.
    channels_per_group: Conformer conv channels per group (``units`` pattern only).
    include, exclude: path patterns of the prunable params.
    frozen: the mask is given (e.g. chosen by centralized pruning) and never changes: every step
      is fine-tuning.
  """

  schedule: Schedule
  pruning_steps: int
  refining_steps: int = 0
  refine_every: int = 1
  pattern: str = default("pruning.pattern")
  allocation: str = default("pruning.allocation")
  score: str = default("pruning.score")
  refinement: str = default("pruning.refinement")
  client_aggregation: str = default("pruning.client_aggregation")
  trim_fraction: float = default("pruning.trim_fraction")
  channels_per_group: int | None = None
  include: tuple[str, ...] = pruning.DEFAULT_INCLUDE
  exclude: tuple[str, ...] = pruning.DEFAULT_EXCLUDE
  frozen: bool = False

  def __post_init__(self):
    for name in ("score", "refinement", "client_aggregation", "trim_fraction"):
      check_field(f"pruning.{name}", getattr(self, name))
    if self.pattern == "units":
      if self.channels_per_group is None:
        raise ConfigError("pruning.pattern='units' needs the model's conv channels per group")
    else:
      pruning.parse_pattern(self.pattern)  # raises ValueError naming the pattern
    pruning.parse_allocation(self.allocation)
    if self.pruning_steps < 1 or self.refining_steps < 0 or self.refine_every < 1:
      raise ConfigError(
        "pruning phase lengths need pruning_rounds >= 1, refining_rounds >= 0, refine_every >= 1;"
        f" got {self.pruning_steps}, {self.refining_steps}, {self.refine_every}"
      )
    if self.schedule.end_step >= self.pruning_steps:
      raise ConfigError(
        f"the sparsity schedule reaches its target at step {self.schedule.end_step}, after the "
        f"pruning phase (pruning_rounds={self.pruning_steps}): lengthen pruning_rounds or update "
        "more often"
      )

  # --- when -----------------------------------------------------------------------------------

  @property
  def final_sparsity(self) -> float:
    sch = self.schedule
    return float(sch.target if isinstance(sch, pruning.Constant) else sch.final)

  def phase(self, step) -> jax.Array:
    """int32: PRUNING, REFINING or FINE_TUNING at ``step``."""
    step = jnp.asarray(step)
    if self.frozen:
      return jnp.full(step.shape, FINE_TUNING, jnp.int32)
    p, r = self.pruning_steps, self.pruning_steps + self.refining_steps
    return jnp.where(step < p, PRUNING, jnp.where(step < r, REFINING, FINE_TUNING)).astype(
      jnp.int32
    )

  def should_update(self, step) -> jax.Array:
    """bool: the mask is recomputed for ``step``."""
    step = jnp.asarray(step)
    ph = self.phase(step)
    in_pruning = (ph == PRUNING) & self.schedule.should_update(step)
    refining = (
      (ph == REFINING)
      & (self.refinement != "none")
      & ((step - self.pruning_steps) % self.refine_every == 0)
    )
    return in_pruning | refining

  def target(self, step) -> jax.Array:
    """float32 target sparsity at ``step``."""
    ph = self.phase(step)
    return jnp.where(ph == PRUNING, self.schedule(step), self.final_sparsity).astype(jnp.float32)

  # --- what -----------------------------------------------------------------------------------

  @property
  def pruning_score(self) -> scores_lib.Score:
    """The pruning phase's score unit."""
    return scores_lib.get_score(self.score)

  @property
  def uses_client_scores(self) -> bool:
    refines_with_clients = self.refinement == "client" and self.refining_steps > 0
    return self.pruning_score.from_clients or refines_with_clients

  @property
  def client_score(self) -> scores_lib.Score:
    """What clients compute: the pruning score if it is a client score, else saliency."""
    score = self.pruning_score
    return score if score.from_clients else scores_lib.get_score("saliency")

  @property
  def per_step(self) -> Callable[[PyTree, PyTree], PyTree] | None:
    """What a client accumulates over its local steps (``make_client_update(per_step=...)``)."""
    return self.client_score.per_step if self.uses_client_scores else None

  @property
  def client_scoring(self) -> ClientScoring | None:
    """What the clients' score computation reads (None: clients compute no scores)."""
    if not self.uses_client_scores:
      return None
    return ClientScoring(self.client_score, vote=self.client_aggregation == "vote")

  def scores_from_clients(self, step) -> jax.Array:
    """bool: the mask update at ``step`` scores with client data."""
    ph = self.phase(step)
    pruning_client = (ph == PRUNING) & self.pruning_score.from_clients
    refining_client = (ph == REFINING) & (self.refinement == "client")
    return pruning_client | refining_client

  def scores(self, step, params: PyTree, client_scores: PyTree | None, key: jax.Array) -> PyTree:
    """Entry scores for the mask update at ``step`` (params' structure).

    Args:
      params: the server's dense params.
      client_scores: the aggregated client scores (``update['scores']``) or None.
      key: for ``random`` scores.
    """
    ph = self.phase(step)
    server = pruning.magnitude(params)  # also the refining phase's server re-scoring
    score = self.pruning_score
    if score.server is not None and score.name != "magnitude":
      own = score.server(params, key)
      server = jax.tree.map(lambda m, r: jnp.where(ph == PRUNING, r, m), server, own)
    if client_scores is None:
      return server
    if self.client_aggregation == "vote":  # the fraction of clients voting for an entry
      client = client_scores
    else:
      client = self.client_score.finish(params, client_scores)
    use_client = self.scores_from_clients(step)
    return jax.tree.map(lambda c, s: jnp.where(use_client, c, s), client, server)

  def init_mask(self, params: PyTree) -> PyTree:
    """All-kept mask with the structure every later mask has."""
    return jax.tree.map(
      lambda m: None if m is None else jnp.ones_like(m, bool),
      self._prune(jax.tree.map(jnp.abs, params), params, 0.0),
      is_leaf=lambda x: x is None,
    )

  def _prune(self, scores: PyTree, params: PyTree, sparsity) -> PyTree:
    if self.pattern == "units":
      umask = units_lib.unit_mask(
        params, self.channels_per_group, sparsity, scores=scores, allocation=self.allocation
      )
      return units_lib.expand_unit_mask(params, self.channels_per_group, umask)
    return pruning.prune_mask(
      scores,
      sparsity,
      pattern=self.pattern,
      allocation=self.allocation,
      include=self.include,
      exclude=self.exclude,
    )

  def next_mask(self, mask: PyTree, scores: PyTree, step, params: PyTree) -> PyTree:
    """The mask for ``step`` from the current ``mask`` and entry ``scores``.

    In the pruning phase pruned entries score 0 and the result is intersected with ``mask``
    (monotone); in the refining phase the mask is recomputed freely at the final sparsity.
    """
    pruning_phase = self.phase(step) == PRUNING
    scores = jax.tree.map(
      lambda s, m: s if m is None else jnp.where(pruning_phase & ~m, 0.0, s),
      scores,
      mask,
      is_leaf=lambda x: x is None,
    )
    new = self._prune(scores, params, self.target(step))
    return jax.tree.map(
      lambda n, m: None if m is None else jnp.where(pruning_phase, n & m, n),
      new,
      mask,
      is_leaf=lambda x: x is None,
    )


def make_schedule(
  kind: str,
  target: float,
  pruning_steps: int,
  *,
  initial: float = 0.0,
  begin: int = 0,
  every: int = 1,
  step_delta: float = 0.1,
  power: float = 3.0,
  hold_initial: bool = False,
) -> Schedule:
  """A schedule over the pruning phase ``[begin, pruning_steps)`` from config values.

  ``constant``: the target at ``begin`` (one-shot); ``step``: + ``step_delta`` every ``every``
  steps, the first raise at ``begin`` (with ``hold_initial``: ``every`` steps after it, the value
  at ``begin`` being ``initial``); ``polynomial``: TFMOT cubic from ``initial`` to ``target``, reaching it at the last
  pruning step, updating every ``every`` steps.
  """
  end = max(pruning_steps - 1, begin)
  if kind == "constant":
    return pruning.Constant(target, begin_step=begin)
  if kind == "step":
    return pruning.Step(
      initial, target, step_delta, every=every, begin_step=begin, hold_initial=hold_initial
    )
  if kind == "polynomial":
    return pruning.Polynomial(initial, target, begin, end, frequency=every, power=power)
  raise ConfigError(
    f"unknown config field pruning.schedule={kind!r}; expected 'constant', 'step' or 'polynomial'"
  )
