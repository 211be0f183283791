"""Experiment configs as Python files (ml_collections) with command-line overrides.

A config file defines ``get_config() -> ml_collections.ConfigDict`` (the big_vision /
ml_collections convention).  Overrides are ``dotted.key=value`` strings; values are parsed as
Python literals where possible (``1e-3``, ``True``, ``(1, 2)``, ``'tiny'``) and kept as strings
otherwise.  Fields named ``overrides`` are free-form maps (e.g. ``model.overrides`` holds
ConformerConfig fields), so ``--set model.overrides.num_layers=2`` may add a new key there.
After the overrides, every field is checked against ``fedprune_jax.validation``.

Named configs live in ``experiments/configs/`` of the source tree; an installed wheel carries
the same files as the package ``fedprune_jax.configs`` (see setup.py).
"""

from __future__ import annotations

import ast
import functools
import importlib.resources
import importlib.util
import pathlib
from typing import Sequence

import ml_collections

from fedprune_jax.errors import ConfigError  # noqa: F401  (re-exported: config.ConfigError)

SOURCE_CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "configs"


@functools.cache
def config_dir() -> pathlib.Path:
  """The named configs: the source tree's (checkout, editable install), else the installed ones."""
  if SOURCE_CONFIG_DIR.is_dir():
    return SOURCE_CONFIG_DIR
  try:
    return pathlib.Path(str(importlib.resources.files("fedprune_jax.configs")))
  except ModuleNotFoundError:
    return SOURCE_CONFIG_DIR  # Neither: resolve_config_path lists no known configs.


def resolve_config_path(name_or_path: str) -> pathlib.Path:
  """Returns the config file for a path or a bare name in ``experiments/configs``."""
  path = pathlib.Path(name_or_path)
  if path.is_file():
    return path
  configs = config_dir()
  candidate = configs / (name_or_path if name_or_path.endswith(".py") else name_or_path + ".py")
  if candidate.is_file():
    return candidate
  known = (
    sorted(p.stem for p in configs.glob("*.py") if p.stem != "__init__") if configs.is_dir() else []
  )
  raise ConfigError(f"config file not found: {name_or_path!r} (known configs: {', '.join(known)})")


def load_config(
  name_or_path: str, overrides: Sequence[str] = (), validate: bool = True
) -> ml_collections.ConfigDict:
  """Loads ``get_config()`` from a Python file, applies ``key=value`` overrides, validates."""
  path = resolve_config_path(name_or_path)
  spec = importlib.util.spec_from_file_location(f"fedprune_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # A config file is user code: say which file broke.
    raise ConfigError(f"{path}: failed to load: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: defines no get_config()")
  try:
    config = module.get_config()
  except ConfigError:
    raise  # a config built on another one that is broken: already names the file
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"{path}: get_config() failed: {type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict")
  apply_overrides(config, overrides, source=str(path))
  if validate:
    from fedprune_jax import validation  # pylint: disable=g-import-not-at-top

    validation.validate(config, source=str(path))
  return config


def parse_value(text: str):
  """Parses an override value as a Python literal, falling back to the raw string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    return text  # not a literal (or one nested too deep to parse): the raw string


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Sequence[str], source: str = "config"
) -> None:
  """Applies ``a.b.c=value`` overrides in place; unknown keys are an error naming the key."""
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = config
    for depth, part in enumerate(parts[:-1]):
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth])!r} is not a section")
      if part not in node:
        raise ConfigError(
          f"override {key!r}: {source} has no field {'.'.join(parts[: depth + 1])!r}"
        )
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"override {key!r}: {'.'.join(parts[:-1])!r} is not a section")
    leaf = parts[-1]
    free_form = len(parts) > 1 and parts[-2] in ("overrides", "head_options")
    if leaf not in node and not free_form:
      raise ConfigError(
        f"override {key!r}: {source} has no field {key!r} (fields here: {', '.join(sorted(node.keys()))})"
      )
    value = parse_value(raw)
    current = node.get(leaf)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      raise ConfigError(f"override {key!r}: {e}") from e
