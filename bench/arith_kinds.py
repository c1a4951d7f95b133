"""Benchmark: the embedded model's correct rate on each kind of the offline `arith` suite.

Runs `attentropy run --benchmark arith --max-new-tokens 256` on --per-kind problems of every kind (the suite's
default order cycles through the kinds, so `--limit` = per-kind x kinds takes as many of each), under `nice -n 10`,
grades it with `attentropy grade` (strict final-answer extraction, as GSM8K), and prints per kind and number of steps:
n, the correct rate with its 95 % Wilson interval, answers without a final number, the mean answer length in tokens
(what a kind costs in a run) and the share of the run's tokens. A rerun with the same --out resumes the run.

    .venv/bin/python bench/arith_kinds.py [--per-kind 32] [--difficulty 1-4] [--out runs/bench-arith-kinds]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k / n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-kind", type=int, default=32, help="problems of each kind (and number of steps)")
    parser.add_argument("--difficulty", help="arith steps, e.g. 2 or 1-4 (default: every kind at its own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-arith-kinds")
    args = parser.parse_args()

    from attentropy import load_run
    from attentropy.arith import variants

    pairs = variants(args.difficulty)
    limit = args.per_kind * len(pairs)
    command = [sys.executable, "-m", "attentropy.cli", "run", "--benchmark", "arith", "--limit", str(limit),
               "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), "--threads",
               str(args.threads), "--out", args.out] + (["--difficulty", args.difficulty] if args.difficulty else [])
    started = time.perf_counter()
    subprocess.run(["nice", "-n", "10", *command], check=True, env=os.environ)
    run_seconds = time.perf_counter() - started
    subprocess.run(["nice", "-n", "10", sys.executable, "-m", "attentropy.cli", "grade", args.out], check=True)

    samples = load_run(Path(args.out)).samples
    samples["kind"] = [m["kind"] for m in samples.metadata]
    samples["steps"] = [m["steps"] for m in samples.metadata]
    samples["tokens"] = samples.completion_ids.map(len)
    total_tokens = samples.tokens.sum()
    print(f"\n{len(samples)} problems, {args.max_new_tokens} new tokens at most; run (resumed runs: the last part "
          f"only) {run_seconds:.0f} s, {run_seconds / max(1, len(samples)):.2f} s a problem")
    print(f"{'kind':<14} {'steps':>5} {'n':>4} {'correct':>8} {'95% interval':>15} {'unparsed':>8} "
          f"{'tokens':>7} {'share':>6}")
    for kind, steps in pairs:
        rows = samples[(samples.kind == kind) & (samples.steps == steps)]
        n, k = len(rows), int((rows.label == "correct").sum())
        lo, hi = wilson(k, n)
        print(f"{kind:<14} {steps:>5} {n:>4} {k / max(1, n):>8.2f} {f'[{lo:.2f}, {hi:.2f}]':>15} "
              f"{int((rows.label == 'unparsed').sum()):>8} {rows.tokens.mean():>7.0f} "
              f"{rows.tokens.sum() / total_tokens:>6.1%}")
    correct = int((samples.label == "correct").sum())
    print(f"{'all':<14} {'':>5} {len(samples):>4} {correct / len(samples):>8.2f}")


if __name__ == "__main__":
    main()
