"""``fedprune report RUNS``: markdown tables and PNG plots from a suite's ``results.json`` files.

Reads every experiment index ``RUNS/<experiment>[_quick].json`` written by ``suite.run_experiment``
(also while the suite is still running: pending runs are left out and the seed count ``n`` says
how many finished), and renders per experiment:

* a table of mean +- std over seeds of test WER (and dev WER, dev CER, sparsity) per arm; an
  experiment whose arms have a column label (T1) is pivoted to rows x columns;
* the regime gate (``fedprune_jax.statistics``): does dense federated training improve dev WER
  over its warm start by >= 10 points, is the dense reference <= 35% dev WER, is any arm of a
  comparison a broken model (>= 90% WER); a table out of regime reads "inconclusive";
* its comparisons: the paired (same replicate: split and seed) difference ``a - b`` of test WER,
  mean +- std, a speaker-level bootstrap interval, the paired t-test and the TOST equivalence test
  (each Holm-corrected over the table's comparisons, a comparison and its mirror ``b - a`` counted
  once), and the reading of the paper's claim (provisional while a comparison has fewer
  replicates than planned, or while the unfinished ones can still change it through Holm);
* its figures (``report_figures``): ``wer_vs_sparsity`` (F1) and ``cost_vs_sparsity`` (F2);

and then every comparison that states a claim of the paper in one table, with its replicates done
of those planned (a reading on fewer is marked provisional), the tables not run yet, a figure of
the claims' effects and intervals, and each table's wall time and gate values.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any


from fedprune_jax import io_utils
from fedprune_jax import report_figures
from fedprune_jax import statistics as stats_lib
from fedprune_jax import suite_index
from fedprune_jax import workdir as workdir_lib
from fedprune_jax.experiments_def import EXPERIMENTS
from fedprune_jax.errors import InputError

METRICS = ("test_wer", "dev_wer", "dev_cer", "sparsity")


def run_metrics(results: dict) -> dict[str, Any]:
  """The numbers the report uses from one run's ``results.json``."""
  final, train = results["final"], results["train"]
  environment = results.get("environment") or {}
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
    "warm_start_dev_wer": train.get("warm_start_dev_wer"),
    "test_speakers": final["test"].get("speakers"),
    # runs written before the environment was recorded ran on this project's CPU machines
    "platform": environment.get("platform", "cpu"),
    "device_kind": environment.get("device_kind", "cpu"),
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
  """arm -> {row, col, report, seeds: {(split, seed): metrics}, seconds: [...], planned: {(split,
  seed)}}: metrics of the done runs, the replicates the index plans (a replicate is a warm start /
  speaker split and a seed)."""
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
        "planned": set(),
      },
    )
    arm["planned"].add((entry.get("split", 0), entry["seed"]))
    workdir = runs_dir / entry["dir"]
    if workdir_lib.incomplete(workdir):  # pending, running, or killed before it finished
      continue
    path = workdir / "results.json"
    try:
      metrics = run_metrics(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise InputError(f"{path}: unreadable run results ({type(e).__name__}: {e})") from e
    arm["seeds"][(entry.get("split", 0), entry["seed"])] = metrics
    if entry.get("seconds") is not None:
      arm["seconds"].append(entry["seconds"])
  return arms


def _fmt(values: list[float], percent: bool = True) -> str:
  mean, std, n = stats_lib.mean_std(values)
  if n == 0:
    return "-"
  scale = 100.0 if percent else 1.0
  if n == 1:  # no spread to show from one seed
    return f"{mean * scale:.1f}"
  return f"{mean * scale:.1f} ± {std * scale:.1f}"


def paired(arms: dict, a: str, b: str, metric: str, margin: float) -> dict[str, Any]:
  """Paired-by-replicate difference a - b: mean, std, n, the t-test's and TOST's raw p-values
  and the speaker-level bootstrap interval (test WER only)."""
  sa, sb = arms[a]["seeds"], arms[b]["seeds"]
  common = sorted(set(sa) & set(sb))
  diffs = [sa[r][metric] - sb[r][metric] for r in common]
  mean, std, n = stats_lib.mean_std(diffs)
  t, p = stats_lib.paired_t(diffs)
  interval = None
  if metric == "test_wer":
    interval = stats_lib.speaker_bootstrap(
      [sa[r].get("test_speakers") for r in common], [sb[r].get("test_speakers") for r in common]
    )
  return {
    "mean": mean,
    "std": std,
    "n": n,
    "t": t,
    "p": p,
    "p_tost": stats_lib.tost(diffs, margin),
    "interval": interval,
  }


def _mean_of(arm: dict | None, key: str) -> float:
  values = [m.get(key) for m in (arm or {}).get("seeds", {}).values()]
  if not values or any(v is None for v in values):
    return math.nan
  return stats_lib.mean_std(values)[0]


def gate_values(index: dict, arms: dict) -> dict[str, Any]:
  """The table's gate inputs (reference and warm start dev WER) and its (a)/(b) failures."""
  ref = arms.get(index.get("reference", "dense"))
  dev, warm = _mean_of(ref, "dev_wer"), _mean_of(ref, "warm_start_dev_wer")
  failures = stats_lib.table_gate(
    None if math.isnan(dev) else dev, None if math.isnan(warm) else warm
  )
  return {"reference_dev_wer": dev, "warm_start_dev_wer": warm, "failures": failures}


def _table_name(index: dict) -> str:
  """The experiment's name as the claims and closing tables show it (quick runs marked)."""
  return index["experiment"] + (" (quick)" if index.get("quick") else "")


def comparison_rows(index: dict, arms: dict, gate: dict) -> list[dict[str, Any]]:
  """Every comparison's paired statistics, Holm-adjusted p-values and reading; ``planned``: the
  replicates both arms are to have (a reading on fewer is marked provisional); ``table``: the
  experiment's name."""
  rows = []
  table = _table_name(index)
  for c in index.get("comparisons", []):
    margin = c.get("margin", stats_lib.DEFAULT_MARGIN)
    row = {**c, "margin": margin, **paired(arms, c["a"], c["b"], c["metric"], margin)}
    row["planned"] = len(arms[c["a"]]["planned"] & arms[c["b"]]["planned"])
    row["table"] = table
    broken = (
      {} if c.get("broken_ok") else {k: _mean_of(arms.get(k), "test_wer") for k in (c["a"], c["b"])}
    )
    row["out_of_regime"] = gate["failures"] + stats_lib.broken_arms(broken)
    rows.append(row)
  running = len({_hypothesis(r) for r in rows if _unfinished(r)})
  for key in ("p", "p_tost"):
    for row, adjusted in zip(rows, _holm_by_hypothesis(rows, key)):
      row[f"{key}_holm"] = adjusted
  for row in rows:
    row["reading"] = _read(row, row["p_holm"], row["p_tost_holm"])
    row["provisional"] = _unfinished(row)
    if row["provisional"]:
      row["reading"] += f" (provisional: {row['n']} of {row['planned']} replicates)"
  if running:
    _mark_unsettled(rows, running)
  return rows


def _read(row: dict, p_holm: float, p_tost_holm: float) -> str:
  """The comparison's reading given its Holm-adjusted p-values."""
  return stats_lib.reading(
    row.get("expect", ""),
    row["mean"],
    row["n"],
    p_holm,
    p_tost_holm,
    row["margin"],
    row["out_of_regime"],
    (row["a"], row["b"]),
  )


def _unfinished(row: dict) -> bool:
  """Whether a comparison has fewer replicates than planned: still running (or a run failed)."""
  return row["n"] < row["planned"]


def _hypothesis(row: dict) -> tuple:
  """What a comparison tests: ``b - a`` is the same test as ``a - b`` (T1's two axis
  conventions), one member of Holm's family, not two."""
  return row["metric"], frozenset((row["a"], row["b"])), row["margin"]


def _holm_by_hypothesis(rows: list[dict], key: str, running_p: float | None = None) -> list[float]:
  """Holm-adjusted p-values ``key`` of ``rows``, each hypothesis counted once.

  ``running_p``: the raw p-value given to the comparisons still running (default: their p so far).
  Holm's adjusted p-values rise with every raw p-value, so 0 and 1 bound what a finished
  comparison's will be once the others finish.
  """
  first: dict[tuple, dict] = {}
  for r in rows:
    first.setdefault(_hypothesis(r), r)
  raw = [running_p if running_p is not None and _unfinished(r) else r[key] for r in first.values()]
  adjusted = dict(zip(first, stats_lib.holm(raw)))
  return [adjusted[_hypothesis(r)] for r in rows]


def _mark_unsettled(rows: list[dict], running: int) -> None:
  """Marks provisional each finished comparison whose reading the ``running`` unfinished ones can
  still change through Holm's correction (one reading with their raw p-values at 0, another at 1;
  a reading that does not use the p-values, e.g. out of regime, is settled)."""
  low, high = (
    list(zip(_holm_by_hypothesis(rows, "p", p), _holm_by_hypothesis(rows, "p_tost", p)))
    for p in (0.0, 1.0)
  )
  for i, row in enumerate(rows):
    settled = _read(row, *low[i]) == _read(row, *high[i])
    if not row["provisional"] and not settled:
      row["provisional"] = True
      row["reading"] += (
        f" (provisional: Holm's correction waits for {running} test(s) still running)"
      )


def _p(p: float) -> str:
  if math.isnan(p):
    return "-"
  return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _gate_lines(gate: dict) -> list[str]:
  g = stats_lib.GATE
  dev, warm = gate["reference_dev_wer"], gate["warm_start_dev_wer"]
  values = (
    f"dense federated dev WER {_pct(dev)}, its warm start's {_pct(warm)}, improvement "
    f"{'-' if math.isnan(dev) or math.isnan(warm) else f'{100 * (warm - dev):.1f} points'}"
  )
  need = (
    f"(needs >= {100 * g.min_improvement:.0f} points improvement, <= "
    f"{100 * g.max_reference_wer:.0f}% dev WER, no compared arm >= {100 * g.broken_wer:.0f}% WER)"
  )
  verdict = (
    "passes (a), (b)" if not gate["failures"] else "OUT OF REGIME: " + "; ".join(gate["failures"])
  )
  return [f"Regime gate: {values} {need}: {verdict}.", ""]


def _pct(x: float) -> str:
  return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def _diff(r: dict) -> str:
  """A comparison row's mean paired difference in points, with its std over replicates."""
  diff = "-" if r["n"] == 0 else f"{r['mean'] * 100:+.1f}"
  return diff + (f" ± {r['std'] * 100:.1f}" if r["n"] > 1 else "")


def _interval(r: dict) -> str:
  if r["interval"] is None:
    return "-"
  return "[{:+.1f}, {:+.1f}]".format(*(100 * x for x in r["interval"]))


def experiment_markdown(index: dict, arms: dict, gate: dict, rows: list[dict]) -> str:
  """One table's markdown: the gate, the arms' metrics and ``rows`` (``comparison_rows``)."""
  lines = [f"### {index['title']}{' (quick)' if index.get('quick') else ''}", ""]
  if index.get("question"):
    lines += [f"Question: {index['question']}", ""]
  for note in index.get("notes", []):
    lines += [note, ""]
  lines += _gate_lines(gate)
  shown = {name: a for name, a in arms.items() if a["report"]}
  if any(a["col"] for a in shown.values()) and index.get("col_title"):
    lines += _pivot(index, shown)
  else:
    lines += [
      f"| {index.get('row_title') or 'arm'} | test WER % | dev WER % | dev CER % | sparsity % "
      "| replicates | run wall time (s) |",
      "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for a in shown.values():
      cells = [_fmt([m[k] for m in a["seeds"].values()]) for k in METRICS]
      secs = stats_lib.mean_std(a["seconds"])[0] if a["seconds"] else math.nan
      lines.append(
        f"| {a['row']} | {' | '.join(cells)} | {len(a['seeds'])} | "
        f"{'-' if math.isnan(secs) else f'{secs:.0f}'} |"
      )
  if index.get("comparisons"):
    lines += [
      "",
      "| comparison (test WER, paired by replicate) | a - b (points) | 95% speaker bootstrap | n "
      "| p (t, Holm) | p (TOST, Holm) | reading |",
      "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
      n = f"{r['n']} of {r['planned']}" if r["n"] < r["planned"] else str(r["n"])
      tost = f"{_p(r['p_tost_holm'])} (±{100 * r['margin']:.1f})"
      lines.append(
        f"| {r['claim']} | {_diff(r)} | {_interval(r)} | {n} | {_p(r['p_holm'])} | {tost} "
        f"| {r['reading']} |"
      )
  total = sum(sum(a["seconds"]) for a in arms.values())
  runs = sum(len(a["seeds"]) for a in arms.values())
  timing = f"{runs} runs done; their wall time adds up to {total / 60:.1f} min"
  last = index.get("last_invocation")
  if last:  # runs side by side (--workers) take less wall time than their sum
    timing += (
      f"; the latest `fedprune experiment` of this table took {last['wall_seconds'] / 60:.1f} min"
      f" with {last['workers']} worker{'s' if last['workers'] > 1 else ''}"
    )
  devices = sorted({_device(m) for a in arms.values() for m in a["seeds"].values()})
  if devices:  # float rounding, and so a replicate's WER, differs between platforms
    timing += f"; ran on {' and '.join(devices)}"
  lines += ["", timing + ".", ""]
  return "\n".join(lines)


def _device(metrics: dict) -> str:
  """``cpu``, or e.g. ``gpu (NVIDIA H200)``: where a run ran."""
  platform, kind = metrics["platform"], metrics["device_kind"]
  return platform if kind.lower() == platform else f"{platform} ({kind})"


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


def render(runs_dir: str | pathlib.Path, out_dir: str | pathlib.Path | None = None) -> str:
  """Writes ``OUT/report.md`` and the figures' PNGs (default OUT: ``RUNS/report``); returns the
  markdown."""
  runs_dir = pathlib.Path(runs_dir)
  if not runs_dir.is_dir():
    raise FileNotFoundError(f"runs directory {str(runs_dir)!r} does not exist")
  out = pathlib.Path(out_dir) if out_dir else runs_dir / "report"
  out.mkdir(parents=True, exist_ok=True)
  indexes = suite_index.load_indexes(runs_dir)
  if not indexes:
    raise FileNotFoundError(
      f"{runs_dir}: no experiment index (<experiment>.json); run `fedprune experiment` first"
    )
  parts = [f"## Results ({runs_dir})", ""]
  closing = [
    "### Tables: wall time and regime gate",
    "",
    "| table | runs done | their wall time (min) | dense federated dev WER | warm start dev WER "
    "| gate (a), (b) |",
    "|---|---:|---:|---:|---:|---|",
  ]
  claims = []
  for index in indexes:
    arms = collect(runs_dir, index)
    gate = gate_values(index, arms)
    rows = comparison_rows(index, arms, gate)
    claims += [r for r in rows if r.get("expect")]
    parts.append(experiment_markdown(index, arms, gate, rows))
    done = sum(len(a["seeds"]) for a in arms.values())
    planned = sum(len(a["planned"]) for a in arms.values())
    closing.append(
      f"| {_table_name(index)} "
      f"| {done}{'' if done == planned else f' of {planned}'} "
      f"| {sum(sum(a['seconds']) for a in arms.values()) / 60:.1f} "
      f"| {_pct(gate['reference_dev_wer'])} | {_pct(gate['warm_start_dev_wer'])} "
      f"| {'pass' if not gate['failures'] else '; '.join(gate['failures'])} |"
    )
    stem = index["experiment"] + ("_quick" if index.get("quick") else "")
    for figure in index.get("figures", []):
      if any(a["seeds"] for a in arms.values()):
        png = out / f"{stem}_{figure}.png"
        report_figures.FIGURES[figure](arms, png)
        parts.append(f"![{figure}]({png.name})\n")
  parts += claims_markdown(claims, [i["experiment"] for i in indexes])
  if any(r["n"] for r in claims):
    report_figures.claims_forest(claims, out / "claims.png")
    parts += ["![claims](claims.png)", ""]
  text = "\n".join(parts + closing + [""])
  io_utils.write_text_atomic(out / "report.md", text)
  return text


def claims_markdown(rows: list[dict], experiments: list[str]) -> list[str]:
  """The paper's claims in one table: the comparison rows that state one (``expect`` set), with
  their tables' readings; then the suite's tables that have no index in ``experiments``."""
  lines = [
    "### The paper's claims",
    "",
    "Each comparison that states a claim of the paper, as read in its table above (a - b of test "
    "WER, paired by replicate: warm start / speaker split and seed).",
    "",
    "| table | claim | a - b (points) | 95% speaker bootstrap | replicates | reading |",
    "|---|---|---:|---:|---:|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['table']} | {r['claim']} | {_diff(r)} | {_interval(r)} | {r['n']} of {r['planned']} "
      f"| {r['reading']} |"
    )
  missing = [name for name in EXPERIMENTS if name not in experiments]
  if missing:
    lines += ["", f"Not run yet: {', '.join(missing)}."]
  return lines + [""]
