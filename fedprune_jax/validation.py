"""Config validation at load time: the field rules of ``fields.FIELDS`` plus cross-field rules.

``validate(config)`` runs once, after a config file is loaded and its overrides are applied
(``config.load_config``), so a bad value fails in milliseconds with the field's dotted name and
its allowed range or values, instead of a traceback from inside a jitted round (or, worse, a
silent run: a NaN learning rate drops every client, negative steps train nothing).

Rules only apply to fields the config has: a centralized config has no ``rounds``, a section
may be ``None`` (``specaug=None`` turns SpecAugment off), and free-form maps such as
``model.overrides`` are never inspected.  To add rules (e.g. for a new ``pruning`` section)
add rows to ``fields.FIELDS`` and functions to ``CROSS_RULES``; the helpers below cover order
between two fields and divisibility.
"""

from __future__ import annotations

from typing import Any, Callable, Collection

from fedprune_jax import fields
from fedprune_jax.errors import ConfigError
from fedprune_jax.fields import BOOL, STRING, Field, count, fraction, one_of, positive  # noqa: F401

_MISSING = object()


# Dotted field path -> rule, from the one table of fields (``fedprune_jax.fields``).
FIELD_RULES: dict[str, Field] = {path: spec.rule for path, spec in fields.FIELDS.items()}


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


def _section_keys(section: str) -> Callable[[], Collection[str]]:
  prefix = section + "."
  return lambda: [p[len(prefix) :] for p in fields.FIELDS if p.startswith(prefix)]


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


CROSS_RULES: list[CrossRule] = [
  *(known_keys(section, _section_keys(section)) for section in fields.CLOSED_SECTIONS),
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
