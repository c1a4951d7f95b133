"""Benchmark: a Llama-3.2-90B-Vision-shaped run, written and analysed out of core.

Writes synthetic graded GSM8K runs with the 90B text shape (100 layers of which 80 self-attention layers are
recorded, under their true indices; 64 heads; float16 statistics, as `--attn-dtype float16`) through the real
writer (`store.append_batch`), with labels, a planted head and critic spans in the incorrect answers, at 1/4, 1/2
and 1x the size (default 1x: GSM8K's 1,319 answers x ~200 tokens). Then, each in its own process so that its peak
memory is its own: `load_run`, `attn` of one statistic at one layer and at all layers, `analyze_run`, the command
`attentropy report DIR` at its default settings (clustered intervals), and the previous method's report beside it,
`attentropy report DIR --interval bootstrap --n-boot N` (`previous`), and the instrument: `attentropy fit DIR` (every
method evaluated and the instrument fitted, its features read a group of layers at a time) and `attentropy score
--probe PROBE DIR` (`fit`, `score`; not among the default steps). Prints time and peak RSS per step and size, the
time per token (linear growth: the same at every size), the report's speed-up over the previous method, bytes per
token on disk and the write rate.

    .venv/bin/python bench/scale.py [--answers 1319] [--tokens 200] [--sizes 0.25,0.5,1] [--out DIR]
        [--steps write,load,attn,report,previous,fit,score] [--previous-n-boot 1000] [--fit-n-boot 1000]

--out DIR keeps the runs (DIR/answers-N; an existing one is reused unless `write` is a step); without it they go to
a temporary directory removed at the end (1x: about 14 GB on disk). --steps chooses the steps (default
write,load,attn,report,previous; `analyze` times analyze_run alone, which the report includes). --previous-n-boot:
the bootstrap's replicates in `previous` (default 1000, the report's default; its time is proportional to it, hours at
1x on 2 cores); --previous-sizes runs `previous` at some of the sizes only.
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

N_LAYERS, N_HEADS = 100, 64
CROSS_ATTENTION = set(range(3, N_LAYERS, 5))  # Llama 3.2 90B Vision: 20 cross-attention layers, 3, 8, ..., 98
LAYERS = [i for i in range(N_LAYERS) if i not in CROSS_ATTENTION]  # the 80 recorded
WORDS = ["The", " store", " sold", " apples", " each", " for", " dollars", " so", " she", " has", " left", " =",
         " +", " *", ".", "\n"] + [f" {d}" for d in range(10)] + [str(d) for d in range(10)]
DIGIT_SHARE = 0.25  # of the tokens, about as in chain-of-thought solutions
INCORRECT_SHARE = 0.2  # of the answers (Llama 3.2 90B gets ~95 % of GSM8K right: 0.2 is generous to the contrasts)
BATCH = 8  # answers per committed part


class WordTokenizer:
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(WORDS[i] for i in ids)


def write_run(path: Path, n_answers: int, mean_tokens: int, seed: int = 0) -> dict:
    """A graded synthetic run: a fifth of the answers incorrect, with the entropy of layer LAYERS[40] head 7 raised
    in their tokens, and of every cell on a 3-token critic span inside each."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from attentropy.capture import Capture
    from attentropy.schema import ATTN_STATS
    from attentropy.data import Question
    from attentropy.generate import Generation
    from attentropy.store import _write_parquet, append_batch, write_json

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    write_json(path / "config.json", {
        "attentropy_version": "bench", "git_commit": None, "benchmark": "gsm8k",
        "model": {"name": "synthetic, Llama-3.2-90B-Vision text shape", "architecture": "none", "dtype": "bfloat16",
                  "revision": "0"},
        "protocol": {"kind": "math", "max_new_tokens": 2 * mean_tokens},
        "capture": {"layers": LAYERS, "n_heads": N_HEADS, "attn_stats": list(ATTN_STATS), "attn_dtype": "float16",
                    "units": "nats"}})
    grades, n_tokens, started = [], 0, time.perf_counter()
    entropy, planted = ATTN_STATS.index("entropy"), LAYERS.index(LAYERS[40])
    for lo in range(0, n_answers, BATCH):
        gens = []
        for i in range(lo, min(lo + BATCH, n_answers)):
            n = int(rng.integers(mean_tokens // 2, 3 * mean_tokens // 2 + 1))
            incorrect = i % round(1 / INCORRECT_SHARE) == 1
            n_keys = 300 + np.arange(n)
            attn = rng.random((n, len(LAYERS), N_HEADS, len(ATTN_STATS)), dtype=np.float32)
            attn[..., entropy] += 0.5 * np.log(n_keys)[:, None, None]
            start = end = -1
            if incorrect:
                attn[:, planted, 7, entropy] += 0.3
                start = int(rng.integers(2, n - 5))
                end = start + 3
                attn[start:end, :, :, entropy] += 0.3
            ids = np.where(rng.random(n) < DIGIT_SHARE, rng.integers(16, len(WORDS), n),
                           rng.integers(0, 16, n)).tolist()
            q = Question(id=f"gsm8k-{i:05d}", benchmark="gsm8k", question=f"question {i}?", target=str(i))
            capture = Capture(attn=attn, logprob=-rng.exponential(1.0, n).astype(np.float32),
                              logit_entropy=rng.exponential(1.0, n).astype(np.float32),
                              logit_varentropy=rng.exponential(1.0, n).astype(np.float32), n_keys=n_keys)
            gens.append(Generation(q, list(range(300)), ids, WordTokenizer().decode(ids), "stop", capture))
            grades.append({"question_id": q.id, "label": "incorrect" if incorrect else "correct",
                           "grader": "synthetic", "critic": "synthetic" if incorrect else None,
                           "critic_status": "located" if incorrect else "not_critiqued",
                           "error_token_start": start, "error_token_end": end})
            n_tokens += n
        append_batch(path, gens, WordTokenizer(), attn_dtype="float16")
    _write_parquet(pa.Table.from_pandas(pd.DataFrame(grades), preserve_index=False), path / "grades.parquet")
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    attn_size = sum(f.stat().st_size for f in (path / "attn").glob("*.parquet"))
    return {"tokens": n_tokens, "seconds": seconds, "bytes": size, "attn_bytes": attn_size}


def step(name: str, path: Path) -> dict:
    """One measured step, run in a child process (`--step`)."""
    from attentropy import load_run

    started = time.perf_counter()
    if name == "load":
        run = load_run(path)
        return {"seconds": time.perf_counter() - started, "tokens": len(run.tokens)}
    if name == "attn":
        run = load_run(path)
        started = time.perf_counter()
        one = run.attn("entropy", [LAYERS[40]])
        one_s = time.perf_counter() - started
        started = time.perf_counter()
        everything = run.attn("entropy")
        all_s = time.perf_counter() - started
        assert (one[:, 0] == everything[:, 40]).all()
        return {"seconds": one_s, "all_layers_seconds": all_s}
    if name == "analyze":
        from attentropy.contrasts import analyze_run

        a = analyze_run(load_run(path))
        planted = a.comparisons.query("contrast == 'incorrect_vs_correct' and stat == 'entropy' and "
                                      "aggregation == 'mean' and level == 'head' and control == 'none'")
        best = planted.loc[planted.auroc.idxmax()]
        return {"seconds": time.perf_counter() - started, "strongest_cell": [int(best.layer), int(best["head"])]}
    raise ValueError(name)


def stored_tokens(path: Path) -> int:
    """The tokens of a run directory, from its tokens parts' Parquet metadata (no `load_run`)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in (path / "tokens").glob("*.parquet"))


def measured(argv: list[str]) -> dict:
    """Run a child process; its result (JSON on its last stdout line, if any), wall time, CPU time (user + system:
    the work done, which other load on the machine does not inflate) and peak RSS (wait4)."""
    started = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(map(str, argv))} failed with exit code {child.returncode}")
    lines = out.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return {"wall_seconds": time.perf_counter() - started, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_gb": usage.ru_maxrss / 2 ** 20, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=1319)
    parser.add_argument("--tokens", type=int, default=200, help="mean tokens per answer")
    parser.add_argument("--sizes", default="0.25,0.5,1", help="fractions of --answers")
    parser.add_argument("--out", type=Path, help="keep the runs here (DIR/answers-N)")
    parser.add_argument("--steps", default="write,load,attn,report,previous",
                        help="of write,load,attn,analyze,report,previous,fit,score (analyze: analyze_run alone, which "
                             "report includes; previous: the report with --interval bootstrap; fit, score: the "
                             "instrument)")
    parser.add_argument("--fit-n-boot", type=int, default=1000, help="attentropy fit's --n-boot")
    parser.add_argument("--previous-n-boot", type=int, default=1000, help="the bootstrap's replicates in previous")
    parser.add_argument("--previous-sizes", help="run previous at these of --sizes only (default: all)")
    parser.add_argument("--step", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step[0], Path(args.step[1]))))
        return
    steps = args.steps.split(",")
    root = args.out or Path(tempfile.mkdtemp(prefix="attentropy-scale-"))
    me = [sys.executable, str(Path(__file__).resolve())]
    rows = []
    try:
        for fraction in map(float, args.sizes.split(",")):
            n = max(2, round(args.answers * fraction))
            path = root / f"answers-{n}"
            row = {"answers": n}
            if "write" in steps or not path.exists():
                if path.exists():
                    shutil.rmtree(path)
                w = write_run(path, n, args.tokens)
                row.update(tokens=w["tokens"], write_s=w["seconds"], bytes_per_token=w["attn_bytes"] / w["tokens"],
                           write_mb_s=w["bytes"] / w["seconds"] / 1e6, disk_gb=w["bytes"] / 1e9)
            for name in ("load", "attn", "analyze"):
                if name in steps:
                    r = measured(me + ["--step", name, str(path)])
                    row[name] = r
            report = [sys.executable, "-m", "attentropy.cli", "report", str(path), "--out", str(root / "report")]
            if "report" in steps:
                row["report"] = measured(report)
            previous_sizes = args.previous_sizes.split(",") if args.previous_sizes else args.sizes.split(",")
            if "previous" in steps and float(fraction) in map(float, previous_sizes):
                row["previous"] = measured(report + ["--interval", "bootstrap", "--n-boot", str(args.previous_n_boot)])
            probe = root / f"instrument-{n}"
            if "fit" in steps:
                row["fit"] = measured([sys.executable, "-m", "attentropy.cli", "fit", str(path), "--out", str(probe),
                                       "--force", "--n-boot", str(args.fit_n_boot)])
            if "score" in steps:
                row["score"] = measured([sys.executable, "-m", "attentropy.cli", "score", "--probe", str(probe),
                                         str(path)])
            row.setdefault("tokens", row.get("load", {}).get("tokens") or stored_tokens(path))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n90B text shape: {len(LAYERS)} recorded layers of {N_LAYERS}, {N_HEADS} heads, float16; report: "
          f"clustered intervals (the default); previous: --interval bootstrap --n-boot {args.previous_n_boot}")
    print(f"{'answers':>8} {'tokens':>9} {'step':>10} {'seconds':>9} {'µs/token':>9} {'peak RSS':>9} {'CPU s':>8}")
    for row in rows:
        if "write_s" in row:
            print(f"{row['answers']:>8} {row['tokens']:>9} {'write':>10} {row['write_s']:>9.1f} "
                  f"{1e6 * row['write_s'] / row['tokens']:>9.1f} {'':>9}   {row['bytes_per_token']:.0f} B/token "
                  f"(attn), {row['write_mb_s']:.0f} MB/s, {row['disk_gb']:.2f} GB")
        for name in ("load", "attn", "analyze", "report", "previous", "fit", "score"):
            if name in row:
                r = row[name]
                s = r.get("seconds", r["wall_seconds"])
                extra = ""
                if name == "attn":
                    extra = (f"   one layer {r['seconds']:.2f} s, all {len(LAYERS)} layers "
                             f"{r['all_layers_seconds']:.2f} s: ratio {r['seconds'] / r['all_layers_seconds']:.3f}")
                if name == "analyze":
                    extra = f"   strongest cell (planted: layer {LAYERS[40]} head 7): {r['strongest_cell']}"
                if name == "report":
                    extra = "   (the whole command, wall time)"
                if name == "previous":
                    speedup = s / row["report"]["wall_seconds"] if "report" in row else None
                    extra = f"   (the whole command): the default report is {speedup:.1f}x faster" if speedup else ""
                print(f"{row['answers']:>8} {row['tokens']:>9} {name:>10} {s:>9.1f} {1e6 * s / row['tokens']:>9.1f} "
                      f"{r['peak_rss_gb']:>7.2f} GB {r['cpu_seconds']:>8.1f}{extra}")


if __name__ == "__main__":
    main()
