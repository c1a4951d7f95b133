"""The statistics' math and their capture: one teacher-forced forward over prompt + completion ids through a
registered attention function that reduces every attention row to its statistics on the fly.

Definitions (DESIGN.md): for a distribution p over the K visible items,
    entropy     H = -sum p ln p                 (nats)
    varentropy  V =  sum p (ln p + H)^2 = Var[-ln p]   (nats^2)
Masked (invisible) keys have p = 0 exactly and contribute 0 (never 0 * inf).
Row convention: completion token t is described by the query row that predicted it, absolute position
len(prompt) - 1 + t; its logit statistics and log-probability come from that same row.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "attentropy"
ATTN_STATS = ("entropy", "varentropy", "sink_mass", "prompt_mass", "diag_mass", "prev_mass")
TOKEN_STATS = ("logprob", "logit_entropy", "logit_varentropy")


def entropy_varentropy(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and varentropy (nats, nats^2) over the last axis of log-probabilities `logp` (float32).
    Items with p == 0 (masked keys, logp = -inf or hugely negative) contribute exactly 0."""
    p = logp.exp()
    logp = torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    entropy = -(p * logp).sum(-1)
    varentropy = (p * (logp + entropy.unsqueeze(-1)) ** 2).sum(-1)
    return entropy, varentropy


@dataclass
class _CaptureState:
    """What the attention function needs during one capture forward, and what it leaves behind."""

    row_start: int  # first query row whose statistics are kept (rows before it only compute outputs)
    prompt_lens: torch.Tensor  # [B] number of prompt tokens per sequence (right padding: keys < it are prompt)
    chunk_bytes: int  # bound on one chunk's float32 score matrix [B, H, rows, K]
    map_rows: dict[int, tuple[int, int]] = field(default_factory=dict)  # batch index -> (first row, n rows) to keep
    stats: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, R, n_stats] float32 on CPU
    maps: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)  # batch index -> layer -> [H, n, K]


_STATE: _CaptureState | None = None


def attentropy_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Drop-in attention implementation (same signature and output as transformers' eager attention).

    query [B, Hq, Q, D]; key, value [B, Hkv, K, D]; attention_mask [B, 1, Q, K] additive float or None.
    Outside a capture, or for cross-attention (K != Q), it is plain sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _STATE
    n_q, n_k = query.shape[2], key.shape[2]
    if state is None or n_q != n_k or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    batch, n_heads = query.shape[:2]
    groups = n_heads // key.shape[1]  # GQA: statistics are per query head; keys/values shared by `groups` heads
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key  # [B, Hq, K, D]
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    if attention_mask is None:  # only when the mask function was not registered: fail loudly, never attend ahead
        raise RuntimeError("attentropy attention got no mask; register the mask function with the implementation")
    mask = attention_mask[:, :, :, :n_k]
    output = torch.empty_like(query)  # [B, Hq, Q, D]
    rs = state.row_start
    if rs > 0:  # rows whose statistics are not kept: fast fused kernel
        output[:, :, :rs] = F.scaled_dot_product_attention(query[:, :, :rs], key, value, attn_mask=mask[:, :, :rs],
                                                          scale=scaling)
    keys = torch.arange(n_k, device=query.device)
    prompt_keys = keys[None, :] < state.prompt_lens.to(query.device)[:, None]  # [B, K]
    stats = torch.empty(batch, n_heads, n_q - rs, len(ATTN_STATS), dtype=torch.float32, device=query.device)
    chunk_rows = max(1, state.chunk_bytes // (4 * batch * n_heads * n_k))
    for start in range(rs, n_q, chunk_rows):
        stop = min(start + chunk_rows, n_q)
        scores = torch.matmul(query[:, :, start:stop].float(), key.float().transpose(2, 3)) * scaling
        scores = scores + mask[:, :, start:stop].float()  # [B, Hq, c, K]; masked keys -> ~ -3.4e38
        logp = torch.log_softmax(scores, dim=-1)
        del scores
        p = logp.exp()
        output[:, :, start:stop] = torch.matmul(p.to(value.dtype), value)
        entropy, varentropy = entropy_varentropy(logp)
        del logp
        rows = torch.arange(start, stop, device=query.device)
        chunk = stats[:, :, start - rs:stop - rs]
        chunk[..., 0] = entropy
        chunk[..., 1] = varentropy
        chunk[..., 2] = p[..., 0]
        chunk[..., 3] = (p * prompt_keys[:, None, None, :]).sum(-1)
        chunk[..., 4] = p.gather(-1, rows.view(1, 1, -1, 1).expand(batch, n_heads, -1, 1)).squeeze(-1)
        prev = (rows - 1).clamp(min=0).view(1, 1, -1, 1).expand(batch, n_heads, -1, 1)
        chunk[..., 5] = torch.where(rows > 0, p.gather(-1, prev).squeeze(-1), 0.0)
        for b, (first, count) in state.map_rows.items():
            lo, hi = max(first, start), min(first + count, stop)
            if lo < hi:
                layer_maps = state.maps.setdefault(b, {}).setdefault(module.layer_idx, [])
                layer_maps.append(p[b, :, lo - start:hi - start, : first + count].half().cpu())
        del p
    state.stats[module.layer_idx] = stats.cpu()
    return output.transpose(1, 2).contiguous(), None  # [B, Q, Hq, D], like eager attention


def register() -> None:
    """Register the attention function and its mask function under one name. Without a mask function of the
    same name transformers would build no causal mask for it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, attentropy_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


@contextmanager
def _attn_implementation(model, name: str):
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@dataclass
class Capture:
    """Statistics of one sequence's completion tokens."""

    attn: np.ndarray  # [n_tokens, n_layers, n_heads, len(ATTN_STATS)] float32
    logprob: np.ndarray  # [n_tokens]
    logit_entropy: np.ndarray
    logit_varentropy: np.ndarray
    n_keys: np.ndarray  # [n_tokens] visible keys of the row (position + 1); max attention entropy is ln n_keys
    attention_map: dict | None = None  # layer -> [n_heads, n_tokens, n_keys_max] float16 (rows of completion tokens)


def recorded_layers(model) -> list[int]:
    """True indices of the self-attention layers (Mllama's cross-attention layers do not run without an image)."""
    config = model.config.get_text_config()
    cross = set(getattr(config, "cross_attention_layers", None) or [])
    return [i for i in range(config.num_hidden_layers) if i not in cross]


@torch.no_grad()
def capture(model, prompts: list[list[int]], completions: list[list[int]], *, chunk_bytes: int = 16 << 20,
            logit_chunk_rows: int = 256, save_maps: set[int] = frozenset()) -> list[Capture]:
    """Statistics for every completion token of each (prompt ids, completion ids) pair, from one batched
    teacher-forced forward over prompt + completion[:-1] (right padded; never re-tokenized).
    `save_maps`: batch indices whose full attention rows (completion rows x all keys) are also returned."""
    global _STATE
    register()
    device = model.device
    seqs = [list(p) + list(c[:-1]) for p, c in zip(prompts, completions)]
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s)
        attention_mask[b, : len(s)] = 1
    prompt_lens = torch.tensor([len(p) for p in prompts])
    row_start = int(prompt_lens.min()) - 1
    if row_start < 0 or any(len(c) == 0 for c in completions):
        raise ValueError("capture needs a non-empty prompt and completion for every sequence")
    state = _CaptureState(row_start=row_start, prompt_lens=prompt_lens, chunk_bytes=chunk_bytes,
                          map_rows={b: (len(prompts[b]) - 1, len(completions[b])) for b in save_maps})
    decoder = model.get_decoder()
    lm_head = model.get_output_embeddings()
    _STATE = state
    try:
        with _attn_implementation(model, ATTN_IMPLEMENTATION):
            hidden = decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             use_cache=False).last_hidden_state  # [B, T, d]
    finally:
        _STATE = None
    layers = recorded_layers(model)
    if sorted(state.stats) != layers:
        raise RuntimeError(f"captured layers {sorted(state.stats)} but expected {layers}")
    attn = torch.stack([state.stats[layer] for layer in layers], dim=2)  # [B, H, L, R, S]
    attn = attn.permute(0, 3, 2, 1, 4)  # [B, R, L, H, S]: rows, then (layer, head), as stored

    results = []
    for b, (p, c) in enumerate(zip(prompts, completions)):
        first = len(p) - 1  # row that predicted completion token 0
        rows = torch.arange(first, first + len(c))
        targets = torch.tensor(c)
        logprob, log_h, log_v = [], [], []
        for lo in range(0, len(c), logit_chunk_rows):
            r = rows[lo: lo + logit_chunk_rows]
            logits = lm_head(hidden[b, r.to(device)]).float()  # [r, V]
            logp = torch.log_softmax(logits, dim=-1)
            h, v = entropy_varentropy(logp)
            logprob.append(logp.gather(-1, targets[lo: lo + logit_chunk_rows, None].to(device)).squeeze(-1).cpu())
            log_h.append(h.cpu())
            log_v.append(v.cpu())
        maps = None
        if b in state.maps:
            maps = {layer: torch.cat(parts, dim=1).numpy() for layer, parts in state.maps[b].items()}
        results.append(Capture(attn=attn[b, first - row_start: first - row_start + len(c)].numpy(),
                               logprob=torch.cat(logprob).numpy(), logit_entropy=torch.cat(log_h).numpy(),
                               logit_varentropy=torch.cat(log_v).numpy(), n_keys=(rows + 1).numpy(),
                               attention_map=maps))
    return results
