"""The Capture: the statistics of one sequence's completion tokens, per token and per layer and query head.

Row convention: completion token t is described by the query row that predicted it, absolute position
len(prompt) - 1 + t; its logit statistics and log-probability come from that same row.

Two ways to fill the same rows, tested to agree:
  - `capture(model, prompts, completions)`: one teacher-forced forward over given ids (any answer, e.g. one
    written elsewhere), attending to the prompts' cached keys/values;
  - `Recorder` during `generate`: the decode steps' own query rows are those rows, so `attentropy run` reads the
    statistics while generating (`recorded_captures`). On a CPU a decode step at batch 16 is compute bound, so a
    second forward would cost about as much as generation itself; reading the rows in place (each layer's rows
    reduced while still in the CPU's cache) costs far less.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .attention import recorded_layers, recording
from .hidden_states import HiddenRecorder, HiddenSpec
from .layout import PromptCache, positions, prompt_layout
from .recorder import PromptDiagonal, Recorder
from .schema import TOKEN_STATS


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
    # LLM-Check's prompt part (`recorder.PromptDiagonal`): per layer and head, the sum over the prompt's rows but its
    # last (which is completion token 0's row) of ln(attention on the row's own token), and the rows summed
    prompt_log_diag: np.ndarray | None = None  # [n_layers, n_heads] float64
    prompt_diag_rows: int | None = None  # len(prompt) - 1


def recorded_captures(recorder: Recorder, model, prompts: list[list[int]], completions: list[list[int]],
                      prompt_diagonal: tuple[np.ndarray, np.ndarray] | None = None) -> list[Capture]:
    """Each sequence's `Capture` from what `recorder` holds (its rows, token statistics, maps and hidden states):
    sequence b's prompt is `prompts[b]`, its completion `completions[b]`; `prompt_diagonal`: the prompts'
    (`PromptDiagonal.result`: sums [B, L, H], rows [B])."""
    layers = recorded_layers(model)
    if recorder.attn_buffer is not None:
        found = recorder.attn_layers
        attn = recorder.attn_buffer[:, :, :, : recorder.attn_rows].cpu().permute(1, 3, 0, 2, 4)
    else:
        found = sorted(recorder.attn)
        attn = torch.stack([torch.cat(recorder.attn[layer], dim=2) for layer in found], dim=2)  # [B, H, L, R, S]
        attn = attn.permute(0, 3, 2, 1, 4)
    if found != layers:
        raise RuntimeError(f"captured layers {found} but expected {layers}")
    # attn: [B, R, L, H, S], rows then (layer, head), as stored
    token = dict(zip(TOKEN_STATS, recorder.token_stats.cpu()))  # name -> [B, max_rows]
    width = recorder.layout_mask.shape[1]
    results = []
    for b, (p, c) in enumerate(zip(prompts, completions)):
        n = len(c)
        if attn.shape[1] < n:
            raise RuntimeError(f"recorded {attn.shape[1]} rows for a completion of {n} tokens")
        maps = None
        if b in recorder.maps:  # layer -> [H, n, len(prompt) + n - 1]: completion rows over the visible keys
            keys = torch.cat([recorder.layout_mask[b].nonzero().squeeze(-1), torch.arange(width, width + n - 1)])
            maps = {}
            for layer, parts in recorder.maps[b].items():
                full = torch.zeros(parts[0].shape[0], sum(x.shape[1] for x in parts), width + n - 1,
                                   dtype=parts[0].dtype)
                row = 0
                for x in parts:
                    k = min(x.shape[2], full.shape[2])
                    full[:, row:row + x.shape[1], :k] = x[:, :, :k]
                    row += x.shape[1]
                maps[layer] = full[:, :n][:, :, keys].numpy()
        extra = recorder.hidden.results(b, n) if recorder.hidden is not None else {}
        if prompt_diagonal is not None:
            extra.update(prompt_log_diag=prompt_diagonal[0][b], prompt_diag_rows=int(prompt_diagonal[1][b]))
        results.append(Capture(attn=attn[b, :n].numpy(), logprob=token["logprob"][b, :n].numpy(),
                               logit_entropy=token["logit_entropy"][b, :n].numpy(),
                               logit_varentropy=token["logit_varentropy"][b, :n].numpy(),
                               n_keys=np.arange(len(p), len(p) + n), attention_map=maps, **extra))
    return results


@torch.no_grad()
def fill_prompt_cache(model, prompts: list[list[int]], pad_id: int = 0) -> PromptCache:
    """Keys/values of the prompts (left padded) from one forward, and their `PromptDiagonal` (every row of the forward:
    the prompts without their last tokens); used when capture gets no cache from generation."""
    from transformers import DynamicCache

    input_ids, attention_mask = prompt_layout(prompts, pad_id)
    cache = DynamicCache(config=model.config.get_text_config())
    diagonal = PromptDiagonal(attention_mask[:, :-1], last_row=True)
    if input_ids.shape[1] > 1:
        with recording(model, None, prompt_diagonal=diagonal):
            model.get_decoder()(input_ids=input_ids[:, :-1].to(model.device),
                                attention_mask=attention_mask[:, :-1].to(model.device),
                                position_ids=positions(attention_mask[:, :-1]).to(model.device), cache=cache,
                                use_cache=True)
    return PromptCache(input_ids, attention_mask, cache, diagonal.result(recorded_layers(model)))


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
    return recorded_captures(rec, model, prompts, completions, prompt_cache.prompt_diagonal)
