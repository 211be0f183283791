"""Tests for fedprune_jax.bench.{peak,flops,step} (micro configs, no timing asserts)."""

from __future__ import annotations

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from fedprune_jax.models import flops as flops_lib
from fedprune_jax.bench import peak as peak_lib
from fedprune_jax.bench import step as step_lib
from fedprune_jax.models import asr
from fedprune_jax.models import conformer

MICRO = dict(
  d_model=16,
  num_layers=1,
  num_heads=2,
  conv_kernel=3,
  conv_groups=2,
  subsample_channels=4,
  input_dim=16,
)


def _jaxpr_matmul_conv_flops(jaxpr) -> float:
  """Brute-force count: 2 x MACs of every dot_general / conv in a jaxpr."""
  total = 0.0
  for eqn in jaxpr.eqns:
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += _jaxpr_matmul_conv_flops(sub)
    if eqn.primitive.name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
    elif eqn.primitive.name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      dn = eqn.params["dimension_numbers"]
      in_feat = rhs[dn.rhs_spec[1]]
      spatial = math.prod(rhs[i] for i in dn.rhs_spec[2:])
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * in_feat * spatial
  return total


def test_analytic_flops_match_jaxpr_count():
  model = asr.make_asr_model("tiny", **MICRO)
  params = model.init(jax.random.PRNGKey(0))
  for frames in (37, 64):
    batch = step_lib.synthetic_batch(3, frames, input_dim=16)
    jaxpr = jax.make_jaxpr(lambda p: model.logits(p, batch)[0])(params)
    # The depthwise conv is shift-and-add (elementwise ops): add its MACs.
    t_out = jax.eval_shape(lambda p: model.logits(p, batch)[0], params).shape[1]
    depthwise = model.config.num_layers * 2 * 3 * t_out * 3 * 16
    counted = _jaxpr_matmul_conv_flops(jaxpr.jaxpr) + depthwise
    analytic = flops_lib.conformer_flops(model.config, 3, frames, train=False)
    assert counted == analytic, (frames, counted, analytic)
    assert flops_lib.conformer_flops(model.config, 3, frames, train=True) == 3 * analytic


def test_jit_flops_of_a_matmul():
  a = jnp.ones((32, 48))
  b = jnp.ones((48, 16))
  got = flops_lib.jit_flops(lambda x, y: x @ y, a, b)
  assert got is None or got == 2 * 32 * 48 * 16


def test_cost_analysis_flops_accepts_dict_list_none():
  class Fake:
    def __init__(self, ca):
      self.ca = ca

    def cost_analysis(self):
      return self.ca

  assert flops_lib.cost_analysis_flops(Fake({"flops": 5.0})) == 5.0
  assert flops_lib.cost_analysis_flops(Fake([{"flops": 2.0}, {"flops": 3.0}])) == 5.0
  assert flops_lib.cost_analysis_flops(Fake(None)) is None


def test_matmul_peak_is_positive():
  flop_s = peak_lib.measure_matmul_peak(jnp.float32, n=64, repeats=2)
  assert np.isfinite(flop_s) and flop_s > 0


def test_run_micro_config(capsys):
  rows = step_lib.run(["tiny"], batch_size=2, frames=24, steps=2, peak_n=64, config_overrides=MICRO)
  (row,) = rows
  assert row["preset"] == "tiny" and row["batch_size"] == 2 and row["frames"] == 24
  cfg = asr.make_asr_model("tiny", **MICRO).config
  assert row["params"] == conformer.analytic_param_count(cfg, vocab_size=29)
  assert np.isfinite(row["loss"])
  assert row["model_flops"] == flops_lib.conformer_flops(cfg, 2, 24, train=True)
  assert row["step_s"] > 0 and row["model_vs_peak"] > 0
  assert "| tiny |" in capsys.readouterr().out


def test_run_ctc_and_rnnt_heads_side_by_side(capsys):
  rows = step_lib.run(
    ["tiny"],
    batch_size=2,
    frames=24,
    steps=1,
    peak_n=64,
    config_overrides=MICRO,
    heads=["ctc", "rnnt"],
    labels=5,
  )
  ctc, rnnt = rows
  assert (ctc["head"], rnnt["head"]) == ("ctc", "rnnt") and rnnt["labels"] == 5
  assert rnnt["params"] > ctc["params"]
  assert rnnt["step_vs_ctc"] == rnnt["step_s"] / ctc["step_s"]
  assert rnnt["memory_vs_ctc"] == rnnt["memory_bytes"] / ctc["memory_bytes"] > 1.0
  assert "step_vs_ctc" not in ctc
  assert "| tiny | rnnt |" in capsys.readouterr().out
