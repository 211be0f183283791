"""Config validation at load time: one table of field rules plus a list of cross-field rules.

``validate(config)`` runs once, after a config file is loaded and its overrides are applied
(``config.load_config``), so a bad value fails in milliseconds with the field's dotted name and
its allowed range or values, instead of a traceback from inside a jitted round (or, worse, a
silent run: a NaN learning rate drops every client, negative steps train nothing).

Rules only apply to fields the config has: a centralized config has no ``rounds``, a section
may be ``None`` (``specaug=None`` turns SpecAugment off), and free-form maps such as
``model.overrides`` are never inspected.  To add rules (e.g. for a new ``pruning`` section)
add rows to ``FIELD_RULES`` and functions to ``CROSS_RULES``; the helpers below cover ranges,
choices, order between two fields and divisibility.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Collection

from fedprune_jax.errors import ConfigError

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Field:
  """What one config field may hold.

  Attributes:
    kind: "int", "float" (ints accepted; NaN and infinities never), "bool" or "str".
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
      noun = {"int": "an integer", "float": "a finite number", "bool": "True or False"}
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
  from fedprune_jax.pruning import allocation  # pylint: disable=g-import-not-at-top

  return _parse_error(allocation.parse_allocation, value)


def _pattern_error(value: str) -> str | None:
  from fedprune_jax.pruning import patterns  # pylint: disable=g-import-not-at-top

  if value.strip().lower() == "units":  # unit-structured masks (heads, FFN units, conv groups)
    return None
  return _parse_error(patterns.parse_pattern, value)


STRING = Field("str")
BOOL = Field("bool")

# Dotted field path -> rule.  Sections of the centralized, federated and demo configs.
FIELD_RULES: dict[str, Field] = {
  "seed": count(0),
  "workdir": Field("str", check=lambda v: None if v.strip() else "must not be empty"),
  # data
  "data.root": STRING,
  "data.source": one_of("librispeech_dir", "tfds"),
  "data.train_split": STRING,
  "data.dev_split": STRING,
  "data.test_split": STRING,
  "data.cache_dir": STRING,
  "data.batch_size": count(1),
  "data.num_buckets": count(1),
  "data.eval_batch_size": count(1),
  "data.eval_max_utterances": count(0),
  "data.max_steps": count(1, optional=True),
  "data.max_frames": count(1, optional=True),
  "data.packing": one_of("cost", "shape"),
  "data.segments": count(1),
  "data.synth_vocab_size": count(2),
  "data.synth_speakers": count(1),
  "data.synth_utterances": count(1),
  "data.synth_seed": count(0),
  # model (model.overrides is free-form: ConformerConfig fields)
  "model.preset": Field("str", choices=_conformer_presets),
  "model.head": Field("str", choices=_asr_heads),
  # centralized optimizer and loop
  "optim.peak_lr": positive(),
  "optim.warmup_steps": count(0),
  "optim.end_lr_fraction": fraction(),
  "optim.b1": fraction(hi_open=True),
  "optim.b2": fraction(hi_open=True),
  "optim.weight_decay": Field("float", lo=0),
  "optim.clip_norm": positive(),
  "train.steps": count(1),
  "train.max_minutes": positive(),
  "train.eval_every": count(0),
  "train.log_every": count(1),
  "train.spec_augment": BOOL,
  "train.checkpoint": BOOL,
  "specaug.num_freq_masks": count(0),
  "specaug.max_freq_width": count(0),
  "specaug.num_time_masks": count(0),
  "specaug.max_time_width": fraction(),
  # federated rounds (fedprune_jax/federated/rounds.py)
  "rounds": count(0),
  "cohort_size": count(1),
  "sampling": one_of("uniform", "weighted"),
  "eval_every": count(0),
  "client.optimizer": one_of("sgd", "adam"),
  "client.learning_rate": positive(),
  "client.momentum": fraction(hi_open=True, optional=True),
  "client.num_epochs": count(1),
  "client.shuffle": BOOL,
  "client.compact": one_of("auto", "on", "off"),
  "client.compact_quantum": fraction(lo_open=True),
  "server.optimizer": one_of("fedavg", "sgd", "fedadam", "adam", "fedyogi", "yogi"),
  "server.learning_rate": positive(),
  "server.b1": fraction(hi_open=True),
  "server.b2": fraction(hi_open=True),
  "server.eps": positive(),
  "server.momentum": fraction(hi_open=True, optional=True),
  "engine.executor": one_of("chunked", "sequential", "drjax"),
  "engine.chunk_size": count(1),
  "engine.num_devices": count(1, also=("all",)),
  "engine.weighting": one_of("num_examples", "uniform"),
  "engine.vmap_size": count(1, optional=True),
  "engine.device_loop": BOOL,
  "faults.dropout": fraction(),
  "faults.straggler": fraction(),
  "faults.corrupt": fraction(),
  "faults.corrupt_kind": one_of("nan", "scale"),
  "faults.max_update_norm": positive(optional=True),
  "faults.clip_norm": positive(optional=True),
  "checkpoint_every": count(0),
  "keep_checkpoints": count(1),
  "data.server_speakers": count(0),
  "warm_start.steps": count(0),
  "warm_start.batch_size": count(1),
  "warm_start.seed": count(0, optional=True),
  "warm_start.eval_every": count(0),
  "data.split_seed": count(0, optional=True),
  "baseline.data": one_of("server", "pooled"),
  "baseline.steps_per_round": count(0),
  "baseline.batch_size": count(1),
  # federated pruning (checked as soon as the section exists; fields of
  # fedprune_jax/algorithms/build.py PRUNING_DEFAULTS)
  "pruning.target_sparsity": fraction(hi_open=True),
  "pruning.initial_sparsity": fraction(hi_open=True),
  "pruning.pattern": Field("str", check=_pattern_error),
  "pruning.score": one_of("magnitude", "random", "saliency", "update"),
  "pruning.allocation": Field("str", check=_allocation_error),
  "pruning.schedule": one_of("polynomial", "constant", "step"),
  "pruning.begin_round": count(0),
  "pruning.update_every": count(1),
  "pruning.step_delta": fraction(lo_open=True),
  "pruning.pruning_rounds": count(1),
  "pruning.refining_rounds": count(0),
  "pruning.refine_every": count(1),
  "pruning.refinement": one_of("server", "client", "none"),
  "pruning.client_aggregation": one_of("mean", "trimmed_mean", "vote"),
  "pruning.trim_fraction": Field("float", lo=0, hi=0.5, hi_open=True),
  "pruning.mask_path": Field("str"),
}


def get_path(config: Any, path: str) -> Any:
  """``config[a][b][c]`` for ``"a.b.c"``; ``_MISSING`` if a part is absent or a section None."""
  node = config
  for part in path.split("."):
    if node is None or not hasattr(node, "keys") or part not in node.keys():
      return _MISSING
    node = node[part]
  return node


# --- cross-field rules: config -> error text (naming both fields) or None ------------------------

CrossRule = Callable[[Any], str | None]


def ordered(low: str, high: str) -> CrossRule:
  """``low <= high`` when both fields are set (e.g. a schedule's begin and end)."""

  def rule(config: Any) -> str | None:
    a, b = get_path(config, low), get_path(config, high)
    if _is_number(a) and _is_number(b) and a > b:
      return f"{low}={a} must be <= {high}={b}"
    return None

  return rule


def multiple_of(field: str, divisor: str) -> CrossRule:
  """``field`` is a multiple of ``divisor`` when both are integers."""

  def rule(config: Any) -> str | None:
    a, b = get_path(config, field), get_path(config, divisor)
    if _is_number(a) and _is_number(b) and b > 0 and a % b:
      return f"{field}={a} must be a multiple of {divisor}={b}"
    return None

  return rule


def sum_at_most(parts: tuple[str, ...], total: str) -> CrossRule:
  """``sum(parts) <= total`` when all are set (e.g. phase lengths within the rounds)."""

  def rule(config: Any) -> str | None:
    values = [get_path(config, p) for p in (*parts, total)]
    if all(_is_number(v) for v in values) and sum(values[:-1]) > values[-1]:
      lhs = " + ".join(f"{p}={v}" for p, v in zip(parts, values))
      return f"{lhs} must be <= {total}={values[-1]}"
    return None

  return rule


def known_keys(section: str, keys: Callable[[], Collection[str]]) -> CrossRule:
  """A closed section (its consumer rejects other keys) holds only ``keys()``.

  ``keys`` is called only when the section exists, so the module defining them is imported
  only then.
  """

  def rule(config: Any) -> str | None:
    node = get_path(config, section)
    if node is _MISSING or not hasattr(node, "keys"):
      return None
    unknown = sorted(set(node.keys()) - set(keys()))
    if unknown:
      return f"{section} has no field {unknown[0]!r} (fields: {', '.join(sorted(keys()))})"
    return None

  return rule


def _round_section_keys(section: str) -> Callable[[], Collection[str]]:
  def keys() -> Collection[str]:
    from fedprune_jax.federated import rounds  # pylint: disable=g-import-not-at-top

    return rounds.DEFAULTS[section].keys()

  return keys


def _pruning_keys() -> Collection[str]:
  from fedprune_jax.algorithms import build  # pylint: disable=g-import-not-at-top

  return build.PRUNING_DEFAULTS.keys()


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


CROSS_RULES: list[CrossRule] = [
  *(
    known_keys(section, _round_section_keys(section))
    for section in ("client", "server", "faults", "engine")
  ),
  known_keys("pruning", _pruning_keys),
  ordered("engine.vmap_size", "engine.chunk_size"),
  # The chunked executor shards a chunk's clients over the devices.
  multiple_of("engine.chunk_size", "engine.num_devices"),
  ordered("pruning.initial_sparsity", "pruning.target_sparsity"),
  # The pruning and refining phases happen within the run.
  sum_at_most(
    ("pruning.begin_round", "pruning.pruning_rounds", "pruning.refining_rounds"), "rounds"
  ),
]


def problems(config: Any) -> list[str]:
  """Every rule violation of ``config`` as ``"field=value must be ..."`` texts."""
  out = []
  for path, rule in FIELD_RULES.items():
    value = get_path(config, path)
    if value is _MISSING:
      continue
    why = rule.error(value)
    if why is not None:
      out.append(f"{path}={_short_repr(value)} {why}")
  if not out:  # cross rules assume each field is well-formed
    out += [why for rule in CROSS_RULES if (why := rule(config)) is not None]
  return out


def _short_repr(value: Any, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def validate(config: Any, source: str = "config") -> None:
  """Raises ConfigError naming ``source`` and every bad field (one line), if any."""
  found = problems(config)
  if found:
    raise ConfigError(f"{source}: {'; '.join(found)}")
