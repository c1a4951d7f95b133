#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, offline): set up, then run the offline
# suites `facts` (all 495 questions) and `arith` (300 problems, half of one step and half of two, so that answers
# hold several equations to compare inside) with attention capture, grade them (offline grader
# and critic), fit the confidence instrument on them (evaluated against the baselines by cross-validation), and
# write the report that compares the groups and shows the instrument (DIR/report.html, figures in DIR/figures).
# Rerunning resumes: finished questions and grades are kept.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
out="${1:-runs/smollm2-135m}"
threads="${ATTENTROPY_THREADS:-$(nproc)}"
.venv/bin/attentropy run --benchmark facts --limit 495 --out "$out/facts" --threads "$threads"
.venv/bin/attentropy run --benchmark arith --difficulty 1-2 --limit 300 --max-new-tokens 256 --out "$out/arith" \
  --threads "$threads"
.venv/bin/attentropy grade "$out/facts" "$out/arith"
.venv/bin/attentropy fit "$out/facts" "$out/arith" --out "$out/instrument"
# 500 bootstrap resamples per interval of the contrasts (default 1000: ~1 min more on 2 cores)
.venv/bin/attentropy report "$out/facts" "$out/arith" --out "$out" --probe "$out/instrument" --n-boot 500
