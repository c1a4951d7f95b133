"""The embedded model's correct rate on each kind of the `facts` suite, which decides the kinds the default suite
keeps (those between roughly 15 % and 85 % correct: both classes are needed to fit and to measure).

Runs `attentropy run --benchmark facts` on every kind (`--kinds`, dropped ones included) with `--per-kind`
questions of each (all of a smaller kind), grades the answers offline (`attentropy grade`, no judge), and prints per
kind: its source package, size, questions run, correct / incorrect / not attempted, and the correct rate with a
95 % Wilson interval. The run keeps no hidden states (only the answers' labels are needed). The run directory is
resumable: a rerun grades and prints again without generating.

    nice -n 10 .venv/bin/python bench/kinds.py --out /tmp/attentropy-kinds --per-kind 40 --threads 2
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

from attentropy.facts import facts_pool
from attentropy.facts_kinds import DROPPED, KINDS
from attentropy.store import load_run

LOW, HIGH = 0.15, 0.85  # the default suite keeps the kinds whose correct rate lies between these


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/attentropy-kinds", help="the run directory (resumed if it exists)")
    parser.add_argument("--per-kind", type=int, default=50, help="questions of each kind (all of a smaller one)")
    parser.add_argument("--kinds", help="comma-separated kinds (default: every kind, dropped ones included)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=32, help="rows decoded at once (greedy: the same answers)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    kinds = args.kinds.split(",") if args.kinds else list(KINDS)
    pool = facts_pool()
    limit = sum(min(len(pool[k]), args.per_kind) for k in kinds)  # the kinds are taken in turn: per_kind rounds
    env = {k: v for k, v in os.environ.items() if k not in ("ATTENTROPY_JUDGE", "ATTENTROPY_CRITIC")}
    cli = [sys.executable, "-m", "attentropy.cli"]
    subprocess.run([*cli, "run", "--benchmark", "facts", "--kinds", ",".join(kinds), "--limit", str(limit),
                    "--seed", str(args.seed), "--out", args.out, "--threads", str(args.threads), "--batch-size",
                    str(args.batch_size), "--hidden-layers", "none"], check=True, env=env)
    subprocess.run([*cli, "grade", args.out, "--quiet"], check=True, env=env, stdout=subprocess.DEVNULL)

    samples = load_run(Path(args.out)).samples
    samples["kind"] = [m["kind"] for m in samples.metadata]
    print(f"\nfacts kinds on {load_run(Path(args.out)).config['model']['name']}: {len(samples)} answers, graded "
          f"offline; kept where the correct rate lies in [{LOW:.0%}, {HIGH:.0%}]\n")
    print("| kind | source | agreed with | size | run | correct | incorrect | not attempted | correct rate "
          "[95 % CI] | default suite |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        rows = samples[samples.kind == kind]
        counts = rows.label.value_counts()
        n, correct = len(rows), int(counts.get("correct", 0))
        rate = correct / n if n else float("nan")
        lo, hi = wilson(correct, n)
        verdict = "kept" if kind not in DROPPED else f"dropped: {DROPPED[kind]}"
        rule = "" if n == 0 or LOW <= rate <= HIGH else " (outside the range)"
        k = KINDS[kind]
        print(f"| {kind} | {k.source} | {k.agreed_with or '-'} | {len(pool[kind])} | {n} | {correct} | "
              f"{int(counts.get('incorrect', 0))} | {int(counts.get('not_attempted', 0))} | {rate:.0%} "
              f"[{lo:.0%}, {hi:.0%}] | {verdict}{rule} |")


if __name__ == "__main__":
    main()
