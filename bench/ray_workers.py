"""Benchmark: a data-parallel run on a local Ray cluster against one process, on the embedded model.

The same questions run once in one process (--threads torch threads) and once with `--ray --workers N` (one CPU and
one torch thread per worker), each into a new directory; prints both wall times (the Ray one includes starting the
cluster and loading the model in every worker) and checks that the two directories hold the same content: the
same questions once each, the same tokens, statistics within float32 rounding.

    .venv/bin/python bench/ray_workers.py [--benchmark facts] [--questions 64] [--workers 2] [--threads 2]

On 2 cores there is no speed to gain (the point is that sharding loses and repeats nothing); on a machine with a
GPU per worker the wall time divides by about the number of workers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def compare(a: Path, b: Path) -> str:
    import numpy as np

    from attentropy import load_run
    from attentropy.schema import ATTN_STATS

    one, other = load_run(a), load_run(b)
    if not (one.samples.question_id.is_unique and other.samples.question_id.is_unique):
        return "a question is stored twice"
    if set(one.samples.question_id) != set(other.samples.question_id):
        return "different questions"
    i = one.tokens.sort_values(["question_id", "pos"]).index.to_numpy()
    j = other.tokens.sort_values(["question_id", "pos"]).index.to_numpy()
    if one.tokens.token_id.to_numpy()[i].tolist() != other.tokens.token_id.to_numpy()[j].tolist():
        return "different tokens"
    worst = max(float(np.abs(one.attn(s)[i] - other.attn(s)[j]).max()) for s in ATTN_STATS)
    return f"same questions ({len(one.samples)}) and tokens ({len(one.tokens)}); statistics within {worst:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="facts")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    base = [sys.executable, "-m", "attentropy.cli", "run", "--benchmark", args.benchmark, "--limit",
            str(args.questions), "--quiet"]
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for name, extra in (("one process", ["--threads", str(args.threads)]),
                            (f"ray, {args.workers} workers", ["--ray", "--workers", str(args.workers)])):
            out = Path(tmp) / name.split(",")[0].replace(" ", "_")
            started = time.perf_counter()
            subprocess.run(base + ["--out", str(out)] + extra, check=True, stdout=subprocess.DEVNULL)
            times[name] = (time.perf_counter() - started, out)
        for name, (seconds, _) in times.items():
            print(f"{name:>16}: {seconds:6.1f} s wall")
        (_, a), (_, b) = times.values()
        print(f"content: {compare(a, b)}")


if __name__ == "__main__":
    main()
