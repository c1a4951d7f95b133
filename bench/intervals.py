"""Benchmark: the report's clustered intervals against the bootstrap's, on real run directories.

For each run, `attentropy report DIR --interval bootstrap --n-boot N` and `attentropy report DIR --interval
clustered`, each in its own process (time and peak RSS), then their `comparisons.parquet` side by side, cell by cell
(contrast, statistic, aggregation, level, control, layer, head): how far apart the 95 % bounds of AUROC and Cohen's d
are (and how many cells lie within --tolerance, by contrast and control), whether the p-values, q-values and
Benjamini-Hochberg survivors are the same (the p-values do not depend on the interval method, so they must be), and
every cell whose interval lies on the other side of no effect (AUROC 0.5, d 0) under one method and not the other,
with its values.

The bootstrap's bounds carry Monte Carlo error of their own (a 2.5 % quantile of 1,000 resamples moves by about a
tenth of the standard error from one seed to the next): --noise-stats (default entropy) also analyses those statistics
with the bootstrap from another seed, and prints the same agreement between the two bootstraps, the floor that no
method can beat against one bootstrap.

    .venv/bin/python bench/intervals.py RUN_DIR [RUN_DIR ...] [--n-boot 1000] [--tolerance 0.01] [--out DIR]
        [--noise-stats entropy]

The run directories are only read; the reports go to --out (default: a temporary directory, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def cell(r) -> str:
    return f"{r.contrast} {r.stat} {r.aggregation} {r.level} {r.control} layer {r.layer} head {r['head']}"


KEYS = ["contrast", "stat", "aggregation", "level", "control", "layer", "head"]
BOUNDS = {"AUROC": ("auroc", "auroc_lo", "auroc_hi", 0.5), "d": ("cohens_d", "d_lo", "d_hi", 0.0)}


def timed_report(run: Path, out: Path, interval: str, n_boot: int) -> dict:
    """`attentropy report` in a child process: wall seconds, CPU seconds (user + system) and peak RSS."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "attentropy.cli", "report", str(run), "--out", str(out),
                              "--interval", interval, "--n-boot", str(n_boot), "--quiet"], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"report of {run} with --interval {interval} failed")
    return {"seconds": time.perf_counter() - started, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_gb": usage.ru_maxrss / 2 ** 20}


def compare(boot, clus, tolerance: float, names: tuple[str, str] = ("bootstrap", "clustered")) -> dict:
    """Print the agreement of two comparisons tables (`names`: what they are); return its summary."""
    import numpy as np

    from attentropy.contrasts import MIN_QUESTIONS_TO_CONCLUDE

    both = boot.merge(clus, on=KEYS, suffixes=("_boot", "_clus"), validate="one_to_one")
    if len(both) != len(boot) or len(both) != len(clus):
        raise SystemExit(f"the two reports hold different cells ({len(boot)} and {len(clus)}, {len(both)} shared)")
    summary = {"cells": len(both)}
    same = {}
    for col in ("auroc", "cohens_d", "p", "q", "significant"):
        a, b = both[f"{col}_boot"].to_numpy(), both[f"{col}_clus"].to_numpy()
        same[col] = int((np.isclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True) if col != "significant"
                         else a == b).sum())
    print(f"  cells {len(both)}; identical under both methods: " + ", ".join(f"{k} {v}" for k, v in same.items()))
    summary["identical"] = same
    for name, (value, lo, hi, null) in BOUNDS.items():
        diff = np.maximum(np.abs(both[f"{lo}_boot"] - both[f"{lo}_clus"]),
                          np.abs(both[f"{hi}_boot"] - both[f"{hi}_clus"]))
        both[f"{name}_diff"] = diff
        within = diff <= tolerance
        print(f"  {name} bounds: {int(within.sum())} of {len(both)} cells within ±{tolerance} ({within.mean():.1%}); "
              f"largest difference {diff.max():.4f}, median {diff.median():.4f}")
        conclusive = np.minimum(both.n_positive_boot, both.n_negative_boot) >= MIN_QUESTIONS_TO_CONCLUDE
        print(f"    of the cells whose groups hold {MIN_QUESTIONS_TO_CONCLUDE} questions or more (the report concludes "
              f"from these): {int(within[conclusive].sum())} of {int(conclusive.sum())} "
              f"({within[conclusive].mean():.1%}), largest difference {diff[conclusive].max():.4f}")
        table = both.assign(within=within).groupby(["contrast", "control"], sort=False).agg(
            cells=("within", "size"), within=("within", "mean"), largest=(f"{name}_diff", "max"),
            n_positive=("n_positive_boot", "min"), n_negative=("n_negative_boot", "min"))
        print("    by contrast and control (n: the smallest group, questions):")
        for (contrast, control), row in table.iterrows():
            print(f"    {contrast:>28} {control:>18}: {row.cells:>6} cells, {row.within:6.1%} within, largest "
                  f"{row.largest:.4f}, n {row.n_positive} vs {row.n_negative}")
        worst = both.nlargest(5, f"{name}_diff")
        print(f"    widest disagreements ({name}, [{names[0]}] vs [{names[1]}]):")
        for _, r in worst.iterrows():
            print(f"      {cell(r)}: {r[value + '_boot']:.3f} "
                  f"[{r[lo + '_boot']:.3f}, {r[hi + '_boot']:.3f}] vs [{r[lo + '_clus']:.3f}, {r[hi + '_clus']:.3f}], "
                  f"n {r.n_positive_boot} vs {r.n_negative_boot}")
        excludes = {m: (both[f"{lo}_{m}"] > null) | (both[f"{hi}_{m}"] < null) for m in ("boot", "clus")}
        flips = both[excludes["boot"] != excludes["clus"]]
        print(f"    cells whose interval excludes {null} under one method only: {len(flips)}")
        for _, r in flips.head(20).iterrows():
            print(f"      {cell(r)}: {names[0]} [{r[lo + '_boot']:.4f}, {r[hi + '_boot']:.4f}], {names[1]} "
                  f"[{r[lo + '_clus']:.4f}, {r[hi + '_clus']:.4f}], q {r.q_boot:.3g}")
        summary[name] = {"within": float(within.mean()), "largest": float(diff.max()), "flips": len(flips),
                         "within_conclusive": float(within[conclusive].mean()),
                         "largest_conclusive": float(diff[conclusive].max())}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--out", type=Path, help="keep the reports here (OUT/<run name>/<interval>)")
    parser.add_argument("--noise-stats", default="entropy",
                        help="statistics analysed again with the bootstrap from seed 1 (comma-separated; '' none)")
    args = parser.parse_args()
    import pandas as pd

    from attentropy import load_run
    from attentropy.contrasts import analyze_run

    root = args.out or Path(tempfile.mkdtemp(prefix="attentropy-intervals-"))
    try:
        for run in args.runs:
            print(f"{run} (bootstrap: {args.n_boot} resamples)", flush=True)
            times, tables = {}, {}
            for interval in ("bootstrap", "clustered"):
                out = root / run.name / interval
                times[interval] = timed_report(run, out, interval, args.n_boot)
                tables[interval] = pd.read_parquet(out / "figures" / "comparisons.parquet")
                print(f"  report --interval {interval}: {times[interval]['seconds']:.1f} s "
                      f"({times[interval]['cpu_seconds']:.1f} CPU s), peak RSS {times[interval]['peak_rss_gb']:.2f} GB",
                      flush=True)
            print(f"  speed-up: {times['bootstrap']['seconds'] / times['clustered']['seconds']:.2f}x wall, "
                  f"{times['bootstrap']['cpu_seconds'] / times['clustered']['cpu_seconds']:.2f}x CPU")
            print("  clustered against the bootstrap (seed 0):")
            summary = compare(tables["bootstrap"], tables["clustered"], args.tolerance)
            print(json.dumps({"run": str(run), "times": times, **summary}), flush=True)
            if args.noise_stats:
                stats = tuple(args.noise_stats.split(","))
                other = analyze_run(load_run(run), interval="bootstrap", n_boot=args.n_boot, seed=1,
                                    stats=stats).comparisons
                print(f"  the noise floor: the bootstrap from seed 1 against seed 0 ({', '.join(stats)}), and the "
                      "clustered intervals against seed 0 on the same cells:")
                seed0 = tables["bootstrap"].merge(other[KEYS], on=KEYS)
                noise = compare(seed0, other, args.tolerance, ("bootstrap seed 0", "bootstrap seed 1"))
                print("  (clustered on the same cells)")
                same_cells = compare(seed0, tables["clustered"].merge(other[KEYS], on=KEYS), args.tolerance)
                print(json.dumps({"run": str(run), "noise_floor": noise, "clustered_same_cells": same_cells}),
                      flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
