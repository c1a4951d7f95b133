#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, offline): set up, then run the
# offline suites `facts` and `arith` with attention capture. Rerunning resumes; finished questions are skipped.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
out="${1:-runs/smollm2-135m}"
threads="${ATTENTROPY_THREADS:-$(nproc)}"
.venv/bin/attentropy run --benchmark facts --limit 200 --out "$out/facts" --threads "$threads"
.venv/bin/attentropy run --benchmark arith --limit 100 --max-new-tokens 256 --out "$out/arith" --threads "$threads"
