"""Continuous batching: `batch_size` rows decode at once and a row whose answer ends takes the next question
(`generate_continuous`, run by a `ContinuousBatch`: prefill, start, step and compact)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .attention import recorded_layers, recording
from .capture import Capture
from .data import Question
from .generate import Generation, PrefixStore, add_prefix_diagonal
from .hidden_states import HiddenSpec, hook_hidden_states
from .kv_cache import (append_masked_columns, growing_cache, holds_keys, new_keys_values, prefixed_cache,
                       shared_keys_values)
from .layout import common_prefix_len, positions, prompt_layout
from .packed_linears import packed_linears
from .prompts import MATH_SHOTS, answer_end, answer_text, prompt_ids, stop_strings, stop_token_ids
from .recorder import PromptDiagonal, Recorder
from .sampling import Sampling

# the cache is compacted when the rows' dead columns exceed both COMPACT_SLACK and COMPACT_FRACTION of their live ones
COMPACT_SLACK, COMPACT_FRACTION = 64, 0.125
PREFILL_GROUP = 8  # prompts prefilled together at least (those without a free row wait, prefilled)


@dataclass
class _Slot:
    """One row of the continuous batch: the answer it is generating."""

    question: Question
    prompt: list[int]
    completion: list[int]
    stop_strings: tuple[str, ...]  # texts that end the answer besides the stop tokens (`prompts.stop_strings`)
    first_step: int  # the decode step that feeds completion token 0 (its row predicts token 1)
    first_row: tuple  # completion token 0's statistics from the prompt's own prefill: (attn [L, H, S], token [3])
    hidden: dict  # hidden states: first [n, d], sum [n, d] float64, rows [[n, d] float16]
    generator: torch.Generator | None  # sampling: the question's own
    prompt_diagonal: tuple  # its prompt's `PromptDiagonal` result (sums [L, H], rows), the shared prefix's included
    shared: int = 0  # tokens of the batch's shared prefix that its prompt starts with (the prefix's length, or 0)


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
    if not questions:
        return
    yield from ContinuousBatch(model, tokenizer, questions, batch_size=batch_size, shots=shots,
                               max_new_tokens=max_new_tokens, prefix_store=prefix_store, hidden=hidden,
                               max_batch_tokens=max_batch_tokens, sampling=sampling).run()


class ContinuousBatch:
    """The state of one `generate_continuous` call: the rows (`slots`), their cache of own columns and mask (the
    shared prefix held once, apart), the recorder's ring buffer, the questions still to do and those prefilled and
    waiting for a free row (`ready`)."""

    def __init__(self, model, tokenizer, questions: list[Question], *, batch_size: int, shots: int,
                 max_new_tokens: int, prefix_store: PrefixStore | None, hidden: HiddenSpec,
                 max_batch_tokens: int | None, sampling: Sampling, prefix: list[int] | None = None):
        # no questions: an empty batch of `batch_size` rows to which `serving_batch` admits, with the `prefix` given
        # (None: the questions' prompts' common prefix); a prompt that does not start with it is held whole in its
        # row, the prefix's columns masked (`shares`)
        self.model, self.tokenizer, self.max_new_tokens, self.sampling = model, tokenizer, max_new_tokens, sampling
        prompts = [prompt_ids(tokenizer, q, shots) for q in questions]
        stops = stop_token_ids(model, tokenizer)
        self.stop_set = set(stops)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        if prefix is None:
            prefix = prompts[0][:common_prefix_len(prompts)] if prompts else []
        self.prefix, self.prefix_len = list(prefix), len(prefix)
        prefix_len = self.prefix_len
        self.store = prefix_store or PrefixStore()
        # columns between the prefix and the answers: any prompt fits
        self.room = room = max((len(p) - self.shares(p) for p in prompts), default=0)
        self.device = model.device
        self.layers = layers = recorded_layers(model)
        self.decoder, self.lm_head = model.get_decoder(), model.get_output_embeddings()
        if max_batch_tokens:  # the prefix, then rows x the widest a row can need, with the dead columns it may keep
            widest = room + max_new_tokens
            batch_size = max(1, min(batch_size, (max_batch_tokens - prefix_len) // most_columns(widest)))
        self.batch_size = batch_size = min(batch_size, len(questions) or batch_size)

        # the rows' cache holds their own columns, `room` masked ones to start with; the shared prefix is held once.
        # Only self-attention layers: a cross-attention layer's cache stays empty (Mllama runs it when it is not)
        # (sliding-window layers too: each holds every key, the attention masks those outside a row's window)
        self.cache = cache = growing_cache(model)
        for i in layers:
            cache.layers[i].keys_by_dim = True
            cache.layers[i].shared = prefix_len
        append_masked_columns(cache, model, batch_size, room, layers)
        self.width = prefix_len + room  # columns in the cache
        self.mask = torch.zeros(batch_size, self.width, dtype=torch.long)
        self.mask[:, :prefix_len] = 1
        # the layout mask only sets defaults (sink key 0); each row's prompt end is its own (`prompt_end`)
        self.recorder = recorder = Recorder(torch.ones(batch_size, 2, dtype=torch.long), all_rows=False,
                                            max_rows=max_new_tokens, layers=layers, ring=True)
        recorder.prompt_end = torch.zeros(batch_size, dtype=torch.long)
        if prefix_len:
            recorder.shared_prefix = shared_keys_values(self.store.get(model, self.prefix, copy=False))
        # the prefix's rows of LLM-Check's prompt part, before any hook that a forward would feed is installed
        self.prefix_diagonal = self.store.diagonal(model) if prefix_len else None
        self.slot_hidden = _SlotHidden(model, hidden) if hidden else None
        self.slots: list[_Slot | None] = [None] * batch_size
        self.inputs = torch.full((batch_size, 1), self.pad, dtype=torch.long)
        self.position = torch.zeros(batch_size, 1, dtype=torch.long)
        self.todo = list(zip(questions, prompts))[::-1]
        self.step_index = 0
        # prefilled questions waiting for a row: (slot, [(keys, values)] per layer)
        self.ready: list[tuple[_Slot, list]] = []

    def run(self):
        """Decode until every question is answered; yields each answer's `Generation` as it ends."""
        try:
            with packed_linears(self.model, self.batch_size), recording(self.model, self.recorder):
                while True:
                    for b in range(self.batch_size):  # fill free rows
                        while self.slots[b] is None and (self.todo or self.ready):
                            done = self.start(b)
                            if done is not None:
                                yield done
                    if all(slot is None for slot in self.slots):
                        break
                    yield from self.step()
                    self.compact()
        finally:
            if self.slot_hidden is not None:
                self.slot_hidden.remove()

    def shares(self, prompt: list[int]) -> int:
        """Tokens of the shared prefix that a prompt starts with: all of them, or 0 where it starts otherwise (or
        would have no token of its own after them)."""
        n = self.prefix_len
        return n if n and len(prompt) > n and prompt[:n] == self.prefix else 0

    def prefill(self, group: list[tuple[Question, list[int]]]) -> None:
        """Prefill prompts together (left padded after the shared prefix, as static batching does: a batched
        forward costs far less per token than one per prompt), recording each prompt's last row, which predicts
        completion token 0; their keys/values wait in `ready` for a free row. Prompts that do not start with the
        shared prefix are prefilled whole, in a forward of their own."""
        kinds = [self.shares(p) for _, p in group]
        for shared in dict.fromkeys(kinds):
            self._prefill([g for g, k in zip(group, kinds) if k == shared], shared)

    def _prefill(self, group: list[tuple[Question, list[int]]], prefix_len: int) -> None:
        model, device = self.model, self.device
        group_prompts = [p for _, p in group]
        ids, layout = prompt_layout(group_prompts, self.pad, prefix_len)
        one = (prefixed_cache(model, self.store.get(model, self.prefix, copy=False)) if prefix_len
               else growing_cache(model))
        rec = Recorder(layout, all_rows=False, max_rows=1, layers=self.layers)
        diagonal = PromptDiagonal(layout, last_row=False)  # the rows after the prefix but each prompt's last
        with recording(model, rec, diagonal):
            last = self.decoder(input_ids=ids[:, prefix_len:].to(device), attention_mask=layout.to(device),
                                position_ids=positions(layout)[:, prefix_len:].to(device), cache=one,
                                use_cache=True).last_hidden_state[:, -1:]
        rec.end_step()
        diagonal_sums, diagonal_rows = add_prefix_diagonal(diagonal.result(self.layers),
                                                           self.prefix_diagonal if prefix_len else None)
        logp = torch.log_softmax(self.lm_head(last).float(), dim=-1)  # [k, 1, V]
        rec.record_step_logits(logp)
        generators = [self.generator(q, logp.device) for q, _ in group]  # the lm head's device
        tokens = self.draw(logp[:, 0], generators)
        rec.record_drawn(tokens[:, None])
        attn, token_stats, tokens = rec.attn_buffer[:, :, :, 0].cpu(), rec.token_stats[:, :, 0].cpu(), tokens.tolist()
        for i, (q, p) in enumerate(group):
            n_rest = len(p) - prefix_len
            h = self.slot_hidden.prefill_row(i) if self.slot_hidden is not None else {}
            slot = _Slot(q, p, [tokens[i]], stop_strings(self.tokenizer, q), -1, (attn[:, i], token_stats[:, i]), h,
                         generators[i], (diagonal_sums[i], int(diagonal_rows[i])), shared=prefix_len)
            self.ready.append((slot, [None if kv is None else (kv[0][i, :, kv[0].shape[-2] - n_rest:].clone(),
                                                               kv[1][i, :, kv[1].shape[-2] - n_rest:].clone())
                                      for kv in new_keys_values(one)]))

    def start(self, b: int) -> Generation | None:
        """Put the next question into row b; an answer that ends at its first token is returned instead."""
        prefix_len, width = self.prefix_len, self.width
        if not self.ready:  # the free rows' worth of prompts, and at least PREFILL_GROUP
            free = sum(slot is None for slot in self.slots)
            todo = self.todo
            self.prefill([todo.pop() for _ in range(min(len(todo), max(free, min(PREFILL_GROUP, self.batch_size))))])
        slot, keys_values = self.ready.pop(0)
        n_rest = len(slot.prompt) - slot.shared
        slot.first_step = self.step_index
        if self.ended(slot) or self.max_new_tokens == 1:
            return _finish(slot, [], [], self.tokenizer, self.ended(slot))
        # the prompt's keys/values into row b, right-aligned at the end of the cache; the row's older keys masked
        own = width - prefix_len  # the row's own columns in the cache
        for layer, kv in zip(self.cache.layers, keys_values):
            if kv is not None:  # (a cross-attention layer has none)
                layer.keys[b, :, own - n_rest:own] = kv[0]
                layer.values[b, :, own - n_rest:own] = kv[1]
        self.mask[b, :prefix_len] = 1 if slot.shared else 0
        self.mask[b, prefix_len:] = 0
        self.mask[b, width - n_rest:] = 1
        self.recorder.start_row(b, prompt_end=width, sink_key=0 if slot.shared else width - n_rest)
        self.inputs[b, 0] = slot.completion[0]
        self.position[b, 0] = len(slot.prompt)
        self.slots[b] = slot
        return None

    def step(self):
        """One decode step of every row (each row's new key goes to column `width`); yields the answers that end."""
        batch_size, recorder, slots = self.batch_size, self.recorder, self.slots
        active = [b for b in range(batch_size) if slots[b] is not None]
        self.mask = mask = torch.cat([self.mask, torch.ones(batch_size, 1, dtype=torch.long)], dim=1)
        last = self.decoder(input_ids=self.inputs.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=self.position.to(self.device), cache=self.cache,
                            use_cache=True).last_hidden_state
        recorder.end_step()
        logp = torch.log_softmax(self.lm_head(last).float(), dim=-1)  # [B, 1, V]
        recorder.record_step_logits(logp)
        drawn = self.draw(logp[:, 0], [None if slot is None else slot.generator for slot in slots])
        recorder.record_drawn(drawn[:, None])
        self.width += 1
        drawn = drawn.cpu()
        for b in active:
            slot = slots[b]
            if self.slot_hidden is not None:
                self.slot_hidden.add_step(b, slot)
            token = int(drawn[b])
            slot.completion.append(token)
            if self.ended(slot) or len(slot.completion) == self.max_new_tokens:
                yield self.end_row(b)
            else:
                self.inputs[b, 0] = token
                self.position[b, 0] += 1
        self.step_index += 1

    def ended(self, slot: _Slot) -> bool:
        """Whether the answer's last token ends it: a stop token, or the end of a stop string."""
        return slot.completion[-1] in self.stop_set or answer_end(self.tokenizer, slot.completion, slot.stop_strings)

    def end_row(self, b: int) -> Generation:
        """The answer of row b as it stands (its statistics from the ring buffer); the row is freed."""
        slot = self.slots[b]
        rows = [(slot.first_step + t - 1) % self.max_new_tokens for t in range(1, len(slot.completion))]
        recorder = self.recorder
        attn_rows, token_rows = ((recorder.attn_buffer[:, b, :, rows].cpu(), recorder.token_stats[:, b, rows].cpu())
                                 if rows else (None, None))  # (ended at its first token: no decode step's rows)
        done = _finish(slot, attn_rows, token_rows, self.tokenizer, self.ended(slot))
        self.slots[b] = None
        self.inputs[b, 0] = self.pad
        self.mask[b, self.prefix_len:] = 0
        self.mask[b, -1] = 1  # an idle row attends to its own column only (its output is not used)
        return done

    def generator(self, question: Question, device) -> torch.Generator | None:
        """The random generator of a question's sampling (None: greedy)."""
        return self.sampling.generator(question.id, device)

    def draw(self, logp: torch.Tensor, generators: list) -> torch.Tensor:
        """Tokens [k] from log-probabilities [k, V], row i with `generators[i]` (`generator`; None: idle)."""
        return self.sampling.draw(logp, generators)

    def compact(self) -> None:
        """When too many of the rows' columns are dead (masked in every row), move each row's live columns
        right-aligned into a cache just wide enough for them and any prompt still to come."""
        prefix_len, width = self.prefix_len, self.width
        lives = {b: _live_columns(self.recorder, b, slot, width) for b, slot in enumerate(self.slots)
                 if slot is not None}
        needed = prefix_len + max([self.room, *lives.values()])
        if width > prefix_len + most_columns(needed - prefix_len):
            self.mask = _compact(self.cache, self.mask, self.recorder, self.slots, prefix_len, width, needed, lives)
            self.width = needed


def most_columns(needed: int) -> int:
    """A row's columns before compaction, when `needed` of them are live."""
    return needed + int(max(COMPACT_SLACK, COMPACT_FRACTION * needed))


def _live_columns(recorder, b: int, slot: _Slot, width: int) -> int:
    """Columns of row b from its prompt's first token (after the shared prefix) to the end of the cache."""
    return width - (int(recorder.prompt_end[b]) - (len(slot.prompt) - slot.shared))


def _compact(cache, mask: torch.Tensor, recorder, slots: list, prefix_len: int, width: int, new_width: int,
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
            recorder.sink_key[b] = new_width - 1  # and its sink there: its last answer's may lie past the new width
            continue
        new_mask[b, new_width - lives[b]:] = mask[b, width - lives[b]:]
    recorder.shift_rows(lives, shift, sink=[b for b in lives if not slots[b].shared])
    own = new_width - prefix_len
    for layer in cache.layers:
        if not holds_keys(layer):  # a cross-attention layer
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


def _finish(slot: _Slot, attn_rows: torch.Tensor, token_rows: torch.Tensor, tokenizer, stopped: bool
            ) -> Generation:
    """The ended answer of a row as a Generation with its Capture: completion token 0's statistics from its
    prefill, the others' from the decode steps (`attn_rows` [L, H, n-1, S], `token_rows` [3, n-1]); `stopped`:
    it ended at a stop token or string (else at the new-token bound)."""
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
                      prompt_log_diag=slot.prompt_diagonal[0], prompt_diag_rows=slot.prompt_diagonal[1], **hidden)
    return Generation(slot.question, slot.prompt, slot.completion,
                      answer_text(tokenizer, slot.completion, slot.stop_strings), "stop" if stopped else "length",
                      capture)


class _SlotHidden:
    """Hidden states for continuous batching: hooks keep each call's last row per kept index (the prefill's last
    prompt token, or a decode step's row of every batch row); the loop adds them to the row's answer."""

    def __init__(self, model, spec: HiddenSpec):
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
