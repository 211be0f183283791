"""What an experiment of the paper is: arms, comparisons, seeds and replicates (``suite`` runs it).

An experiment file (``experiments/configs/t1_pattern.py`` ...) defines
``get_experiment(setting) -> Experiment``: a base config (the setting: ``paper_small`` on a CPU,
``paper_full`` on LibriSpeech and accelerators), its arms (config overrides, one table cell each),
its claims as paired comparisons, and its replicates:

* ``seeds``: every arm runs each of them (client sampling, local batch order, SpecAugment);
* ``claim_seeds``: the arms a comparison names (and the arms they start from, and the reference)
  also run these (>= 5 for a claim);
* ``splits``: each replicate of the warm start and of the server/client speaker split
  (``data.split_seed`` and ``warm_start.seed`` set to it), so a reading does not hold for one
  warm start only. A replicate is the pair (split, seed); comparisons pair arms by replicate.

These names are re-exported by ``fedprune_jax.suite`` (``suite.Arm`` ...).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Mapping, Sequence

import ml_collections

from fedprune_jax import config as config_lib
from fedprune_jax import statistics
from fedprune_jax.errors import ConfigError

FEDERATED, BASELINE = "federated", "baseline"
# the paper's tables: 5 seeds for the claims' arms, 2 warm starts / speaker splits
PAPER_REPLICATES = {"seeds": (0, 1, 2), "claim_seeds": (0, 1, 2, 3, 4), "splits": (0, 1)}


@dataclasses.dataclass(frozen=True)
class From:
  """A path inside another arm's run directory (same replicate), e.g. its ``mask.npz``."""

  arm: str
  file: str


@dataclasses.dataclass(frozen=True)
class Arm:
  """One cell of an experiment's table.

  Attributes:
    name: unique within the experiment (e.g. ``"row@0.7"``).
    overrides: dotted config field -> value, a ``From`` (a file of another arm's run), or a
      callable ``cfg -> value`` evaluated last, on the run's config with the other fields set.
    kind: ``"federated"`` (``fedprune federated``) or ``"baseline"`` (``fedprune baseline``).
    row, col: the cell's position in the report's table.
    report: False for helper runs that other arms start from (not a table cell).
  """

  name: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  kind: str = FEDERATED
  row: str = ""
  col: str = ""
  report: bool = True

  @property
  def needs(self) -> tuple[str, ...]:
    return tuple(sorted({v.arm for v in self.overrides.values() if isinstance(v, From)}))


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A claim as a difference of one metric between two arms, paired by replicate (``a - b``).

  Attributes:
    expect: the paper's claim about ``a - b``: ``"lower"``, ``"higher"``, ``"equivalent"`` (within
      ``margin``: "similar to the full model", "no difference"), or ``""`` (no claim: described).
    margin: TOST's equivalence margin, WER as a fraction (0.01 = 1 point).
    broken_ok: an arm at or above the gate's broken-model WER is the finding, not a failure.
  """

  claim: str
  a: str
  b: str
  metric: str = "test_wer"
  expect: str = ""
  margin: float = statistics.DEFAULT_MARGIN
  broken_ok: bool = False

  def __post_init__(self):
    if self.expect not in statistics.EXPECTATIONS:
      raise ConfigError(
        f"comparison {self.claim!r}: expect={self.expect!r}; one of {statistics.EXPECTATIONS}"
      )
    if not self.margin > 0:
      raise ConfigError(f"comparison {self.claim!r}: margin={self.margin} must be > 0")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A table or figure of the paper: a setting, arms, replicates.

  Attributes:
    name: file-system name (``t1_pattern``).
    title: heading in the report.
    question: what the paper claims or asks.
    base: the setting's config.
    arms: the runs of one replicate.
    seeds: every arm's seeds (``--quick`` uses the first).
    claim_seeds: more seeds for the arms of the comparisons (and what they need); the paper's
      tables use ``PAPER_REPLICATES``.
    splits: warm start / speaker split replicates (``--quick`` uses the first).
    reference: the dense federated arm the regime gate reads.
    quick: config overrides of ``--quick`` mode (few rounds, a short warm start).
    row_title, col_title: table axes in the report.
    comparisons: the claims, as paired differences.
    figures: report figures drawn from this experiment (``wer_vs_sparsity``, ``cost_vs_sparsity``).
    notes: lines the report prints under the title (e.g. T1's include list).
  """

  name: str
  title: str
  question: str
  base: ml_collections.ConfigDict
  arms: tuple[Arm, ...]
  seeds: tuple[int, ...] = (0, 1, 2)
  claim_seeds: tuple[int, ...] = ()
  splits: tuple[int, ...] = (0,)
  reference: str = "dense"
  quick: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  row_title: str = ""
  col_title: str = ""
  comparisons: tuple[Comparison, ...] = ()
  figures: tuple[str, ...] = ()
  notes: tuple[str, ...] = ()

  def __post_init__(self):
    names = [a.name for a in self.arms]
    if len(set(names)) != len(names):
      raise ConfigError(f"experiment {self.name}: arm names repeat: {names}")
    for arm in self.arms:
      if arm.kind not in (FEDERATED, BASELINE):
        raise ConfigError(f"experiment {self.name}, arm {arm.name}: unknown kind {arm.kind!r}")
      for need in arm.needs:
        if need not in names[: names.index(arm.name)]:
          raise ConfigError(
            f"experiment {self.name}, arm {arm.name} starts from arm {need!r}, "
            "which must come before it"
          )
    for c in self.comparisons:
      for name in (c.a, c.b):
        if name not in names:
          raise ConfigError(f"experiment {self.name}: comparison names unknown arm {name!r}")
    if not self.splits:
      raise ConfigError(f"experiment {self.name}: needs at least one split replicate")

  @property
  def all_seeds(self) -> tuple[int, ...]:
    return tuple(dict.fromkeys(self.seeds + self.claim_seeds))

  def _with_needs(self, names: Sequence[str]) -> set[str]:
    """``names`` with (transitively) the arms they start from."""
    by_name = {a.name: a for a in self.arms}
    todo, found = list(names), set()
    while todo:
      name = todo.pop()
      if name not in found:
        found.add(name)
        todo += list(by_name[name].needs)
    return found

  def _reference(self) -> list[str]:
    return [self.reference] if any(a.name == self.reference for a in self.arms) else []

  @property
  def claim_arms(self) -> frozenset[str]:
    """The arms of the comparisons, the reference and (transitively) the arms they start from."""
    names = [n for c in self.comparisons for n in (c.a, c.b)]
    return frozenset(self._with_needs(names + self._reference()))

  def start_ranks(self) -> dict[str, int]:
    """Arm name -> when its runs start (lower first; ties seed-major): the first comparison's
    arms (with the reference the gate reads, and what they start from) at 0, the next
    comparison's new arms at 1, ..., arms no comparison reads last. So a suite cut short by its
    budget has whole comparisons, not a few replicates of every arm."""
    ranks: dict[str, int] = {}
    for k, c in enumerate(self.comparisons):
      first = self._reference() if k == 0 else []
      for name in self._with_needs([c.a, c.b, *first]):
        ranks.setdefault(name, k)
    return {a.name: ranks.get(a.name, len(self.comparisons)) for a in self.arms}

  def runs_seed(self, arm: Arm, seed: int) -> bool:
    """Whether ``arm`` runs ``seed``: every arm runs ``seeds``, claim arms ``claim_seeds`` too."""
    return seed in self.seeds or arm.name in self.claim_arms


QUICK = {
  # --quick: each table's whole pipeline in a few minutes, to check it end to end before the real
  # run (its numbers mean nothing): 1 seed, 4 rounds, a micro Conformer, a short warm start,
  # 96 evaluation utterances per split
  "model.overrides": ml_collections.ConfigDict(
    dict(d_model=32, num_layers=1, num_heads=2, conv_kernel=3, conv_groups=4, subsample_channels=8)
  ),
  "data.eval_max_utterances": 96,
  "rounds": 4,
  "cohort_size": 4,
  "data.max_steps": 2,
  "checkpoint_every": 2,
  "warm_start.steps": 40,
  "warm_start.eval_every": 0,
  "warm_start.optim.warmup_steps": 10,
  "pruning.pruning_rounds": 2,
  "pruning.update_every": 1,
  "pruning.refining_rounds": 1,
  "pruning.refine_every": 1,
}


def one_factor(
  name: str,
  title: str,
  question: str,
  setting: str,
  field: str,
  values: Sequence[str],
  comparisons: Sequence[tuple[str, str, str] | Comparison],
  fixed: Mapping[str, Any] | None = None,
  extra: Mapping[str, Mapping[str, Any]] | None = None,
  more_arms: Sequence[Arm] = (),
) -> Experiment:
  """An experiment that varies one config ``field`` over ``values`` (plus the dense reference).

  Args:
    fixed: overrides of every pruning arm (default: 70% target sparsity).
    extra: per value, more overrides of that arm.
    comparisons: ``Comparison``s or ``(claim, a, b)`` triples (arms are named by their value).
    more_arms: arms after the one-factor ones (e.g. a sub-comparison).
  """
  fixed = {"pruning.target_sparsity": 0.7} if fixed is None else fixed
  arms = [Arm("dense", {"pruning": None}, row="dense")]
  for value in values:
    overrides = {**fixed, field: value, **(extra or {}).get(value, {})}
    arms.append(Arm(value, overrides, row=value))
  return Experiment(
    name=name,
    title=title,
    question=question,
    base=setting_config(setting),
    arms=tuple(arms) + tuple(more_arms),
    row_title=field.split(".")[-1],
    comparisons=tuple(c if isinstance(c, Comparison) else Comparison(*c) for c in comparisons),
    **PAPER_REPLICATES,
  )


def load_experiment(name: str, setting: str = "small") -> Experiment:
  """``get_experiment(setting)`` of ``experiments/configs/<name>.py``."""
  path = config_lib.resolve_config_path(name)
  spec = importlib.util.spec_from_file_location(f"fedprune_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_experiment"):
    raise ConfigError(f"{path}: defines no get_experiment() (not an experiment file)")
  return module.get_experiment(setting)


EXPERIMENTS = ("t1_pattern", "t2_score", "t3_schedule", "t4_allocation", "t5_refinement", "t6_data")


def setting_config(setting: str) -> ml_collections.ConfigDict:
  if setting not in ("small", "full"):
    raise ConfigError(f"unknown setting {setting!r}; expected 'small' or 'full'")
  return config_lib.load_config(f"paper_{setting}")
