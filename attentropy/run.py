"""`run_benchmark`: questions -> generate -> capture -> run directory, one batch at a time, resumable."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .attention import recorded_layers
from .continuous import generate_continuous
from .data import ARITH_DEFAULT_DIFFICULTY, Question, load_questions, protocol_kind
from .generate import PrefixStore, generate
from .hidden_states import HiddenSpec, hidden_spec
from .instrument import answers_from_generations
from .model import DEFAULT_MODEL, load_model
from .prompts import MATH_SHOTS, MATH_USER_TEMPLATE, MAX_NEW_TOKENS
from .provenance import git_commit, package_versions
from .sampling import Sampling
from .schema import ATTN_STATS, TOKEN_STATS
from .store import (append_batch, done_question_ids, load_run, read_config, scan_parts, set_aside, write_json,
                    writer_lock)

PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "gguf", "numpy", "pandas", "pyarrow")
# Settings that change what a stored token means: a rerun into the same directory must repeat them.
IDENTITY_KEYS = ("model", "benchmark", "data", "protocol", "capture")


def _file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_benchmark(benchmark: str, out: str | Path, *, model: str = DEFAULT_MODEL, data: str | None = None,
                  limit: int | None = None, offset: int = 0, batch_size: int = 16, max_new_tokens: int | None = None,
                  shots: int = MATH_SHOTS, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  seed: int = 0, difficulty: int = ARITH_DEFAULT_DIFFICULTY, dtype: str = "auto",
                  device: str = "auto", device_map: str | None = None, save_attention: tuple[str, ...] = (),
                  attn_dtype: str = "float32", probe: str | Path | None = None, hidden_layers: str | None = None,
                  hidden_token_layers: str | None = None, raw: bool = False, batching: str = "continuous",
                  max_batch_tokens: int | None = None, ray: str | None = None, workers: int = 2,
                  gpus_per_worker: float = 0, cpus_per_worker: float = 1, progress: bool = True) -> dict:
    """Generate and capture every question not yet in `out`; return a summary of the whole run directory.
    `probe`: an instrument directory; every new batch is scored as it is generated (DIR/confidence/).
    `hidden_layers`, `hidden_token_layers`: hidden states kept (`hidden_spec`); default: `auto` and none for a new
    run, the run's own for a resumed one. `raw`: free prompts (`benchmark="prompts"`) continued as plain text,
    without the chat template; a prompt's own `max_new_tokens` bounds its answer (batches hold one bound each).
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
                               raw=raw)
    kind = protocol_kind(benchmark)
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[kind]
    protocol = {"kind": kind, "chat_template": not raw, "max_new_tokens": max_new_tokens,
                "sampling": {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "seed": seed}}
    if do_sample:  # how the seed is used (`answers_in_batches`)
        protocol["sampling"]["seeded"] = "per question" if batching == "continuous" else "per static batch"
    if kind == "math":
        exemplars = ("arith train split (same seed and difficulty)" if benchmark == "arith"
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


@dataclass(frozen=True)
class Settings:
    """How a run's answers are generated and stored: the same in its one process or in each of its workers."""

    batching: str
    batch_size: int
    shots: int
    max_new_tokens: int
    max_batch_tokens: int | None
    do_sample: bool
    temperature: float
    top_p: float
    seed: int
    save_attention: tuple[str, ...]
    attn_dtype: str
    probe: str | None  # an instrument that scores each batch as it is generated


def model_config(mdl, info, *, benchmark: str, data_info: dict, protocol: dict, previous: dict | None, batching: str,
                 batch_size: int, attn_dtype: str, hidden_layers: str | None, hidden_token_layers: str | None) -> dict:
    """config.json of a run of this model (`previous`: the run's config when it is resumed)."""
    text_config = mdl.config.get_text_config()
    kept = ((previous or {}).get("capture") or {}).get("hidden") or {}

    def setting(given: str | None, key: str, new_run: str) -> str:  # a resumed run keeps its own by default
        if given:
            return given
        return new_run if previous is None else ",".join(map(str, kept.get(key, []))) or "none"

    hidden = hidden_spec(text_config.num_hidden_layers, setting(hidden_layers, "layers", "auto"),
                         setting(hidden_token_layers, "token_layers", "none"))
    config = {
        "attentropy_version": __version__, "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {k: v for k, v in asdict(info).items() if k not in ("device", "extra")},
        "runtime": {"device": info.device, **info.extra, "torch_threads": torch.get_num_threads(),
                    "batching": batching, "batch_size": batch_size, "python": platform.python_version()},
        "benchmark": benchmark, "data": data_info, "protocol": protocol,
        "capture": {"layers": recorded_layers(mdl), "n_heads": text_config.num_attention_heads,
                    "n_kv_heads": getattr(text_config, "num_key_value_heads", text_config.num_attention_heads),
                    "attn_stats": list(ATTN_STATS), "token_stats": list(TOKEN_STATS), "attn_dtype": attn_dtype,
                    "row_convention": "completion token t <- query row len(prompt)-1+t", "units": "nats"},
        "packages": package_versions(PACKAGES),
    }
    if hidden:
        config["capture"]["hidden"] = {
            "layers": list(hidden.layers), "token_layers": list(hidden.token_layers),
            "size": text_config.hidden_size,
            "index": "transformers' output_hidden_states: 0 the embeddings, i after block i, the last "
                     "after the final norm",
            "rows": "the rows that predicted the completion tokens (inputs: last prompt token, "
                    "completion[:-1])"}
    return config


def generate_into(out: Path, mdl, tok, todo: list[Question], settings: Settings, config: dict, advance=None,
                  writer: str = "") -> int:
    """Generate and commit the answers of `todo` into the run directory `out` (whose config.json is `config`), one
    batch a part (`writer`: a data-parallel worker's part names); `advance(answers, tokens)` after each batch.
    Returns the number of new tokens."""
    instrument = None
    if settings.probe:
        from .instrument import load_instrument

        instrument = load_instrument(settings.probe)
    spec = config["capture"].get("hidden") or {}
    hidden = HiddenSpec(tuple(spec.get("layers", ())), tuple(spec.get("token_layers", ())))
    new_tokens = 0
    for gens in answers_in_batches(
            mdl, tok, todo, batching=settings.batching, batch_size=settings.batch_size, shots=settings.shots,
            max_new_tokens=settings.max_new_tokens, max_batch_tokens=settings.max_batch_tokens,
            do_sample=settings.do_sample, temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed,
            prefix_store=PrefixStore(), save_attention=set(settings.save_attention), hidden=hidden):
        scores = None
        if instrument is not None:
            scores = instrument.score(answers_from_generations(gens, config["capture"]["layers"],
                                                               config["capture"]["n_heads"], settings.attn_dtype))
        append_batch(out, gens, tok, attn_dtype=settings.attn_dtype, confidence=scores, writer=writer)
        n_tokens = sum(len(g.completion_ids) for g in gens)
        new_tokens += n_tokens
        if advance is not None:
            advance(len(gens), n_tokens)
    return new_tokens


def answers_in_batches(model, tokenizer, todo: list[Question], *, batching: str, batch_size: int, shots: int,
                       max_new_tokens: int, max_batch_tokens: int | None, do_sample: bool, temperature: float,
                       top_p: float, seed: int, prefix_store: PrefixStore, save_attention: set[str],
                       hidden: HiddenSpec):
    """Recorded generations of `todo`, in lists of up to `batch_size` to commit together. `continuous`: rows
    refilled as answers end (`generate_continuous`), a list committed each `batch_size` answers that ended;
    sampled with a random generator per question seeded by (seed, question id). The questions whose full
    attention rows are kept (`save_attention`) go through static batches. `static`: one batch decodes until its
    longest answer ends (transformers' `generate`); sampled with torch's global generator seeded by `seed` plus
    the batch's offset in `todo`."""
    if batching not in ("continuous", "static"):
        raise ValueError(f"batching must be continuous or static, got {batching!r}")
    static = todo if batching == "static" else [q for q in todo if q.id in save_attention]
    for lo, batch, limit in batches(static, batch_size, max_new_tokens):
        wanted = {b for b, q in enumerate(batch) if q.id in save_attention}
        # [0]: the prompts' keys/values are not needed here; dropped now, not held while the batch is stored
        yield generate(model, tokenizer, batch, shots=shots, max_new_tokens=limit, do_sample=do_sample,
                       temperature=temperature, top_p=top_p, seed=seed + lo, prefix_store=prefix_store,
                       record=True, save_maps=wanted, hidden=hidden)[0]
    if batching == "static":
        return
    rest = [q for q in todo if q.id not in save_attention]
    by_limit: dict[int, list[Question]] = {}  # free prompts may bring their own bounds
    for q in rest:
        by_limit.setdefault(q.metadata.get("max_new_tokens", max_new_tokens), []).append(q)
    for limit, questions in by_limit.items():
        ended = []
        for g in generate_continuous(model, tokenizer, questions, batch_size=batch_size, shots=shots,
                                     max_new_tokens=limit, prefix_store=prefix_store, hidden=hidden,
                                     max_batch_tokens=max_batch_tokens,
                                     sampling=Sampling(do_sample, temperature, top_p, seed)):
            ended.append(g)
            if len(ended) == batch_size:
                yield ended
                ended = []
        if ended:
            yield ended


def batches(todo: list[Question], batch_size: int, max_new_tokens: int):
    """(index of the first question, questions, their max_new_tokens): consecutive runs of `batch_size` questions,
    a new batch wherever a free prompt's own `max_new_tokens` changes (a batch decodes to one bound)."""
    lo = 0
    while lo < len(todo):
        limit = todo[lo].metadata.get("max_new_tokens", max_new_tokens)
        hi = lo + 1
        while hi < min(lo + batch_size, len(todo)) and todo[hi].metadata.get("max_new_tokens",
                                                                             max_new_tokens) == limit:
            hi += 1
        yield lo, todo[lo:hi], limit
        lo = hi


def _live_instrument(probe, out: Path, config: dict):
    """The instrument that scores a run while it generates: it must belong to the run's model and layout, and a
    run already scored by another instrument is not mixed with this one."""
    from .instrument import InstrumentError, load_instrument, model_identity, probe_stamp

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
