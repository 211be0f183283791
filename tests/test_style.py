"""The house style is the formatter's: `ruff format` and `ruff check` (config: ruff.toml)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
  exe = pathlib.Path(sys.executable).with_name("ruff")
  if exe.exists():
    return [str(exe)]
  if shutil.which("ruff"):
    return ["ruff"]
  pytest.skip("ruff is not installed (pip install -e '.[dev]')")


@pytest.mark.parametrize("args", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff_is_clean(args):
  proc = subprocess.run(_ruff() + args + ["."], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr
