"""`run_benchmark`: questions -> generate -> capture -> run directory, one batch at a time, resumable."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .capture import ATTN_STATS, TOKEN_STATS, recorded_layers
from .data import ARITH_DEFAULT_DIFFICULTY, load_questions
from .generate import MATH_SHOTS, MATH_USER_TEMPLATE, MAX_NEW_TOKENS, PrefixStore, generate, protocol_kind
from .model import DEFAULT_MODEL, load_model
from .store import append_batch, done_question_ids, load_run, write_json

PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "gguf", "numpy", "pandas", "pyarrow")
# Settings that change what a stored token means: a rerun into the same directory must repeat them.
IDENTITY_KEYS = ("model", "benchmark", "data", "protocol", "capture")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except OSError:
        return None


def _file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_benchmark(benchmark: str, out: str | Path, *, model: str = DEFAULT_MODEL, data: str | None = None,
                  limit: int | None = None, offset: int = 0, batch_size: int = 16, max_new_tokens: int | None = None,
                  shots: int = MATH_SHOTS, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  seed: int = 0, difficulty: int = ARITH_DEFAULT_DIFFICULTY, dtype: str = "auto",
                  device: str = "auto", device_map: str | None = None, save_attention: tuple[str, ...] = (),
                  attn_dtype: str = "float32", progress: bool = True) -> dict:
    """Generate and capture every question not yet in `out`; return a summary of the whole run directory."""
    out = Path(out)
    questions = load_questions(benchmark, data, offset=offset, limit=limit, seed=seed, difficulty=difficulty)
    kind = protocol_kind(benchmark)
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[kind]
    protocol = {"kind": kind, "chat_template": True, "max_new_tokens": max_new_tokens,
                "sampling": {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "seed": seed}}
    if kind == "math":
        exemplars = ("arith train split (same seed and difficulty)" if benchmark == "arith"
                     else "first rows of GSM8K train (attentropy/gsm8k_fewshot.jsonl)")
        protocol.update(shots=shots, user_template=MATH_USER_TEMPLATE, exemplars=exemplars)
    else:
        protocol.update(user_template="{question}")
    data_info = {"path": str(Path(data).resolve()), "sha256": _file_sha256(data)} if data else {"path": None}
    if benchmark in ("facts", "arith"):
        data_info.update(generated=True, seed=seed, **({"difficulty": difficulty} if benchmark == "arith" else {}))

    done = done_question_ids(out) if out.exists() else set()
    todo = [q for q in questions if q.id not in done]
    config_path = out / "config.json"
    previous = json.loads(config_path.read_text()) if config_path.exists() else None
    mdl = tok = None
    if todo or previous is None:
        mdl, tok, info = load_model(model, dtype=dtype, device=device, device_map=device_map)
        text_config = mdl.config.get_text_config()
        config = {
            "attentropy_version": __version__, "git_commit": git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {k: v for k, v in asdict(info).items() if k not in ("device", "extra")},
            "runtime": {"device": info.device, **info.extra, "torch_threads": torch.get_num_threads(),
                        "python": platform.python_version()},
            "benchmark": benchmark, "data": data_info, "protocol": protocol,
            "capture": {"layers": recorded_layers(mdl), "n_heads": text_config.num_attention_heads,
                        "n_kv_heads": getattr(text_config, "num_key_value_heads", text_config.num_attention_heads),
                        "attn_stats": list(ATTN_STATS), "token_stats": list(TOKEN_STATS), "attn_dtype": attn_dtype,
                        "row_convention": "completion token t <- query row len(prompt)-1+t", "units": "nats"},
            "packages": {p: importlib.metadata.version(p) for p in PACKAGES},
        }
        if previous is not None:
            for key in IDENTITY_KEYS:
                if previous.get(key) != config.get(key):
                    raise ValueError(
                        f"{out} holds a run with a different {key!r} ({previous.get(key)!r}); resume with the same "
                        f"settings, or choose another --out")
        else:
            out.mkdir(parents=True, exist_ok=True)
            write_json(config_path, config)

    started = time.perf_counter()
    new_tokens = 0
    prefix_store = PrefixStore()
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc=f"{benchmark}", unit="q",
               disable=not progress)
    for lo in range(0, len(todo), batch_size):
        batch = todo[lo: lo + batch_size]
        wanted = {b for b, q in enumerate(batch) if q.id in save_attention}
        # [0]: the prompts' keys/values are not needed here; dropped now, they are not held while the batch is stored
        gens = generate(mdl, tok, batch, shots=shots, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_p=top_p, seed=seed + lo, prefix_store=prefix_store,
                        record=True, save_maps=wanted)[0]
        append_batch(out, gens, tok, attn_dtype=attn_dtype)
        new_tokens += sum(len(g.completion_ids) for g in gens)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - started):.0f}")
    bar.close()
    elapsed = time.perf_counter() - started
    return summarize(out, new_tokens=new_tokens, seconds=elapsed)


def summarize(out: str | Path, new_tokens: int = 0, seconds: float = 0.0) -> dict:
    run = load_run(out)
    entropy = run.attn("entropy")  # [n_tokens, L, H]
    return {
        "run": str(out), "benchmark": run.config["benchmark"], "model": run.config["model"]["name"],
        "questions": len(run.samples), "tokens": len(run.tokens), "new_tokens": new_tokens,
        "tokens_per_s": new_tokens / seconds if seconds > 0 else None,
        "mean_attn_entropy_per_layer": dict(zip(run.layers, np.round(entropy.mean(axis=(0, 2)), 4).tolist()))
        if len(entropy) else {},
    }


def format_summary(s: dict) -> str:
    lines = [f"{s['benchmark']} on {s['model']}: {s['questions']} questions, {s['tokens']} completion tokens "
             f"in {s['run']}"]
    if s["tokens_per_s"]:
        lines.append(f"  this invocation: {s['new_tokens']} new tokens, {s['tokens_per_s']:.1f} tokens/s "
                     "(generation + capture + store)")
    if s["mean_attn_entropy_per_layer"]:
        lines.append("  mean attention entropy per layer (nats, mean over tokens and heads):")
        items = [f"L{layer:>2} {v:5.3f}" for layer, v in s["mean_attn_entropy_per_layer"].items()]
        lines += ["    " + "  ".join(items[i:i + 6]) for i in range(0, len(items), 6)]
    return "\n".join(lines)
