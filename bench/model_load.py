"""Benchmark: loading the embedded model from its GGUF file vs from attentropy's safetensors cache.

Prints, in one process: the time of transformers' GGUF load (dequantization), of `load_model("smollm2-135m")`
from the cache the first time (transformers' model classes imported on first use) and again, and their ratios.
Also checks that the cached model gives the same logits as the GGUF one.

    .venv/bin/python bench/model_load.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from attentropy.model import embedded_gguf, embedded_model_dir, load_model

    embedded_model_dir()  # make sure the cache exists (the first run of attentropy creates it)
    gguf = embedded_gguf()
    start = time.perf_counter()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    gguf_s = time.perf_counter() - start
    start = time.perf_counter()
    cached, _, _ = load_model("smollm2-135m")
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    load_model("smollm2-135m")
    again_s = time.perf_counter() - start
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356]])
    with torch.no_grad():
        diff = (from_gguf(ids).logits - cached(ids).logits).abs().max().item()
    print(f"GGUF load (dequantize): {gguf_s:.2f} s")
    print(f"cached load, first in process: {first_s:.2f} s ({gguf_s / first_s:.0f}x faster)")
    print(f"cached load, again: {again_s:.2f} s ({gguf_s / again_s:.0f}x faster)")
    print(f"max |logit difference| GGUF vs cached: {diff:.2e}")


if __name__ == "__main__":
    main()
