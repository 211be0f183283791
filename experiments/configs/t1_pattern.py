"""T1 (and figures F1, F2): pruning pattern x target sparsity, against the dense reference.

Axis convention: Flax kernels are ``[in, out]`` (``y = x W``). Our **column** ``W[:, j]`` is the
**fan-in** of output neuron j (a *row* of the matrix under the ``y = W x``, ``[out, in]``,
convention); our **row** ``W[i, :]`` is the **fan-out** of input unit i (a *column* under
``y = W x``). The paper's "column beats row" is compared under both conventions.

Structured arms (rows, columns, half rows, half columns) prune every kernel except those of
``pruning.STRUCTURED_EXCLUDE``: the subsampling convs and the input projection, and every matrix
that writes into the d_model residual stream (``dense_out``, ``mhsa/out``, ``pointwise_out``), so
a row or column removes a hidden neuron, an attention channel or a conv channel, not the model's
width; unstructured arms prune every kernel (``pruning.DEFAULT_INCLUDE``/``DEFAULT_EXCLUDE``).
``units`` removes whole FFN neurons, attention heads and conv channels (pruning/units.py).

Run: fedprune experiment t1_pattern [--quick] ; report: fedprune report RUNS
"""

from fedprune_jax import pruning, suite

PATTERNS = ("unstructured", "row", "half_row", "column", "half_column", "units")
STRUCTURED = ("row", "half_row", "column", "half_column")
SPARSITIES = (0.5, 0.7, 0.8)
# the report's row labels: which axis each pattern removes, under both conventions
LABELS = {
  "unstructured": "unstructured",
  "row": "row [ours] = fan-out of an input unit = column of W in y = Wx",
  "half_row": "half-row [ours] = half a fan-out = half-column of W in y = Wx",
  "column": "column [ours] = fan-in of an output neuron = row of W in y = Wx",
  "half_column": "half-column [ours] = half a fan-in = half-row of W in y = Wx",
  "units": "units (FFN neurons, attention heads, conv channels)",
}


def _overrides(pattern: str, sparsity: float) -> dict:
  out = {"pruning.pattern": pattern, "pruning.target_sparsity": sparsity}
  if pattern in STRUCTURED:
    out["pruning.exclude"] = list(pruning.STRUCTURED_EXCLUDE)
  return out


def _both_conventions(s: float, fan_in: str, fan_out: str) -> tuple:
  """The paper's "column beats row" for our ``fan_in`` pattern against ``fan_out`` at ``s``,
  under each axis convention."""
  pct, claim = f"{s:.0%}", f"{fan_in} beats {fan_out}".replace("_", "-")
  return (
    suite.Comparison(
      f"{claim}, [in, out] convention: fan-in - fan-out at {pct} (negative: reproduces)",
      f"{fan_in}@{s}",
      f"{fan_out}@{s}",
      expect="lower",
    ),
    suite.Comparison(
      f"{claim}, y = Wx convention: fan-out - fan-in at {pct} (negative: reproduces)",
      f"{fan_out}@{s}",
      f"{fan_in}@{s}",
      expect="lower",
    ),
  )


def get_experiment(setting: str = "small") -> suite.Experiment:
  arms = [suite.Arm("dense", {"pruning": None}, row="dense", col="0")]
  for pattern in PATTERNS:
    for s in SPARSITIES:
      arms.append(
        suite.Arm(f"{pattern}@{s}", _overrides(pattern, s), row=LABELS[pattern], col=f"{s:.0%}")
      )
  include = ", ".join(pruning.DEFAULT_INCLUDE)
  excluded = ", ".join(pruning.STRUCTURED_EXCLUDE)
  return suite.Experiment(
    name="t1_pattern",
    title="T1: pruning pattern x sparsity",
    question="WER rises with sparsity; column-wise pruning beats row-wise pruning; at moderate "
    "sparsity the pruned model is similar to the full model.",
    base=suite.setting_config(setting),
    arms=tuple(arms),
    row_title="pattern",
    col_title="target sparsity",
    # the paper's claims in order (their runs start in this order: suite.run_experiment)
    comparisons=(
      suite.Comparison(
        "unstructured 80% - 50% (positive: WER rises with sparsity)",
        "unstructured@0.8",
        "unstructured@0.5",
        expect="higher",
      ),
      *_both_conventions(0.5, "column", "row"),
      *_both_conventions(0.7, "column", "row"),
      *_both_conventions(0.5, "half_column", "half_row"),
      suite.Comparison(
        "unstructured 50% - dense (similar to the full model: within the margin)",
        "unstructured@0.5",
        "dense",
        expect="equivalent",
      ),
    ),
    figures=("wer_vs_sparsity", "cost_vs_sparsity"),
    notes=(
      f"Prunable params: kernels matching {include}; structured patterns (rows, columns and "
      f"their halves) exclude {excluded}; unstructured excludes "
      f"{', '.join(pruning.DEFAULT_EXCLUDE)}. Our column = fan-in of an output neuron (a row "
      "of W under y = Wx); our row = fan-out of an input unit (a column under y = Wx).",
    ),
    **suite.PAPER_REPLICATES,
  )
