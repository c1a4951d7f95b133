"""Benchmark: one decode step of the embedded model with and without `attentropy.packed_linears.packed_linears`.

For each batch size: a prompt of --keys random tokens is prefilled once; then a decode step (body + lm_head) is
timed with plain `F.linear` and with MKL-packed weights in turn, --rounds rounds of --steps steps each; prints the
median step time of each and their ratio, and the largest logit difference between the two.

    .venv/bin/python bench/packed_linears.py [--batch-sizes 1 4 8 16] [--keys 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--keys", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import attentropy.packed_linears as packing
    from attentropy.kv_cache import growing_cache
    from attentropy.model import load_model

    model, _, _ = load_model("smollm2-135m")
    threshold, packing.PACKED_MIN_BATCH = packing.PACKED_MIN_BATCH, 1  # measure the packing at every batch size
    for batch in args.batch_sizes:
        torch.manual_seed(0)
        cache = growing_cache(model)
        with torch.no_grad():
            model.model(input_ids=torch.randint(0, 40000, (batch, args.keys)), cache=cache, use_cache=True)
        token = torch.randint(0, 40000, (batch, 1))

        def step():
            if cache.get_seq_length() > args.keys:
                cache.crop(args.keys - cache.get_seq_length())
            with torch.no_grad():
                return model.lm_head(model.model(input_ids=token, cache=cache, use_cache=True).last_hidden_state)

        def timed(packed: bool):
            with packing.packed_linears(model, batch if packed else 0):
                logits = step()  # also packs the weights on first use
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
            return (time.perf_counter() - start) / args.steps * 1e3, logits

        times = {False: [], True: []}
        for _ in range(args.rounds):
            for packed in (False, True):
                times[packed].append(timed(packed)[0])
        plain, packed = statistics.median(times[False]), statistics.median(times[True])
        diff = (timed(False)[1] - timed(True)[1]).abs().max().item()
        note = "" if batch >= threshold else f" (below PACKED_MIN_BATCH = {threshold}: generate does not pack)"
        print(f"batch {batch:2d}, {args.keys} keys: plain {plain:6.1f} ms, packed {packed:6.1f} ms per decode step, "
              f"ratio {packed / plain:.3f}; max |logit difference| {diff:.1e}{note}", flush=True)
        for m in model.modules():
            m.__dict__.pop("_mkl_packed", None)


if __name__ == "__main__":
    main()
