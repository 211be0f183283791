"""Compacted client training: a round whose clients train the compacted Conformer equals the same
round with masked-dense clients (same state, cohort and keys) to float tolerance, for CTC and
RNN-T heads, in pruning, refining (with a revival) and fine-tuning rounds, chunk sizes 1 and 4 and
a reversed cohort; client-data scores (saliency, movement) scattered back equal the masked-dense
ones, and so do the server's scores from them; so do clients' saliency votes (ranked with the
dense layer's threshold) and the masks from them; the number of client programs of a run whose
mask changes every round stays within the quantum's bound; a run SIGKILLed mid-round resumes
bit-identically."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import MICRO_MODEL
from fedprune_jax import pruning
from fedprune_jax.algorithms import build
from fedprune_jax.federated import client_data, rounds
from fedprune_jax.models import asr
from fedprune_jax.pruning import compaction, units

CLIENTS = np.array([5, 0, 3, 6, 1])


@functools.lru_cache(maxsize=None)
def _model(head: str) -> asr.AsrModel:
  return asr.make_asr_model(
    "tiny", head=head, **dict(MICRO_MODEL, input_dim=8, attention_dropout_rate=0.0)
  )


@functools.lru_cache(maxsize=None)
def _loss_of(model: asr.AsrModel):
  """One loss object per model (as ``job`` keeps one): client programs keyed by it are compiled
  once per module, whichever test builds them first."""
  return lambda p, b, r: model.loss(p, b, r, True)


@functools.lru_cache(maxsize=None)
def _params(head: str, seed: int):
  return _model(head).init(jax.random.key(seed))


STORE = dict(
  batch_size=2, min_examples=2, max_examples=4, num_frames=12, feature_dim=8, label_len=3,
  num_classes=5, seed=1,
)  # fmt: skip


def _store() -> client_data.SyntheticClientStore:
  return client_data.SyntheticClientStore(8, **STORE)


@functools.lru_cache(maxsize=None)
def _compact_model(head: str) -> build.CompactModel:
  """As ``job`` builds it: the dense sizes give the dense loss object."""
  model = _model(head)
  return build.compact_model_for(model, _loss_of(model), _loss_of)


def _config(quantum=1e-6, server="fedadam", mode="on", chunk=4, devices=1) -> dict:
  return rounds.resolve_config(
    {
      "cohort_size": len(CLIENTS),
      "client": {"learning_rate": 0.05, "compact": mode, "compact_quantum": quantum},
      "server": {"optimizer": server, "learning_rate": 0.01},
      "engine": {"chunk_size": chunk, "num_devices": devices},
    }
  )


@functools.lru_cache(maxsize=None)
def _algorithms(head: str, pruning_cfg: tuple, quantum=1e-6, server="fedadam"):
  """(masked-dense, compacted) federated pruning of ``_model(head)`` (``pruning_cfg``: the items
  of its ``pruning`` section). Cached: a test that reuses them reuses their server
  programs."""
  model = _model(head)
  pcfg = build.resolve_pruning({"pattern": "units", **dict(pruning_cfg)})
  policy = build.policy_from_config(pcfg, model.config.conv_group_channels)
  return tuple(
    build.build_algorithm(
      _config(quantum, server, mode), _loss_of(model), policy, compact_model=_compact_model(head)
    )
    for mode in ("off", "on")
  )


class FixedSampler:
  """The same cohort every round (in a given order)."""

  def __init__(self, ids):
    self.ids = np.asarray(ids)

  def sample(self, r):
    del r
    return self.ids


def _close(a, b, tol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def _run(alg, state, ids, num_rounds, chunk=4, devices=1):
  """(state after every round, history) of ``num_rounds`` rounds of cohort ``ids``."""
  states = []
  state, hist = rounds.run_rounds(
    alg,
    state,
    _store(),
    build.shared_executors(_config(chunk=chunk, devices=devices)["engine"]),
    FixedSampler(ids),
    num_rounds,
    progress=False,
    on_round=lambda st, m: states.append(st),
  )
  return states, hist


def _poke_pruned_unit(state, cpg):
  """The state with one pruned FFN unit's kept values made the largest of its layer, so the next
  refining mask update (server magnitude) revives it."""
  umask = compaction.unit_mask_of(state.params, state.mask, cpg)
  j = int(np.flatnonzero(~np.asarray(umask["block_0"]["ffn1"]))[0])
  ffn = state.params["encoder"]["block_0"]["ffn1"]
  big = float(np.float32(10.0 * float(jnp.abs(ffn["dense_in"]["kernel"]).max())))
  params = jax.tree.map(lambda x: x, state.params)
  new_ffn = params["encoder"]["block_0"]["ffn1"] = dict(ffn)
  new_ffn["dense_in"] = dict(ffn["dense_in"], kernel=ffn["dense_in"]["kernel"].at[:, j].set(big))
  new_ffn["dense_out"] = dict(ffn["dense_out"], kernel=ffn["dense_out"]["kernel"].at[j].set(big))
  return state.replace(params=params), j, big


# one-shot 50% unit mask at round 0; round 0 is a pruning round whose server step refines
# (revives), round 1 a refining round, round 2 fine-tuning
ROUNDS_PCFG = (
  ("pruning_rounds", 1), ("refinement", "server"), ("refining_rounds", 1),
  ("schedule", "constant"), ("target_sparsity", 0.5),
)  # fmt: skip


def _assert_same_rounds(dense, compact):
  """Masked-dense and compacted runs (states, history) agree round by round."""
  (dense_states, dense_hist), (compact_states, compact_hist) = dense, compact
  assert [h["client_path"] for h in dense_hist] == ["masked_dense"] * 3
  assert [h["client_path"] for h in compact_hist] == ["compact"] * 3
  assert [h["phase"] for h in compact_hist] == [0, 1, 2]
  for d, c in zip(dense_states, compact_states):
    for a, b in zip(jax.tree.leaves(d.mask), jax.tree.leaves(c.mask)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _close(c.params, d.params, 2e-5)
    _close(c.opt_state, d.opt_state, 2e-5)
  for hd, hc in zip(dense_hist, compact_hist):
    for key in ("train_loss", "num_examples", "sparsity", "revived_next", "mask_updated"):
      np.testing.assert_allclose(hc[key], hd[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["ctc", "rnnt"])
def test_compacted_rounds_equal_masked_dense_rounds(head):
  """Chunk size 4; for CTC also the compacted run at chunk size 1 with the cohort reversed (the
  chunking does not depend on the head)."""
  cpg = _model(head).config.conv_group_channels
  dense_alg, compact_alg = _algorithms(head, ROUNDS_PCFG)
  state0, j, big = _poke_pruned_unit(jax.jit(dense_alg.init)(_params(head, 0), 0), cpg)
  dense = _run(dense_alg, state0, CLIENTS, 3)
  compact = _run(compact_alg, state0, CLIENTS, 3)
  _assert_same_rounds(dense, compact)
  (_, dense_hist), (compact_states, compact_hist) = dense, compact
  # the poked unit was pruned in round 0 and revived for round 1 with its kept value
  assert compact_hist[0]["revived_next"] >= 1
  after0 = compact_states[0]
  assert bool(after0.mask["encoder"]["block_0"]["ffn1"]["dense_out"]["kernel"][j].all())
  np.testing.assert_array_equal(
    np.asarray(after0.params["encoder"]["block_0"]["ffn1"]["dense_out"]["kernel"][j]), big
  )
  # the compacted clients trained fewer params than the dense model has
  assert compact_hist[1]["client_params"] < dense_hist[1]["client_params"]
  if head == "ctc":  # chunk size and cohort order do not change a round
    reordered = _run(compact_alg, state0, CLIENTS[::-1], 3, chunk=1)
    _assert_same_rounds(dense, reordered)
    _close(reordered[0][-1].params, compact_states[-1].params, 2e-5)


# movement stands for the scores accumulated at the client's current params (taylor's per-step
# term |w g| is computed the same way; a third Conformer compile would cost ~1 CPU minute)
@pytest.mark.parametrize("score", ["saliency", "movement"])
def test_client_scores_scattered_back_equal_masked_dense_scores(score):
  model, params = _model("ctc"), _params("ctc", 1)
  pcfg = (
    ("pruning_rounds", 3),
    ("score", score),
    ("target_sparsity", 0.5),
    ("update_every", 1),
  )
  # every kind keeps 1/2 of its units -> level 0.6 at quantum 0.3: FFN 64 kept of 128 -> 77
  # trained, 13 of them padding units; heads 1 of 2 -> 2; conv groups 2 of 4 -> 3
  dense_alg, compact_alg = _algorithms("ctc", pcfg, quantum=0.3)
  state = jax.jit(dense_alg.init)(params, 0)
  # a unit mask of the kind rounds later would have: half the units pruned
  cpg = model.config.conv_group_channels
  umask = units.unit_mask(params, cpg, 0.5)
  state = state.replace(mask=units.expand_unit_mask(params, cpg, umask))
  key = jax.random.key(3)
  aggs = {}
  for name, alg in (("dense", dense_alg), ("compact", compact_alg)):
    plan = alg.plan_round(state)
    assert plan.metrics["client_path"] == ("compact" if name == "compact" else "masked_dense")
    if name == "compact":
      assert plan.client_input["mask"] is not None  # padding units, held at zero by the mask
      ffn = plan.client_input["params"]["encoder"]["block_0"]["ffn1"]["dense_in"]["kernel"]
      assert ffn.shape[1] == 77
    ex = build.shared_executors(_config(chunk=2)["engine"])(plan.program)
    agg, _ = ex(plan.client_input, _store(), CLIENTS, key)
    aggs[name] = agg if plan.finish is None else plan.finish(agg)
  dense_mask = pruning.dense_mask(state.mask, params)
  for d, c, m in zip(*(jax.tree.leaves(t) for t in (aggs["dense"].update["scores"],
                                                    aggs["compact"].update["scores"], dense_mask))):  # fmt: skip
    d, c, m = np.asarray(d), np.asarray(c), np.asarray(m)
    np.testing.assert_allclose(c[m], d[m], rtol=1e-4, atol=1e-7)
    # a pruned unit's gradient is exactly zero on the masked-dense model too
    np.testing.assert_array_equal(c[~m], 0.0)
    np.testing.assert_allclose(d[~m], 0.0, atol=1e-7)
  assert any(np.asarray(x).max() > 0 for x in jax.tree.leaves(aggs["compact"].update["scores"]))
  # the server's scores of the two aggregates agree at kept coordinates too
  policy = build.policy_from_config(build.resolve_pruning({"pattern": "units", **dict(pcfg)}), cpg)
  server = {
    name: policy.scores(1, params, aggs[name].update["scores"], jax.random.key(0)) for name in aggs
  }
  for d, c, m in zip(
    *(jax.tree.leaves(t) for t in (server["dense"], server["compact"], dense_mask))
  ):
    np.testing.assert_allclose(
      np.asarray(c)[np.asarray(m)], np.asarray(d)[np.asarray(m)], rtol=1e-4, atol=1e-7
    )
  _close(aggs["compact"].update["delta"], aggs["dense"].update["delta"], 2e-5)
  for c, m in zip(jax.tree.leaves(aggs["compact"].update["delta"]), jax.tree.leaves(dense_mask)):
    np.testing.assert_array_equal(np.asarray(c)[~np.asarray(m)], 0.0)  # padding units included


def test_a_pruning_run_compiles_a_bounded_number_of_client_programs():
  """Ten rounds of a polynomial schedule change the mask every round; with quantum 1/4 a block
  takes at most 4 shapes, so the run needs at most 4 compacted client programs (+ the plain dense
  one of the all-kept round 0), and the padding units stay exactly zero."""
  params = _params("ctc", 2)
  pcfg = (("pruning_rounds", 10), ("target_sparsity", 0.75), ("update_every", 1))
  _, compact_alg = _algorithms("ctc", pcfg, quantum=0.25, server="fedavg")
  state0 = jax.jit(compact_alg.init)(params, 0)
  states, hist = _run(compact_alg, state0, CLIENTS, 10)
  sparsities = [h["sparsity"] for h in hist]
  assert len(set(np.round(sparsities, 4))) >= 6  # the mask did change round after round
  assert hist[-1]["client_programs"] <= 5
  assert all(h["client_path"] == "compact" for h in hist)
  for before, after in zip(states, states[1:]):  # pruned units (padding ones too) never move
    m = pruning.dense_mask(before.mask, params)
    for a, b, keep in zip(*map(jax.tree.leaves, (before.params, after.params, m))):
      np.testing.assert_array_equal(
        np.asarray(b)[~np.asarray(keep)], np.asarray(a)[~np.asarray(keep)]
      )


class KillingStore(client_data.SyntheticClientStore):
  """``_store()``'s clients; the process SIGKILLs itself at the ``kill_at``-th ``get`` (1-based;
  0: never), i.e. inside a round after some of its chunks ran."""

  def __init__(self, kill_at: int):
    super().__init__(8, **STORE)
    self.kill_at, self.calls = kill_at, 0

  def get(self, ids):
    self.calls += 1
    if self.calls == self.kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    return super().get(ids)


def resumable_run(workdir: str, kill_at: int = 0):
  """4 rounds of compacted federated pruning (the unit mask changes every round; quantum 1/2)
  checkpointed every 2 rounds in ``workdir``, resumed from there; SIGKILLed at the ``kill_at``-th
  store read. A round reads the store 3 times (a shape probe, then 2 chunks of its 5 clients)."""
  model = _model("ctc")
  policy = build.policy_from_config(
    build.resolve_pruning(
      {"pattern": "units", "target_sparsity": 0.5, "pruning_rounds": 3, "update_every": 1}
    ),
    model.config.conv_group_channels,
  )
  cfg = {
    "seed": 2,
    "rounds": 4,
    "cohort_size": 5,
    "checkpoint_dir": os.path.join(workdir, "rounds"),
    "checkpoint_every": 2,
    "log_path": os.path.join(workdir, "metrics.jsonl"),
    "client": {"learning_rate": 0.05, "compact": "on", "compact_quantum": 0.5},
    "server": {"optimizer": "fedadam", "learning_rate": 0.01},
    "engine": {"chunk_size": 4},
  }
  return build.run_federated(
    cfg,
    _loss_of(model),
    _params("ctc", 4),
    KillingStore(kill_at),
    progress=False,
    policy=policy,
    compact_model=_compact_model("ctc"),
  )


def _logged_rounds(workdir) -> list[int]:
  return [
    json.loads(line)["round"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
  ]


def test_sigkill_mid_round_then_resume_on_the_compacted_path_is_bit_identical(tmp_path):
  """A run SIGKILLed (in a subprocess) in the middle of round 3, after the checkpoint of round 2
  and a round past it, and run again from its checkpoint ends bit-identical to a straight run
  (params, mask, metrics): the compaction plan is host-side and rebuilt from the state."""
  from fedprune_jax import io_utils  # pylint: disable=g-import-not-at-top
  from fedprune_jax.federated import checkpoints  # pylint: disable=g-import-not-at-top

  here = os.path.dirname(os.path.abspath(__file__))
  killed = tmp_path / "killed"
  # read 12 = round 3's second chunk (reads 10-12: shape probe, chunk 1, chunk 2)
  script = (
    f"import sys; sys.path.insert(0, {here!r}); import test_compact_clients as t; "
    f"t.resumable_run({str(killed)!r}, kill_at=12)"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), env.get("PYTHONPATH", "")])
  proc = subprocess.run(
    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1200
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert checkpoints.saved_rounds(killed / "rounds") == [2]
  assert _logged_rounds(killed) == [0, 1, 2]  # killed in round 3, one round past its checkpoint
  straight, hist = resumable_run(str(tmp_path / "straight"))
  resumed, hist2 = resumable_run(str(killed))
  assert [h["client_path"] for h in hist] == ["compact"] * 4
  assert len(set(np.round([h["sparsity"] for h in hist], 4))) >= 3  # the mask did change
  assert io_utils.tree_sha256(straight.params) == io_utils.tree_sha256(resumed.params)
  assert io_utils.tree_sha256(straight.mask) == io_utils.tree_sha256(resumed.mask)
  keep = lambda h: {k: v for k, v in h.items() if k not in rounds.PROCESS_METRICS}  # noqa: E731
  assert [keep(h) for h in hist] == [keep(h) for h in hist2]
  assert _logged_rounds(killed) == [0, 1, 2, 3]  # resumed: no round logged twice


def one_round_params(mode: str, devices: int) -> np.ndarray:
  """Flat params after one pruning round (50% unit mask) with ``client.compact=mode``."""
  dense_alg, compact_alg = _algorithms("ctc", ROUNDS_PCFG)
  alg = compact_alg if mode == "on" else dense_alg
  state0 = jax.jit(alg.init)(_params("ctc", 0), 0)
  states, hist = _run(alg, state0, CLIENTS, 1, devices=devices)
  assert hist[0]["client_path"] == ("compact" if mode == "on" else "masked_dense")
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(states[-1].params)])


def test_compacted_round_on_two_forced_devices_equals_masked_dense_on_one(tmp_path):
  here = os.path.dirname(os.path.abspath(__file__))
  out = tmp_path / "two.npy"
  script = (
    f"import sys; sys.path.insert(0, {here!r}); import numpy as np, jax; "
    "import test_compact_clients as t; assert jax.device_count() == 2; "
    f"np.save({str(out)!r}, t.one_round_params('on', 2))"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), env.get("PYTHONPATH", "")])
  proc = subprocess.run(
    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1200
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_allclose(np.load(out), one_round_params("off", 1), atol=2e-5, rtol=2e-5)


# clients vote for their top 1 - s of each layer; one-shot half the units at round 0 (set by hand
# below), then the votes' mask updates at 0.656 (step 1) and 0.75 (step 2)
VOTE_PCFG = (
  ("pruning_rounds", 3), ("score", "saliency"), ("client_aggregation", "vote"),
  ("target_sparsity", 0.75), ("update_every", 1),
)  # fmt: skip


def test_compacted_client_votes_equal_masked_dense_votes():
  """Saliency votes: a compacted client ranks its entries with the dense layer's threshold (its
  scores with the pruned entries it lacks as zeros), so the aggregated votes scattered back, the
  masks the server computes from them, the params and the metrics equal the masked-dense round's,
  with padding units (quantum 0.3) and for two rounds (each followed by a mask update from the
  votes)."""
  model, params = _model("ctc"), _params("ctc", 1)
  cpg = model.config.conv_group_channels
  dense_alg, compact_alg = _algorithms("ctc", VOTE_PCFG, quantum=0.3)
  state = jax.jit(dense_alg.init)(params, 0)
  mask = units.expand_unit_mask(params, cpg, units.unit_mask(params, cpg, 0.5))
  state = state.replace(
    mask=mask, opt_state=pruning.update_mask(state.opt_state, mask), sparsity=jnp.float32(0.5)
  )
  round_key = jax.random.fold_in(jax.random.key(int(state.seed)), 0)
  aggs, after, metrics = {}, {}, {}
  for name, alg in (("dense", dense_alg), ("compact", compact_alg)):
    plan = alg.plan_round(state)
    assert plan.metrics["client_path"] == ("compact" if name == "compact" else "masked_dense")
    if name == "compact":  # 13 padding FFN units (as in the saliency test above)
      ffn = plan.client_input["params"]["encoder"]["block_0"]["ffn1"]["dense_in"]["kernel"]
      assert ffn.shape[1] == 77 and bool(plan.client_input["want_scores"])
    ex = build.shared_executors(_config()["engine"])(plan.program)
    agg, metrics[name] = ex(plan.client_input, _store(), CLIENTS, round_key)
    aggs[name] = agg if plan.finish is None else plan.finish(agg)
    after[name], server_metrics = jax.jit(alg.server_update)(state, aggs[name])
    metrics[name].update(jax.device_get(server_metrics))
  keep = pruning.dense_mask(state.mask, params)
  cut = 0  # kept entries some client voted out
  for d, c, m in zip(*(jax.tree.leaves(t) for t in (aggs["dense"].update["scores"],
                                                    aggs["compact"].update["scores"], keep))):  # fmt: skip
    d, c, m = np.asarray(d), np.asarray(c), np.asarray(m)
    np.testing.assert_allclose(c[m], d[m], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(c[~m], 0.0)  # a pruned entry scores 0: no client votes for it
    np.testing.assert_array_equal(d[~m], 0.0)
    cut += int(np.sum(d[m] < 1.0))
  assert cut > 1000  # the dense threshold falls among the kept entries: the votes rank them
  new = after["compact"]
  assert metrics["compact"]["mask_updated"] == 1.0
  assert float(pruning.sparsity(new.mask)) > 0.6
  for a, b in zip(jax.tree.leaves(after["dense"].mask), jax.tree.leaves(new.mask)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _close(new.params, after["dense"].params, 2e-5)
  _close(new.opt_state, after["dense"].opt_state, 2e-5)
  for key in ("train_loss", "num_examples", "sparsity", "revived_next", "mask_updated"):
    np.testing.assert_allclose(metrics["compact"][key], metrics["dense"][key], rtol=1e-5)
  # one more round from there, on the votes' mask: its votes update the mask again
  (dense_states, dense_hist), (compact_states, compact_hist) = (
    _run(alg, after[name], CLIENTS, 1)
    for name, alg in (("dense", dense_alg), ("compact", compact_alg))
  )
  assert [h["client_path"] for h in compact_hist] == ["compact"]
  assert compact_hist[0]["mask_updated"] == 1.0
  for a, b in zip(jax.tree.leaves(dense_states[-1].mask), jax.tree.leaves(compact_states[-1].mask)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _close(compact_states[-1].params, dense_states[-1].params, 2e-5)
  for key in ("train_loss", "num_examples", "sparsity", "revived_next", "mask_updated"):
    np.testing.assert_allclose(compact_hist[0][key], dense_hist[0][key], rtol=1e-5, atol=1e-6)
