"""Static generation: one batch of prompts, left padded after their shared prefix, decoded by transformers'
`generate` until its longest answer ends (`generate`, its `Generation`s, and the `PrefixStore` that keeps the shared
prefix's keys/values across batches)."""

from __future__ import annotations

import copy as copy_module
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .capture import Capture, recorded_captures
from .data import Question
from .hidden_states import HiddenSpec
from .kv_cache import growing_cache, growing_layer_class
from .layout import PromptCache, common_prefix_len, prompt_layout
from .packed_linears import packed_linears
from .prompts import MATH_SHOTS, prompt_ids, stop_token_ids
from .attention import recorded_layers, recording
from .recorder import PromptDiagonal, recording_generation


@dataclass
class Generation:
    question: Question
    prompt_ids: list[int]
    completion_ids: list[int]  # generated tokens up to and including the end-of-turn token, if one came
    completion: str  # decoded completion without special tokens
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)
    capture: Capture | None = None  # the completion tokens' statistics, when generated with record=True


@dataclass
class PrefixStore:
    """Keys/values of the prompt prefix shared by a run's batches (system prompt and few-shot exemplars), so an
    8-shot prompt's ~1,500 shared tokens are computed once per run rather than once per question."""

    ids: tuple[int, ...] = ()
    cache: object = None
    _diagonal: tuple | None = None  # `diagonal`'s result for `ids`

    def get(self, model, ids: list[int], copy: bool = True):
        """A fresh batch-1 copy of the cache of `ids` (computed on first use or when the prefix changes); with
        `copy=False` the stored cache itself, to read only."""
        if tuple(ids) != self.ids:
            self.cache = growing_cache(model)
            model.get_decoder()(input_ids=torch.tensor([ids], device=model.device), cache=self.cache, use_cache=True)
            self.ids, self._diagonal = tuple(ids), None
        return copy_module.deepcopy(self.cache) if copy else self.cache

    def diagonal(self, model) -> tuple:
        """The prefix's `PromptDiagonal` result (sums [1, L, H], rows [1]; all its rows count: a prompt's last token
        is never in the shared prefix), once per prefix, from a forward of its own (the cache's stays as it is)."""
        if self._diagonal is None:
            diagonal = PromptDiagonal(torch.ones(1, len(self.ids), dtype=torch.long), last_row=True)
            with recording(model, None, prompt_diagonal=diagonal):
                model.get_decoder()(input_ids=torch.tensor([self.ids], device=model.device), use_cache=False)
            self._diagonal = diagonal.result(recorded_layers(model))
        return self._diagonal


def add_prefix_diagonal(rest: tuple, prefix: tuple | None) -> tuple:
    """The prompts' `PromptDiagonal` results: their rows after a shared prefix (`rest`), plus the prefix's rows."""
    return rest if prefix is None else (rest[0] + prefix[0], rest[1] + prefix[1])


def suppress_stops(stops: list[int], prompt_width: int, min_new_tokens: int):
    """A logits processor that keeps the stop tokens' scores at -inf until `min_new_tokens` tokens are generated,
    in place. transformers' own (`min_new_tokens=`) copies the [B, V] scores and masks the whole vocabulary at every
    step, which costs a step more (measured once by hand; no bench script keeps it). `bench/capture.py` forces
    exactly N new tokens with this."""
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
    prefix_store = prefix_store or PrefixStore()
    if prefix_len:
        cache = prefix_store.get(model, prompts[0][:prefix_len])
        cache.batch_repeat_interleave(len(prompts))
    else:
        cache = growing_cache(model)
    # the prefix's rows of LLM-Check's prompt part, computed before any hook that a forward would feed is installed
    prefix_diagonal = prefix_store.diagonal(model) if prefix_len and record else None
    if record:  # keys laid out for the recording attention
        for layer in cache.layers:
            if isinstance(layer, growing_layer_class()):
                layer.keys_by_dim = True
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    if do_sample:
        torch.manual_seed(seed)
    processors = [suppress_stops(stops, input_ids.shape[1], min_new_tokens)] if min_new_tokens else []
    # the prompt rows after the shared prefix, but the last (completion token 0's row), during the prefill
    diagonal = PromptDiagonal(attention_mask, last_row=False) if record else None
    recording_context = (recording_generation(model, attention_mask, max_new_tokens, save_maps, hidden, stops,
                                              diagonal) if record else nullcontext())
    with recording_context as recorder, packed_linears(model, len(questions)):
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
    prompt_diagonal = None
    if record:
        recorder.record_drawn(out.sequences[:, -1:])
        prompt_diagonal = add_prefix_diagonal(diagonal.result(recorded_layers(model)), prefix_diagonal)
        captures = recorded_captures(recorder, model, prompts, [g.completion_ids for g in generations],
                                     prompt_diagonal)
        for g, c in zip(generations, captures):
            g.capture = c
    cache = out.cache
    cache.crop(-(cache.get_seq_length() - (width - 1)))  # keep the prompts' keys/values, minus each last token
    return generations, PromptCache(input_ids, attention_mask, cache, prompt_diagonal)
