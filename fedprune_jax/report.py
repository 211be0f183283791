"""``fedprune report RUNS``: markdown tables and PNG plots from a suite's ``results.json`` files.

Reads every experiment index ``RUNS/<experiment>[_quick].json`` written by ``suite.run_experiment``
(also while the suite is still running: pending runs are left out and the seed count ``n`` says
how many finished), and renders per experiment:

* a table of mean +- std over seeds of test WER (and dev WER, dev CER, sparsity) per arm; an
  experiment whose arms have a column label (T1) is pivoted to rows x columns;
* its comparisons: the paired (same seed) difference ``a - b`` of test WER, mean +- std over
  seeds, with a verdict from a two-sided paired t-test over seeds (p < 0.05: the sign is read as
  an effect; otherwise "within noise"; with 2 seeds only |t| > 12.7 is an effect, with 3 |t| > 4.3);
* its figures: ``wer_vs_sparsity`` (F1: test WER vs target sparsity per pattern, the dense
  reference as a line) and ``cost_vs_sparsity`` (F2: client bytes down / up, FLOPs per local step
  and training memory vs sparsity).
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
from typing import Any

from scipy import stats as scipy_stats

from fedprune_jax import io_utils

METRICS = ("test_wer", "dev_wer", "dev_cer", "sparsity")
ALPHA = 0.05  # significance level of the paired comparisons


def load_indexes(runs_dir: pathlib.Path) -> list[dict]:
  """The experiment indexes in ``runs_dir`` (sorted by name)."""
  indexes = []
  for path in sorted(runs_dir.glob("*.json")):
    try:
      data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: not a readable experiment index ({e})") from e
    if isinstance(data, dict) and "experiment" in data and "runs" in data:
      indexes.append(data)
  return indexes


def run_metrics(results: dict) -> dict[str, float]:
  """The numbers the report uses from one run's ``results.json``."""
  final, train = results["final"], results["train"]
  history = results.get("history") or [{}]
  last = history[-1]
  out = {
    "test_wer": final["test"]["wer"],
    "dev_wer": final["dev"]["wer"],
    "dev_cer": final["dev"]["cer"],
    "test_cer": final["test"]["cer"],
    "sparsity": train.get("sparsity", 0.0),
    "nonzero_params": train.get("nonzero_params"),
    "num_params": train.get("num_params"),
  }
  for key in ("bytes_down_masked", "bytes_down_dense", "bytes_up", "client_train_memory_bytes"):
    out[key] = train.get(f"last_{key}")
  for key in ("bytes_down_sent", "bytes_up_sent"):  # what was sent (compacted or masked)
    out[key] = train.get(f"last_{key}")
  for key in (
    "client_flops_per_step",
    "client_flops_per_step_sparse",
    "client_flops_per_step_dense",
  ):
    out[key] = last.get(key)
  return out


def collect(runs_dir: pathlib.Path, index: dict) -> dict[str, dict]:
  """arm -> {row, col, report, seeds: {seed: metrics}, seconds: [...]} for the done runs."""
  arms: dict[str, dict] = {}
  for entry in index["runs"]:
    arm = arms.setdefault(
      entry["arm"],
      {
        "row": entry["row"],
        "col": entry["col"],
        "report": entry["report"],
        "seeds": {},
        "seconds": [],
      },
    )
    path = runs_dir / entry["dir"] / "results.json"
    if entry["state"] != "done" and not path.exists():
      continue
    results = json.loads(path.read_text(encoding="utf-8"))
    arm["seeds"][entry["seed"]] = run_metrics(results)
    if entry.get("seconds") is not None:
      arm["seconds"].append(entry["seconds"])
  return arms


def mean_std(values: list[float]) -> tuple[float, float, int]:
  """(mean, sample std (0 for one value), n)."""
  n = len(values)
  if n == 0:
    return math.nan, math.nan, 0
  return statistics.fmean(values), statistics.stdev(values) if n > 1 else 0.0, n


def _fmt(values: list[float], percent: bool = True) -> str:
  mean, std, n = mean_std(values)
  if n == 0:
    return "-"
  scale = 100.0 if percent else 1.0
  if n == 1:  # no spread to show from one seed
    return f"{mean * scale:.1f}"
  return f"{mean * scale:.1f} ± {std * scale:.1f}"


def paired(arms: dict, a: str, b: str, metric: str) -> dict[str, Any]:
  """Paired-by-seed difference a - b: mean, std, n, t and a verdict."""
  sa, sb = arms[a]["seeds"], arms[b]["seeds"]
  diffs = [sa[s][metric] - sb[s][metric] for s in sorted(set(sa) & set(sb))]
  mean, std, n = mean_std(diffs)
  t = mean / (std / math.sqrt(n)) if n > 1 and std > 0 else math.nan
  # two-sided paired t-test with n - 1 degrees of freedom
  p = 2.0 * float(scipy_stats.t.sf(abs(t), n - 1)) if not math.isnan(t) else math.nan
  if n < 2:
    verdict = "needs >= 2 seeds"
  elif math.isnan(p) or p >= ALPHA:
    verdict = "within noise" if math.isnan(p) else f"within noise (p = {p:.2f})"
  else:
    shown = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    verdict = f"{a} {'higher' if mean > 0 else 'lower'} ({shown})"
  return {"mean": mean, "std": std, "n": n, "t": t, "p": p, "verdict": verdict}


def experiment_markdown(index: dict, arms: dict) -> str:
  lines = [f"### {index['title']}{' (quick)' if index.get('quick') else ''}", ""]
  if index.get("question"):
    lines += [f"Question: {index['question']}", ""]
  shown = {name: a for name, a in arms.items() if a["report"]}
  if any(a["col"] for a in shown.values()) and index.get("col_title"):
    lines += _pivot(index, shown)
  else:
    lines += [
      f"| {index.get('row_title') or 'arm'} | test WER % | dev WER % | dev CER % | sparsity % "
      "| seeds | run wall time (s) |",
      "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for a in shown.values():
      cells = [_fmt([m[k] for m in a["seeds"].values()]) for k in METRICS]
      secs = mean_std(a["seconds"])[0] if a["seconds"] else math.nan
      lines.append(
        f"| {a['row']} | {' | '.join(cells)} | {len(a['seeds'])} | "
        f"{'-' if math.isnan(secs) else f'{secs:.0f}'} |"
      )
  if index.get("comparisons"):
    lines += ["", "| comparison (test WER, paired by seed) | a - b (points) | seeds | reading |"]
    lines += ["|---|---:|---:|---|"]
    for c in index["comparisons"]:
      p = paired(arms, c["a"], c["b"], c["metric"])
      diff = "-" if p["n"] == 0 else f"{p['mean'] * 100:+.1f}"
      if p["n"] > 1:
        diff += f" ± {p['std'] * 100:.1f}"
      lines.append(f"| {c['claim']} | {diff} | {p['n']} | {p['verdict']} |")
  total = sum(sum(a["seconds"]) for a in arms.values())
  runs = sum(len(a["seeds"]) for a in arms.values())
  timing = f"{runs} runs done; their wall time adds up to {total / 60:.1f} min"
  last = index.get("last_invocation")
  if last:  # runs side by side (--workers) take less wall time than their sum
    timing += (
      f"; the latest `fedprune experiment` of this table took {last['wall_seconds'] / 60:.1f} min"
      f" with {last['workers']} worker{'s' if last['workers'] > 1 else ''}"
    )
  lines += ["", timing + ".", ""]
  return "\n".join(lines)


def _pivot(index: dict, shown: dict) -> list[str]:
  cols = list(dict.fromkeys(a["col"] for a in shown.values() if a["col"]))
  rows = list(dict.fromkeys(a["row"] for a in shown.values()))
  head = f"| {index.get('row_title', '')} \\ {index['col_title']} | " + " | ".join(cols) + " |"
  lines = [
    "test WER %, mean ± std over seeds:",
    "",
    head,
    "|---|" + "---:|" * len(cols),
  ]
  for row in rows:
    cells = []
    for col in cols:
      match = [a for a in shown.values() if a["row"] == row and a["col"] == col]
      cells.append(_fmt([m["test_wer"] for m in match[0]["seeds"].values()]) if match else "")
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  return lines


# --- figures -------------------------------------------------------------------------------------


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
    stats = [mean_std([m["test_wer"] for m in a["seeds"].values()]) for _, a in points]
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
    m, sd, _ = mean_std([x["test_wer"] for x in dense["seeds"].values()])
    ax.axhline(100 * m, color="k", linestyle="--", label=f"dense ({100 * m:.1f} ± {100 * sd:.1f})")
  ax.set_xlabel("target sparsity (%)")
  ax.set_ylabel("test WER (%)")
  ax.set_title("F1: WER vs sparsity (mean ± std over seeds)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


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
          ys.append(mean_std(values)[0] * scale)
      ax.plot(xs, ys, marker="o", label=pattern)
    ax.set_xlabel("target sparsity (%)")
    ax.set_ylabel(label, fontsize=8)
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  fig.suptitle("F2: client cost vs sparsity")
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def _save(fig, path: pathlib.Path) -> None:
  tmp = path.with_name(path.name + ".tmp.png")
  fig.savefig(tmp)
  tmp.replace(path)


FIGURES = {"wer_vs_sparsity": wer_vs_sparsity, "cost_vs_sparsity": cost_vs_sparsity}


def render(runs_dir: str | pathlib.Path, out_dir: str | pathlib.Path | None = None) -> str:
  """Writes ``OUT/report.md`` and the figures' PNGs (default OUT: ``RUNS/report``); returns the
  markdown."""
  runs_dir = pathlib.Path(runs_dir)
  if not runs_dir.is_dir():
    raise FileNotFoundError(f"runs directory {str(runs_dir)!r} does not exist")
  out = pathlib.Path(out_dir) if out_dir else runs_dir / "report"
  out.mkdir(parents=True, exist_ok=True)
  indexes = load_indexes(runs_dir)
  if not indexes:
    raise FileNotFoundError(
      f"{runs_dir}: no experiment index (<experiment>.json); run `fedprune experiment` first"
    )
  parts = [f"## Results ({runs_dir})", ""]
  for index in indexes:
    arms = collect(runs_dir, index)
    parts.append(experiment_markdown(index, arms))
    stem = index["experiment"] + ("_quick" if index.get("quick") else "")
    for figure in index.get("figures", []):
      if any(a["seeds"] for a in arms.values()):
        png = out / f"{stem}_{figure}.png"
        FIGURES[figure](arms, png)
        parts.append(f"![{figure}]({png.name})\n")
  text = "\n".join(parts)
  io_utils.write_text_atomic(out / "report.md", text)
  return text
