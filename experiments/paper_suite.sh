#!/bin/bash
# The paper suite behind the README's results, table by table, resumable on a new machine:
#
#   experiments/paper_suite.sh [TABLE ...]   (default: t3 t5 t4 t2 t6 t1, the order it ran in)
#
# Every finished run is archived, slim, in docs/paper/runs_v30 (commit it); on a new machine the
# suite restores them from there and runs only the rest. DATA must be the path the archived runs
# used: the corpus path is part of a run's key (the embedded corpus is synthesized there if
# absent; its audio and transcripts were byte-identical under two Python / SciPy versions).
# Logs: $RUNS/../suite_v30_<table>.out.
set -u
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/work/runs/paper_v30}
DATA=${DATA:-/work/runs/data}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$RUNS"
tables=("$@")
[ ${#tables[@]} -eq 0 ] && tables=(t3_schedule t5_refinement t4_allocation t2_score t6_data t1_pattern)
for t in "${tables[@]}"; do
  echo "=== $t $(date -u +%FT%TZ)"
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} PYTHONUNBUFFERED=1 "$PYTHON" -m fedprune_jax.cli experiment \
    "$t" --runs "$RUNS" --data "$DATA" --workers 2 --archive docs/paper/runs_v30 \
    > "$RUNS/../suite_v30_$t.out" 2>&1
  echo "=== $t rc=$? $(date -u +%FT%TZ)"
done
