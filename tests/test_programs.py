"""Programs shared across the runs of one process (``fedprune_jax.programs``): sharing never
changes a result, and equal inputs do share."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import toy_store
from fedprune_jax import io_utils, programs
from fedprune_jax.algorithms import build
from fedprune_jax.federated import toy

# Arms of a small suite, in the order a suite would run them, with what each may share with the
# arms before it: (algorithm, executor). The algorithm holds init, broadcast and server update;
# the executor the client program, which magnitude arms of any pattern, sparsity or schedule have
# in common.
ARMS = [
  ({"pruning": {"target_sparsity": 0.5}}, (False, False)),
  ({"pruning": {"target_sparsity": 0.7, "pattern": "row", "schedule": "constant"}}, (False, True)),
  ({"pruning": {"score": "saliency"}}, (False, False)),  # clients compute scores
  ({"pruning": {"score": "saliency", "client_aggregation": "trimmed_mean"}}, (False, False)),
  ({"pruning": {"target_sparsity": 0.5}, "client": {"learning_rate": 0.1}}, (False, False)),
  ({"pruning": {"target_sparsity": 0.5}, "engine": {"chunk_size": 3}}, (True, False)),
  ({"pruning": None}, (False, False)),  # FedAvg
  ({"pruning": {"target_sparsity": 0.5}}, (True, True)),
]


def _run(arm: dict, loss_fn) -> dict:
  pruning = arm.get("pruning")
  if pruning is not None:
    pruning = {"pruning_rounds": 2, "update_every": 1, "refining_rounds": 1, **pruning}
  cfg = {
    "seed": 3,
    "rounds": 4,
    "cohort_size": 5,
    "client": {"learning_rate": 0.3, **arm.get("client", {})},
    "server": {"optimizer": "fedadam", "learning_rate": 0.05},
    "engine": {"chunk_size": 2, **arm.get("engine", {})},
    "pruning": pruning,
  }
  params = toy.init_params(jax.random.key(0), 4, 3, hidden=6)
  state, history = build.run_federated(cfg, loss_fn, params, toy_store(12, 1), progress=False)
  # what sharing changes: time, and how many compiles a run needed
  timing = ("seconds", "clients_per_s", "examples_per_s", "compilations", "compile_seconds")
  return {
    "params": io_utils.tree_sha256(state.params),
    "mask": io_utils.tree_sha256(getattr(state, "mask", None)),
    "history": [{k: v for k, v in h.items() if k not in timing} for h in history],
  }


def test_runs_sharing_programs_equal_runs_built_afresh():
  """One loss object for every arm (as ``job`` does), so arms share what their keys allow; an arm
  that shared anything equals the same arm built from nothing (cache cleared, a new loss)."""
  shared_loss = toy.make_loss_fn()
  programs.clear()
  results = []
  for arm, expected in ARMS:
    before = programs.stats()["hits"]
    results.append(_run(arm, shared_loss))
    assert programs.stats()["hits"] - before == sum(expected), arm
  for (arm, expected), result in zip(ARMS, results):
    if any(expected):
      programs.clear()
      assert result == _run(arm, toy.make_loss_fn()), arm
  # the arms do differ (the chunk size and the repeat may not change a result)
  assert len({r["params"] for r in results[:5] + results[6:7]}) == 6


def test_shared_returns_the_first_build_and_forgets_the_oldest():
  programs.clear()
  built = []
  first = programs.shared(("k", 1), lambda: built.append(1) or object())
  assert programs.shared(("k", 1), lambda: built.append(2) or object()) is first
  assert built == [1]
  for i in range(programs.MAX_ENTRIES):
    programs.shared(("other", i), object)
  assert programs.shared(("k", 1), object) is not first  # evicted, built anew
  assert programs.stats()["entries"] == programs.MAX_ENTRIES
  unshared = programs.shared(None, object)
  assert programs.shared(None, object) is not unshared  # key None: built every time
  assert programs.stats()["entries"] == programs.MAX_ENTRIES  # and never remembered


@pytest.mark.parametrize(
  "a, b, equal",
  [
    ({"x": 1, "y": [1, 2]}, {"y": [1, 2], "x": 1}, True),
    ({"x": 1}, {"x": 1.5}, False),
    ({"x": None}, {}, False),
  ],
)
def test_config_key_is_canonical(a, b, equal):
  assert (programs.config_key(a) == programs.config_key(b)) is equal


def test_tree_sha256_skips_none_and_sees_every_byte():
  tree = {"a": np.arange(4, dtype=np.float32), "b": None}
  same = {"a": np.arange(4, dtype=np.float32), "b": None}
  other = {"a": np.arange(4, dtype=np.float32)}
  other["a"][3] = np.nextafter(np.float32(3), np.float32(4))  # one bit of one value
  assert io_utils.tree_sha256(tree) == io_utils.tree_sha256(same)
  assert io_utils.tree_sha256(tree) != io_utils.tree_sha256(other)


# The client program's key is derived from what it closes over (the local update's hashable
# inputs, ``mask_policy.ClientScoring`` and the reducers): configs that differ in a value the
# client program reads get other programs; configs that differ only in what it does not read
# share one, and such programs give equal outputs.
KEY_BASE = {"pruning": {"score": "saliency"}}
CLIENT_READS = [
  {"pruning": {"score": "taylor"}},
  {"pruning": {"score": "movement"}},
  {"pruning": {"score": "update"}},
  {"pruning": {"score": "magnitude"}},  # no client scores at all
  {"pruning": {"score": "saliency", "client_aggregation": "vote"}},
  {"pruning": {"score": "saliency", "client_aggregation": "trimmed_mean"}},
  {"pruning": {"score": "saliency", "client_aggregation": "trimmed_mean", "trim_fraction": 0.3}},
  {**KEY_BASE, "client": {"learning_rate": 0.2}},
  {**KEY_BASE, "client": {"num_epochs": 2}},
  {**KEY_BASE, "faults": {"dropout": 0.5}},
]
CLIENT_IGNORES = [
  {
    "pruning": {
      "score": "saliency",
      "target_sparsity": 0.7,
      "pattern": "row",
      "schedule": "constant",
    }
  },
  # magnitude pruning refined with client scores: the clients compute saliency, as in KEY_BASE
  {"pruning": {"score": "magnitude", "refinement": "client", "refining_rounds": 1}},
]


def _program(arm: dict, loss_fn, params):
  cfg = {
    "cohort_size": 5,
    "client": {"learning_rate": 0.3, **arm.get("client", {})},
    "faults": arm.get("faults", {}),
    "pruning": {"pruning_rounds": 2, "update_every": 1, **arm["pruning"]},
  }
  resolved, policy = build.resolve(cfg)
  alg = build.build_algorithm(resolved, loss_fn, policy)
  plan = alg.plan_round(jax.jit(alg.init)(params, 0))
  return plan.program, plan.client_input


def _outputs(program, client_input, store):
  run = jax.jit(program.client_update)
  return [
    run(client_input, {k: v[0] for k, v in store.get(np.array([c])).items()}, jax.random.key(c))
    for c in range(4)
  ]


def _same(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_client_program_key_follows_what_the_client_program_reads():
  loss_fn, store = toy.make_loss_fn(), toy_store(6, 2)
  params = toy.init_params(jax.random.key(0), 4, 3, hidden=6)
  base, base_input = _program(KEY_BASE, loss_fn, params)
  base_out = _outputs(base, base_input, store)
  again, _ = _program({"pruning": dict(KEY_BASE["pruning"])}, loss_fn, params)  # an equal config
  assert again.key == base.key
  keys = {base.key}
  for arm in CLIENT_READS:
    program, _ = _program(arm, loss_fn, params)
    assert program.key not in keys, arm
    keys.add(program.key)
    # and the value does matter: other outputs on the same input, or another reduction
    outs = _outputs(program, base_input, store)
    assert not _same(outs, base_out) or program.reducers != base.reducers, arm
  for arm in CLIENT_IGNORES:
    program, _ = _program(arm, loss_fn, params)
    assert program.key == base.key, arm
    assert _same(_outputs(program, base_input, store), base_out), arm
