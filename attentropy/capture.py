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


@dataclass
class _CaptureState:
    """What the attention function needs during one capture forward, and what it leaves behind. Key indices are
    into the full key axis [prompt layout without its last token | last prompt token | completion[:-1]]."""

    sink_key: torch.Tensor  # [B] first visible key (the sequence's first token)
    prompt_keys: int  # keys < prompt_keys are prompt tokens (or padding, which gets p = 0)
    prev_key: torch.Tensor  # [B, Q] key index of the token before each query row's own token
    chunk_bytes: int  # bound on one chunk's float32 score matrix [B, H, rows, K]
    map_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # batch index -> visible key indices to keep
    stats: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, Q, n_stats] float32 on CPU
    maps: dict[int, dict[int, list]] = field(default_factory=dict)  # batch index -> layer -> [[H, rows, K_b]]


_STATE: _CaptureState | None = None


def attentropy_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Drop-in attention implementation (same signature and output as transformers' eager attention).

    query [B, Hq, Q, D]; key, value [B, Hkv, K, D] (cache included, the Q new tokens last); attention_mask
    [B, 1, Q, K] additive float. Outside a capture, or for non-causal (cross) attention, it is plain sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _STATE
    if state is None or not getattr(module, "is_causal", False) or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if attention_mask is None:  # only when the mask function was not registered: fail loudly, never attend ahead
        raise RuntimeError("attentropy attention got no mask; register the mask function with the implementation")
    batch, n_heads, n_q = query.shape[:3]
    n_k = key.shape[2]
    groups = n_heads // key.shape[1]  # GQA: statistics are per query head; keys/values shared by `groups` heads
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key  # [B, Hq, K, D]
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    mask = attention_mask[:, :, :, :n_k]
    dev = query.device
    output = torch.empty_like(query)  # [B, Hq, Q, D]
    stats = torch.empty(batch, n_heads, n_q, len(ATTN_STATS), dtype=torch.float32, device=dev)
    sink = state.sink_key.to(dev).view(batch, 1, 1, 1).expand(batch, n_heads, n_q, 1)
    diag = torch.arange(n_k - n_q, n_k, device=dev).view(1, 1, n_q, 1).expand(batch, n_heads, n_q, 1)
    prev = state.prev_key.to(dev).view(batch, 1, n_q, 1).expand(batch, n_heads, n_q, 1)
    chunk_rows = max(1, state.chunk_bytes // (4 * batch * n_heads * n_k))
    for start in range(0, n_q, chunk_rows):
        stop = min(start + chunk_rows, n_q)
        rows = slice(start, stop)
        scores = torch.matmul(query[:, :, rows].float(), key.float().transpose(2, 3)) * scaling
        scores = scores + mask[:, :, rows].float()  # [B, Hq, c, K]; masked keys -> ~ -3.4e38
        logp = torch.log_softmax(scores, dim=-1)
        del scores
        p = logp.exp()
        output[:, :, rows] = torch.matmul(p.to(value.dtype), value)
        entropy, varentropy = entropy_varentropy(logp)
        del logp
        chunk = stats[:, :, rows]
        chunk[..., 0] = entropy
        chunk[..., 1] = varentropy
        chunk[..., 2] = p.gather(-1, sink[:, :, rows]).squeeze(-1)
        chunk[..., 3] = p[..., : state.prompt_keys].sum(-1)
        chunk[..., 4] = p.gather(-1, diag[:, :, rows]).squeeze(-1)
        chunk[..., 5] = p.gather(-1, prev[:, :, rows]).squeeze(-1)
        for b, keys in state.map_keys.items():
            layer_maps = state.maps.setdefault(b, {}).setdefault(module.layer_idx, [])
            layer_maps.append(p[b][:, :, keys.to(dev)].half().cpu())
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
def capture(model, prompts: list[list[int]], completions: list[list[int]], *, prompt_cache: PromptCache | None = None,
            chunk_bytes: int = 16 << 20, logit_chunk_rows: int = 256, save_maps: set[int] = frozenset()
            ) -> list[Capture]:
    """Statistics for every completion token of each (prompt ids, completion ids) pair (never re-tokenized).

    One teacher-forced forward over [last prompt token, completion[:-1]] per sequence (right padded), attending
    to the prompt's cached keys/values: `prompt_cache` from generation, or computed here. Its query rows are
    exactly the rows that predicted the completion tokens.
    `save_maps`: batch indices whose full attention rows (completion rows x visible keys) are also returned."""
    global _STATE
    register()
    if not prompts or any(len(p) < 2 for p in prompts) or any(len(c) == 0 for c in completions):
        raise ValueError("capture needs a prompt of at least 2 tokens and a non-empty completion for every sequence")
    device = model.device
    if prompt_cache is None:
        prompt_cache = fill_prompt_cache(model, prompts)
    layout_ids, layout_mask = prompt_cache.input_ids, prompt_cache.attention_mask
    batch, width = layout_ids.shape
    n_q = max(len(c) for c in completions)
    new_ids = torch.zeros(batch, n_q, dtype=torch.long)
    new_valid = torch.zeros(batch, n_q, dtype=torch.long)
    for b, c in enumerate(completions):
        new_ids[b, 0] = layout_ids[b, -1]
        new_ids[b, 1:len(c)] = torch.tensor(c[:-1], dtype=torch.long)
        new_valid[b, :len(c)] = 1
    full_mask = torch.cat([layout_mask, new_valid[:, 1:]], dim=1)  # [B, W-1+Q] over the key axis
    position_ids = positions(layout_mask)[:, -1:] + torch.arange(n_q)  # [B, Q]
    visible_before_last = layout_mask[:, :-1] * torch.arange(1, width)  # index+1 where visible, else 0
    prev_key = torch.cat([(visible_before_last.max(-1).values - 1)[:, None],  # row 0: previous visible prompt token
                          torch.arange(width - 1, width - 2 + n_q).expand(batch, -1)], dim=1)
    state = _CaptureState(sink_key=layout_mask.argmax(-1), prompt_keys=width, prev_key=prev_key,
                          chunk_bytes=chunk_bytes,
                          map_keys={b: full_mask[b].nonzero().squeeze(-1) for b in save_maps})
    cache = prompt_cache.cache
    _STATE = state
    try:
        with _attn_implementation(model, ATTN_IMPLEMENTATION):
            hidden = model.get_decoder()(input_ids=new_ids.to(device), attention_mask=full_mask.to(device),
                                         position_ids=position_ids.to(device), cache=cache,
                                         use_cache=True).last_hidden_state  # [B, Q, d]
    finally:
        _STATE = None
    layers = recorded_layers(model)
    if sorted(state.stats) != layers:
        raise RuntimeError(f"captured layers {sorted(state.stats)} but expected {layers}")
    attn = torch.stack([state.stats[layer] for layer in layers], dim=2)  # [B, H, L, Q, S]
    attn = attn.permute(0, 3, 2, 1, 4)  # [B, Q, L, H, S]: rows, then (layer, head), as stored
    lm_head = model.get_output_embeddings()
    results = []
    for b, (p, c) in enumerate(zip(prompts, completions)):
        targets = torch.tensor(c, device=device)
        logprob, log_h, log_v = [], [], []
        for lo in range(0, len(c), logit_chunk_rows):
            hi = min(lo + logit_chunk_rows, len(c))
            logp = torch.log_softmax(lm_head(hidden[b, lo:hi]).float(), dim=-1)  # [r, V]
            h, v = entropy_varentropy(logp)
            logprob.append(logp.gather(-1, targets[lo:hi, None]).squeeze(-1).cpu())
            log_h.append(h.cpu())
            log_v.append(v.cpu())
        maps = None
        if b in state.maps:  # layer -> [H, n, K_b]: the completion rows over this sequence's visible keys
            maps = {layer: torch.cat(parts, dim=1)[:, : len(c), : len(p) + len(c) - 1].numpy()
                    for layer, parts in state.maps[b].items()}
        results.append(Capture(attn=attn[b, : len(c)].numpy(), logprob=torch.cat(logprob).numpy(),
                               logit_entropy=torch.cat(log_h).numpy(), logit_varentropy=torch.cat(log_v).numpy(),
                               n_keys=np.arange(len(p), len(p) + len(c)), attention_map=maps))
    return results
