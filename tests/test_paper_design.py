"""The paper's experiment designs, asserted from their resolved run configs: T2 without the
refinement confound, T1's structured include list, T6's equal budgets and its accent-shifted,
reproducible, disjoint server split."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedprune_jax import pruning, speaker_split, suite, task, warm_start
from fedprune_jax.algorithms import build
from fedprune_jax.errors import ConfigError


def _by_arm(name: str, quick: bool = False) -> dict:
  specs = suite.expand(suite.load_experiment(name), quick=quick, seeds=[0], splits=[0])
  return {s.arm.name: s.config for s in specs}


def test_t2_scores_resolve_to_no_refinement():
  arms = _by_arm("t2_score")
  for score in ("magnitude", "random", "saliency", "update"):
    p = build.resolve_pruning(arms[score].pruning)
    assert p["score"] == score and p["refinement"] == "none" and p["target_sparsity"] == 0.7
  # the sub-comparison: each score also refines (random has no refinement of its own)
  refined = {n: build.resolve_pruning(c.pruning) for n, c in arms.items() if "+refine" in n}
  assert {n: (p["score"], p["refinement"]) for n, p in refined.items()} == {
    "magnitude+refine": ("magnitude", "server"),
    "saliency+refine": ("saliency", "client"),
    "update+refine": ("update", "client"),
  }


def test_t1_structured_arms_prune_the_documented_kernels():
  arms = _by_arm("t1_pattern", quick=True)
  cfg = arms["column@0.5"]
  params = task.make_model(cfg).init(jax.random.key(0))
  structured = {
    name
    for name, c in arms.items()
    if c.get("pruning") is not None
    and tuple(build.resolve_pruning(c.pruning)["exclude"]) == pruning.STRUCTURED_EXCLUDE
  }
  assert structured == {
    f"{p}@{s}" for p in ("row", "half_row", "column", "half_column") for s in (0.5, 0.7, 0.8)
  }
  policy = build.policy_from_config(build.resolve_pruning(cfg.pruning))
  kept = {p for p, m in pruning.flatten_with_paths(policy.init_mask(params)) if m is not None}
  for path in kept:  # no subsampling, input projection or residual-stream writer
    assert "subsample/" not in path
    assert not any(w in path for w in ("dense_out/", "mhsa/out/", "pointwise_out/")), path
  expected = {
    "ffn1/dense_in",
    "ffn2/dense_in",
    "mhsa/query",
    "mhsa/key",
    "mhsa/value",
    "mhsa/pos",
    "conv/pointwise_in",
    "conv/depthwise",
  }
  assert {"/".join(p.split("/")[2:4]) for p in kept} == expected
  # unstructured keeps the default list: the input projection is pruned there
  policy = build.policy_from_config(build.resolve_pruning(arms["unstructured@0.5"].pruning))
  kept = {p for p, m in pruning.flatten_with_paths(policy.init_mask(params)) if m is not None}
  assert "encoder/subsample/proj/kernel" in kept
  assert arms["units@0.5"].pruning.pattern == "units"


def test_t6_arms_have_equal_budgets_and_schedules():
  for quick in (False, True):
    arms = _by_arm("t6_data", quick=quick)
    fed = {n: c for n, c in arms.items() if n in ("dense", "federated", "federated_saliency")}
    central = {n: c for n, c in arms.items() if n.startswith("central_")}
    assert len(fed) == 3 and len(central) == 2
    budget = {
      (c.rounds, c.cohort_size, c.data.max_steps, c.data.batch_size, c.client.num_epochs)
      for c in fed.values()
    }
    assert len(budget) == 1  # same client examples; one server update a round
    (rounds, cohort, steps, batch, _) = budget.pop()
    if not quick:  # longer than the setting's 80 rounds: the dense reference's gate (README)
      assert rounds == 100 and suite.setting_config("small").rounds == 80
      assert fed["federated"].pruning.pruning_rounds == 50
    for c in central.values():  # as many examples, the same schedule keyed by rounds
      per_round = c.baseline.steps_per_round or c.cohort_size * c.data.max_steps
      assert (c.rounds, per_round, c.baseline.batch_size) == (rounds, cohort * steps, batch)
    schedules = set()
    for c in [*central.values(), fed["federated"], fed["federated_saliency"]]:
      p = build.resolve_pruning(c.pruning)
      schedules.add(
        tuple(
          p[k]
          for k in (
            "target_sparsity",
            "schedule",
            "pruning_rounds",
            "update_every",
            "refining_rounds",
            "refinement",
            "begin_round",
            "mask_path",
          )
        )
      )
    assert len(schedules) == 1 and schedules.pop()[5] == "none"
    assert build.resolve_pruning(fed["federated_saliency"].pruning)["score"] == "saliency"
    # one warm start on the server's (scarce, accent-shifted) data
    assert len({c.warm_start.path for c in arms.values()}) == 1
    assert all(c.data.server_accents == ("en-us", "en-us-nyc") for c in arms.values())


SPEAKERS_TXT = """\
; synthetic
;ID  |SEX| SUBSET           |MINUTES| NAME
1000 | F | train            |  1.61 | espeak en+f1 rate=142 pitch=38 range=64 clean
1001 | F | train            |  1.30 | espeak en-us-nyc+f4 rate=191 pitch=40 range=67 snr=29dB
1002 | M | train            |  1.63 | espeak en-us+m1 rate=148 pitch=54 range=66 snr=17dB
1003 | M | train            |  1.66 | espeak en-gb-x-gbcwmd+m1 rate=140 pitch=35 range=45 clean
1004 | M | dev              |  1.73 | espeak en-029+m4 rate=155 pitch=74 range=35 clean
1005 | M | train            |  1.63 | espeak en-us+m2 rate=148 pitch=54 range=66 clean
1006 | F | train            |  1.63 | espeak en-us+f2 rate=148 pitch=54 range=66 clean
1007 | F | train            |  1.63 | espeak en+f3 rate=148 pitch=54 range=66 clean
"""


def test_accent_shifted_server_split_is_reproducible_and_disjoint(tmp_path):
  (tmp_path / "SPEAKERS.TXT").write_text(SPEAKERS_TXT)
  cfg = suite.load_experiment("t6_data").base
  cfg.data.root = str(tmp_path)
  eligible = speaker_split.server_eligible(cfg)
  assert eligible == ["1001", "1002", "1005", "1006"]  # en-us and en-us-nyc voices

  class FS:
    def speaker_indices(self):
      return {
        s: np.array([i])
        for i, s in enumerate(["1000", "1001", "1002", "1003", "1005", "1006", "1007"])
      }

  servers = set()
  for seed in range(6):
    server, clients = speaker_split.split_speakers(FS(), 2, seed, eligible)
    assert (server, clients) == speaker_split.split_speakers(
      FS(), 2, seed, eligible
    )  # reproducible
    assert len(server) == 2 and set(server) <= set(eligible)
    assert not set(server) & set(clients)
    assert sorted(server + clients) == sorted(FS().speaker_indices())
    servers.add(tuple(server))
  assert len(servers) > 1  # the split seed draws different server speakers
  with pytest.raises(ConfigError, match="4 of the server's accents"):
    speaker_split.split_speakers(FS(), 5, 0, eligible)
  cfg.data.server_accents = ("en-xx",)
  with pytest.raises(ConfigError, match="'en-xx' is no accent of the corpus"):
    speaker_split.server_eligible(cfg)
  (tmp_path / "SPEAKERS.TXT").write_text(
    ";ID|SEX|SUBSET|MINUTES|NAME\n19 | F | train | 1.0 | Ann\n"
  )
  with pytest.raises(Exception, match="no synthetic voices"):
    speaker_split.server_eligible(cfg)


def test_warm_start_dev_wer_is_read_or_evaluated_once(tmp_path):
  """The regime gate's warm start WER: from the warm start's own final evaluation if it has one,
  else evaluated once and recorded beside it."""
  import json  # pylint: disable=g-import-not-at-top

  calls = []

  def evaluate():
    calls.append(1)
    return {"dev_wer": 0.6, "dev_cer": 0.3}

  ws = tmp_path / "warm_start"
  history = [{"step": 100, "loss": 2.0, "dev_wer": 0.8, "dev_cer": 0.4}, {"step": 200, "loss": 1.0}]
  (tmp_path / "warm_start.json").write_text(json.dumps({"history": history}))
  assert warm_start.dev_metrics(str(ws), evaluate) == {
    "dev_wer": 0.6,
    "dev_cer": 0.3,
  }  # step 100 is stale
  assert warm_start.dev_metrics(str(ws), evaluate)["dev_wer"] == 0.6 and len(calls) == 1  # recorded
  history[-1].update(dev_wer=0.5, dev_cer=0.2)
  (tmp_path / "warm_start.json").write_text(json.dumps({"history": history}))
  assert warm_start.dev_metrics(str(ws), evaluate) == {"dev_wer": 0.5, "dev_cer": 0.2}
  assert len(calls) == 1
  assert warm_start.dev_metrics(None, evaluate) is None
  # another run's checkpoint as the warm start: evaluated, nothing written beside it
  assert warm_start.dev_metrics(str(tmp_path / "checkpoint"), evaluate)["dev_wer"] == 0.6
  assert not (tmp_path / "checkpoint.json").exists()


def test_t1_structured_and_units_arms_run_and_spare_the_excluded_kernels(tiny_corpus, tmp_path):
  """Quick column@0.5 and units@0.5 of T1 through the real job: the column arm's mask prunes
  only the structured include list's kernels, whole columns of them."""
  from test_suite import TEST_SETS  # pylint: disable=g-import-not-at-top

  t1 = suite.load_experiment("t1_pattern")
  arms = tuple(a for a in t1.arms if a.name in ("column@0.5", "units@0.5"))
  experiment = suite.Experiment(
    name="t1_check", title="t1", question="?", base=t1.base, arms=arms, reference="column@0.5"
  )
  index = suite.run_experiment(
    experiment,
    tmp_path,
    quick=True,
    overrides=TEST_SETS + [f"data.root={tiny_corpus}"],
    progress=False,
    log=lambda s: None,
  )
  assert [r["state"] for r in index["runs"]] == ["done", "done"], index["runs"]
  column = tmp_path / index["runs"][0]["dir"]
  with np.load(column / "mask.npz") as flat:
    masks = {k: flat[k] for k in flat.files}
  pruned = {k for k, m in masks.items() if not m.all()}
  assert pruned and not any(
    w in k for k in pruned for w in ("subsample/", "dense_out/", "mhsa/out/", "pointwise_out/")
  )
  for k in pruned:  # whole columns (an output neuron's fan-in) of the [prod(in), out] view
    m = masks[k].reshape(-1, masks[k].shape[-1])
    assert (m.all(axis=0) | ~m.any(axis=0)).all(), k
