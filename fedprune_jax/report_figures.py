"""The report's figures (``fedprune report``): PNGs drawn with matplotlib from the arms that
``report.collect`` gathers and the comparison rows of ``report.comparison_rows``.

* ``wer_vs_sparsity`` (F1): test WER vs target sparsity per pattern, the dense reference a line;
* ``cost_vs_sparsity`` (F2): client bytes down / up, FLOPs per local step and training memory vs
  sparsity;
* ``claims_forest``: every claim's paired difference with its speaker-bootstrap interval, coloured
  by its reading, one line per comparison of the paper's claims.
"""

from __future__ import annotations

import pathlib

from fedprune_jax import statistics as stats_lib


def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(
      "fedprune report draws its figures with matplotlib: pip install 'fedprune_jax[report]'"
    ) from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _by_pattern(arms: dict) -> dict[str, list[tuple[float, dict]]]:
  """pattern -> [(target sparsity, arm)] sorted by sparsity (arms named 'pattern@sparsity')."""
  out: dict[str, list] = {}
  for name, a in arms.items():
    if "@" in name and a["seeds"]:
      pattern, s = name.split("@")
      out.setdefault(pattern, []).append((float(s), a))
  return {k: sorted(v, key=lambda x: x[0]) for k, v in out.items()}


def wer_vs_sparsity(arms: dict, path: pathlib.Path) -> None:
  """F1: test WER vs target sparsity, one line per pattern, the dense reference dashed."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
  for pattern, points in _by_pattern(arms).items():
    stats = [stats_lib.mean_std([m["test_wer"] for m in a["seeds"].values()]) for _, a in points]
    ax.errorbar(
      [100 * s for s, _ in points],
      [100 * m for m, _, _ in stats],
      yerr=[100 * sd for _, sd, _ in stats],
      marker="o",
      capsize=3,
      label=pattern,
    )
  dense = arms.get("dense")
  if dense and dense["seeds"]:
    m, sd, _ = stats_lib.mean_std([x["test_wer"] for x in dense["seeds"].values()])
    ax.axhline(100 * m, color="k", linestyle="--", label=f"dense ({100 * m:.1f} ± {100 * sd:.1f})")
  ax.set_xlabel("target sparsity (%)")
  ax.set_ylabel("test WER (%)")
  ax.set_title("F1: WER vs sparsity (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  _legend_and_note(fig, ax)
  _save(fig, path)
  plt.close(fig)


# what our row and column patterns remove (the axis convention; experiments/configs/t1_pattern.py)
_AXIS_NOTE = (
  "Flax kernels W are [in, out]: column = an output neuron's fan-in, row = an input unit's fan-out"
)


def _legend_and_note(fig, ax) -> None:
  """One legend right of the plots (inside them it hid lines) and, when the patterns include rows
  or columns, what they are below; then a layout that keeps both inside the figure."""
  handles, labels = ax.get_legend_handles_labels()
  legend = fig.legend(handles, labels, loc="center right", fontsize=8)
  bottom = 0.0
  if {"row", "column", "half_row", "half_column"} & set(labels):  # labels: the pattern names
    fig.text(0.5, 0.01, _AXIS_NOTE, ha="center", va="bottom", fontsize=7)
    bottom = 0.05
  fig.canvas.draw()
  legend_width = legend.get_window_extent().width / fig.bbox.width
  fig.tight_layout(rect=(0, bottom, 1 - legend_width - 0.01, 1))


def cost_vs_sparsity(arms: dict, path: pathlib.Path) -> None:
  """F2: per-client cost per round vs target sparsity, one line per pattern: bytes actually sent,
  FLOPs of a local step of the model actually trained and the measured training memory (older
  runs without them: the masked-dense estimates)."""
  plt = _pyplot()
  panels = (
    ("bytes_down_sent", "bytes down / client / round (MB)", 1e-6),
    ("bytes_up_sent", "bytes up / client / round (MB)", 1e-6),
    ("client_flops_per_step", "client GFLOP / local step (executed)", 1e-9),
    ("client_train_memory_bytes", "client training memory (MB, measured)", 1e-6),
  )
  fallback = {
    "bytes_down_sent": "bytes_down_masked",
    "bytes_up_sent": "bytes_up",
    "client_flops_per_step": "client_flops_per_step_sparse",
  }
  dense_of = {
    "bytes_down_sent": "bytes_down_dense",
    "bytes_up_sent": "bytes_down_dense",
    "client_flops_per_step": "client_flops_per_step_dense",
    "client_train_memory_bytes": None,
  }

  def value(m: dict, key: str):
    return m.get(key) if m.get(key) is not None else m.get(fallback.get(key, ""))

  fig, axes = plt.subplots(2, 2, figsize=(8, 6), dpi=110)
  for ax, (key, label, scale) in zip(axes.flat, panels):
    for pattern, points in _by_pattern(arms).items():
      xs, ys = [], []
      first = next(iter(points[0][1]["seeds"].values()))
      if dense_of[key] and first.get(dense_of[key]) is not None:
        xs.append(0.0)
        ys.append(first[dense_of[key]] * scale)
      for s, a in points:
        values = [value(m, key) for m in a["seeds"].values() if value(m, key) is not None]
        if values:
          xs.append(100 * s)
          ys.append(stats_lib.mean_std(values)[0] * scale)
      ax.plot(xs, ys, marker="o", label=pattern)
    ax.set_xlabel("target sparsity (%)")
    ax.set_ylabel(label, fontsize=8)
    ax.grid(alpha=0.3)
  fig.suptitle("F2: client cost vs sparsity")
  _legend_and_note(fig, axes.flat[0])
  _save(fig, path)
  plt.close(fig)


# a reading's first word -> its colour in the claims figure
_READING_COLOURS = {"reproduces": "tab:green", "does": "tab:red", "inconclusive": "tab:gray"}


def claims_forest(rows: list[dict], path: pathlib.Path) -> None:
  """The paper's claims: each comparison's mean paired difference a - b of test WER (points) with
  its 95% speaker-bootstrap interval (a bare point where there is none), coloured by its reading,
  hollow while provisional (``report.comparison_rows``), the equivalence margin shaded for
  "similar" claims.

  Args:
    rows: ``report.comparison_rows``: dicts with ``table``, ``claim``, ``mean``, ``interval`` (a pair
      or None), ``n``, ``planned``, ``provisional``, ``expect``, ``margin`` and ``reading``; rows
      with ``n`` = 0 are left out.
  """
  rows = [r for r in rows if r["n"] > 0]
  labels = [f"{r['table']}: {r['claim']} (n={r['n']}/{r['planned']})" for r in reversed(rows)]
  plt = _pyplot()
  height = 0.45 * len(rows) + 1.6
  fig, ax = plt.subplots(figsize=(10, height), dpi=110)
  for y, r in enumerate(reversed(rows)):
    colour = _READING_COLOURS.get(r["reading"].split(" ")[0].rstrip(":"), "tab:gray")
    mean = 100 * r["mean"]
    if r["interval"] is not None:
      lo, hi = (100 * x for x in r["interval"])
      ax.plot([lo, hi], [y, y], color=colour, linewidth=2)
    hollow = r["provisional"]
    ax.plot([mean], [y], "o", color=colour, markerfacecolor="white" if hollow else colour)
    if r["expect"] == "equivalent":
      ax.fill_betweenx([y - 0.3, y + 0.3], -100 * r["margin"], 100 * r["margin"], alpha=0.15)
  ax.axvline(0, color="k", linewidth=0.8)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels(labels, fontsize=7)
  ax.set_xlabel("a - b, test WER points (95% speaker bootstrap)")
  fig.suptitle(  # over the whole figure: the plot alone is narrower than the title
    "The paper's claims: green reproduces, red does not, grey inconclusive; hollow: provisional",
    fontsize=9,
  )
  ax.grid(axis="x", alpha=0.3)
  # as wide as the longest claim's label (measured once drawn) plus 5 inches for the plot
  fig.canvas.draw()
  label_width = max(t.get_window_extent().width for t in ax.get_yticklabels()) / fig.dpi
  fig.set_size_inches(label_width + 5.0, height)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def _save(fig, path: pathlib.Path) -> None:
  tmp = path.with_name(path.name + ".tmp.png")
  fig.savefig(tmp)
  tmp.replace(path)


FIGURES = {"wer_vs_sparsity": wer_vs_sparsity, "cost_vs_sparsity": cost_vs_sparsity}
