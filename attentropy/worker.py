"""The worker: what one process of a run does, alone or as one of a data-parallel run's workers: the run's
`Settings`, its config.json (`model_config`), and its answers generated in batches and committed into the run
directory (`generate_into`, `answers_in_batches`, `batches`)."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__
from .attention import recorded_layers
from .continuous import generate_continuous
from .data import Question
from .generate import PrefixStore, generate
from .hidden_states import HiddenSpec, hidden_spec
from .answers import answers_from_generations
from .prompts import exemplar_group
from .provenance import git_commit, package_versions
from .sampling import Sampling
from .schema import ATTN_STATS, TOKEN_STATS
from .store import PROMPT_DIAGONAL, append_batch

PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "gguf", "numpy", "pandas", "pyarrow")


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
    if previous is None or PROMPT_DIAGONAL in previous.get("capture", {}):  # a resumed older run goes on without
        config["capture"][PROMPT_DIAGONAL] = (
            "per answer, layer and query head: the sum over the prompt's rows but its last (completion token 0's row) "
            "of ln(attention on the row's own token), samples column prompt_log_diag; their number, prompt_diag_rows")
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
    # free prompts may bring their own bounds; math questions of several exemplar sets (arith's step ranges) would
    # share no prompt prefix: one continuous run per bound and exemplar set
    groups: dict[tuple, list[Question]] = {}
    for q in rest:
        groups.setdefault((q.metadata.get("max_new_tokens", max_new_tokens), exemplar_group(q)), []).append(q)
    for (limit, _), questions in groups.items():
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
