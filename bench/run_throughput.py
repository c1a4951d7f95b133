"""Benchmark: continuous against static batching in whole `attentropy run`s on the embedded model.

Each round runs, as separate processes (so that each has its own peak memory), `facts` (--facts questions) and
`arith` (--arith problems, 256 new tokens at most, as the main job) with `--batching static` and `--batching
continuous`, alternating which goes first. Prints per run: generation time and tokens/s (as the run reports them)
and the whole process's wall time, row utilisation (answer tokens / rows decoded: every decode step's batch rows
plus each prompt's last row, counted by a hook on the decoder), peak RSS, the decoder's time in decode steps and in
prompts' forwards; then per benchmark the median over rounds of continuous / static (tokens/s, memory), where a
continuous run's time goes (decode steps' decoder forwards, lm head, prompts' forwards, the rest) and the rate its
decode steps alone would give, were prompts, statistics and store free; and checks that both runs hold the same
answers and statistics (tokens identical, largest difference of any recorded statistic). As this machine's
reference, each round also times plain decoding (transformers' generate with sdpa, no recording, no store) of the
first --batch-size facts prompts at --batch-size, every row forced to 256 new tokens: every row busy and almost no
prefill, the most a batch of that size decodes per second here; whole runs are printed also as a fraction of it.

    .venv/bin/python bench/run_throughput.py [--facts 200] [--arith 100] [--rounds 1] [--batch-size 16] [--threads 2]
                                             [--sample]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args) -> None:
    """One `attentropy run` in this process; prints a JSON line of its figures."""
    import torch

    torch.set_num_threads(args.threads)
    from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel  # the embedded model's classes

    from attentropy.run import run_benchmark

    rows, steps, clock = [0], [0], [0.0]
    seconds = {"decode": 0.0, "prompts": 0.0, "lm_head": 0.0}
    original, output_embeddings = LlamaModel.forward, LlamaForCausalLM.get_output_embeddings

    def timed_head(self):  # the lm head, timed by hooks put on it the first time it is asked for
        head = output_embeddings(self)
        if not hasattr(head, "_timed"):
            head._timed = True
            head.register_forward_pre_hook(lambda *_: clock.__setitem__(0, time.perf_counter()))
            head.register_forward_hook(
                lambda *_: seconds.__setitem__("lm_head", seconds["lm_head"] + time.perf_counter() - clock[0]))
        return head
    LlamaForCausalLM.get_output_embeddings = timed_head

    def forward(self, *a, **kwargs):  # rows whose query row predicts a token: decode steps', prompts' last rows
        ids = kwargs.get("input_ids")  # (the shared prefix's own forward has neither mask nor positions)
        if ids is not None and (ids.shape[1] == 1 or kwargs.get("position_ids") is not None
                                or kwargs.get("attention_mask") is not None):
            rows[0] += ids.shape[0]
        started = time.perf_counter()
        out = original(self, *a, **kwargs)
        decode = ids is not None and ids.shape[1] == 1
        seconds["decode" if decode else "prompts"] += time.perf_counter() - started
        steps[0] += decode
        return out
    LlamaModel.forward = forward
    started = time.perf_counter()
    limit, extra = (args.facts, []) if args.benchmark == "facts" else (args.arith, ["max_new_tokens"])
    summary = run_benchmark(args.benchmark, args.out, limit=limit, batch_size=args.batch_size,
                            max_new_tokens=256 if extra else None, batching=args.batching, progress=False,
                            do_sample=args.sample, temperature=0.7 if args.sample else 1.0)
    wall = time.perf_counter() - started
    print(json.dumps({"wall": wall, "summary": summary, "rows": rows[0], "steps": steps[0], "seconds": seconds,
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def plain_child(args) -> None:
    """Plain decoding at --batch-size, all rows forced to 256 new tokens; prints a JSON line with tokens/s."""
    import torch

    torch.set_num_threads(args.threads)
    from attentropy.data import load_questions
    from attentropy.generate import generate
    from attentropy.model import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    questions = load_questions("facts", limit=args.batch_size)
    generate(model, tokenizer, questions, max_new_tokens=16, min_new_tokens=16)  # warm-up
    started = time.perf_counter()
    out, _ = generate(model, tokenizer, questions, max_new_tokens=256, min_new_tokens=256)
    seconds = time.perf_counter() - started
    print(json.dumps({"tok_s": sum(len(g.completion_ids) for g in out) / seconds}))


def run_child(benchmark: str, batching: str, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--benchmark", benchmark, "--batching", batching, "--out", str(out),
           "--facts", str(args.facts), "--arith", str(args.arith), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)] + (["--sample"] if args.sample else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_content(static: Path, continuous: Path) -> str:
    import numpy as np

    from attentropy import load_run

    a, b = load_run(static), load_run(continuous)
    sa, sb = a.samples.set_index("question_id"), b.samples.set_index("question_id").loc[a.samples.question_id]
    if sorted(sa.index) != sorted(sb.index) or any(list(x) != list(y) for x, y in
                                                   zip(sa.completion_ids, sb.completion_ids)):
        return "DIFFERENT answers"
    ta = a.tokens.reset_index(drop=True)
    order = b.tokens.reset_index(drop=True).reset_index().set_index(["question_id", "pos"]).loc[
        list(zip(ta.question_id, ta.pos)), "index"].to_numpy()
    worst = {}
    for stat in ("entropy", "varentropy", "sink_mass", "prompt_mass", "diag_mass", "prev_mass"):
        worst[stat] = float(np.abs(a.attn(stat) - b.attn(stat)[order]).max())
    for stat in ("logprob", "logit_entropy", "logit_varentropy"):
        worst[stat] = float(np.abs(ta[stat].to_numpy() - b.tokens[stat].to_numpy()[order]).max())
    return (f"same {len(sa)} answers, tokens identical; largest difference of a statistic "
            f"{max(worst.values()):.1e} ({max(worst, key=worst.get)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=200)
    parser.add_argument("--arith", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample", action="store_true", help="sampled runs (temperature 0.7): the speed only, "
                        "their draws differ by design (static batches seed per batch, continuous per question)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--benchmark", help=argparse.SUPPRESS)
    parser.add_argument("--batching", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return plain_child(args) if args.batching == "plain" else child(args)
    results: dict = {}
    plain = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            plain.append(run_child("facts", "plain", Path(tmp) / "plain", args)["tok_s"])
            print(f"round {r + 1} plain decoding at batch {args.batch_size}, every row busy (reference): "
                  f"{plain[-1]:.0f} tok/s", flush=True)
            for benchmark in ("facts", "arith"):
                order = ("static", "continuous") if r % 2 == 0 else ("continuous", "static")
                for batching in order:
                    out = Path(tmp) / f"{benchmark}-{batching}-{r}"
                    m = run_child(benchmark, batching, out, args)
                    s = m["summary"]
                    m["tokens"] = s["new_tokens"]
                    m["gen_s"] = s["new_tokens"] / s["tokens_per_s"]
                    results.setdefault(benchmark, {}).setdefault(batching, []).append(m)
                    print(f"round {r + 1} {benchmark:5s} {batching:10s}: {m['tokens']} tokens in {m['gen_s']:.1f} s "
                          f"({m['tokens'] / m['gen_s']:.0f} tok/s generating; process {m['wall']:.1f} s), row "
                          f"utilisation {m['tokens'] / m['rows']:.1%}, peak RSS {m['max_rss_mb']:.0f} MB; decoder "
                          f"forwards: {m['steps']} decode steps {m['seconds']['decode']:.1f} s "
                          f"({1e3 * m['seconds']['decode'] / max(1, m['steps']):.0f} ms each), prompts "
                          f"{m['seconds']['prompts']:.1f} s", flush=True)
                if args.sample:  # static batches seed per batch, continuous per question: other draws
                    continue
                print(f"         {benchmark}: " + same_content(Path(tmp) / f"{benchmark}-static-{r}",
                                                             Path(tmp) / f"{benchmark}-continuous-{r}"), flush=True)
    for benchmark, by in results.items():
        # tokens/s against tokens/s (sampled runs' answers differ, and so do their lengths)
        speed = [(c["tokens"] / c["gen_s"]) / (s["tokens"] / s["gen_s"])
                 for s, c in zip(by["static"], by["continuous"])]
        memory = [c["max_rss_mb"] / s["max_rss_mb"] for s, c in zip(by["static"], by["continuous"])]
        util = [c["tokens"] / c["rows"] for c in by["continuous"]]
        util_static = [s["tokens"] / s["rows"] for s in by["static"]]
        rate = [c["tokens"] / c["gen_s"] for c in by["continuous"]]
        of_plain = [x / y for x, y in zip(rate, plain)]
        print(f"{benchmark}: continuous / static speed {statistics.median(speed):.2f}x (rounds: "
              f"{', '.join(f'{x:.2f}' for x in speed)}); {statistics.median(rate):.0f} tok/s "
              f"({statistics.median(of_plain):.2f}x plain decoding's {statistics.median(plain):.0f}); row utilisation "
              f"{statistics.median(util):.1%} (static {statistics.median(util_static):.1%}); peak RSS "
              f"{statistics.median(memory):.2f}x static")
        # where a continuous run's generation time goes, and the rate of its decode steps alone
        runs = by["continuous"]
        step_ms = [1e3 * (c["seconds"]["decode"] + c["seconds"]["lm_head"]) / c["steps"] for c in runs]
        share = {part: statistics.median(c["seconds"][part] / c["gen_s"] for c in runs)
                 for part in ("decode", "lm_head", "prompts")}
        decode_only = [c["tokens"] / (c["seconds"]["decode"] + c["seconds"]["lm_head"]) for c in runs]
        print(f"    {benchmark} continuous, generation time: decode steps' decoder forwards {share['decode']:.0%}, "
              f"lm head {share['lm_head']:.0%} (a step {statistics.median(step_ms):.0f} ms with both; a whole step of "
              f"plain decoding {statistics.median(1e3 * args.batch_size / x for x in plain):.0f} ms), prompts' "
              f"forwards {share['prompts']:.0%}, the rest (next-token statistics, bookkeeping, store) "
              f"{1 - sum(share.values()):.0%}; its decode steps alone, with nothing else costing time, would give "
              f"{statistics.median(decode_only):.0f} tok/s")


if __name__ == "__main__":
    main()
