"""Prompts (the benchmarks' protocols) and batched generation with left padding."""

from __future__ import annotations

import copy as copy_module
import functools
import hashlib
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from .capture import Capture, recorded_captures
from .data import Question, fewshot_exemplars, protocol_kind
from .hidden_states import HiddenSpec
from .layout import PromptCache, common_prefix_len, positions, prompt_layout
from .recorder import recording_generation

# Meta's published Llama 3.2 GSM8K protocol: this user turn, 8 worked exemplars as earlier chat turns,
# every answer ending "The final answer is N", up to 1024 new tokens.
MATH_USER_TEMPLATE = (
    "Given the following problem, reason and give a final answer to the problem.\nProblem: {question}\n"
    'Your response should end with "The final answer is [answer]" where [answer] is the response to the problem.'
)
MATH_SHOTS = 8
MAX_NEW_TOKENS = {"factual": 128, "math": 1024, "free": 256}


def exemplar_answer(reference: str) -> str:
    """A GSM8K reference solution as a chain of thought: calculator annotations removed, `#### N` replaced by
    the sentence the protocol asks for."""
    body, _, final = reference.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe final answer is {final.strip()}"


def chat_messages(question: Question, shots: int = MATH_SHOTS) -> list[dict]:
    """The chat for one question: SimpleQA-style benchmarks get the bare question as the user turn; GSM8K-style
    ones get `shots` exemplars of the benchmark's train split as a multi-turn chat, then the question."""
    kind = protocol_kind(question.benchmark)
    if kind == "factual":
        return [{"role": "user", "content": question.question}]
    if kind == "free":  # a free prompt, with its own system turn if it has one
        system = question.metadata.get("system")
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question.question}]
    messages = []
    for ex in fewshot_exemplars(question)[:shots]:
        messages.append({"role": "user", "content": MATH_USER_TEMPLATE.format(question=ex.question)})
        messages.append({"role": "assistant", "content": exemplar_answer(ex.reference)})
    messages.append({"role": "user", "content": MATH_USER_TEMPLATE.format(question=question.question)})
    return messages


def prompt_ids(tokenizer, question: Question, shots: int = MATH_SHOTS) -> list[int]:
    """The prompt's token ids: the chat template applied to `chat_messages`, or for a raw free prompt the text
    as the tokenizer encodes it for continuation (with its beginning-of-text token, if it adds one)."""
    if question.metadata.get("raw"):
        return list(tokenizer(question.question, add_special_tokens=True)["input_ids"])
    ids = tokenizer.apply_chat_template(chat_messages(question, shots), add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    return list(ids)


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn tokens: the tokenizer's eos plus the generation config's (Llama 3.2 lists several)."""
    ids = set()
    for source in (tokenizer.eos_token_id, model.generation_config.eos_token_id):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    return sorted(ids)


@dataclass
class Generation:
    question: Question
    prompt_ids: list[int]
    completion_ids: list[int]  # generated tokens up to and including the end-of-turn token, if one came
    completion: str  # decoded completion without special tokens
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)
    capture: Capture | None = None  # the completion tokens' statistics, when generated with record=True


def growing_cache(model):
    """A transformers DynamicCache whose full-attention layers append in place (`GrowingLayer`)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    growing_layer = _growing_layer_class()
    cache = DynamicCache(config=model.config.get_text_config())
    cache.layers = [growing_layer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@functools.cache
def _growing_layer_class():  # defined on first use: importing transformers' cache module takes seconds
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """transformers' DynamicLayer appends a step's keys/values with torch.cat, copying the whole layer cache
        at every decode step: at batch 16 and 1,000 keys that is ~0.7 GB moved per step on SmolLM2 (plain
        generation, batch 16 x 1024 new tokens, 2 CPU threads: 86 tok/s with it, 111 with this layer;
        `bench/capture.py --new-tokens 1024 --batch-sizes 16 --modes a_generate a_dynamic_cache`). This layer
        writes into a buffer with room for `spare` more tokens and hands out the filled part as a view, so it
        copies only when the buffer is full (or was replaced by crop/reorder/repeat).

        `keys_by_dim` (set by `generate` when it records): the key buffer is stored as [B, H, D, capacity] and
        handed out as the usual [B, H, K, D] shape, a transposed view. The recording attention computes q @ k^T
        from it as a product with contiguous [D, K] rows: 1.3-1.9x faster than reading [K, D] rows transposed, the
        whole attention call 9-19 % faster (batch 1 and 16, 300-1,200 keys; throwaway micro-benchmark,
        alternating, identical outputs). sdpa's CPU kernel wants [K, D] rows (6-20x slower on this layout), so
        plain generation keeps the default."""

        spare = 256
        keys_by_dim = False
        shared = 0  # keys before this layer's own, held once for all rows elsewhere (continuous batching's prefix)

        def get_seq_length(self) -> int:  # the length attention sees: the shared keys and the layer's own
            return self.shared + super().get_seq_length()

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, new = super().get_seq_length(), key_states.shape[-2]
            buffers = getattr(self, "buffers", None)
            in_place = (buffers is not None and n > 0 and self.keys.data_ptr() == buffers[0].data_ptr()
                        and self.keys.stride() == buffers[0].stride() and self.keys.shape[:2] == buffers[0].shape[:2]
                        and n + new <= buffers[0].shape[-2] and (buffers[0].stride(-1) != 1) == self.keys_by_dim)
            if not in_place:  # first call, full, self.keys replaced by a method of DynamicLayer, or a new layout
                size = n + new + self.spare
                key_buffer = (key_states.new_empty(*key_states.shape[:2], key_states.shape[-1], size).transpose(2, 3)
                              if self.keys_by_dim else
                              key_states.new_empty(*key_states.shape[:2], size, key_states.shape[-1]))
                buffers = (key_buffer, value_states.new_empty(*value_states.shape[:2], size, value_states.shape[-1]))
                if n:
                    buffers[0][..., :n, :] = self.keys
                    buffers[1][..., :n, :] = self.values
                self.buffers = buffers
            buffers[0][..., n:n + new, :] = key_states
            buffers[1][..., n:n + new, :] = value_states
            self.keys, self.values = buffers[0][..., :n + new, :], buffers[1][..., :n + new, :]
            return self.keys, self.values

    return GrowingLayer


PACKED_MIN_BATCH = 4


@contextmanager
def packed_linears(model, batch_size: int):
    """Within this context, on CPU in float32, the linear layers multiply a decode step's `batch_size` rows by
    weights that MKL packed once for its GEMM kernel (`torch.ops.mkl._mkl_linear`, the op torch's inductor uses for
    the same purpose), instead of `F.linear`, whose MKL call re-packs the transposed weight at every call. Any
    other row count (prefill, a teacher-forced forward) takes the plain `F.linear`. One decode step of SmolLM2-135M
    over 300 keys, 2 CPU threads (`bench/packed_linears.py`, alternating, median of 7): packed / plain 0.85 at
    batch 4, 0.82 at 8, 0.81 at 16, but 1.19 at batch 1, hence only from batch `PACKED_MIN_BATCH` on. Results differ from `F.linear`'s by float32 rounding at most (as results at different
    batch sizes already do). Cost: each packed weight is kept on its module (`_mkl_packed`) for reuse by later
    batches, about the weights' size again: peak RSS of plain generation on SmolLM2-135M at batch 16 x 256 new
    tokens 1,270 MB without, 1,788 MB with (`bench/capture.py`). Packed lazily, so layers that never run (Mllama's
    vision tower) are not packed."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" not in m.__dict__
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    if batch_size < PACKED_MIN_BATCH or not linears or not _mkl_linear_available():
        yield
        return
    for module in linears:
        module.forward = functools.partial(_packed_linear, module, batch_size)
    try:
        yield
    finally:
        for module in linears:
            del module.forward


@functools.cache
def _mkl_linear_available() -> bool:
    try:
        return torch.backends.mkl.is_available() and callable(torch.ops.mkl._mkl_linear)
    except (AttributeError, RuntimeError):
        return False


def _packed_linear(module: torch.nn.Linear, batch_size: int, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows != batch_size or torch.is_grad_enabled():
        return torch.nn.functional.linear(x, module.weight, module.bias)
    packed = module.__dict__.get("_mkl_packed")
    if packed is None or packed[0] != batch_size:  # the batch size is part of MKL's packing
        packed = (batch_size, torch.ops.mkl._mkl_reorder_linear_weight(module.weight, batch_size))
        module._mkl_packed = packed
    out = torch.ops.mkl._mkl_linear(x.reshape(rows, x.shape[-1]), packed[1], module.weight, module.bias, batch_size)
    return out.view(*x.shape[:-1], out.shape[-1])


@dataclass
class PrefixStore:
    """Keys/values of the prompt prefix shared by a run's batches (system prompt and few-shot exemplars), so an
    8-shot prompt's ~1,500 shared tokens are computed once per run rather than once per question."""

    ids: tuple[int, ...] = ()
    cache: object = None

    def get(self, model, ids: list[int], copy: bool = True):
        """A fresh batch-1 copy of the cache of `ids` (computed on first use or when the prefix changes); with
        `copy=False` the stored cache itself, to read only."""
        if tuple(ids) != self.ids:
            self.cache = growing_cache(model)
            model.get_decoder()(input_ids=torch.tensor([ids], device=model.device), cache=self.cache, use_cache=True)
            self.ids = tuple(ids)
        return copy_module.deepcopy(self.cache) if copy else self.cache


def suppress_stops(stops: list[int], prompt_width: int, min_new_tokens: int):
    """A logits processor that keeps the stop tokens' scores at -inf until `min_new_tokens` tokens are generated,
    in place. transformers' own (`min_new_tokens=`) copies the [B, V] scores and masks the whole vocabulary at every
    step: a step's copy, processing and argmax of the scores take 3.0-3.7 ms with it at batch 16 on 2 CPU cores and
    1.6 ms with this (batch 1: 0.6 and 0.2 ms). `bench/capture.py` forces exactly N new tokens with this."""
    from transformers import LogitsProcessor

    class SuppressStops(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if input_ids.shape[-1] - prompt_width < min_new_tokens:
                scores[:, stops] = float("-inf")  # scores: this step's own float32 copy of the logits
            return scores

    return SuppressStops()


@torch.no_grad()
def generate(model, tokenizer, questions: list[Question], *, shots: int = MATH_SHOTS, max_new_tokens: int = 128,
             min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, prefix_store: PrefixStore | None = None, record: bool = False,
             save_maps: set[int] = frozenset(), hidden: HiddenSpec = HiddenSpec()
             ) -> tuple[list[Generation], PromptCache]:
    """Generate answers for one batch; greedy unless `do_sample` (seeded per batch).

    The prompts' common prefix is computed once (and kept in `prefix_store` across batches), the rest of each
    prompt is left padded after it. With `record`, every generated token's statistics are read in the decode
    steps themselves (`Generation.capture`; `save_maps`: batch indices whose full attention rows are kept;
    `hidden`: the hidden states of the same rows).
    Returns the generations and the prompts' keys/values, for a later teacher-forced `capture`."""
    from transformers import LogitsProcessorList

    prompts = [prompt_ids(tokenizer, q, shots) for q in questions]
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prefix_len = common_prefix_len(prompts)
    input_ids, attention_mask = prompt_layout(prompts, pad, prefix_len)
    if prefix_len:
        cache = (prefix_store or PrefixStore()).get(model, prompts[0][:prefix_len])
        cache.batch_repeat_interleave(len(prompts))
    else:
        cache = growing_cache(model)
    if record:  # keys laid out for the recording attention
        for layer in cache.layers:
            if isinstance(layer, _growing_layer_class()):
                layer.keys_by_dim = True
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    if do_sample:
        torch.manual_seed(seed)
    processors = [suppress_stops(stops, input_ids.shape[1], min_new_tokens)] if min_new_tokens else []
    recording = (recording_generation(model, attention_mask, max_new_tokens, save_maps, hidden, stops) if record
                 else nullcontext())
    with recording as recorder, packed_linears(model, len(questions)):
        out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                             cache=cache, max_new_tokens=max_new_tokens, eos_token_id=stops,
                             logits_processor=LogitsProcessorList(processors), pad_token_id=pad, top_k=None,
                             return_dict_in_generate=True, **sampling)
    width = input_ids.shape[1]
    generations = []
    for q, p, row in zip(questions, prompts, out.sequences[:, width:].tolist()):
        end = next((i for i, t in enumerate(row) if t in stops), None)
        completion = row if end is None else row[: end + 1]
        generations.append(Generation(q, p, completion, tokenizer.decode(completion, skip_special_tokens=True),
                                      "length" if end is None else "stop"))
    if record:
        recorder.record_drawn(out.sequences[:, -1:])
        captures = recorded_captures(recorder, model, prompts, [g.completion_ids for g in generations])
        for g, c in zip(generations, captures):
            g.capture = c
    cache = out.cache
    cache.crop(-(cache.get_seq_length() - (width - 1)))  # keep the prompts' keys/values, minus each last token
    return generations, PromptCache(input_ids, attention_mask, cache)


# ---------------------------------------------------------------- continuous batching

# the cache is compacted when the rows' dead columns exceed both COMPACT_SLACK and COMPACT_FRACTION of their live ones
COMPACT_SLACK, COMPACT_FRACTION = 64, 0.125
PREFILL_GROUP = 8  # prompts prefilled together at least (those without a free row wait, prefilled)


@dataclass(frozen=True)
class Sampling:
    """How continuous batching draws each token: greedy (the argmax) unless `do_sample`. Sampling warps the
    next-token distribution as transformers' `generate` does (its temperature and top-p warpers, in that order),
    then draws with a random generator of the question's own, seeded by (seed, question id): an answer depends on
    its question and the seed only, not on its neighbours, the batch size, a resume or the worker it ran on."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def generator(self, question_id: str, device) -> torch.Generator | None:
        if not self.do_sample:
            return None
        digest = hashlib.sha256(f"{self.seed}\0{question_id}".encode()).digest()
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    @functools.cached_property
    def warpers(self):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        return LogitsProcessorList(([TemperatureLogitsWarper(self.temperature)] if self.temperature != 1.0 else [])
                                   + ([TopPLogitsWarper(self.top_p)] if self.top_p < 1.0 else []))

    def draw(self, logp: torch.Tensor, generators: list) -> torch.Tensor:
        """Tokens [k] from log-probabilities [k, V], row i with `generators[i]` (None: an idle row, whose token is
        not used). Sampling is the Gumbel-max draw: each row's V uniform variables U from its own generator,
        token = argmax(warped score - ln(-ln U)), which is token i with probability p_i (the warped distribution's).
        A difference in the scores' float32 rounding (another batch size multiplies in another order) changes the
        token only at a near-tie of that maximum, where an inverse CDF would move every boundary after the first
        difference. `torch.multinomial` takes one generator per call: a call per row took 17 ms a step at batch 16
        over SmolLM2's 49,152 tokens on 2 CPU cores; this takes 6 ms. Idle rows get 0 when sampling."""
        if not self.do_sample:
            return logp.argmax(-1)
        tokens = torch.zeros(logp.shape[0], dtype=torch.long, device=logp.device)
        rows = [i for i, generator in enumerate(generators) if generator is not None]
        if rows:
            scores = self.warpers(None, logp[rows])
            uniform = torch.empty_like(scores)
            for row, i in zip(uniform, rows):
                row.uniform_(generator=generators[i])
            tokens[rows] = (scores - uniform.log_().neg_().log_()).argmax(-1)
        return tokens


@dataclass
class _Slot:
    """One row of the continuous batch: the answer it is generating."""

    question: Question
    prompt: list[int]
    completion: list[int]
    first_step: int  # the decode step that feeds completion token 0 (its row predicts token 1)
    first_row: tuple  # completion token 0's statistics from the prompt's own prefill: (attn [L, H, S], token [3])
    hidden: dict  # hidden states: first [n, d], sum [n, d] float64, rows [[n, d] float16]
    generator: torch.Generator | None  # sampling: the question's own


@torch.no_grad()
def generate_continuous(model, tokenizer, questions: list[Question], *, batch_size: int = 16, shots: int = MATH_SHOTS,
                        max_new_tokens: int = 128, prefix_store: PrefixStore | None = None,
                        hidden: HiddenSpec = HiddenSpec(), max_batch_tokens: int | None = None,
                        sampling: Sampling = Sampling()):
    """Recorded generation with continuous batching, greedy or `sampling`; yields each `Generation` (with its
    `capture`) as it ends, in the order answers end. `batch_size` rows decode at once; when an answer ends, its row
    takes the next question: that prompt is prefilled alone against the run's shared prefix, and its keys/values are
    written into the row right-aligned at the current end of the cache, the row's older keys masked, so every row
    keeps the layout of static batching ([shared prefix | masked | prompt | answer]). A masked key has p = 0 exactly,
    so an answer's tokens and statistics do not depend on its neighbours (as with static batching's padding).
    The shared prefix's keys/values are held once, not per row: a decode step's attention reads them once for all
    rows (`attention.attentropy_attention`, `Recorder.shared_prefix`), where a per-row copy made every step read
    them batch-size times (the 8-shot prefix is ~1,500 of a row's ~1,700 keys). When dead (masked) columns make
    up more than 1/8 of the rows' own, the cache is compacted. `max_batch_tokens`: a bound on the key/value
    columns held, the shared prefix once plus rows x a row's own columns; fewer rows decode while it would be
    exceeded (memory stays flat on long prompts).

    Rows: completion token 0's statistics come from the prompt's prefill (its last row), token t's from decode step
    first_step + t - 1, taken from the recorder's ring buffer when the answer ends."""
    from .attention import recorded_layers, recording
    from .recorder import Recorder

    if not questions:
        return
    prompts = [prompt_ids(tokenizer, q, shots) for q in questions]
    stops = stop_token_ids(model, tokenizer)
    stop_set = set(stops)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prefix_len = common_prefix_len(prompts)
    prefix = prompts[0][:prefix_len]
    store = prefix_store or PrefixStore()
    room = max(len(p) - prefix_len for p in prompts)  # columns between the prefix and the answers: any prompt fits
    device = model.device
    layers = recorded_layers(model)
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    if max_batch_tokens:  # the prefix, then rows x the widest a row can need, with the dead columns it may keep
        widest = room + max_new_tokens
        batch_size = max(1, min(batch_size, (max_batch_tokens - prefix_len) // most_columns(widest)))
    batch_size = min(batch_size, len(questions))

    # the rows' cache holds their own columns, `room` masked ones to start with; the shared prefix is held once.
    # Only self-attention layers: a cross-attention layer's cache stays empty (Mllama runs it when it is not)
    cache = growing_cache(model)
    if not all(isinstance(cache.layers[i], _growing_layer_class()) for i in layers):
        raise ValueError("continuous batching needs full-attention layers (this model has sliding-window or other "
                         "cache layers); use --batching static")
    for i in layers:
        cache.layers[i].keys_by_dim = True
        cache.layers[i].shared = prefix_len
    _cache_append_masked(cache, model, batch_size, room, layers)
    width = prefix_len + room  # columns in the cache
    mask = torch.zeros(batch_size, width, dtype=torch.long)
    mask[:, :prefix_len] = 1
    # the layout mask only sets defaults (sink key 0); each row's prompt end is its own (`prompt_end`)
    recorder = Recorder(torch.ones(batch_size, 2, dtype=torch.long), all_rows=False, max_rows=max_new_tokens,
                        layers=layers, ring=True)
    recorder.prompt_end = torch.zeros(batch_size, dtype=torch.long)
    if prefix_len:
        recorder.shared_prefix = shared_keys_values(store.get(model, prefix, copy=False))
    slot_hidden = _SlotHidden(model, hidden) if hidden else None
    slots: list[_Slot | None] = [None] * batch_size
    inputs = torch.full((batch_size, 1), pad, dtype=torch.long)
    position = torch.zeros(batch_size, 1, dtype=torch.long)
    todo = list(zip(questions, prompts))[::-1]
    step = 0

    ready: list[tuple[_Slot, list]] = []  # prefilled questions waiting for a row: (slot, [(keys, values)] per layer)

    def prefill(group: list[tuple[Question, list[int]]]) -> None:
        """Prefill prompts together (left padded after the shared prefix, as static batching does: a batched
        forward costs far less per token than one per prompt), recording each prompt's last row, which predicts
        completion token 0; their keys/values wait in `ready` for a free row."""
        group_prompts = [p for _, p in group]
        ids, layout = prompt_layout(group_prompts, pad, prefix_len)
        one = _prefixed_cache(model, store.get(model, prefix, copy=False)) if prefix_len else growing_cache(model)
        rec = Recorder(layout, all_rows=False, max_rows=1, layers=layers)
        with recording(model, rec):
            last = decoder(input_ids=ids[:, prefix_len:].to(device), attention_mask=layout.to(device),
                           position_ids=positions(layout)[:, prefix_len:].to(device), cache=one,
                           use_cache=True).last_hidden_state[:, -1:]
        rec.end_step()
        logp = torch.log_softmax(lm_head(last).float(), dim=-1)  # [k, 1, V]
        rec.record_step_logits(logp)
        generators = [sampling.generator(q.id, logp.device) for q, _ in group]  # the lm head's device
        tokens = sampling.draw(logp[:, 0], generators)
        rec.record_drawn(tokens[:, None])
        attn, token_stats, tokens = rec.attn_buffer[:, :, :, 0].cpu(), rec.token_stats[:, :, 0].cpu(), tokens.tolist()
        for i, (q, p) in enumerate(group):
            n_rest = len(p) - prefix_len
            h = slot_hidden.prefill_row(i) if slot_hidden is not None else {}
            slot = _Slot(q, p, [tokens[i]], -1, (attn[:, i], token_stats[:, i]), h, generators[i])
            ready.append((slot, [None if kv is None else (kv[0][i, :, kv[0].shape[-2] - n_rest:].clone(),
                                                          kv[1][i, :, kv[1].shape[-2] - n_rest:].clone())
                                 for kv in _new_keys_values(one)]))

    def start(b: int) -> Generation | None:
        """Put the next question into row b; an answer that ends at its first token is returned instead."""
        if not ready:  # the free rows' worth of prompts, and at least PREFILL_GROUP
            free = sum(slot is None for slot in slots)
            prefill([todo.pop() for _ in range(min(len(todo), max(free, min(PREFILL_GROUP, batch_size))))])
        slot, keys_values = ready.pop(0)
        n_rest = len(slot.prompt) - prefix_len
        slot.first_step = step
        if slot.completion[0] in stop_set or max_new_tokens == 1:
            return _finish(slot, [], [], tokenizer, stop_set)
        # the prompt's keys/values into row b, right-aligned at the end of the cache; the row's older keys masked
        own = width - prefix_len  # the row's own columns in the cache
        for layer, kv in zip(cache.layers, keys_values):
            if kv is not None:  # (a cross-attention layer has none)
                layer.keys[b, :, own - n_rest:own] = kv[0]
                layer.values[b, :, own - n_rest:own] = kv[1]
        mask[b, prefix_len:] = 0
        mask[b, width - n_rest:] = 1
        recorder.prompt_end[b] = width
        if not prefix_len:
            recorder.sink_key[b] = width - n_rest
            recorder._mass_keys = None
        inputs[b, 0] = slot.completion[0]
        position[b, 0] = len(slot.prompt)
        slots[b] = slot
        return None

    try:
        with packed_linears(model, batch_size), recording(model, recorder):
            while True:
                for b in range(batch_size):  # fill free rows
                    while slots[b] is None and (todo or ready):
                        done = start(b)
                        if done is not None:
                            yield done
                active = [b for b in range(batch_size) if slots[b] is not None]
                if not active:
                    break
                # one decode step of every row: each row's new key goes to column `width`
                mask = torch.cat([mask, torch.ones(batch_size, 1, dtype=torch.long)], dim=1)
                last = decoder(input_ids=inputs.to(device), attention_mask=mask.to(device),
                               position_ids=position.to(device), cache=cache, use_cache=True).last_hidden_state
                recorder.end_step()
                logp = torch.log_softmax(lm_head(last).float(), dim=-1)  # [B, 1, V]
                recorder.record_step_logits(logp)
                drawn = sampling.draw(logp[:, 0], [None if slot is None else slot.generator for slot in slots])
                recorder.record_drawn(drawn[:, None])
                width += 1
                drawn = drawn.cpu()
                for b in active:
                    slot = slots[b]
                    if slot_hidden is not None:
                        slot_hidden.add_step(b, slot)
                    token = int(drawn[b])
                    slot.completion.append(token)
                    if token in stop_set or len(slot.completion) == max_new_tokens:
                        rows = [(slot.first_step + t - 1) % max_new_tokens for t in range(1, len(slot.completion))]
                        yield _finish(slot, recorder.attn_buffer[:, b, :, rows].cpu(),
                                      recorder.token_stats[:, b, rows].cpu(), tokenizer, stop_set)
                        slots[b] = None
                        inputs[b, 0] = pad
                        mask[b, prefix_len:] = 0
                        mask[b, -1] = 1  # an idle row attends to its own column only (its output is not used)
                    else:
                        inputs[b, 0] = token
                        position[b, 0] += 1
                step += 1
                # compaction: when too many of the rows' columns are dead (masked in every row), each row's live
                # columns are moved right-aligned into a cache just wide enough for them and any prompt still to come
                lives = {b: _live_columns(recorder, b, slots[b], prefix_len, width) for b in range(batch_size)
                         if slots[b] is not None}
                needed = prefix_len + max([room, *lives.values()])
                if width > prefix_len + most_columns(needed - prefix_len):
                    mask = _compact(cache, mask, recorder, prefix_len, width, needed, lives)
                    width = needed
    finally:
        if slot_hidden is not None:
            slot_hidden.remove()


def most_columns(needed: int) -> int:
    """A row's columns before compaction, when `needed` of them are live."""
    return needed + int(max(COMPACT_SLACK, COMPACT_FRACTION * needed))


def shared_keys_values(prefix_cache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer index, a prefix cache's keys [Hkv, D, P] and values [Hkv, P, D] in float32 (the recording
    attention's product layouts), for `Recorder.shared_prefix`."""
    return {i: (layer.keys[0].transpose(1, 2).float().contiguous(), layer.values[0].float().contiguous())
            for i, layer in enumerate(prefix_cache.layers) if _holds_keys(layer)}


def _prefixed_cache(model, prefix_cache):
    """A cache for prefilling several prompts after one shared prefix without a copy of the prefix per prompt:
    each layer hands attention the prefix broadcast over the batch joined to the new keys/values (one layer's
    worth at a time) and keeps only the new ones (`_new_keys_values`)."""
    from transformers.cache_utils import DynamicLayer

    class PrefixedLayer(DynamicLayer):
        def __init__(self, keys, values):
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values  # [1, H, P, D]: the length the model sees as cached
            self.new = None

        def update(self, key_states, value_states, *args, **kwargs):
            self.new = (key_states, value_states)
            batch = key_states.shape[0]
            return (torch.cat([self.keys.expand(batch, -1, -1, -1), key_states], dim=-2),
                    torch.cat([self.values.expand(batch, -1, -1, -1), value_states], dim=-2))

    cache = growing_cache(model)
    cache.layers = [PrefixedLayer(layer.keys, layer.values) if _holds_keys(layer) else DynamicLayer()
                    for layer in prefix_cache.layers]  # (a cross-attention layer holds none and stays empty)
    return cache


def _holds_keys(layer) -> bool:
    return layer.is_initialized and layer.keys.numel() > 0


def _new_keys_values(cache) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per layer, the keys/values a prefill added: those a `_prefixed_cache` kept, or a plain cache's (no prefix);
    None for a layer that did not run (a cross-attention layer without an image)."""
    return [layer.new if hasattr(layer, "new") else (layer.keys, layer.values) if _holds_keys(layer) else None
            for layer in cache.layers]


def _cache_append_masked(cache, model, batch: int, columns: int, layers: list[int]) -> None:
    """Append `columns` zero key/value columns to the given layers of `cache` (the attention mask hides them)."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    zeros = torch.zeros(batch, heads, columns, head_dim, dtype=model.dtype, device=model.device)
    for i in layers:
        cache.layers[i].update(zeros, zeros)


def _live_columns(recorder, b: int, slot: _Slot, prefix_len: int, width: int) -> int:
    """Columns of row b from its prompt's first token (after the shared prefix) to the end of the cache."""
    return width - (int(recorder.prompt_end[b]) - (len(slot.prompt) - prefix_len))


def _compact(cache, mask: torch.Tensor, recorder, prefix_len: int, width: int, new_width: int,
             lives: dict[int, int]) -> torch.Tensor:
    """Keep, per row, the row's live columns (`lives`: row -> `_live_columns`; its prompt and answer),
    right-aligned in `new_width` columns after the shared prefix (held apart from the cache, which holds the
    rows' own columns); returns the new mask and moves the recorder's per-row key indices with the columns."""
    shift = new_width - width
    new_mask = torch.zeros(mask.shape[0], new_width, dtype=mask.dtype)
    new_mask[:, :prefix_len] = mask[:, :prefix_len]
    for b in range(mask.shape[0]):
        if b not in lives:
            new_mask[b, -1] = 1  # an idle row: one visible column, so its (unused) attention row is defined
            continue
        new_mask[b, new_width - lives[b]:] = mask[b, width - lives[b]:]
        recorder.prompt_end[b] += shift
        if not prefix_len:
            recorder.sink_key[b] += shift
    recorder._mass_keys = None
    own = new_width - prefix_len
    for layer in cache.layers:
        if not _holds_keys(layer):  # a cross-attention layer
            continue
        keys = layer.keys.new_zeros(*layer.keys.shape[:2], own, layer.keys.shape[-1])
        values = layer.values.new_zeros(*layer.values.shape[:2], own, layer.values.shape[-1])
        for b, live in lives.items():
            keys[b, :, own - live:] = layer.keys[b, :, -live:]
            values[b, :, own - live:] = layer.values[b, :, -live:]
        # the layer's next update moves them into a buffer with room; the old buffer goes now, layer by layer, so
        # that compaction needs one layer's columns more memory, not a second cache
        layer.keys, layer.values = keys, values
        if hasattr(layer, "buffers"):
            layer.buffers = None
    return new_mask


def _finish(slot: _Slot, attn_rows: torch.Tensor, token_rows: torch.Tensor, tokenizer, stops: set[int]
            ) -> Generation:
    """The ended answer of a row as a Generation with its Capture: completion token 0's statistics from its
    prefill, the others' from the decode steps (`attn_rows` [L, H, n-1, S], `token_rows` [3, n-1])."""
    first_attn, first_token = slot.first_row
    n = len(slot.completion)
    attn = first_attn[None] if n == 1 else torch.cat([first_attn[None], attn_rows.permute(2, 0, 1, 3)])
    token = first_token[:, None] if n == 1 else torch.cat([first_token[:, None], token_rows], dim=1)
    hidden = {}
    if slot.hidden:
        h = slot.hidden
        if h["layers"]:
            hidden["hidden_last_prompt"] = torch.stack([h["first"][i] for i in h["layers"]]).cpu().numpy()
            hidden["hidden_mean"] = torch.stack([h["sum"][i] / n for i in h["layers"]]).float().cpu().numpy()
        if h["token_layers"]:
            hidden["hidden_tokens"] = torch.stack([torch.stack(h["rows"][i]) for i in h["token_layers"]],
                                                  dim=1).cpu().numpy()
    capture = Capture(attn=attn.numpy(), logprob=token[0].numpy(), logit_entropy=token[1].numpy(),
                      logit_varentropy=token[2].numpy(), n_keys=np.arange(len(slot.prompt), len(slot.prompt) + n),
                      **hidden)
    stopped = slot.completion[-1] in stops
    return Generation(slot.question, slot.prompt, slot.completion,
                      tokenizer.decode(slot.completion, skip_special_tokens=True), "stop" if stopped else "length",
                      capture)


class _SlotHidden:
    """Hidden states for continuous batching: hooks keep each call's last row per kept index (the prefill's last
    prompt token, or a decode step's row of every batch row); the loop adds them to the row's answer."""

    def __init__(self, model, spec: HiddenSpec):
        from .hidden_states import hook_hidden_states

        self.spec = spec
        self.last: dict[int, torch.Tensor] = {}
        self.hooks = hook_hidden_states(model, spec, self._hook)

    def _hook(self, index: int):
        def on_output(module, args, output):
            # kept on the model's device (no wait for it per step); moved to the host when the answer ends
            self.last[index] = (output[0] if isinstance(output, tuple) else output)[:, -1].detach().float()
        return on_output

    def prefill_row(self, row: int) -> dict:
        """A new answer's hidden states: its first row (its last prompt token's), from the prefill just run."""
        return {"layers": self.spec.layers, "token_layers": self.spec.token_layers,
                "first": {i: self.last[i][row] for i in self.spec.layers},
                "sum": {i: self.last[i][row].double() for i in self.spec.layers},
                "rows": {i: [self.last[i][row].half()] for i in self.spec.token_layers}}

    def add_step(self, b: int, slot: _Slot) -> None:
        for i in self.spec.layers:
            slot.hidden["sum"][i] += self.last[i][b].double()
        for i in self.spec.token_layers:
            slot.hidden["rows"][i].append(self.last[i][b].half())

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
