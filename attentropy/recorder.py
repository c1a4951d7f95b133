"""The Recorder: it collects the statistics of the recorded query rows while a model runs with the recording
attention (`attention.recording`), into buffers allocated once; `recording_generation` records during transformers'
`generate`. `capture.recorded_captures` turns what it holds into each sequence's `Capture`. `PromptDiagonal`
collects the prompt rows' log own-token attention while prompts are prefilled (LLM-Check's prompt part)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from .attention import log_own_attention, recorded_layers, recording
from .entropy import entropy_varentropy
from .hidden_states import HiddenRecorder, HiddenSpec
from .schema import TOKEN_STATS


class Recorder:
    """Collects statistics of recorded query rows while a model runs with the attentropy implementation.

    Key indices follow one axis for a batch: [prompt layout (width W) | completion tokens], so the last prompt
    token is key W-1 and completion token t is key W+t, both in generation and in teacher-forced capture."""

    # Generation reduces several layers' rows at once, up to group_bytes of float32 probabilities: at batch 1
    # a layer's rows are small, and reducing them one layer at a time costs more in per-operation overhead than in
    # arithmetic; at batch 16 one layer already fills the group, and is reduced while still in the CPU's cache.
    group_bytes = 1 << 20

    def __init__(self, layout_mask: torch.Tensor, all_rows: bool, max_rows: int, chunk_bytes: int = 16 << 20,
                 save_maps: set[int] = frozenset(), layers: list[int] = (), ring: bool = False):
        batch, width = layout_mask.shape
        self.layout_mask = layout_mask  # [B, W]
        self.all_rows = all_rows  # teacher forcing: every new query row; generation: the last row of each call
        self.chunk_bytes = chunk_bytes  # bound on one chunk's float32 scores [B, H, rows, K]
        self.sink_key = layout_mask.argmax(-1)  # [B] first visible key: the sequence's first token
        self.prompt_keys = width  # keys < W are prompt (or padding, whose p is 0)
        visible = layout_mask[:, :-1] * torch.arange(1, width)  # index + 1 where visible
        self.prev_of_last_prompt = visible.max(-1).values - 1  # [B] the token before the last prompt token
        self.save_maps = save_maps
        # Continuous batching (`ring`): each row's prompt ends at its own key (`prompt_end` [B]; the keys between
        # the shared prefix and a row's prompt are masked, p = 0), and step s writes buffer row s % max_rows, a
        # ring from which `generate_continuous` takes each answer's rows when it ends.
        self.ring = ring
        self.prompt_end: torch.Tensor | None = None
        # Continuous batching: layer index -> keys [Hkv, D, P], values [Hkv, P, D] (float32) of the prefix that every
        # row shares, held once; the cache then holds each row's own keys, which follow them (key P on).
        self.shared_prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._group: torch.Tensor | None = None  # [G, B, H, r, K]: probabilities of G layers' rows
        self._group_layers: list[int] = []
        self._group_slots: tuple[torch.Tensor, ...] = ()  # the group's rows of each layer
        self._group_own = 0
        self._mass_keys: tuple[tuple, torch.Tensor] | None = None  # (own, rows, device) -> mass_keys(...), one step
        # Results go to buffers allocated once: thousands of small tensors kept across decode steps would scatter
        # over the heap between the growing key/value cache's blocks and fragment it (peak memory: measured by
        # `bench/capture.py`).
        self.max_rows = max_rows
        self.attn: dict[int, list[torch.Tensor]] = {}  # teacher forcing: layer -> [[B, H, rows, n_stats]]
        self.attn_buffer: torch.Tensor | None = None  # generation: [L, B, H, max_rows, n_stats]
        self.attn_layers = list(layers)  # generation: the layers expected at every step, in buffer order
        self._slot = {layer: i for i, layer in enumerate(self.attn_layers)}
        self.attn_rows = 0  # generation: rows of finished steps
        self._step_rows: dict[int, int] = {}  # generation: layer -> rows written in the current step
        # (logprob, entropy, varentropy) [3, B, max_rows]; like attn_buffer, on the device of the rows: no copy to
        # the host (and no wait for the device) per step, one at the end
        self.token_stats: torch.Tensor | None = None
        self._step_logp: tuple[torch.Tensor, int] | None = None  # generation: last step's logp until a token is drawn
        self._steps = 0
        self.maps: dict[int, dict[int, list[torch.Tensor]]] = {}  # batch index -> layer -> [[H, rows, K]]
        self.hidden: HiddenRecorder | None = None  # hidden states of the same rows, when asked for

    def mass_keys(self, own: int, rows: int, device) -> torch.Tensor:
        """[B, 1, rows, 3] key indices (first token, own token, previous token) of `rows` query rows whose own
        tokens are keys own, own+1, ...; the previous token of the last prompt token may lie before padding.
        Kept for the next call: every layer of a decode step asks for the same keys."""
        if self._mass_keys is not None and self._mass_keys[0] == (own, rows, device):
            return self._mass_keys[1]
        sink = self.sink_key.to(device)
        own_keys = torch.arange(own, own + rows, device=device).expand(len(sink), rows)
        prev = own_keys - 1
        if own <= self.prompt_keys - 1 < own + rows:
            prev[:, self.prompt_keys - 1 - own] = self.prev_of_last_prompt.to(device)
        keys = torch.stack([sink[:, None].expand(-1, rows), own_keys, prev.clamp(min=0)], dim=-1)[:, None]
        self._mass_keys = ((own, rows, device), keys)
        return keys

    def row_stats(self, p: torch.Tensor, own: int) -> torch.Tensor:
        """Statistics [..., B, H, r, n_stats] of attention rows p [..., B, H, r, K] (float32 softmax; masked keys
        have p = 0 exactly) whose own tokens are keys own, own+1, ... (leading axes: e.g. layers, all with the same
        keys)."""
        # ln p of the rounded probabilities, taken once for the whole group (a log-softmax per layer would cost one
        # more operation per layer and step): within float32 rounding of the log-softmax (~1e-7 nats) wherever
        # p > 0; p = 0 (masked or underflowed) gives -inf, which entropy_varentropy makes contribute exactly 0
        entropy, varentropy = entropy_varentropy(p=p)
        *lead, batch, heads, rows, _ = p.shape
        idx = self.mass_keys(own, rows, p.device)  # [B, 1, r, 3]
        single = p.gather(-1, idx.expand(*lead, batch, heads, rows, 3))  # first token, own token, previous
        if own == 0:  # a row without a previous token (only a forward with no prompt cache) has no such mass
            single[..., 0, 2] = 0.0
        if self.prompt_end is None:
            prompt_mass = p[..., : self.prompt_keys].sum(-1)
        else:  # [B, 1, 1, K]: each row's keys before the end of its prompt
            before = torch.arange(p.shape[-1], device=p.device) < self.prompt_end.to(p.device)[:, None]
            prompt_mass = (p * before[:, None, None, :]).sum(-1)
        return torch.stack([entropy, varentropy, single[..., 0], prompt_mass, single[..., 1], single[..., 2]], dim=-1)

    def rows(self, layer: int, shape: tuple[int, int, int, int], own: int, device: torch.device) -> torch.Tensor:
        """An empty float32 tensor [B, H, r, K] on `device` for the probabilities of one layer's recorded rows, whose
        own tokens are keys own, own+1, ...; the caller fills it, then calls `rows_done`. A group holds layers of one
        step on one device (a model split over GPUs starts a new one)."""
        if self._group_layers and (self._group_own != own or self._group.shape[1:] != shape
                                   or self._group.device != device):
            self.flush()
        if not self._group_layers:
            slot_bytes = 4 * shape[0] * shape[1] * shape[2] * shape[3]
            size = 1 if self.all_rows else max(1, min(len(self.attn_layers), self.group_bytes // slot_bytes))
            self._group = torch.empty(size, *shape, device=device)
            self._group_slots = self._group.unbind(0)  # views per layer
            self._group_own = own
        self._group_layers.append(layer)
        return self._group_slots[len(self._group_layers) - 1]

    def rows_done(self, p: torch.Tensor) -> None:
        """The rows asked for last are filled (`p` their probabilities): keep maps, reduce a full group."""
        for b in self.save_maps:
            self.maps.setdefault(b, {}).setdefault(self._group_layers[-1], []).append(p[b].half().cpu())
        if len(self._group_layers) == len(self._group_slots):
            self.flush()

    def flush(self) -> None:
        """Reduce the group's rows to statistics [B, H, r, n_stats] per layer and store them. Generation writes
        them straight into the buffer at the current step's row."""
        layers, n = self._group_layers, len(self._group_layers)
        if not n:
            return
        stats = self.row_stats(self._group[:n], self._group_own)  # [n, B, H, r, S]
        self._group_layers, self._group, self._group_slots = [], None, ()  # let the rows' buffer go
        for layer, layer_stats in zip(layers, stats):
            self.add_rows(layer, layer_stats)

    def add_rows(self, layer: int, stats: torch.Tensor) -> None:
        """Store one layer's statistics [B, H, r, n_stats]; generation checks that each layer comes once a step."""
        if self.all_rows:
            self.attn.setdefault(layer, []).append(stats.cpu())
            return
        if layer not in self._slot or layer in self._step_rows:
            raise RuntimeError(f"unexpected attention layer {layer} in a decode step (expected {self.attn_layers})")
        rows = stats.shape[2]
        if self.attn_rows + rows > self.max_rows and not self.ring:
            raise RuntimeError(f"{self.attn_rows + rows} rows recorded, more than the {self.max_rows} expected")
        if self.attn_buffer is None:
            self.attn_buffer = torch.zeros(len(self.attn_layers), *stats.shape[:2], self.max_rows, stats.shape[-1],
                                           device=stats.device)
        row = self.attn_rows % self.max_rows
        self.attn_buffer[self._slot[layer], :, :, row:row + rows] = stats
        self._step_rows[layer] = rows

    def end_step(self) -> None:
        """Generation: the forward is over (its logits are computed); the next rows belong to the next step."""
        self.flush()
        if not self._step_rows:
            return
        if set(self._step_rows) != set(self.attn_layers) or len(set(self._step_rows.values())) != 1:
            raise RuntimeError(f"a decode step recorded rows {self._step_rows}, expected every layer of "
                               f"{self.attn_layers} once")
        self.attn_rows += next(iter(self._step_rows.values()))
        self._step_rows.clear()

    def record_logits(self, logp: torch.Tensor, row: int, targets: torch.Tensor | None = None) -> None:
        """logp [B, r, V] float32 log-softmax of rows row, row+1, ...; targets [B, r] the tokens they predicted
        (None: not known yet, see `record_logprob`)."""
        entropy, varentropy = entropy_varentropy(logp)
        rows = slice(row, row + logp.shape[1])
        if self.token_stats is None:
            self.token_stats = torch.zeros(len(TOKEN_STATS), logp.shape[0], self.max_rows, device=logp.device)
        self.token_stats[1, :, rows] = entropy
        self.token_stats[2, :, rows] = varentropy
        if targets is not None:
            self.record_logprob(logp, row, targets)

    def record_logprob(self, logp: torch.Tensor, row: int, targets: torch.Tensor) -> None:
        self.token_stats[0, :, row:row + logp.shape[1]] = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def record_step_logits(self, logp: torch.Tensor) -> None:
        """Generation: the next-token log-probabilities [B, 1, V] of one step; the token drawn from them is
        known only at the next step (`record_drawn`)."""
        row = self._steps % self.max_rows
        self.record_logits(logp, row)
        self._step_logp = (logp, row)
        self._steps += 1

    def record_drawn(self, tokens: torch.Tensor) -> None:
        """Generation: the tokens [B, 1] drawn from the last step's distribution."""
        if self._step_logp is not None:
            logp, row = self._step_logp
            self.record_logprob(logp, row, tokens.to(logp.device))
            self._step_logp = None

    def start_row(self, b: int, prompt_end: int, sink_key: int | None = None) -> None:
        """Continuous batching: row b holds a new prompt, which ends at key `prompt_end`; `sink_key`: its first
        token's key, where the rows share no prefix (else the shared prefix's first token stays the sink)."""
        self.prompt_end[b] = prompt_end
        if sink_key is not None:
            self.sink_key[b] = sink_key
            self._mass_keys = None

    def shift_rows(self, rows, shift: int, sink) -> None:
        """Continuous batching: the keys of `rows` moved by `shift` columns (a compaction of the cache); `sink`:
        the rows among them whose first tokens' keys moved with them (those that share no prefix)."""
        for b in rows:
            self.prompt_end[b] += shift
        for b in sink:
            self.sink_key[b] += shift
        self._mass_keys = None


class PromptDiagonal:
    """LLM-Check's prompt part, collected while prompts are prefilled (`attention.recording(model, recorder,
    prompt_diagonal=...)`): per sequence, layer and query head, the sum over the prompt's rows of ln(attention on
    the row's own token), and the number of rows summed. The rows of a prompt's last token are the answer's first
    (`Capture.attn`'s diag_mass), so a call's last query row is left out unless `last_row` (a prefill of a shared
    prefix, or of prompts without their last token). Padding rows (0 in `layout_mask` [B, W], whose columns are the
    key indices of the prefill) are left out."""

    def __init__(self, layout_mask: torch.Tensor, last_row: bool, chunk_bytes: int = 16 << 20):
        self.layout_mask = layout_mask
        self.last_row = last_row
        self.chunk_bytes = chunk_bytes
        self.sums: dict[int, torch.Tensor] = {}  # layer -> [B, H] float64
        self.rows: dict[int, torch.Tensor] = {}  # layer -> [B]

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float) -> None:
        """One layer's prefill call (the attention function's arguments); a decode step adds nothing."""
        n_q, n_k = query.shape[2], key.shape[2]
        n = n_q if self.last_row else n_q - 1
        if n <= 0:  # (a prefill of one token a prompt: nothing to add, but the layer ran)
            self.sums.setdefault(layer, torch.zeros(query.shape[:2], dtype=torch.float64, device=query.device))
            self.rows.setdefault(layer, torch.zeros(query.shape[0], dtype=torch.long, device=query.device))
            return
        if attention_mask is None:
            raise RuntimeError("attentropy attention got no mask; register the mask function with the implementation")
        own = n_k - n_q  # key of query row 0
        valid = self.layout_mask[:, own:own + n].bool().to(query.device)  # [B, n]
        log_own = log_own_attention(query[:, :, :n], key, attention_mask[:, :, :n], scaling, own, self.chunk_bytes)
        sums = torch.where(valid[:, None], log_own, 0.0).double().sum(-1)
        self.sums[layer] = sums + self.sums[layer] if layer in self.sums else sums
        self.rows[layer] = valid.sum(-1) + self.rows.get(layer, 0)

    def result(self, layers: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(sums [B, len(layers), H] float64, rows [B] int64) of the given layers; rows are the same in every
        layer (checked)."""
        missing = [layer for layer in layers if layer not in self.sums]
        if missing:
            raise RuntimeError(f"no prompt rows recorded at layers {missing}")
        rows = torch.stack([self.rows[layer].cpu() for layer in layers])
        if not (rows == rows[0]).all():
            raise RuntimeError("prompt rows recorded differ between layers")
        return torch.stack([self.sums[layer].cpu() for layer in layers], 1).numpy(), rows[0].numpy().astype(np.int64)


@contextmanager
def recording_generation(model, layout_mask: torch.Tensor, max_new_tokens: int, save_maps: set[int] = frozenset(),
                         hidden: HiddenSpec = HiddenSpec(), stops=(), prompt_diagonal: PromptDiagonal | None = None):
    """Record during `model.generate`: each call's last query row (the prefill's last prompt token, then one
    row per decode step), and the raw next-token distribution of each step (before any logits processor); with
    `hidden`, the hidden states of the same rows (`stops`: the stop tokens that end an answer); with
    `prompt_diagonal`, the prefill's other rows' log own-token attention.
    After generation, call `recorder.record_drawn(sequences[:, -1:])`: the last drawn token is never fed back."""
    recorder = Recorder(layout_mask, all_rows=False, max_rows=max_new_tokens, save_maps=save_maps,
                        layers=recorded_layers(model))
    if hidden:
        recorder.hidden = HiddenRecorder(model, hidden, layout_mask.shape[0], all_rows=False, stops=stops)

    def on_logits(module, args, output):  # lm_head: [B, q, V]; generation keeps only the last position
        recorder.end_step()
        recorder.record_step_logits(torch.log_softmax(output[:, -1:].float(), dim=-1))

    def on_forward(module, args, kwargs):  # step s's input is the token drawn from step s-1's distribution
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        recorder.record_drawn(input_ids[:, -1:])
        if recorder.hidden is not None:
            recorder.hidden.step(input_ids)

    hooks = [model.get_output_embeddings().register_forward_hook(on_logits),
             model.register_forward_pre_hook(on_forward, with_kwargs=True)]
    try:
        with recording(model, recorder, prompt_diagonal):
            yield recorder
    finally:
        for h in hooks:
            h.remove()
        if recorder.hidden is not None:
            recorder.hidden.remove()
