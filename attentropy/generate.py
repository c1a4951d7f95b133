"""Prompts (the benchmarks' protocols) and batched generation with left padding."""

from __future__ import annotations

import copy
import functools
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .capture import Capture, HiddenSpec, PromptCache, common_prefix_len, prompt_layout, recording_generation
from .data import FACTUAL, FREE, MATH, Question, fewshot_exemplars

# Meta's published Llama 3.2 GSM8K protocol: this user turn, 8 worked exemplars as earlier chat turns,
# every answer ending "The final answer is N", up to 1024 new tokens.
MATH_USER_TEMPLATE = (
    "Given the following problem, reason and give a final answer to the problem.\nProblem: {question}\n"
    'Your response should end with "The final answer is [answer]" where [answer] is the response to the problem.'
)
MATH_SHOTS = 8
MAX_NEW_TOKENS = {"factual": 128, "math": 1024, "free": 256}


def protocol_kind(benchmark: str) -> str:
    if benchmark in FACTUAL:
        return "factual"
    if benchmark in MATH:
        return "math"
    if benchmark == FREE:
        return "free"
    raise ValueError(f"unknown benchmark {benchmark!r}")


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

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, new = self.get_seq_length(), key_states.shape[-2]
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

    def get(self, model, ids: list[int]):
        """A fresh batch-1 copy of the cache of `ids` (computed on first use or when the prefix changes)."""
        if tuple(ids) != self.ids:
            self.cache = growing_cache(model)
            model.get_decoder()(input_ids=torch.tensor([ids], device=model.device), cache=self.cache, use_cache=True)
            self.ids = tuple(ids)
        return copy.deepcopy(self.cache)


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
        captures = recorder.captures(model, prompts, [g.completion_ids for g in generations])
        for g, c in zip(generations, captures):
            g.capture = c
    cache = out.cache
    cache.crop(-(cache.get_seq_length() - (width - 1)))  # keep the prompts' keys/values, minus each last token
    return generations, PromptCache(input_ids, attention_mask, cache)
