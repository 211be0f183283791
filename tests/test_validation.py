"""Config validation: the field table, cross-field rules, and where validation runs."""

from __future__ import annotations

import math

import ml_collections
import pytest

from fedprune_jax import config as config_lib
from fedprune_jax import validation as V


@pytest.mark.parametrize(
  "name",
  ["tiny_centralized", "tiny_federated", "fedprune_tiny", "demo", "paper_small", "paper_full"],
)
def test_shipped_configs_are_valid_and_set_only_fields_of_the_table(name):
  cfg = config_lib.load_config(name, validate=False)
  assert V.problems(cfg) == []
  missing = [p for p in _leaves(cfg) if p not in V.FIELD_RULES]
  assert not missing, f"{name}: fields not in fedprune_jax/fields.py: {missing}"


def _leaves(node, prefix=""):
  for key in node.keys():
    value, path = node[key], f"{prefix}{key}"
    if key == "overrides":  # free-form maps (model.overrides: ConformerConfig fields)
      continue
    if hasattr(value, "keys"):
      yield from _leaves(value, path + ".")
    else:
      yield path


@pytest.mark.parametrize(
  "rule, good, bad",
  [
    (V.count(1), [1, 7, 10**12], [0, -1, 1.0, True, "3", None]),
    (V.count(0, optional=True), [0, None], [-1, 0.5]),
    (V.positive(), [1e-9, 3, 1e300], [0, -1e-9, math.nan, math.inf, -math.inf, False, "1"]),
    (V.fraction(hi_open=True), [0, 0.5, 0.999], [1, 1.0, -0.1, math.nan]),
    (V.fraction(), [0, 1, 1.0], [1.0001, math.nan]),
    (V.one_of("sgd", "adam"), ["sgd", "ADAM"], ["adamw", "", 1, None]),
    (V.count(1, also=("all",)), [1, "all"], [0, "ALL ", True, "some"]),
    (V.Field("str", choices=lambda: {"tiny": 1, "s": 2}), ["tiny", "s"], ["xl", 3]),
    (V.BOOL, [True, False], [0, 1, "True", None]),
  ],
)
def test_field_rules_accept_and_reject(rule, good, bad):
  for value in good:
    assert rule.error(value) is None, value
  for value in bad:
    assert rule.error(value) is not None, value


def test_describe_names_range_and_choices():
  assert V.count(1).describe() == "an integer >= 1"
  assert V.fraction(hi_open=True, optional=True).describe() == "a finite number in [0, 1) or None"
  assert V.positive().describe() == "a finite number > 0"
  assert V.one_of("b", "a").describe() == "one of 'a', 'b'"
  assert V.count(1, also=("all",)).describe() == "an integer >= 1 or 'all'"


def test_problems_name_every_bad_field_and_skip_absent_ones():
  cfg = config_lib.load_config("tiny_federated", validate=False)
  cfg.rounds = -3
  cfg.server.optimizer = "nesterov"
  cfg.specaug = None  # a section may be off; its rules then do not apply
  found = V.problems(cfg)
  assert len(found) == 2
  assert found[0].startswith("rounds=-3 must be an integer >= 0")
  assert found[1].startswith("server.optimizer='nesterov' must be one of")
  assert "train.steps" not in " ".join(found)  # a federated config has no train section


def test_free_form_maps_are_not_inspected():
  cfg = config_lib.load_config(
    "tiny_centralized", ["model.overrides.anything_new=-1", "model.overrides.num_layers=2"]
  )
  assert cfg.model.overrides.anything_new == -1


def test_cross_rules_helpers():
  cfg = ml_collections.ConfigDict({"a": {"begin": 5, "end": 3, "n": 8, "k": 3}})
  assert V.ordered("a.begin", "a.end")(cfg) == "a.begin=5 must be <= a.end=3"
  assert V.ordered("a.end", "a.begin")(cfg) is None
  assert V.ordered("a.begin", "a.missing")(cfg) is None
  assert V.multiple_of("a.n", "a.k")(cfg) == "a.n=8 must be a multiple of a.k=3"
  assert V.multiple_of("a.n", "a.end")(ml_collections.ConfigDict({"a": {"n": 9, "end": 3}})) is None


def test_pruning_rules_apply_once_the_section_exists():
  cfg = config_lib.load_config("tiny_federated", validate=False)
  cfg.rounds = 40
  cfg.pruning = ml_collections.ConfigDict(
    dict(
      target_sparsity=0.5,
      initial_sparsity=0.0,
      pattern="block:4x4",
      schedule="polynomial",
      allocation="global",
      begin_round=0,
      pruning_rounds=20,
      refining_rounds=10,
      trim_fraction=0.1,
    )
  )
  assert V.problems(cfg) == []
  cfg.pruning.pattern = "diagonal"
  cfg.pruning.target_sparsity = 1.0
  cfg.pruning.trim_fraction = 0.5
  found = " ".join(V.problems(cfg))
  assert "pruning.target_sparsity=1.0" in found and "unknown pruning pattern 'diagonal'" in found
  assert "pruning.trim_fraction=0.5 must be a finite number in [0, 0.5)" in found
  cfg.pruning.update(pattern="units", target_sparsity=0.9, trim_fraction=0.0, refining_rounds=21)
  assert V.problems(cfg) == [
    "pruning.begin_round=0 + pruning.pruning_rounds=20 + pruning.refining_rounds=21 "
    "must be <= rounds=40"
  ]
  cfg.pruning.update(refining_rounds=0, initial_sparsity=0.95)
  assert V.problems(cfg) == ["pruning.initial_sparsity=0.95 must be <= pruning.target_sparsity=0.9"]


def test_load_config_validates_after_overrides_and_names_the_file(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"tiny_federated\.py: engine\.chunk_size=0"):
    config_lib.load_config("tiny_federated", ["engine.chunk_size=0"])
  # An override may repair a bad file: validation sees the final config.
  path = tmp_path / "bad_steps.py"
  path.write_text(
    "from fedprune_jax import config as c\n"
    "def get_config():\n"
    "  cfg = c.load_config('tiny_centralized')\n"
    "  cfg.train.steps = 0\n"
    "  return cfg\n"
  )
  with pytest.raises(config_lib.ConfigError, match=r"bad_steps\.py: train\.steps=0"):
    config_lib.load_config(str(path))
  assert config_lib.load_config(str(path), ["train.steps=5"]).train.steps == 5


def test_closed_sections_name_an_unknown_field(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text(
    "from fedprune_jax import config as c\n"
    "def get_config():\n"
    "  cfg = c.load_config('fedprune_tiny')\n"
    "  cfg.pruning.target_sparsty = 0.7\n"
    "  return cfg\n"
  )
  with pytest.raises(
    config_lib.ConfigError, match=r"typo\.py: pruning has no field 'target_sparsty'"
  ):
    config_lib.load_config(str(path))
  cfg = config_lib.load_config("tiny_federated", validate=False)
  cfg.engine.chunksize = 4
  assert V.problems(cfg)[0].startswith("engine has no field 'chunksize' (fields: chunk_size, ")
