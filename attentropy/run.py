"""`run_benchmark`: questions -> generate -> capture -> run directory, one batch at a time, resumable."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from tqdm import tqdm

from .data import load_questions, protocol_kind
from .model import DEFAULT_MODEL, load_model
from .prompts import BASE, MATH_SHOTS, MATH_USER_TEMPLATE, MAX_NEW_TOKENS, run_protocol
from .store import done_question_ids, load_run, read_config, scan_parts, set_aside, write_json
from .writer_lock import writer_lock
from .worker import Settings, generate_into, model_config

# Settings that change what a stored token means: a rerun into the same directory must repeat them.
IDENTITY_KEYS = ("model", "benchmark", "data", "protocol", "capture")


def _file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_benchmark(benchmark: str, out: str | Path, *, model: str = DEFAULT_MODEL, data: str | None = None,
                  limit: int | None = None, offset: int = 0, batch_size: int = 16, max_new_tokens: int | None = None,
                  shots: int = MATH_SHOTS, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  seed: int = 0, difficulty: int | str | None = None, dtype: str = "auto",
                  device: str = "auto", device_map: str | None = None, save_attention: tuple[str, ...] = (),
                  attn_dtype: str = "float32", probe: str | Path | None = None, hidden_layers: str | None = None,
                  hidden_token_layers: str | None = None, raw: bool = False, batching: str = "continuous",
                  max_batch_tokens: int | None = None, ray: str | None = None, workers: int = 2,
                  gpus_per_worker: float = 0, cpus_per_worker: float = 1, kinds: tuple[str, ...] | None = None,
                  progress: bool = True, protocol: str = "auto") -> dict:
    """Generate and capture every question not yet in `out`; return a summary of the whole run directory.
    `probe`: an instrument directory; every new batch is scored as it is generated (DIR/confidence/).
    `hidden_layers`, `hidden_token_layers`: hidden states kept (`hidden_spec`); default: `auto` and none for a new
    run, the run's own for a resumed one. `raw`: free prompts (`benchmark="prompts"`) continued as plain text,
    without the chat template; a prompt's own `max_new_tokens` bounds its answer (batches hold one bound each).
    `protocol`: chat (the chat template), base (plain-text few-shot Q/A, `prompts.base_prompt`) or auto (base
    where the model has no chat template); recorded in config.json's protocol (format "base").
    `batching`: continuous (rows refilled as answers end) or static (`answers_in_batches`);
    `max_batch_tokens`: continuous batching decodes fewer rows where the key/value columns held (the shared prefix
    once, plus rows x a row's own columns) would exceed it.
    `ray`: a data-parallel run on Ray (`attentropy.parallel`): "" for a local cluster (or the one RAY_ADDRESS
    names), else a cluster's address; `workers` actors of `gpus_per_worker` GPUs and `cpus_per_worker` CPUs each."""
    out = Path(out)
    if do_sample and save_attention and batching == "continuous":  # those questions would go through static batches
        raise ValueError("--save-attention with --sample needs --batching static (continuous batching seeds each "
                         "question's sampling, static batches each batch's)")
    questions = load_questions(benchmark, data, offset=offset, limit=limit, seed=seed, difficulty=difficulty,
                               raw=raw, kinds=kinds)
    kind = protocol_kind(benchmark)
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[kind]
    requested_protocol = protocol
    protocol = {"kind": kind, "chat_template": not raw, "max_new_tokens": max_new_tokens,
                "sampling": {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "seed": seed}}
    if do_sample:  # how the seed is used (`answers_in_batches`)
        protocol["sampling"]["seeded"] = "per question" if batching == "continuous" else "per static batch"
    if kind == "math":
        exemplars = ("arith train split (same seed, kind and steps)" if benchmark == "arith"
                     else "first rows of GSM8K train (attentropy/gsm8k_fewshot.jsonl)")
        protocol.update(shots=shots, user_template=MATH_USER_TEMPLATE, exemplars=exemplars)
    elif kind == "factual":
        protocol.update(user_template="{question}")
    else:
        protocol.update(user_template="{prompt}" if not raw else None,
                        per_prompt="a prompt's own system turn and max_new_tokens, where its JSONL line gives them")
    data_info = {"path": str(Path(data).resolve()), "sha256": _file_sha256(data)} if data else {"path": None}
    if benchmark in ("facts", "arith"):
        data_info.update(generated=True, seed=seed, **({"difficulty": difficulty} if benchmark == "arith" else {}))
        if kinds is not None:
            data_info["kinds"] = list(kinds)
    if benchmark == "facts":  # the suite's content: a run resumed after the suite changed is refused
        from .facts import suite_fingerprint

        data_info["suite"] = suite_fingerprint(seed, kinds)

    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out, f"attentropy run --benchmark {benchmark}"):  # one writer per run directory
        config_path = out / "config.json"
        previous = read_config(out) if config_path.exists() else None
        sampled = ((previous or {}).get("protocol") or {}).get("sampling") or {}
        if sampled.get("do_sample") and "seeded" not in sampled:  # written before continuous batching could sample
            sampled["seeded"] = "per static batch"
        if previous is not None:  # a damaged batch (torn copy, full disk) is set aside and generated again
            for damage in scan_parts(out, previous)[1]:
                where = set_aside(out, damage)
                print(f"[run] {damage.part} is damaged ({damage.reason}): set aside into {where}; its "
                      f"{len(damage.question_ids) or 'unknown'} questions are generated again")
        done = done_question_ids(out)
        todo = [q for q in questions if q.id not in done]
        settings = Settings(batching=batching, batch_size=batch_size, shots=shots, max_new_tokens=max_new_tokens,
                            max_batch_tokens=max_batch_tokens, do_sample=do_sample, temperature=temperature,
                            top_p=top_p, seed=seed, save_attention=tuple(save_attention), attn_dtype=attn_dtype,
                            probe=str(probe) if probe else None)
        described = dict(benchmark=benchmark, data_info=data_info, protocol=protocol, previous=previous,
                         batching=batching, batch_size=batch_size, attn_dtype=attn_dtype, hidden_layers=hidden_layers,
                         hidden_token_layers=hidden_token_layers)
        pool = mdl = tok = None
        config = previous
        try:
            if todo or previous is None:
                if ray is not None:
                    from .parallel import WorkerPool

                    pool = WorkerPool(out, model, address=ray or None, workers=workers,
                                      gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, dtype=dtype,
                                      device=device, device_map=device_map)
                    config = pool.describe(**described)
                else:
                    mdl, tok, info = load_model(model, dtype=dtype, device=device, device_map=device_map)
                    config = model_config(mdl, info, **described)
                if not raw:
                    config["protocol"].update(run_protocol(requested_protocol, config["runtime"]["chat_template"],
                                                           kind))
                if previous is not None:
                    for key in IDENTITY_KEYS:
                        if previous.get(key) != config.get(key):
                            raise ValueError(
                                f"{out} holds a run with a different {key!r} ({previous.get(key)!r}); resume with "
                                f"the same settings, or choose another --out")
                else:
                    write_json(config_path, config)
            if probe:
                _live_instrument(probe, out, config)  # checked and stamped here; each writer loads it
            if config["protocol"].get("format") == BASE:  # (`prompts.protocol_of` reads it from each question)
                for q in todo:
                    q.metadata["protocol"] = BASE

            started = time.perf_counter()
            bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc=f"{benchmark}", unit="q",
                       disable=not progress)
            new_tokens = 0

            def advance(n_answers: int, n_tokens: int) -> None:
                nonlocal new_tokens
                new_tokens += n_tokens
                bar.update(n_answers)
                bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - started):.0f}")

            if pool is not None:
                pool.run(todo, settings, config, advance)
            elif todo:
                generate_into(out, mdl, tok, todo, settings, config, advance)
            bar.close()
            elapsed = time.perf_counter() - started
            return summarize(out, new_tokens=new_tokens, seconds=elapsed)
        finally:
            if pool is not None:
                pool.close()


def _live_instrument(probe, out: Path, config: dict):
    """The instrument that scores a run while it generates: it must belong to the run's model and layout, and a
    run already scored by another instrument is not mixed with this one."""
    from .answers import InstrumentError, model_identity
    from .instrument import load_instrument
    from .scoring import probe_stamp

    instrument = load_instrument(probe)
    instrument.check(model_identity(config, config["capture"]["layers"], config["capture"]["n_heads"]),
                     f"the run {out}")
    stamp_path = out / "confidence" / "probe.json"
    if stamp_path.exists():
        previous = json.loads(stamp_path.read_text())
        if previous.get("fingerprint") != instrument.fingerprint:
            raise InstrumentError(f"{out} was scored by another instrument ({previous.get('fingerprint')}); "
                                  f"rescore it with `attentropy score --probe {probe} {out}` or choose another --out")
    else:
        stamp_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(stamp_path, probe_stamp(instrument))
    return instrument


def summarize(out: str | Path, new_tokens: int = 0, seconds: float = 0.0) -> dict:
    run = load_run(out)
    entropy = {}  # layer -> mean over tokens and heads, read a group of layers at a time
    for group in run.layer_groups() if len(run.tokens) else ():
        entropy.update(zip(group, run.attn("entropy", group).mean(axis=(0, 2)).tolist()))
    return {
        "run": str(out), "benchmark": run.config["benchmark"], "model": run.config["model"]["name"],
        "questions": len(run.samples), "tokens": len(run.tokens), "new_tokens": new_tokens,
        "tokens_per_s": new_tokens / seconds if seconds > 0 else None,
        "mean_attn_entropy_per_layer": {layer: round(v, 4) for layer, v in entropy.items()},
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
