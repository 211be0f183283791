"""Config files and command-line overrides."""

from __future__ import annotations

import pytest

from fedprune_jax import config as config_lib


def test_loads_named_config_and_applies_typed_overrides():
  cfg = config_lib.load_config(
    "tiny_centralized",
    [
      "train.steps=7",
      "optim.peak_lr=1",
      "model.preset='s'",
      "train.spec_augment=False",
      "model.overrides.num_layers=2",
      "data.root=/some/where",
    ],
  )
  assert cfg.train.steps == 7
  assert cfg.optim.peak_lr == 1.0 and isinstance(cfg.optim.peak_lr, float)
  assert cfg.model.preset == "s"
  assert cfg.train.spec_augment is False
  assert cfg.model.overrides.num_layers == 2
  assert cfg.data.root == "/some/where"  # not a literal: kept as a string


def test_config_can_build_on_another(tmp_path):
  cfg = config_lib.load_config("demo")
  base = config_lib.load_config("tiny_centralized")
  assert cfg.workdir == "runs/demo"
  assert cfg.model.preset == base.model.preset


@pytest.mark.parametrize(
  "override, message",
  [
    ("train.stepz=3", "has no field 'train.stepz'"),
    ("nosuch.field=1", "has no field 'nosuch'"),
    ("train.steps", "not of the form key=value"),
  ],
)
def test_bad_overrides_name_the_field(override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load_config("tiny_centralized", [override])


def test_missing_and_broken_config_files_are_named(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="config file not found: 'nope'"):
    config_lib.load_config("nope")
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  with pytest.raises(config_lib.ConfigError, match="broken.py: failed to load"):
    config_lib.load_config(str(broken))
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  with pytest.raises(config_lib.ConfigError, match="defines no get_config"):
    config_lib.load_config(str(empty))
