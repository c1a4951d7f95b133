"""A prepared GPU check: recording on CUDA with the shapes of Llama 3.2 1B and of Llama 3.2 11B Vision's text
model, random weights in bfloat16 (nothing to download). One command, a few minutes, prints a table:

  1. exactness: statistics recorded during generation (static and continuous batching; on CUDA the recording
     multiplies the model's bfloat16 queries, keys and values with float32 accumulation, `capture._product`)
     against an eager `output_attentions` recomputation of the same sequences (entropy and varentropy of every
     recorded row; worst absolute and relative error), and the recorded next-token statistics against a plain
     forward's logits;
  2. speed: new tokens/s of `attentropy` generation with recording (static and continuous batching) against plain
     transformers sdpa generation of the same number of tokens, at batch 1, 16 and 64;
  3. memory: peak GPU memory of each.

The 11B Vision text model is a Llama 3.1 8B-shaped decoder with 8 cross-attention layers that run only with an
image: its self-attention layers are what attentropy records, so the check builds them as a LlamaForCausalLM of the
same shape (32 self-attention layers of the 40). Without CUDA it says so and exits 0; `--smoke` runs the same code
on the CPU with tiny shapes (for the test suite's machines).

    .venv/bin/python bench/gpu_check.py [--models 1b 11b] [--batches 1 16 64] [--new-tokens 128] [--prompt 256]
"""

from __future__ import annotations

import argparse
import sys
import time

SHAPES = {  # hidden, layers, heads, kv heads, MLP, vocabulary (Llama 3.2 1B; the 11B Vision text self-attention)
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "11b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512),
}


def build(name: str, device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         **SHAPES[name])
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = 2
    return model


class Tokenizer:
    """The least `generate` needs: ids in, ids out (the check's prompts are random ids)."""

    pad_token_id, eos_token_id = 0, 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def exactness(model, prompts, new_tokens: int, mode: str) -> dict:
    """Recorded statistics (`mode`: static or continuous batching) against eager attention probabilities of the
    same full sequences (float32 math on the eager bf16 probabilities)."""
    import torch

    from attentropy.continuous import generate_continuous
    from attentropy.entropy import entropy_varentropy
    from attentropy.generate import generate

    questions = [_question(i, p) for i, p in enumerate(prompts)]
    if mode == "static":
        gens = generate(model, Tokenizer(), questions, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        record=True)[0]
    else:  # greedy to the first stop or the bound: random weights rarely draw the stop token
        gens = list(generate_continuous(model, Tokenizer(), questions, batch_size=len(questions),
                                        max_new_tokens=new_tokens))
    worst = {"entropy_abs": 0.0, "entropy_rel": 0.0, "varentropy_abs": 0.0, "logprob_abs": 0.0}
    model.set_attn_implementation("eager")
    try:
        for g in gens:
            ids = torch.tensor([g.prompt_ids + g.completion_ids[:-1]], device=model.device)
            with torch.no_grad():
                out = model(input_ids=ids, output_attentions=True)
            first = len(g.prompt_ids) - 1
            for li, attn in enumerate(out.attentions):  # [1, H, T, T]
                p = attn[0, :, first:].float()
                h, v = entropy_varentropy(p=p)  # [H, n]
                rec = torch.tensor(g.capture.attn[:, li], device=p.device)  # [n, H, S]
                err = (h.T - rec[..., 0]).abs()
                worst["entropy_abs"] = max(worst["entropy_abs"], float(err.max()))
                worst["entropy_rel"] = max(worst["entropy_rel"], float((err / h.T.abs().clamp(min=1e-3)).max()))
                worst["varentropy_abs"] = max(worst["varentropy_abs"], float((v.T - rec[..., 1]).abs().max()))
            logp = torch.log_softmax(out.logits[0, first:].float(), -1)
            target = torch.tensor(g.completion_ids, device=logp.device)
            lp = logp.gather(-1, target[:, None])[:, 0].cpu().numpy()
            worst["logprob_abs"] = max(worst["logprob_abs"], float(abs(lp - g.capture.logprob).max()))
    finally:
        model.set_attn_implementation("sdpa")
    return worst


def _question(i: int, prompt: list[int]):
    from attentropy.data import Question

    return Question(f"gpu-{i:05d}", "prompts", "", "", metadata={"ids": prompt})


def speed(model, prompts, new_tokens: int, mode: str) -> tuple[float, float]:
    """(new tokens per second, peak memory in GiB) of one batch of `prompts` generating `new_tokens` each."""
    import torch

    from attentropy.continuous import generate_continuous
    from attentropy.generate import generate, suppress_stops

    questions = [_question(i, p) for i, p in enumerate(prompts)]
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    if mode == "plain sdpa":
        from transformers import LogitsProcessorList

        ids = torch.tensor(prompts, device=model.device)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, eos_token_id=2,
                       logits_processor=LogitsProcessorList([suppress_stops([2], ids.shape[1], new_tokens)]))
        n = len(prompts) * new_tokens
    elif mode == "recorded, static":
        gens = generate(model, Tokenizer(), questions, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        record=True)[0]
        n = sum(len(g.completion_ids) for g in gens)
    else:
        n = sum(len(g.completion_ids) for g in generate_continuous(model, Tokenizer(), questions,
                                                                   batch_size=len(questions),
                                                                   max_new_tokens=new_tokens))
    sync()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() / 2 ** 30 if model.device.type == "cuda" else float("nan")
    return n / seconds, memory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["1b", "11b"], choices=["1b", "11b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=256, help="prompt length in tokens (random ids)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the code paths, no figures")
    args = parser.parse_args()
    import torch

    import attentropy.continuous as continuous_module
    import attentropy.generate as generate_module

    if args.smoke:
        device, dtype, models = torch.device("cpu"), torch.float32, ["smoke"]
        args.batches, args.new_tokens, args.prompt = [1, 4], 8, 16
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (skipped)")
        return 0
    else:
        device, dtype, models = torch.device("cuda"), torch.bfloat16, args.models
        print(f"gpu_check on {torch.cuda.get_device_name()}, torch {torch.__version__}, bfloat16")
    # free prompts of random ids: the prompt is the question's `ids`
    for module in (generate_module, continuous_module):  # static and continuous batching read them
        module.prompt_ids = lambda tokenizer, q, shots=8: list(q.metadata["ids"])
        module.stop_token_ids = lambda model, tokenizer: [2]
    generator = torch.Generator().manual_seed(0)
    for name in models:
        model = build(name, device, dtype)
        # a shared first eighth (as a chat template's system prompt) so the shared-prefix path runs too
        shared = [1] + torch.randint(3, model.config.vocab_size, (args.prompt // 8,), generator=generator).tolist()
        prompts = [shared + torch.randint(3, model.config.vocab_size, (args.prompt - len(shared),),
                                          generator=generator).tolist() for _ in range(max(args.batches))]
        print()
        for mode in ("static", "continuous"):
            worst = exactness(model, prompts[:2], min(args.new_tokens, 32), mode)
            print(f"{name}: recorded ({mode}) vs eager ({str(dtype)[6:]} model, float32 statistics): entropy worst "
                  f"abs {worst['entropy_abs']:.2e} nats (rel {worst['entropy_rel']:.2e}), varentropy worst abs "
                  f"{worst['varentropy_abs']:.2e}, log-prob worst abs {worst['logprob_abs']:.2e}")
        print(f"{'batch':>6} {'mode':>20} {'tokens/s':>10} {'vs plain':>9} {'peak GiB':>9}")
        for batch in args.batches:
            plain = None
            for mode in ("plain sdpa", "recorded, static", "recorded, continuous"):
                speed(model, prompts[:batch], 4, mode)  # warm-up (kernels, allocator)
                rate, memory = speed(model, prompts[:batch], args.new_tokens, mode)
                plain = plain or rate
                print(f"{batch:>6} {mode:>20} {rate:>10.1f} {rate / plain:>8.2f}x {memory:>9.2f}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
