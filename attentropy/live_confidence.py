"""The instrument's confidences of tokens as they are generated (`LiveConfidence`): each new token's features are
built from its own recorded statistics and running sums over the answer so far, the same numbers as
`features.token_features` / `prefix_features` of the finished answer (`attentropy serve` streams them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .answers import ATTN_FEATURES, normalised_attention
from .instrument import Instrument
from .schema import ATTN_STATS


@dataclass
class AnswerSoFar:
    """Running sums of one answer's features: the prefix means' float64 sums (as `np.cumsum` adds them) and the
    minimum log-prob so far."""

    task: str | None  # the instrument's answer model for this answer; None: the instrument does not apply
    n: int = 0
    sums: np.ndarray | None = None  # [6 * L * H + 3] float64
    logprob_min: float = np.inf
    confidences: list = field(default_factory=list)  # (token confidence, prefix confidence) per token


class LiveConfidence:
    """Scores new tokens of several answers at once (one decode step's rows) with the instrument."""

    def __init__(self, instrument: Instrument):
        self.instrument = instrument

    def add(self, answers: list[AnswerSoFar], attn: np.ndarray, token_stats: np.ndarray, n_keys: np.ndarray
            ) -> list[tuple[float, float]]:
        """Each answer's next token: `attn` [k, L, H, n_stats] and `token_stats` [k, 3] (log-prob, entropy,
        varentropy) as recorded, `n_keys` [k] its visible keys. Returns (token confidence, prefix confidence) per
        answer (NaN where the instrument has no such model or does not apply to the answer) and remembers them."""
        stats = {s: attn[..., i].astype(np.float32) for i, s in enumerate(ATTN_STATS)}
        normal = normalised_attention(stats, n_keys)  # ATTN_FEATURES -> [k, L, H] float32
        logit = token_stats.astype(np.float32)
        per_token = np.concatenate([*(normal[f].mean(axis=2) for f in ATTN_FEATURES), logit], axis=1)
        rows = np.concatenate([*(normal[f].reshape(len(logit), -1) for f in ATTN_FEATURES), logit], axis=1)
        token = np.full(len(logit), np.nan)  # only where the instrument applies to the answer
        scored = [i for i, a in enumerate(answers) if a.task is not None]
        if self.instrument.token_model is not None and scored:
            token[scored] = self.instrument.token_model.confidence(per_token[scored])
        prefix = np.full(len(logit), np.nan)
        pooled = []
        for i, a in enumerate(answers):
            a.sums = rows[i].astype(np.float64) if a.sums is None else a.sums + rows[i]
            a.n += 1
            a.logprob_min = min(a.logprob_min, float(logit[i, 0]))
            means = (a.sums / a.n).astype(np.float32)
            pooled.append(np.concatenate([means[:-3], means[-3:-2], np.float32([a.logprob_min]), means[-2:]]))
        for task, model in self.instrument.answer_models.items():
            chosen = [i for i, a in enumerate(answers) if a.task == task]
            if chosen:
                prefix[chosen] = model.confidence(np.stack([pooled[i] for i in chosen]))
        out = [(float(t), float(p)) for t, p in zip(token, prefix)]
        for a, scores in zip(answers, out):
            a.confidences.append(scores)
        return out
