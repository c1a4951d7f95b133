#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, offline): set up, then run the offline
# suites `facts` and `arith` with attention capture, grade them (offline grader and critic), and write the report
# that compares the groups (DIR/report.html, figures in DIR/figures).
# Rerunning resumes: finished questions and grades are kept.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
out="${1:-runs/smollm2-135m}"
threads="${ATTENTROPY_THREADS:-$(nproc)}"
.venv/bin/attentropy run --benchmark facts --limit 200 --out "$out/facts" --threads "$threads"
.venv/bin/attentropy run --benchmark arith --limit 100 --max-new-tokens 256 --out "$out/arith" --threads "$threads"
.venv/bin/attentropy grade "$out/facts" "$out/arith"
.venv/bin/attentropy report "$out/facts" "$out/arith" --out "$out"
