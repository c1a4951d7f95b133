#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, offline): set up, then run the offline
# suites `facts` (680 questions: 40 of each of the 17 kinds, from 7 data sources, that its default keeps) and
# `arith` (440 problems: 40 of each of its 11 kinds of problem shape; 40 a kind leaves most held-out kinds with 10
# answers of each class, what leave one kind out needs) with attention capture, grade them (offline grader and critic), fit the
# confidence instrument on them (evaluated against the baselines by cross-validation, leave one kind out and leave
# one source out), and write the report that compares the groups and shows the instrument (DIR/report.html,
# figures in DIR/figures). Rerunning resumes: finished questions and grades are kept.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
out="${1:-runs/smollm2-135m}"
threads="${ATTENTROPY_THREADS:-$(nproc)}"
.venv/bin/attentropy run --benchmark facts --limit 680 --out "$out/facts" --threads "$threads"
.venv/bin/attentropy run --benchmark arith --limit 440 --max-new-tokens 256 --out "$out/arith" \
  --threads "$threads"
.venv/bin/attentropy grade "$out/facts" "$out/arith"
.venv/bin/attentropy fit "$out/facts" "$out/arith" --out "$out/instrument"
.venv/bin/attentropy report "$out/facts" "$out/arith" --out "$out" --probe "$out/instrument"
