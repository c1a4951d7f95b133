"""Benchmark: the cost of attentropy's capture on the embedded model (SmolLM2-135M-Instruct, float32, CPU).

For 256 and 1024 new tokens and batch sizes 1 and 16 it measures tokens/s and peak memory of
  (a) plain batched generation with sdpa attention (attentropy's `generate`),
  (b) attentropy's generate with recording + store (what `attentropy run` does per batch),
  (c) the naive approach: generation with eager attention and `output_attentions=True`, the statistics computed
      afterwards from the returned weights.
Targets: (b)/(a) <= 1.10 in time and <= 1.25 in peak memory; (b) at batch 16 >= 8x the tokens/s of (c) at batch 1.

Timing. This machine's speed drifts by tens of percent over minutes, more than the differences measured, so
every ratio is measured on runs that alternate in one child process after a short warm-up: at batch 1,
(a), (b), (a), (b), ...; at batch 16, (a) and (b) at batch 16 and (c) at batch 1 in turn, so the speedup of (b)
at batch 16 over (c) at batch 1 is paired too. Each ratio is printed two ways: from each configuration's fastest
run (other processes only ever add time), and as the median of the ratios of the --repeats rounds (the runs of a
round follow each other, so slow drift cancels). Rounds by default: 6 at 256 new tokens, 3 at 1024 (1536 / N, at
least 3): a batch-1 run of 256 tokens lasts ~15 s, and this machine's noise over 15 s is as large as the effect.
Peak memory (max RSS): every mode in a child process of its own, whose run also counts as one more timing.
Generation is forced to exactly N new tokens (the stop tokens suppressed until then, in place:
`attentropy.generate.suppress_stops`, in all three modes), so all modes produce the same token count.
Optional mode `a_dynamic_cache` (--modes a_generate a_dynamic_cache): (a) with transformers' DynamicCache, which
copies every layer's keys/values at each step, instead of attentropy's in-place GrowingLayer; it alternates with
(a), and measures what the in-place cache gains. Optional mode `b_no_prompt_diagonal` (--modes b_attentropy
b_no_prompt_diagonal): (b) without LLM-Check's prompt part (the prompt rows' log own-token attention, computed at
prefill, and the shared prefix's own forward for it); it alternates with (b), and measures what recording the prompt
part costs (most with few new tokens: --new-tokens 1 times little but prefills).

    .venv/bin/python bench/capture.py [--threads 2] [--new-tokens 256 1024] [--batch-sizes 1 16] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

MODES = ("a_generate", "b_attentropy", "c_naive")
# alternate in one process, at the same batch size
TIMED = ("a_generate", "b_attentropy", "a_dynamic_cache", "b_no_prompt_diagonal")


def child(items: list[tuple[str, int]], new_tokens: int, threads: int, repeats: int) -> dict:
    """Run each (mode, batch size) of `items` `repeats` times, in turn; return {"mode@batch": [seconds, ...]},
    the tokens of each and the peak RSS."""
    import torch

    torch.set_num_threads(threads)
    import attentropy.generate
    import attentropy.store  # noqa: F401 - imported before timing: run_once's imports are then free
    from attentropy.data import make_facts
    from attentropy.model import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    questions = {batch: make_facts(batch, seed=0) for _, batch in items}
    for mode, batch in items:  # warm-up: first calls pay one-time costs (lazy initialisation, first page faults)
        run_once(mode, model, tokenizer, questions[batch], batch, 4)
    times: dict[str, list[float]] = {f"{mode}@{batch}": [] for mode, batch in items}
    tokens = {}
    for _ in range(repeats):
        for mode, batch in items:
            start = time.perf_counter()
            tokens[f"{mode}@{batch}"] = run_once(mode, model, tokenizer, questions[batch], batch, new_tokens)
            times[f"{mode}@{batch}"].append(time.perf_counter() - start)
    return {"times": times, "tokens": tokens, "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_once(mode, model, tokenizer, questions, batch, new_tokens) -> int:
    import torch

    from attentropy.entropy import entropy_varentropy
    from transformers import LogitsProcessorList

    from attentropy.generate import PrefixStore, generate, suppress_stops
    from attentropy.prompts import prompt_ids, stop_token_ids
    from attentropy.store import append_batch

    if mode == "a_dynamic_cache":
        import attentropy.generate
        from transformers import DynamicCache

        in_place = attentropy.generate.growing_cache
        attentropy.generate.growing_cache = lambda model: DynamicCache(config=model.config.get_text_config())
        try:
            return run_once("a_generate", model, tokenizer, questions, batch, new_tokens)
        finally:
            attentropy.generate.growing_cache = in_place
    if mode == "b_no_prompt_diagonal":
        import numpy as np

        import attentropy.generate

        class NoPromptDiagonal:  # records nothing; its result: zeros of the right shape
            def __init__(self, layout_mask, last_row, chunk_bytes=0):
                self.batch = layout_mask.shape[0]

            def record(self, *args):
                pass

            def result(self, layers):
                heads = model.config.num_attention_heads
                return np.zeros((self.batch, len(layers), heads)), np.zeros(self.batch, np.int64)

        recording = attentropy.generate.PromptDiagonal
        attentropy.generate.PromptDiagonal = NoPromptDiagonal
        try:
            return run_once("b_attentropy", model, tokenizer, questions, batch, new_tokens)
        finally:
            attentropy.generate.PromptDiagonal = recording
    if mode in ("a_generate", "b_attentropy"):
        gens = generate(model, tokenizer, questions, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        prefix_store=PrefixStore(), record=mode == "b_attentropy")[0]  # as `attentropy run` does
        if mode == "b_attentropy":
            with tempfile.TemporaryDirectory() as out:
                append_batch(out, gens, tokenizer)
        n_tokens = sum(len(g.completion_ids) for g in gens)
    else:
        model.set_attn_implementation("eager")
        prompts = [prompt_ids(tokenizer, q) for q in questions]
        width = max(len(p) for p in prompts)
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        stops = stop_token_ids(model, tokenizer)
        with torch.no_grad():  # forced to N tokens by the same stop suppression as (a) and (b)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 logits_processor=LogitsProcessorList([suppress_stops(stops, width, new_tokens)]),
                                 do_sample=False, top_k=None, output_attentions=True, output_scores=True,
                                 return_dict_in_generate=True, eos_token_id=stops)
        # statistics of every generated token from the returned weights: step s, layer l -> [B, H, q, K]
        for step, layers in enumerate(out.attentions):
            for weights in layers:
                entropy_varentropy(p=weights[:, :, -1].float())
            entropy_varentropy(torch.log_softmax(out.scores[step].float(), -1))
        model.set_attn_implementation("sdpa")
        n_tokens = batch * (out.sequences.shape[1] - width)
    return n_tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES + TIMED[2:])
    parser.add_argument("--repeats", type=int, help="rounds of alternating runs besides the runs that "
                        "measure memory (default: 1536 / new tokens, at least 3)")
    parser.add_argument("--naive-max-gb", type=float, default=18.0,
                        help="skip a naive configuration whose estimated peak exceeds this (it would not fit)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec, new_tokens = args.child.split(",")
        items = [(item.split("@")[0], int(item.split("@")[1])) for item in spec.split("+")]
        print(json.dumps(child(items, int(new_tokens), args.threads, args.repeats)))
        return

    def spawn(items, new_tokens, repeats):
        cmd = [sys.executable, __file__, "--child", f"{'+'.join(f'{m}@{b}' for m, b in items)},{new_tokens}",
               "--threads", str(args.threads), "--repeats", str(repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{items} x {new_tokens} failed:\n{proc.stderr[-2000:]}")
            return None
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def naive_gb(batch, new_tokens):
        # the returned weights alone: steps x layers x B x H x K floats, K growing to prompt + N
        return 30 * 9 * batch * (new_tokens + 60) ** 2 / 2 * 4 / 1e9 * 2.5

    results = {}  # (mode, batch, new tokens) -> figures
    rounds = {}  # (mode, batch, new tokens) -> seconds of each alternating round
    for new_tokens in args.new_tokens:
        for batch in args.batch_sizes:
            items = [(m, batch) for m in TIMED if m in args.modes]
            if (batch == 16 and "c_naive" in args.modes and 1 in args.batch_sizes and "b_attentropy" in args.modes
                    and naive_gb(1, new_tokens) <= args.naive_max_gb):
                items.append(("c_naive", 1))  # the 8x target pairs (b) at batch 16 with (c) at batch 1
            if len(items) > 1:
                alternating = spawn(items, new_tokens, args.repeats or max(3, -(-1536 // new_tokens)))
                for mode, b in items:
                    rounds[(mode, b, new_tokens)] = alternating["times"][f"{mode}@{b}"] if alternating else []
            for mode in args.modes:
                if mode == "c_naive" and naive_gb(batch, new_tokens) > args.naive_max_gb:
                    print(f"skip c_naive batch {batch} x {new_tokens}: estimated {naive_gb(batch, new_tokens):.0f} "
                          "GB peak (it would not fit)")
                    continue
                alone = spawn([(mode, batch)], new_tokens, 1)
                if alone is None:
                    continue
                results[(mode, batch, new_tokens)] = {
                    "alone_seconds": alone["times"][f"{mode}@{batch}"][0],
                    "tokens": alone["tokens"][f"{mode}@{batch}"],
                    "peak_rss_mb": alone["peak_rss_mb"], "rss_after_load_mb": alone["rss_after_load_mb"]}

    for key, r in results.items():  # fastest of all timings of a configuration, alone or alternating
        mode, batch, new_tokens = key
        times = [r["alone_seconds"]] + rounds.get(key, [])
        r["seconds"] = min(times)
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        print(f"{mode:15s} batch {batch:2d} new {new_tokens:4d}: {r['tokens_per_s']:7.1f} tok/s "
              f"({r['tokens']} tokens, fastest of {', '.join(f'{t:.1f}' for t in times)} s), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB (after load {r['rss_after_load_mb']:.0f} MB)", flush=True)

    def paired(x, y, scale=1.0, fmt=".3f"):
        """scale * (time of y / time of x) in each alternating round, sorted, and their median."""
        pairs = sorted(scale * ty / tx for tx, ty in zip(rounds.get(x, []), rounds.get(y, [])))
        if not pairs:
            return ""
        return f"; each round {', '.join(f'{p:{fmt}}' for p in pairs)}, median {statistics.median(pairs):{fmt}}"

    print("\nratios (targets: time <= 1.10, peak <= 1.25, speedup >= 8); 'fastest': from each configuration's "
          "fastest run; 'each round': from the runs of one alternating round")
    for new_tokens in args.new_tokens:
        for batch in args.batch_sizes:
            a, b = results.get(("a_generate", batch, new_tokens)), results.get(("b_attentropy", batch, new_tokens))
            dynamic = results.get(("a_dynamic_cache", batch, new_tokens))
            if a and dynamic:
                print(f"  batch {batch:2d} new {new_tokens:4d}: (a) with transformers' DynamicCache / (a) in place: "
                      f"time, fastest {dynamic['seconds'] / a['seconds']:.3f}"
                      f"{paired(('a_generate', batch, new_tokens), ('a_dynamic_cache', batch, new_tokens))}; "
                      f"peak RSS {dynamic['peak_rss_mb'] / a['peak_rss_mb']:.3f}")
            without = results.get(("b_no_prompt_diagonal", batch, new_tokens))
            if b and without:
                print(f"  batch {batch:2d} new {new_tokens:4d}: (b) / (b) without the prompt rows' log-diagonal: "
                      f"time, fastest {b['seconds'] / without['seconds']:.3f}"
                      f"{paired(('b_no_prompt_diagonal', batch, new_tokens), ('b_attentropy', batch, new_tokens))}")
            if a and b:
                working = (b['peak_rss_mb'] - b['rss_after_load_mb']) \
                    / max(1, a['peak_rss_mb'] - a['rss_after_load_mb'])
                print(f"  batch {batch:2d} new {new_tokens:4d}: (b)/(a) time, fastest {b['seconds'] / a['seconds']:.3f}"
                      f"{paired(('a_generate', batch, new_tokens), ('b_attentropy', batch, new_tokens))}; "
                      f"peak RSS {b['peak_rss_mb'] / a['peak_rss_mb']:.3f}, working memory (peak - after load) "
                      f"{working:.2f}")
        b16, c1 = results.get(("b_attentropy", 16, new_tokens)), results.get(("c_naive", 1, new_tokens))
        if b16 and c1:
            # tokens/s ratio = (tokens_b / t_b) / (tokens_c / t_c): per round, the time ratio t_c / t_b scaled
            each = paired(("b_attentropy", 16, new_tokens), ("c_naive", 1, new_tokens),
                          scale=b16["tokens"] / c1["tokens"], fmt=".1f")
            print(f"  new {new_tokens:4d}: (b) batch 16 / (c) batch 1 tokens/s, fastest "
                  f"{b16['tokens_per_s'] / c1['tokens_per_s']:.1f}x{each}")


if __name__ == "__main__":
    main()
