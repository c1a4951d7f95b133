"""The statistics' math and their capture through a registered attention function that reduces attention rows
to their statistics on the fly (the full attention matrices are never kept).

Definitions (DESIGN.md): for a distribution p over the K visible items,
    entropy     H = -sum p ln p                       (nats)
    varentropy  V =  sum p (ln p + H)^2 = Var[-ln p]   (nats^2)
Masked (invisible) keys have p = 0 exactly and contribute 0 (never 0 * inf).
Row convention: completion token t is described by the query row that predicted it, absolute position
len(prompt) - 1 + t; its logit statistics and log-probability come from that same row.

Two ways to fill the same rows, tested to agree:
  - `capture(model, prompts, completions)`: one teacher-forced forward over given ids (any answer, e.g. one
    written elsewhere), attending to the prompts' cached keys/values;
  - `Recorder` during `generate`: the decode steps' own query rows are those rows, so `attentropy run` reads the
    statistics while generating. On a CPU a decode step at batch 16 is compute bound, so a second forward would
    cost about as much as generation itself; reading the rows in place (each layer's rows reduced while
    still in the CPU's cache) costs far less.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .schema import TOKEN_STATS

ATTN_IMPLEMENTATION = "attentropy"


def entropy_varentropy(logp: torch.Tensor | None = None, *, p: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and varentropy (nats, nats^2) over the last axis of float32 log-probabilities `logp`, or of
    probabilities `p` (ln p taken here). Items with p == 0 (masked keys: logp = -inf or hugely negative)
    contribute 0."""
    # any p > 0 has logp > -104 (float32 underflow), so the clamp never changes a visible item; it makes every
    # masked item's logp finite, so that its p * logp is exactly 0 (never 0 * inf). Both branches leave a
    # tensor of our own in logp (the caller's is not changed), reused below for ln p + H
    if (logp is None) == (p is None):
        raise TypeError("entropy_varentropy takes either logp or p=")
    if p is None:
        p = logp.exp()
        logp = logp.clamp(min=-1e4)
    else:
        logp = p.log().clamp_(min=-1e4)
    p_logp = p * logp
    entropy = -p_logp.sum(-1)
    deviation = logp.add_(entropy.unsqueeze(-1))  # ln p + H
    # p (ln p + H)^2 in the product buffer: one allocation less per call
    p_dev2 = torch.mul(p, deviation, out=p_logp).mul_(deviation)
    return entropy, p_dev2.sum(-1)


@dataclass
class PromptCache:
    """A batch of prompts laid out as [shared prefix | left padding | rest of each prompt], and the keys/values of
    every prompt token but the last (whose query row predicts completion token 0 and so belongs to capture)."""

    input_ids: torch.Tensor  # [B, W]
    attention_mask: torch.Tensor  # [B, W], 0 on padding
    cache: object  # transformers Cache holding keys/values of input_ids[:, :W-1]


def common_prefix_len(prompts: list[list[int]]) -> int:
    """Length of the prefix all prompts share, leaving every prompt at least one token of its own."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for i in range(n):
        if any(p[i] != first[i] for p in prompts):
            return i
    return n


def prompt_layout(prompts: list[list[int]], pad_id: int, prefix_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, W] ids and attention mask: the first `prefix_len` tokens (shared by all prompts) at the left, then left
    padding, then each prompt's remaining tokens. Position ids follow from the mask (cumsum - 1), so every token
    keeps the position it has in its unpadded prompt."""
    width = prefix_len + max(len(p) - prefix_len for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, :prefix_len] = torch.tensor(p[:prefix_len])
        attention_mask[b, :prefix_len] = 1
        rest = p[prefix_len:]
        input_ids[b, width - len(rest):] = torch.tensor(rest)
        attention_mask[b, width - len(rest):] = 1
    return input_ids, attention_mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def fill_prompt_cache(model, prompts: list[list[int]], pad_id: int = 0) -> PromptCache:
    """Keys/values of the prompts (left padded) from one plain forward; used when capture gets no cache from
    generation."""
    from transformers import DynamicCache

    input_ids, attention_mask = prompt_layout(prompts, pad_id)
    cache = DynamicCache(config=model.config.get_text_config())
    if input_ids.shape[1] > 1:
        model.get_decoder()(input_ids=input_ids[:, :-1].to(model.device),
                            attention_mask=attention_mask[:, :-1].to(model.device),
                            position_ids=positions(attention_mask[:, :-1]).to(model.device), cache=cache,
                            use_cache=True)
    return PromptCache(input_ids, attention_mask, cache)


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
        # over the heap between the growing key/value cache's blocks and fragment it (peak memory +50% at batch 16).
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

    def captures(self, model, prompts: list[list[int]], completions: list[list[int]]) -> list["Capture"]:
        layers = recorded_layers(model)
        if self.attn_buffer is not None:
            found, attn = self.attn_layers, self.attn_buffer[:, :, :, : self.attn_rows].cpu().permute(1, 3, 0, 2, 4)
        else:
            found = sorted(self.attn)
            attn = torch.stack([torch.cat(self.attn[layer], dim=2) for layer in found], dim=2)  # [B, H, L, R, S]
            attn = attn.permute(0, 3, 2, 1, 4)
        if found != layers:
            raise RuntimeError(f"captured layers {found} but expected {layers}")
        # attn: [B, R, L, H, S], rows then (layer, head), as stored
        token = dict(zip(TOKEN_STATS, self.token_stats.cpu()))  # name -> [B, max_rows]
        width = self.layout_mask.shape[1]
        results = []
        for b, (p, c) in enumerate(zip(prompts, completions)):
            n = len(c)
            if attn.shape[1] < n:
                raise RuntimeError(f"recorded {attn.shape[1]} rows for a completion of {n} tokens")
            maps = None
            if b in self.maps:  # layer -> [H, n, len(prompt) + n - 1]: completion rows over the visible keys
                keys = torch.cat([self.layout_mask[b].nonzero().squeeze(-1), torch.arange(width, width + n - 1)])
                maps = {}
                for layer, parts in self.maps[b].items():
                    full = torch.zeros(parts[0].shape[0], sum(x.shape[1] for x in parts), width + n - 1,
                                       dtype=parts[0].dtype)
                    row = 0
                    for x in parts:
                        k = min(x.shape[2], full.shape[2])
                        full[:, row:row + x.shape[1], :k] = x[:, :, :k]
                        row += x.shape[1]
                    maps[layer] = full[:, :n][:, :, keys].numpy()
            hidden = self.hidden.results(b, n) if self.hidden is not None else {}
            results.append(Capture(attn=attn[b, :n].numpy(), logprob=token["logprob"][b, :n].numpy(),
                                   logit_entropy=token["logit_entropy"][b, :n].numpy(),
                                   logit_varentropy=token["logit_varentropy"][b, :n].numpy(),
                                   n_keys=np.arange(len(p), len(p) + n), attention_map=maps, **hidden))
        return results


@dataclass(frozen=True)
class HiddenSpec:
    """Which hidden states to keep, by transformers' `output_hidden_states` index: 0 the token embeddings, i the
    residual stream after block i, the last (= the number of layers) after the final norm."""

    layers: tuple[int, ...] = ()  # per answer: the last prompt token's row and the mean over the answer's rows
    token_layers: tuple[int, ...] = ()  # every row of the answer, float16 (for token-level probes)

    def __bool__(self) -> bool:
        return bool(self.layers or self.token_layers)


def hidden_modules(model) -> list[torch.nn.Module]:
    """Module whose output is hidden state i (`output_hidden_states[i]`): the embeddings, blocks 0 .. L-2, the final
    norm (transformers reports the last block's output after the norm)."""
    decoder = model.get_decoder()
    return [decoder.embed_tokens, *decoder.layers[:-1], decoder.norm]


def hook_hidden_states(model, spec: HiddenSpec, make_hook) -> list:
    """Forward hooks `make_hook(i)` on the modules whose outputs are the hidden states `spec` keeps."""
    modules = hidden_modules(model)
    for i in (*spec.layers, *spec.token_layers):
        if not 0 <= i < len(modules):
            raise ValueError(f"hidden-state index {i} out of range 0..{len(modules) - 1}")
    return [modules[i].register_forward_hook(make_hook(i)) for i in sorted(set(spec.layers) | set(spec.token_layers))]


class HiddenRecorder:
    """The residual stream at the recorded rows (the rows that predict the completion tokens, as for attention):
    per sequence, the first such row (its input is the last prompt token) and the sum over the rows that belong to
    its completion, for `spec.layers`; every row for `spec.token_layers`. Forward hooks on the modules of
    `hidden_modules`; in generation, `step(input_ids)` before each forward tells which rows are still in their
    answer (a row whose input is a stop token, or follows one, is not)."""

    def __init__(self, model, spec: HiddenSpec, batch: int, all_rows: bool, stops=(), valid: torch.Tensor = None):
        self.spec, self.all_rows = spec, all_rows
        self.stops = torch.tensor(list(stops), dtype=torch.long)
        self.first: dict[int, torch.Tensor] = {}  # layer -> [B, d]
        self.sums: dict[int, torch.Tensor] = {}  # layer -> [B, d] float64
        self.rows: dict[int, list[torch.Tensor]] = {}  # token layer -> [[B, r, d] float16]
        self.valid = valid  # teacher forcing: [B, Q] rows of the completion; generation: [B] rows still in it
        self.finished = torch.zeros(batch, dtype=torch.bool)
        self.counts = torch.zeros(batch, dtype=torch.long)
        self.hooks = hook_hidden_states(model, spec, self._hook)

    def step(self, input_ids: torch.Tensor) -> None:
        """Generation, before each forward: the prefill's row is the last prompt token's; a decode step's input is
        the token drawn last, and its row belongs to the answer unless a stop token has been drawn."""
        if self.valid is not None:  # a decode step (the first call, the prefill, only sets `valid`)
            self.finished |= torch.isin(input_ids[:, -1].cpu(), self.stops)
        self.valid = ~self.finished
        self.counts += self.valid

    def _hook(self, index: int):
        def on_output(module, args, output):
            hidden = (output[0] if isinstance(output, tuple) else output).detach()  # [B, q, d]
            rows = hidden if self.all_rows else hidden[:, -1:]
            if index in self.spec.layers:
                valid = (self.valid if self.all_rows else self.valid[:, None]).to(rows.device)  # [B, r]
                if index not in self.first:
                    self.first[index] = rows[:, 0].float().cpu()
                total = (rows.double() * valid[..., None]).sum(1).cpu()
                self.sums[index] = total if index not in self.sums else self.sums[index] + total
            if index in self.spec.token_layers:
                self.rows.setdefault(index, []).append(rows.half().cpu())
        return on_output

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def results(self, b: int, n: int) -> dict:
        """Capture fields of sequence b, whose completion has n tokens."""
        counts = self.valid.sum(1) if self.all_rows else self.counts
        if int(counts[b]) != n:
            raise RuntimeError(f"hidden states of {int(counts[b])} rows recorded for a completion of {n} tokens")
        out = {}
        if self.spec.layers:
            out["hidden_last_prompt"] = torch.stack([self.first[i][b] for i in self.spec.layers]).numpy()
            out["hidden_mean"] = torch.stack([self.sums[i][b] / n for i in self.spec.layers]).float().numpy()
        if self.spec.token_layers:
            out["hidden_tokens"] = torch.stack([torch.cat(self.rows[i], dim=1)[b, :n] for i in self.spec.token_layers],
                                               dim=1).numpy()
        return out


_RECORDER: Recorder | None = None


def key_rows(key: torch.Tensor) -> torch.Tensor:
    """Keys [B, H, K, D] with contiguous [K, D] rows, for sdpa: the recording generation stores them as [D, K]
    (`GrowingLayer.keys_by_dim`), a layout on which sdpa's CPU kernel is many times slower."""
    return key if key.stride(-1) == 1 else key.contiguous()


def _float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (batched) in float32, b being keys or values. On CUDA, with keys/values in the model's half precision,
    the operands are multiplied in it, the products accumulated and returned in float32 (cuBLAS, `out_dtype`):
    for queries @ keys the same sums as on float32 copies (a product of two half-precision numbers is exact in
    float32), without converting the cache every layer and step; probabilities @ values rounds the probabilities
    to half precision for that product only, as flash attention does (the statistics are computed before). Elsewhere
    both are converted to float32 (the CPU has no such product)."""
    if _half_on_cuda(b):
        return torch.bmm(a.to(b.dtype), b, out_dtype=torch.float32)
    return torch.bmm(_float32(a), _float32(b))


def _half_on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def attentropy_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Drop-in attention implementation (same signature and output as transformers' eager attention).

    query [B, Hq, Q, D]; key, value [B, Hkv, K, D] (cache included, the Q new tokens last); attention_mask
    [B, 1, Q, K] additive float. Without an active Recorder, or for non-causal (cross) attention, it is plain
    sdpa. Recorded rows are computed explicitly, scores, softmax and statistics in float32 (`_product`: on CUDA
    from half-precision operands with float32 accumulation); other rows use sdpa."""
    rec = _RECORDER
    if rec is None or not getattr(module, "is_causal", False) or module.training:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key_rows(key), value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if attention_mask is None:  # only when the mask function was not registered: fail loudly, never attend ahead
        raise RuntimeError("attentropy attention got no mask; register the mask function with the implementation")
    batch, n_heads, n_q, head_dim = query.shape
    n_kv, n_own = key.shape[1], key.shape[2]
    groups = n_heads // n_kv  # GQA: query head h reads key/value head h // groups; statistics per query head
    first = 0 if rec.all_rows else n_q - 1  # first recorded row
    shared = rec.shared_prefix.get(module.layer_idx) if rec.shared_prefix else None
    n_shared = 0 if shared is None else shared[0].shape[-1]
    if shared is not None and first > 0:
        raise RuntimeError("a shared prefix is supported for recorded rows only (decode steps)")
    n_k = n_shared + n_own  # keys: the shared prefix's, then the cache's
    if attention_mask.shape[-1] != n_k:
        attention_mask = attention_mask[..., :n_k]
    outputs = []
    if first > 0:
        outputs.append(F.scaled_dot_product_attention(query[:, :, :first], key_rows(key), value,
                                                      attn_mask=attention_mask[:, :, :first], scale=scaling,
                                                      enable_gqa=groups > 1))
    # A decode step calls this once per layer with one row: every tensor operation saved here counts (each costs a
    # few microseconds, as much as the arithmetic at batch 1), hence no calls that would return their input.
    # 3-D views for bmm (matmul's broadcasting costs more than the product itself at batch 1): [B * Hkv, D, K] keys
    # (contiguous rows in the recording generation's layout) and [B * Hkv, K, D] values, no copy
    if not _half_on_cuda(key):  # float32 copies (where needed), once for every chunk
        key, value = _float32(key), _float32(value)
    key_t = key.transpose(2, 3).reshape(batch * n_kv, head_dim, n_own)
    value_rows = value.reshape(batch * n_kv, n_own, head_dim)
    chunk_rows = max(1, rec.chunk_bytes // (4 * batch * n_heads * n_k))
    for start in range(first, n_q, chunk_rows):
        stop = min(start + chunk_rows, n_q)
        r = stop - start
        q, mask = (query, attention_mask) if r == n_q else (query[:, :, start:stop], attention_mask[:, :, start:stop])
        # [B * Hkv, groups * r, D] @ [B * Hkv, D, K]: grouped heads read their shared keys without copying them
        q = q.reshape(batch * n_kv, groups * r, head_dim)
        scores = _product(q, key_t)
        if shared is not None:  # the prefix's keys once for all rows: [Hkv, B * groups * r, D] @ [Hkv, D, P]
            q_by_head = q.view(batch, n_kv, groups * r, head_dim).transpose(0, 1).reshape(n_kv, -1, head_dim)
            prefix_scores = _product(q_by_head, shared[0]).view(n_kv, batch, groups * r, n_shared).transpose(0, 1)
            scores = torch.cat([prefix_scores, scores.view(batch, n_kv, groups * r, n_own)], dim=-1)
        scores = scores.view(batch, n_heads, r, n_k)
        # mask + scaling * scores in one pass, as eager attention orders it (scaled scores, then the mask); masked
        # keys: ~ -3.4e38 (finite), so p = 0 exactly
        torch.add(mask, scores, alpha=scaling, out=scores)
        # own token of the chunk's first row: key n_k - n_q + start
        p = rec.rows(module.layer_idx, (batch, n_heads, r, n_k), own=n_k - n_q + start, device=scores.device)
        torch.softmax(scores, dim=-1, out=p)
        del scores
        p_rows = p.view(batch * n_kv, groups * r, n_k)
        output = _product(p_rows if shared is None else p_rows[..., n_shared:], value_rows)
        if shared is not None:  # + the prefix's values, once for all rows: [Hkv, B * groups * r, P] @ [Hkv, P, D]
            p_by_head = p_rows[..., :n_shared].view(batch, n_kv, groups * r, n_shared).transpose(0, 1)
            prefix_output = _product(p_by_head.reshape(n_kv, -1, n_shared), shared[1])
            output += prefix_output.view(n_kv, batch, groups * r, head_dim).transpose(0, 1).reshape(output.shape)
        outputs.append(output.view(batch, n_heads, r, head_dim))
        rec.rows_done(p)
        del p
    output = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    if output.dtype != query.dtype:
        output = output.to(query.dtype)
    output = output.transpose(1, 2)  # [B, Q, Hq, D], like eager attention: contiguous already when Q == 1
    return (output if n_q == 1 else output.contiguous()), None


def register() -> None:
    """Register the attention function and its mask function under one name. Without a mask function of the
    same name transformers would build no causal mask for it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, attentropy_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


@contextmanager
def recording(model, recorder: Recorder):
    """Run `model` with the attentropy attention implementation, feeding `recorder`."""
    global _RECORDER
    register()
    previous, outer = model.config._attn_implementation, _RECORDER  # (nested: a prefill inside a decode loop)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    _RECORDER = recorder
    try:
        yield recorder
    finally:
        _RECORDER = outer
        model.set_attn_implementation(previous)


@contextmanager
def recording_generation(model, layout_mask: torch.Tensor, max_new_tokens: int, save_maps: set[int] = frozenset(),
                         hidden: HiddenSpec = HiddenSpec(), stops=()):
    """Record during `model.generate`: each call's last query row (the prefill's last prompt token, then one
    row per decode step), and the raw next-token distribution of each step (before any logits processor); with
    `hidden`, the hidden states of the same rows (`stops`: the stop tokens that end an answer).
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
        with recording(model, recorder):
            yield recorder
    finally:
        for h in hooks:
            h.remove()
        if recorder.hidden is not None:
            recorder.hidden.remove()


@dataclass
class Capture:
    """Statistics of one sequence's completion tokens."""

    attn: np.ndarray  # [n_tokens, n_layers, n_heads, len(ATTN_STATS)] float32
    logprob: np.ndarray  # [n_tokens]
    logit_entropy: np.ndarray
    logit_varentropy: np.ndarray
    n_keys: np.ndarray  # [n_tokens] visible keys of the row (position + 1); max attention entropy is ln n_keys
    attention_map: dict | None = None  # layer -> [n_heads, n_tokens, len(prompt) + n_tokens - 1] float16
    hidden_last_prompt: np.ndarray | None = None  # [len(HiddenSpec.layers), d] float32: row of completion token 0
    hidden_mean: np.ndarray | None = None  # [len(HiddenSpec.layers), d] float32: mean over the completion's rows
    hidden_tokens: np.ndarray | None = None  # [n_tokens, len(HiddenSpec.token_layers), d] float16: every row


def recorded_layers(model) -> list[int]:
    """True indices of the self-attention layers (Mllama's cross-attention layers do not run without an image)."""
    config = model.config.get_text_config()
    cross = set(getattr(config, "cross_attention_layers", None) or [])
    return [i for i in range(config.num_hidden_layers) if i not in cross]


@torch.no_grad()
def capture(model, prompts: list[list[int]], completions: list[list[int]], *, prompt_cache: PromptCache | None = None,
            chunk_bytes: int = 16 << 20, save_maps: set[int] = frozenset(), hidden: HiddenSpec = HiddenSpec()
            ) -> list[Capture]:
    """Statistics for every completion token of each (prompt ids, completion ids) pair (never re-tokenized).

    One teacher-forced forward over [last prompt token, completion[:-1]] per sequence (right padded), attending
    to the prompts' cached keys/values (`prompt_cache`, or computed here): its query rows are exactly the rows
    that predicted the completion tokens.
    `save_maps`: batch indices whose full attention rows (completion rows x visible keys) are also returned;
    `hidden`: hidden states of the same rows (Capture.hidden_*)."""
    if not prompts or any(len(p) < 2 for p in prompts) or any(len(c) == 0 for c in completions):
        raise ValueError("capture needs a prompt of at least 2 tokens and a non-empty completion for every sequence")
    device = model.device
    if prompt_cache is None:
        prompt_cache = fill_prompt_cache(model, prompts)
    layout_ids, layout_mask = prompt_cache.input_ids, prompt_cache.attention_mask
    batch = layout_ids.shape[0]
    n_q = max(len(c) for c in completions)
    new_ids = torch.zeros(batch, n_q, dtype=torch.long)  # [last prompt token, completion[:-1]], right padded
    targets = torch.zeros(batch, n_q, dtype=torch.long)  # the tokens those rows predicted
    new_valid = torch.zeros(batch, n_q, dtype=torch.long)
    for b, c in enumerate(completions):
        new_ids[b, 0] = layout_ids[b, -1]
        new_ids[b, 1:len(c)] = torch.tensor(c[:-1], dtype=torch.long)
        targets[b, :len(c)] = torch.tensor(c, dtype=torch.long)
        new_valid[b, :len(c)] = 1
    full_mask = torch.cat([layout_mask, new_valid[:, 1:]], dim=1)  # [B, W-1+Q] over the key axis
    position_ids = positions(layout_mask)[:, -1:] + torch.arange(n_q)  # [B, Q]
    recorder = Recorder(layout_mask, all_rows=True, max_rows=n_q, chunk_bytes=chunk_bytes, save_maps=save_maps)
    if hidden:
        recorder.hidden = HiddenRecorder(model, hidden, batch, all_rows=True, valid=new_valid.bool())
    try:
        with recording(model, recorder) as rec:
            last = model.get_decoder()(input_ids=new_ids.to(device), attention_mask=full_mask.to(device),
                                       position_ids=position_ids.to(device), cache=prompt_cache.cache,
                                       use_cache=True).last_hidden_state  # [B, Q, d]
    finally:
        if recorder.hidden is not None:
            recorder.hidden.remove()
    lm_head = model.get_output_embeddings()
    rows = max(1, chunk_bytes // (batch * lm_head.out_features))  # float32 logits chunk <= 4 * chunk_bytes
    for lo in range(0, n_q, rows):
        logp = torch.log_softmax(lm_head(last[:, lo:lo + rows]).float(), dim=-1)  # [B, r, V]
        rec.record_logits(logp, lo, targets[:, lo:lo + rows].to(device))
    return rec.captures(model, prompts, completions)
