"""A regular (non-editable) install carries the named configs."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

_LOAD = """
import sys
import fedprune_jax
from fedprune_jax import config
assert fedprune_jax.__file__.startswith(sys.argv[1]), fedprune_jax.__file__
cfg = config.load_config("tiny_federated", ["rounds=3"])
print(config.config_dir(), cfg.rounds, cfg.model.preset)
"""


def test_wheel_install_loads_named_configs(tmp_path):
  src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
  src.mkdir()
  for name in ("setup.py", "README.md"):
    shutil.copy(ROOT / name, src / name)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  shutil.copytree(ROOT / "fedprune_jax", src / "fedprune_jax", ignore=ignore)
  shutil.copytree(ROOT / "experiments" / "configs", src / "experiments" / "configs", ignore=ignore)
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  wheels, target = tmp_path / "wheels", tmp_path / "site"
  subprocess.run(
    pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
    check=True,
    cwd=tmp_path,
  )
  (wheel,) = wheels.glob("fedprune_jax-*.whl")
  subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)], check=True)
  assert (target / "fedprune_jax" / "configs" / "tiny_centralized.py").is_file()
  proc = subprocess.run(
    [sys.executable, "-c", _LOAD, str(target)],
    capture_output=True,
    text=True,
    cwd=tmp_path,  # not the checkout: only the installed copy is importable
    env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    check=False,
  )
  assert proc.returncode == 0, proc.stderr
  config_dir, rounds, preset = proc.stdout.split()
  assert config_dir == str(target / "fedprune_jax" / "configs")
  assert (rounds, preset) == ("3", "tiny")
