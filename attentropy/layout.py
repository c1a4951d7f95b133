"""The prompts' layout in a batch: [shared prefix | left padding | rest of each prompt], its position ids, and the
`PromptCache` of a batch so laid out."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptCache:
    """A batch of prompts laid out as [shared prefix | left padding | rest of each prompt], and the keys/values of
    every prompt token but the last (whose query row predicts completion token 0 and so belongs to capture)."""

    input_ids: torch.Tensor  # [B, W]
    attention_mask: torch.Tensor  # [B, W], 0 on padding
    cache: object  # transformers Cache holding keys/values of input_ids[:, :W-1]
    # the prompts' `PromptDiagonal.result` (sums [B, L, H], rows [B]), when their prefill recorded it
    prompt_diagonal: tuple | None = None


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
