"""`fedprune bench fedprune --compact`: the two paths' rounds are interleaved (ABBA), so a drift
in the machine's speed falls on both alike; medians skip each path's first (compiling) round."""

from __future__ import annotations

import types

import pytest

from fedprune_jax.bench import compact


def test_paired_rounds_alternate_abba_and_time_only_the_rounds_after_the_first(monkeypatch):
  calls = []
  seconds = {"masked": iter([100.0, 4.0, 2.0, 6.0]), "compact": iter([50.0, 1.0, 3.0, 2.0])}

  def fake_run_rounds(alg, state, store, executors, sampler, num_rounds, progress):
    assert num_rounds == 1 and not progress
    calls.append(alg.name)
    record = {
      "seconds": next(seconds[alg.name]),
      "examples_per_s": 1.0,
      "client_path": alg.name,
      "compile_seconds": 7.0,
      "client_params": 10.0,
    }
    return state + 1, [record]

  monkeypatch.setattr(compact.rounds, "run_rounds", fake_run_rounds)
  monkeypatch.setattr(compact.jax, "jit", lambda f: f)
  runs = {
    name: (types.SimpleNamespace(name=name, init=lambda params, seed: 0), None)
    for name in ("masked", "compact")
  }
  store = types.SimpleNamespace(num_clients=4)
  out = compact._paired(runs, None, store, {"cohort_size": 2}, repeats=3)
  assert calls == [
    "masked",
    "compact",
    "compact",
    "masked",
    "masked",
    "compact",
    "compact",
    "masked",
  ]
  assert out["masked"]["round_s"] == pytest.approx(4.0)  # median of 4, 2, 6 (not the 100 s round)
  assert out["compact"]["round_s"] == pytest.approx(2.0)  # median of 1, 3, 2
  assert out["masked"]["compile_s"] == 7.0 and out["compact"]["path"] == "compact"


def test_abba_order():
  assert compact.abba(["a", "b"], 3) == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_step_ceiling_times_each_model_after_its_first_step(monkeypatch, capsys):
  """The isolated-step bench (``--step``) runs the dense and the compacted model interleaved and
  leaves each one's first (warm-up) step out of its median: a fake clock makes the first steps
  100 s and the rest 2 s (dense) and 1 s (compacted)."""
  # calls: dense, compact (first steps), then compact, dense, dense, compact
  ticks = iter([0.0, 100.0, 0.0, 100.0] + [0.0, 1.0, 0.0, 2.0, 0.0, 2.0, 0.0, 1.0])
  monkeypatch.setattr(compact.time, "perf_counter", lambda: next(ticks))
  args = types.SimpleNamespace(batch_size=1, frames=64, repeats=2)
  (row,) = compact.step_ceiling("tiny", [0.5], args)
  assert row["dense_step_s"] == pytest.approx(2.0) and row["compact_step_s"] == pytest.approx(1.0)
  assert row["speedup"] == pytest.approx(2.0)
  assert "| tiny | 50% | 2000 | 1000 | 2.00x |" in capsys.readouterr().out
