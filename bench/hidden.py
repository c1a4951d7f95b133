"""Benchmark: what keeping hidden states costs an `attentropy run` on the embedded model (time and disk).

Whole runs of the same questions (facts by default; arith with --benchmark arith) in one process, alternating
without hidden states (`--hidden-layers none`), with the default per-answer summary (`auto`: 9 layers, last prompt
token and mean over the answer) and with the summary plus per-token states of 3 middle layers (`--hidden-token-layers
auto`), --rounds times after a warm-up; prints each round's time ratio against the run without, their median, and
the bytes each adds on disk (per answer and per token, and as a share of the run directory).

    .venv/bin/python bench/hidden.py [--benchmark facts] [--questions 64] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

MODES = {"none": ("none", "none"), "summary": ("auto", "none"), "summary+tokens": ("auto", "auto")}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="facts", choices=["facts", "arith"])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from attentropy import load_run
    from attentropy.run import run_benchmark

    max_new_tokens = 256 if args.benchmark == "arith" else None

    def once(mode: str) -> tuple[float, Path]:
        out = Path(tempfile.mkdtemp(prefix="bench-hidden-")) / "run"
        layers, token_layers = MODES[mode]
        start = time.perf_counter()
        run_benchmark(args.benchmark, out, limit=args.questions, batch_size=16, max_new_tokens=max_new_tokens,
                      hidden_layers=layers, hidden_token_layers=token_layers, progress=False)
        return time.perf_counter() - start, out

    for mode in MODES:  # warm-up
        shutil.rmtree(once(mode)[1].parent)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    sizes = {}
    for r in range(args.rounds):
        for mode in MODES:
            seconds, out = once(mode)
            times[mode].append(seconds)
            if r == 0:
                run = load_run(out)
                sizes[mode] = (du(out), du(out / "hidden") if (out / "hidden").exists() else 0,
                               du(out / "hidden_tokens") if (out / "hidden_tokens").exists() else 0,
                               len(run.samples), len(run.tokens))
            shutil.rmtree(out.parent)
        print(f"  round {r + 1}: " + ", ".join(f"{m} {times[m][-1]:.1f} s" for m in MODES))
    for mode in ("summary", "summary+tokens"):
        ratios = [t / base for t, base in zip(times[mode], times["none"])]
        total, hidden, tokens, n_answers, n_tokens = sizes[mode]
        print(f"{mode}: time ratio to no hidden states, median of {args.rounds} alternating rounds "
              f"{statistics.median(ratios):.3f} (rounds {', '.join(f'{x:.3f}' for x in ratios)}); disk: hidden/ "
              f"{hidden / n_answers / 1024:.1f} kB per answer" + (f", hidden_tokens/ {tokens / n_tokens / 1024:.2f} "
                                                                   f"kB per token" if tokens else "")
              + f"; run directory {total / 1e6:.1f} MB against {sizes['none'][0] / 1e6:.1f} MB without "
              f"({total / sizes['none'][0]:.2f}x)")


if __name__ == "__main__":
    main()
