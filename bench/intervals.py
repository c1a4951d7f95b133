"""Benchmark: the report's clustered intervals against the bootstrap's, on real run directories.

For each run, `attentropy report DIR --interval bootstrap --n-boot N` and `attentropy report DIR --interval
clustered`, each in its own process (time and peak RSS), then their `comparisons.parquet` side by side, cell by cell
(contrast, statistic, aggregation, level, control, layer, head): how far apart the 95 % bounds of AUROC and Cohen's d
are (and how many cells lie within --tolerance, by contrast and control), whether the p-values, q-values and
Benjamini-Hochberg survivors are the same (the p-values do not depend on the interval method, so they must be), and
every cell whose interval lies on the other side of no effect (AUROC 0.5, d 0) under one method and not the other,
with its values.

    .venv/bin/python bench/intervals.py RUN_DIR [RUN_DIR ...] [--n-boot 1000] [--tolerance 0.01] [--out DIR]

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
    """`attentropy report` in a child process: wall seconds and peak RSS."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "attentropy.cli", "report", str(run), "--out", str(out),
                              "--interval", interval, "--n-boot", str(n_boot), "--quiet"], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"report of {run} with --interval {interval} failed")
    return {"seconds": time.perf_counter() - started, "peak_rss_gb": usage.ru_maxrss / 2 ** 20}


def compare(boot, clus, tolerance: float) -> dict:
    """Print the agreement of two comparisons tables; return its summary."""
    import numpy as np

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
        table = both.assign(within=within).groupby(["contrast", "control"], sort=False).agg(
            cells=("within", "size"), within=("within", "mean"), largest=(f"{name}_diff", "max"),
            n_positive=("n_positive_boot", "min"), n_negative=("n_negative_boot", "min"))
        print("    by contrast and control (n: the smallest group, questions):")
        for (contrast, control), row in table.iterrows():
            print(f"    {contrast:>28} {control:>18}: {row.cells:>6} cells, {row.within:6.1%} within, largest "
                  f"{row.largest:.4f}, n {row.n_positive} vs {row.n_negative}")
        worst = both.nlargest(5, f"{name}_diff")
        print(f"    widest disagreements ({name}, [bootstrap] vs [clustered]):")
        for _, r in worst.iterrows():
            print(f"      {cell(r)}: {r[value + '_boot']:.3f} "
                  f"[{r[lo + '_boot']:.3f}, {r[hi + '_boot']:.3f}] vs [{r[lo + '_clus']:.3f}, {r[hi + '_clus']:.3f}], "
                  f"n {r.n_positive_boot} vs {r.n_negative_boot}")
        excludes = {m: (both[f"{lo}_{m}"] > null) | (both[f"{hi}_{m}"] < null) for m in ("boot", "clus")}
        flips = both[excludes["boot"] != excludes["clus"]]
        print(f"    cells whose interval excludes {null} under one method only: {len(flips)}")
        for _, r in flips.head(20).iterrows():
            print(f"      {cell(r)}: bootstrap [{r[lo + '_boot']:.4f}, {r[hi + '_boot']:.4f}], clustered [{r[lo + '_clus']:.4f}, "
                  f"{r[hi + '_clus']:.4f}], q {r.q_boot:.3g}")
        summary[name] = {"within": float(within.mean()), "largest": float(diff.max()), "flips": len(flips)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--out", type=Path, help="keep the reports here (OUT/<run name>/<interval>)")
    args = parser.parse_args()
    import pandas as pd

    root = args.out or Path(tempfile.mkdtemp(prefix="attentropy-intervals-"))
    try:
        for run in args.runs:
            print(f"{run} (bootstrap: {args.n_boot} resamples)", flush=True)
            times, tables = {}, {}
            for interval in ("bootstrap", "clustered"):
                out = root / run.name / interval
                times[interval] = timed_report(run, out, interval, args.n_boot)
                tables[interval] = pd.read_parquet(out / "figures" / "comparisons.parquet")
                print(f"  report --interval {interval}: {times[interval]['seconds']:.1f} s, peak RSS "
                      f"{times[interval]['peak_rss_gb']:.2f} GB", flush=True)
            print(f"  speed-up: {times['bootstrap']['seconds'] / times['clustered']['seconds']:.2f}x")
            summary = compare(tables["bootstrap"], tables["clustered"], args.tolerance)
            print(json.dumps({"run": str(run), "times": times, **summary}), flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
