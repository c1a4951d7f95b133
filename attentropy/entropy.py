"""Entropy and varentropy of a distribution: the statistics' math.

Definitions: for a distribution p over the K visible items,
    entropy     H = -sum p ln p                       (nats)
    varentropy  V =  sum p (ln p + H)^2 = Var[-ln p]   (nats^2)
Masked (invisible) keys have p = 0 exactly and contribute 0 (never 0 * inf).
"""

from __future__ import annotations

import torch


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
