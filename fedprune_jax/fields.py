"""Every config field in one table: its type, library default, allowed values and help text.

``FIELDS`` maps a dotted field path to a ``Spec``. Derived from it, and from nothing else:

* validation (``validation.FIELD_RULES`` is ``{path: spec.rule}``),
* the defaults the library uses when a config leaves a field out (``defaults(section)``: the
  federated engine's sections and ``pruning``),
* the allowed names the implementations dispatch on (``SERVER_SCORES``, ``AGGREGATIONS``, ...:
  an implementation imports its tuple from here instead of keeping its own),
* ``fedprune fields`` (the ``--set`` reference) and the README's generated field list
  (``markdown_table``; ``tests/test_fields.py`` fails if the README drifts).

A field whose value always comes from a config file (``data.root``, ``optim.peak_lr``, ...) has
no library default (``NO_DEFAULT``). To add a field: one row here, then read it where it is used.
This module imports from the package only ``errors`` and ``pruning.spec`` (the pruning library's
config-level values: default prunable paths, allocation strings); choices defined next to their
implementation, such as Conformer presets, are callables imported only when checked.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Collection

from fedprune_jax.errors import ConfigError
from fedprune_jax.pruning.spec import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, parse_allocation


@dataclasses.dataclass(frozen=True)
class Field:
  """What one config field may hold.

  Attributes:
    kind: "int", "float" (ints accepted; NaN and infinities never), "bool", "str" or "strs" (a
      list of strings).
    lo, hi: inclusive bounds for numbers (None = unbounded).
    lo_open: the lower bound itself is excluded (``> lo``).
    hi_open: the upper bound itself is excluded (``< hi``).
    choices: allowed values (compared case-insensitively for strings), or a zero-argument
      callable returning them, so that choices defined next to their implementation
      (Conformer presets, ASR heads) are imported only when the field is checked.
    check: extra test ``value -> error text or None`` (e.g. a pattern grammar).
    optional: ``None`` is allowed.
    also: other allowed strings besides ``kind`` (e.g. ``num_devices='all'``).
  """

  kind: str
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  choices: Collection[Any] | Callable[[], Collection[Any]] | None = None
  check: Callable[[Any], str | None] | None = None
  optional: bool = False
  also: tuple[str, ...] = ()

  def describe(self) -> str:
    """The allowed values in words, e.g. "an integer >= 1" or "one of 'sgd', 'adam'"."""
    if self.choices is not None:
      text = "one of " + ", ".join(repr(c) for c in sorted(_choices(self), key=str))
    else:
      noun = {
        "int": "an integer",
        "float": "a finite number",
        "bool": "True or False",
        "strs": "a list of strings",
      }
      text = noun.get(self.kind, "a string")
      if self.lo is not None and self.hi is not None:
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        text += f" in {left}{self.lo}, {self.hi}{right}"
      elif self.lo is not None:
        text += f" {'>' if self.lo_open else '>='} {self.lo}"
      elif self.hi is not None:
        text += f" {'<' if self.hi_open else '<='} {self.hi}"
    extras = [repr(a) for a in self.also] + (["None"] if self.optional else [])
    return text + "".join(f" or {e}" for e in extras)

  def error(self, value: Any) -> str | None:
    """Why ``value`` is not allowed, or None if it is."""
    if value is None and self.optional:
      return None
    if isinstance(value, str) and value in self.also:
      return None
    if not _has_kind(value, self.kind):
      return f"must be {self.describe()}"
    if self.choices is not None:
      allowed = {_fold(c) for c in _choices(self)}
      if _fold(value) not in allowed:
        return f"must be {self.describe()}"
    if self.kind in ("int", "float"):
      too_low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
      too_high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
      if too_low or too_high:
        return f"must be {self.describe()}"
    if self.check is not None:
      return self.check(value)
    return None


def _choices(rule: Field) -> Collection[Any]:
  return rule.choices() if callable(rule.choices) else rule.choices


def _fold(value: Any) -> Any:
  return value.lower() if isinstance(value, str) else value


def _has_kind(value: Any, kind: str) -> bool:
  if kind == "bool":
    return isinstance(value, bool)
  if kind == "str":
    return isinstance(value, str)
  if kind == "strs":
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
  if isinstance(value, bool):
    return False
  if kind == "int":
    return isinstance(value, int)
  if kind == "float":
    return isinstance(value, (int, float)) and math.isfinite(value)
  raise ValueError(f"unknown field kind {kind!r}")


# --- shorthands for the table -------------------------------------------------------------------


def count(lo: int = 0, **kw) -> Field:
  """An integer >= ``lo``."""
  return Field("int", lo=lo, **kw)


def positive(**kw) -> Field:
  """A finite number > 0."""
  return Field("float", lo=0, lo_open=True, **kw)


def fraction(**kw) -> Field:
  """A finite number in [0, 1] (narrow with ``hi_open``/``lo_open``)."""
  return Field("float", lo=0, hi=1, **kw)


def one_of(*choices: Any, **kw) -> Field:
  return Field("str", choices=choices, **kw)


STRING = Field("str")
BOOL = Field("bool")


def _conformer_presets() -> Collection[str]:
  from fedprune_jax.models import conformer  # pylint: disable=g-import-not-at-top

  return conformer.PRESETS


def _asr_heads() -> Collection[str]:
  from fedprune_jax.models import asr  # pylint: disable=g-import-not-at-top

  return asr.HEADS


def _parse_error(parse: Callable[[str], Any], value: str) -> str | None:
  """The ValueError text of ``parse(value)``, or None if it parses."""
  try:
    parse(value)
  except ValueError as e:
    return str(e)
  return None


def _allocation_error(value: str) -> str | None:
  return _parse_error(parse_allocation, value)


def _pattern_error(value: str) -> str | None:
  from fedprune_jax.pruning import patterns  # pylint: disable=g-import-not-at-top

  if value.strip().lower() == "units":  # unit-structured masks (heads, FFN units, conv groups)
    return None
  return _parse_error(patterns.parse_pattern, value)


def _regexes_error(values: Any) -> str | None:
  import re  # pylint: disable=g-import-not-at-top

  for pattern in values:
    try:
      re.compile(pattern[5:] if pattern.startswith("glob:") else pattern)
    except re.error as e:
      return f"must be path regexes: {pattern!r} is not one ({e})"
  return None


# --- allowed names (implementations import these) ------------------------------------------------

SAMPLINGS = ("uniform", "weighted")
CLIENT_OPTIMIZERS = ("sgd", "adam")
CLIENT_COMPACT = ("auto", "on", "off")
# canonical server optimizer name -> the names that select it
SERVER_OPTIMIZERS = {
  "fedavg": ("fedavg", "sgd"),
  "fedadam": ("fedadam", "adam"),
  "fedyogi": ("fedyogi", "yogi"),
}
EXECUTORS = ("chunked", "sequential", "drjax")
WEIGHTINGS = ("num_examples", "uniform")
CORRUPT_KINDS = ("nan", "scale")
SCHEDULES = ("polynomial", "constant", "step")
# importance scores (``pruning.scores.REGISTRY`` holds one ``Score`` per name; tests/test_scores.py
# checks that the two agree)
SERVER_SCORES = ("magnitude", "random")  # computed from the server's params
CLIENT_SCORES = ("saliency", "update", "taylor", "movement")  # computed from the clients' data
REFINEMENTS = ("none", "server", "client")
AGGREGATIONS = ("mean", "trimmed_mean", "vote")


# --- the table -----------------------------------------------------------------------------------


class _NoDefault:
  def __repr__(self) -> str:
    return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()


@dataclasses.dataclass(frozen=True)
class Spec:
  """One config field: its rule, its library default (``NO_DEFAULT``: a config file sets it)
  and one line of help."""

  rule: Field
  default: Any = NO_DEFAULT
  help: str = ""


def _workdir_error(value: str) -> str | None:
  return None if value.strip() else "must not be empty"


S = Spec
FIELDS: dict[str, Spec] = {
  "seed": S(count(0), 0, "the run's seed (params, sampling, client keys)"),
  "workdir": S(Field("str", check=_workdir_error), help="output directory (also `--workdir`)"),
  "tensorboard": S(
    BOOL,
    True,
    "also write TensorBoard scalars to WORKDIR/tensorboard (if the `tensorboard` extra is installed)",
  ),
  # data
  "data.root": S(STRING, help="corpus root directory (also `--data`)"),
  "data.source": S(one_of("librispeech_dir", "tfds"), help="LibriSpeech layout on disk or TFDS"),
  "data.train_split": S(STRING, help="training split name(s), '+'-joined"),
  "data.dev_split": S(STRING, help="dev split name"),
  "data.test_split": S(STRING, help="test split name"),
  "data.cache_dir": S(STRING, help="feature cache directory"),
  "data.batch_size": S(count(1), help="utterances per training step"),
  "data.num_buckets": S(count(1), help="length buckets (compiled shapes) of the training data"),
  "data.eval_batch_size": S(count(1), help="utterances per evaluation step"),
  "data.eval_max_utterances": S(count(0), help="evaluate at most this many per split (0 = all)"),
  "data.max_steps": S(count(1, optional=True), help="local steps per client at most (None = all)"),
  "data.max_frames": S(count(1, optional=True), help="drop utterances longer than this"),
  "data.skip_unalignable": S(
    BOOL,
    False,
    "drop (with a warning per file) training utterances too short for their transcript under the"
    " model's head, instead of stopping with an error naming the file",
  ),
  "data.packing": S(one_of("cost", "shape"), help="how client steps are packed into buckets"),
  "data.segments": S(count(1), help="scan segments per client, each padded to its own length"),
  "data.synth_vocab_size": S(count(2), help="words of a synthesized corpus"),
  "data.synth_speakers": S(count(1), help="speakers of a synthesized corpus"),
  "data.synth_utterances": S(count(1), help="utterances per speaker of a synthesized corpus"),
  "data.synth_seed": S(count(0), help="seed of a synthesized corpus"),
  "data.server_speakers": S(count(0), help="train speakers held by the server, not clients"),
  "data.server_accents": S(
    Field("strs", optional=True), help="accents the server's speakers are drawn from (None = all)"
  ),
  "data.split_seed": S(
    count(0, optional=True), help="seed of the server/client split (None = seed)"
  ),
  # model (model.overrides is free-form: ConformerConfig fields)
  "model.preset": S(Field("str", choices=_conformer_presets), help="Conformer size"),
  "model.head": S(Field("str", choices=_asr_heads), help="ASR head (CTC or transducer)"),
  # centralized optimizer and loop
  "optim.peak_lr": S(positive(), help="peak learning rate of the warmup-cosine schedule"),
  "optim.warmup_steps": S(count(0), help="linear warmup steps"),
  "optim.end_lr_fraction": S(fraction(), help="final learning rate / peak"),
  "optim.b1": S(fraction(hi_open=True), help="Adam b1"),
  "optim.b2": S(fraction(hi_open=True), help="Adam b2"),
  "optim.weight_decay": S(Field("float", lo=0), help="AdamW weight decay"),
  "optim.clip_norm": S(positive(), help="global gradient norm clip"),
  "train.steps": S(count(1), help="centralized training steps"),
  "train.max_minutes": S(positive(), help="stop centralized training after this long"),
  "train.eval_every": S(count(0), help="dev evaluation every k steps (0 = at the end)"),
  "train.log_every": S(count(1), help="metrics line every k steps"),
  "train.spec_augment": S(BOOL, help="SpecAugment in centralized training"),
  "train.checkpoint": S(BOOL, help="save the final checkpoint"),
  "specaug.num_freq_masks": S(count(0), help="SpecAugment frequency masks"),
  "specaug.max_freq_width": S(count(0), help="widest frequency mask (bins)"),
  "specaug.num_time_masks": S(count(0), help="SpecAugment time masks"),
  "specaug.max_time_width": S(fraction(), help="widest time mask (fraction of the utterance)"),
  # federated rounds (fedprune_jax/federated/rounds.py)
  "rounds": S(count(0), 10, "federated rounds"),
  "cohort_size": S(count(1), 16, "clients per round (clamped to the number of clients)"),
  "sampling": S(one_of(*SAMPLINGS), "uniform", "cohort sampling: uniform or by #examples"),
  "eval_every": S(count(0), 0, "dev evaluation every k rounds (0 = none)"),
  "log_path": S(Field("str", optional=True), None, "JSONL metrics, one line per round"),
  "tensorboard_dir": S(Field("str", optional=True), None, "TensorBoard scalars of each round"),
  "checkpoint_dir": S(Field("str", optional=True), None, "orbax round checkpoints (None = none)"),
  "checkpoint_every": S(count(0), 10, "rounds between round checkpoints (and one at the end)"),
  "keep_checkpoints": S(count(1), 2, "round checkpoints kept"),
  "client.optimizer": S(one_of(*CLIENT_OPTIMIZERS), "sgd", "client optimizer"),
  "client.learning_rate": S(positive(), 0.1, "client learning rate"),
  "client.momentum": S(fraction(hi_open=True, optional=True), None, "client SGD momentum"),
  "client.num_epochs": S(count(1), 1, "local epochs per round"),
  "client.shuffle": S(BOOL, True, "shuffle a client's steps each epoch"),
  "client.compact": S(
    one_of(*CLIENT_COMPACT),
    "auto",
    "federated pruning's clients train the compacted model: whenever the mask is unit-structured"
    " (auto), always (on: an error otherwise) or never (off)",
  ),
  "client.compact_quantum": S(
    fraction(lo_open=True),
    0.125,
    "a block's kept unit fraction is rounded up to a multiple of this (padding units): at most"
    " 1/quantum compacted client programs per block",
  ),
  "server.optimizer": S(
    one_of(*(n for names in SERVER_OPTIMIZERS.values() for n in names)),
    "fedavg",
    "server optimizer (FedAvg = SGD lr 1, FedAdam, FedYogi)",
  ),
  "server.learning_rate": S(positive(), 1.0, "server learning rate"),
  "server.b1": S(fraction(hi_open=True), 0.9, "FedAdam/FedYogi b1"),
  "server.b2": S(fraction(hi_open=True), 0.99, "FedAdam/FedYogi b2"),
  "server.eps": S(positive(), 1e-3, "FedAdam/FedYogi adaptivity tau (Reddi et al.)"),
  "server.momentum": S(fraction(hi_open=True, optional=True), None, "FedAvgM momentum"),
  "engine.executor": S(one_of(*EXECUTORS), "chunked", "how a cohort's clients are run"),
  "engine.chunk_size": S(count(1), 16, "clients per jitted chunk"),
  "engine.num_devices": S(count(1, also=("all",)), 1, "devices the clients are sharded over"),
  "engine.weighting": S(one_of(*WEIGHTINGS), "num_examples", "client weights of the mean"),
  "engine.vmap_size": S(count(1, optional=True), None, "clients vmapped together (None = chunk)"),
  "engine.device_loop": S(BOOL, False, "loop over a client's steps on the device"),
  "faults.dropout": S(fraction(), 0.0, "probability a sampled client never reports"),
  "faults.straggler": S(fraction(), 0.0, "probability a client completes only part of its steps"),
  "faults.corrupt": S(fraction(), 0.0, "probability a client's delta arrives corrupted"),
  "faults.corrupt_kind": S(one_of(*CORRUPT_KINDS), "nan", "corruption: times NaN or 1e6"),
  "faults.max_update_norm": S(positive(optional=True), None, "reject updates with a larger norm"),
  "faults.clip_norm": S(positive(optional=True), None, "clip update norms to this"),
  "warm_start.steps": S(count(0), help="centralized steps on the server's speakers (0 = none)"),
  "warm_start.batch_size": S(count(1), help="batch size of the warm start"),
  "warm_start.seed": S(count(0, optional=True), help="seed of the warm start (None = seed)"),
  "warm_start.eval_every": S(count(0), help="dev WER every k warm-start steps"),
  "warm_start.path": S(STRING, help="the warm start's checkpoint (shared by runs that name it)"),
  "warm_start.train_if_missing": S(
    BOOL, False, "train the warm start at warm_start.path when it is not there (else an error)"
  ),
  "baseline.data": S(one_of("server", "pooled"), help="centralized baseline's data"),
  "baseline.steps_per_round": S(count(0), help="baseline steps a round (0 = a round's)"),
  "baseline.batch_size": S(count(1), help="batch size of the centralized baseline"),
  # federated pruning (fedprune_jax/algorithms/mask_policy.py; the section None = dense)
  "pruning.target_sparsity": S(fraction(hi_open=True), 0.5, "sparsity at the end of pruning"),
  "pruning.initial_sparsity": S(fraction(hi_open=True), 0.0, "schedule's start sparsity"),
  "pruning.pattern": S(
    Field("str", check=_pattern_error),
    "unstructured",
    "unstructured | row | half_row | column | half_column | block:HxW | N:M | units",
  ),
  "pruning.score": S(
    one_of(*SERVER_SCORES, *CLIENT_SCORES), "magnitude", "importance score of the pruning phase"
  ),
  "pruning.allocation": S(
    Field("str", check=_allocation_error),
    "uniform",
    "uniform | global | adaptive[:FLOOR-CEIL] | erk",
  ),
  "pruning.schedule": S(one_of(*SCHEDULES), "polynomial", "sparsity schedule"),
  "pruning.begin_round": S(
    count(0),
    0,
    "first round of the schedule; `step` raises AT it: initial 0, step_delta 0.25, begin 0 "
    "gives 0.25, 0.5, ... from round 0 (see step_hold_initial)",
  ),
  "pruning.step_hold_initial": S(
    BOOL,
    False,
    "`step` schedule: keep initial_sparsity at begin_round, first raise update_every rounds "
    "later (0 -> 0.25 -> 0.5 from round 0)",
  ),
  "pruning.update_every": S(count(1), 1, "rounds between mask updates in the pruning phase"),
  "pruning.step_delta": S(fraction(lo_open=True), 0.1, "`step` schedule increment"),
  "pruning.pruning_rounds": S(count(1), 10, "length of the pruning phase"),
  "pruning.refining_rounds": S(count(0), 0, "length of the refining phase"),
  "pruning.refine_every": S(count(1), 1, "rounds between mask recomputations when refining"),
  "pruning.refinement": S(one_of(*REFINEMENTS), "server", "scores of the refining phase"),
  "pruning.client_aggregation": S(one_of(*AGGREGATIONS), "mean", "how client scores combine"),
  "pruning.trim_fraction": S(
    Field("float", lo=0, hi=0.5, hi_open=True), 0.1, "trimmed_mean: cohort dropped at each end"
  ),
  "pruning.mask_path": S(STRING, "", "a mask.npz to train with, frozen, from round 0"),
  "pruning.include": S(
    Field("strs", check=_regexes_error), DEFAULT_INCLUDE, "path regexes of the prunable params"
  ),
  "pruning.exclude": S(
    Field("strs", check=_regexes_error),
    DEFAULT_EXCLUDE,
    "path regexes left dense (e.g. pruning.STRUCTURED_EXCLUDE)",
  ),
}
# the warm start's optimizer: the fields of ``optim``
FIELDS.update({f"warm_start.{p}": s for p, s in FIELDS.items() if p.startswith("optim.")})
del S

# Sections whose consumer rejects keys it does not know (validation lists the known ones).
CLOSED_SECTIONS = ("client", "server", "faults", "engine", "pruning")
# The top-level fields and sections the federated round driver reads (``rounds.DEFAULTS``).
ENGINE_FIELDS = (
  "seed",
  "rounds",
  "cohort_size",
  "sampling",
  "eval_every",
  "log_path",
  "tensorboard_dir",
  "checkpoint_dir",
  "checkpoint_every",
  "keep_checkpoints",
  "client",
  "server",
  "faults",
  "engine",
)


def default(path: str) -> Any:
  """The library default of field ``path`` (KeyError if it has none)."""
  value = FIELDS[path].default
  if value is NO_DEFAULT:
    raise KeyError(f"config field {path} has no library default")
  return value


def defaults(section: str) -> dict[str, Any]:
  """``{field: default}`` of a section's fields that have a library default."""
  prefix = section + "."
  return {
    p[len(prefix) :]: s.default
    for p, s in FIELDS.items()
    if p.startswith(prefix) and s.default is not NO_DEFAULT
  }


def engine_defaults() -> dict[str, Any]:
  """The round driver's config: top-level fields plus its sections as dicts."""
  sections = {p.split(".")[0] for p in FIELDS if "." in p}
  return {n: defaults(n) if n in sections else default(n) for n in ENGINE_FIELDS}


def check(path: str, value: Any) -> None:
  """Raises ConfigError ``config field PATH=VALUE must be ...`` if ``value`` breaks the rule."""
  why = FIELDS[path].rule.error(value)
  if why is not None:
    raise ConfigError(f"config field {path}={value!r} {why}")


# --- derived text --------------------------------------------------------------------------------


def _default_text(spec: Spec) -> str:
  return "(config file)" if spec.default is NO_DEFAULT else repr(spec.default)


def reference() -> str:
  """Plain text for ``fedprune fields``: one block per field."""
  return "\n".join(
    f"{path} = {_default_text(s)}\n    {s.rule.describe()}\n    {s.help}"
    for path, s in FIELDS.items()
  )


def markdown_table() -> str:
  """The README's field list (between ``README_BEGIN`` and ``README_END``)."""
  rows = ["| field | default | allowed | meaning |", "|---|---|---|---|"]
  for path, s in FIELDS.items():
    allowed, meaning = (t.replace("|", "\\|") for t in (s.rule.describe(), s.help))
    rows.append(f"| `{path}` | `{_default_text(s)}` | {allowed} | {meaning} |")
  return "\n".join(rows)


README_BEGIN = "<!-- fields: generated by `fedprune fields --markdown`; do not edit -->"
README_END = "<!-- end of fields -->"
