"""The one table of config fields: what is derived from it agrees with it, the README's field
list is the generated one (tests/test_validation.py: every field a shipped config sets is in the
table)."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from fedprune_jax import fields, validation
from fedprune_jax.algorithms import build, mask_policy
from fedprune_jax.federated import faults, rounds

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_field_list_is_the_generated_table():
  text = README.read_text(encoding="utf-8")
  begin = text.index(fields.README_BEGIN) + len(fields.README_BEGIN)
  end = text.index(fields.README_END)
  assert text[begin:end].strip() == fields.markdown_table(), (
    "README field list is stale: paste `fedprune fields --markdown` between its markers"
  )


def test_derived_defaults_and_rules_are_the_table():
  for section, values in rounds.DEFAULTS.items():
    if isinstance(values, dict):
      for name, value in values.items():
        assert fields.FIELDS[f"{section}.{name}"].default == value
    else:
      assert fields.FIELDS[section].default == values
  assert build.PRUNING_DEFAULTS == {
    p.split(".", 1)[1]: s.default for p, s in fields.FIELDS.items() if p.startswith("pruning.")
  }
  assert validation.FIELD_RULES == {p: s.rule for p, s in fields.FIELDS.items()}
  # dataclass defaults of the implementations come from the table
  for f in dataclasses.fields(faults.FaultConfig):
    assert f.default == fields.default(f"faults.{f.name}")
  for name in ("pattern", "allocation", "score", "refinement", "client_aggregation"):
    assert mask_policy.MaskPolicy.__dataclass_fields__[name].default == fields.default(
      f"pruning.{name}"
    )
  # every library default is an allowed value of its own field
  for path, spec in fields.FIELDS.items():
    if spec.default is not fields.NO_DEFAULT:
      assert spec.rule.error(spec.default) is None, path


def test_implementations_reject_what_the_table_rejects():
  with pytest.raises(ValueError, match=r"faults.dropout=1.5 must be a finite number in \[0, 1\]"):
    faults.FaultConfig(dropout=1.5)
  with pytest.raises(ValueError, match="pruning.client_aggregation='median' must be one of"):
    mask_policy.MaskPolicy(
      mask_policy.make_schedule("constant", 0.5, 1), 1, client_aggregation="median"
    )


def test_cli_prints_the_table(capsys):
  from fedprune_jax import cli

  assert cli.main(["fields", "--markdown"]) == 0
  assert capsys.readouterr().out.strip() == fields.markdown_table()
  cli.main(["fields"])
  out = capsys.readouterr().out
  assert (
    "pruning.step_hold_initial = False" in out and "one of 'mean', 'trimmed_mean', 'vote'" in out
  )


def test_set_help_points_at_the_field_list(capsys):
  from fedprune_jax import cli

  with pytest.raises(SystemExit):
    cli.main(["federated", "--help"])
  assert "`fedprune fields` lists every field" in " ".join(capsys.readouterr().out.split())
