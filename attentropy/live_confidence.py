"""The instrument's confidences of tokens as they are generated (`LiveConfidence`): each new token is scored from its
own recorded statistics and running state over the answer so far (`AnswerSoFar`), the same numbers as
`Instrument.score` of the finished answer at that token (`attentropy serve` streams them).

The answer model of a task is a `RoutedModel`: the dense probe for an answer whose question kind was seen in
fitting, the anchored model otherwise. Its inputs at a token are `anchored_prefix_inputs`: the pooled features over
the tokens so far (the attention statistics per layer x head and the logit statistics: running float64 sums, as
`np.cumsum` adds them, and the minimum log-prob) and the anchors (mean log-prob, negated mean entropy, negated RAUQ
uncertainty). RAUQ's part is its recurrence c_i = alpha p_i + (1 - alpha) a_(i,i-1) c_(i-1) per layer of the middle
third x head, carried from token to token, with running sums of -ln c_i and of a_(i,i-1) over the tokens after
the first (`detectors.rauq`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .answers import ATTN_FEATURES, normalised_attention
from .detectors.instrument import UNKNOWN_KIND
from .detectors.rauq import RAUQ_ALPHA, rauq_layers, rauq_uncertainty
from .instrument import Instrument
from .schema import ATTN_STATS
from .windows import attended_keys


@dataclass
class AnswerSoFar:
    """The running state of one answer's features and the confidences it was given."""

    task: str | None  # the instrument's answer model for this answer; None: the instrument does not apply
    kind: str = UNKNOWN_KIND  # its question kind, which routes it (UNKNOWN_KIND: a typed prompt, anchored model)
    n: int = 0  # tokens so far
    sums: np.ndarray | None = None  # [6 * L * H + 3] float64: the attention statistics and the logit statistics
    logprob_min: float = np.inf
    rauq_c: np.ndarray | None = None  # [L_mid, H] float64: c of the last token
    rauq_neg_log_c: np.ndarray | None = None  # [L_mid, H] float64: the sum of -ln c over the tokens so far
    rauq_prev: np.ndarray | None = None  # [L_mid, H] float64: the sum of a_(i,i-1) over the tokens after the first
    confidences: list = field(default_factory=list)  # (token confidence, prefix confidence) per token
    in_kind: bool | None = None  # whether the dense probe scored it (its kind seen in fitting); None: not scored


class LiveConfidence:
    """Scores new tokens of several answers at once (one decode step's rows) with the instrument."""

    def __init__(self, instrument: Instrument, windows: list[int | None] | None = None):
        self.instrument = instrument
        # per recorded layer its sliding window (None: full attention), as `windows.layer_windows` gives them
        self.windows = list(windows or [None] * len(instrument.identity["layers"]))
        self.rauq_layers = rauq_layers(instrument.identity["layers"])  # indices into the recorded layers

    def add(self, answers: list[AnswerSoFar], attn: np.ndarray, token_stats: np.ndarray, n_keys: np.ndarray
            ) -> list[tuple[float, float]]:
        """Each answer's next token: `attn` [k, L, H, n_stats] and `token_stats` [k, 3] (log-prob, entropy,
        varentropy) as recorded, `n_keys` [k] its visible keys. Returns (token confidence, prefix confidence) per
        answer (NaN where the instrument has no such model or does not apply to the answer) and remembers them."""
        stats = {s: attn[..., i].astype(np.float32) for i, s in enumerate(ATTN_STATS)}
        normal = normalised_attention(stats, attended_keys(n_keys, self.windows))  # ATTN_FEATURES -> [k, L, H]
        logit = token_stats.astype(np.float32)
        per_token = np.concatenate([*(normal[f].mean(axis=2) for f in ATTN_FEATURES), logit], axis=1)
        rows = np.concatenate([*(normal[f].reshape(len(logit), -1) for f in ATTN_FEATURES), logit], axis=1)
        prev_mass = normal["prev_mass"][:, self.rauq_layers].astype(np.float64)  # [k, L_mid, H]
        p = np.exp(logit[:, 0].astype(np.float64))

        token = np.full(len(logit), np.nan)  # only where the instrument applies to the answer
        scored = [i for i, a in enumerate(answers) if a.task is not None]
        if self.instrument.token_model is not None and scored:
            token[scored] = self.instrument.token_model.confidence(per_token[scored])

        prefix = np.full(len(logit), np.nan)
        for task, model in self.instrument.answer_models.items():
            chosen = [i for i in scored if answers[i].task == task]
            if not chosen:
                continue
            inputs = [_next_token(answers[i], rows[i], p[i], prev_mass[i]) for i in chosen]
            pooled = np.stack([x[0] for x in inputs])
            rauq = np.stack([x[1] for x in inputs])  # [k', 2, L_mid, H]
            anchors = np.column_stack([pooled[:, -4], -pooled[:, -2], -rauq_uncertainty(rauq)])
            kinds = np.array([answers[i].kind for i in chosen], dtype=str)
            prefix[chosen] = model.confidence((anchors, pooled, kinds))
            for i, in_kind in zip(chosen, model.in_kind(kinds)):
                answers[i].in_kind = bool(in_kind)

        out = [(float(t), float(q)) for t, q in zip(token, prefix)]
        for a, scores in zip(answers, out):
            a.confidences.append(scores)
        return out


def _next_token(a: AnswerSoFar, row: np.ndarray, p: float, prev_mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add one token to an answer's running state: `row` its attention statistics per layer x head and logit
    statistics [6 * L * H + 3], `p` its probability, `prev_mass` [L_mid, H] the RAUQ layers' attention to the
    previous token. Returns the answer's prefix inputs at this token: the pooled features ([6 * L * H + 4] float32,
    as `features.prefix_features`) and RAUQ's features ([2, L_mid, H], as `rauq.rauq_prefix_uncertainty` reads them)."""
    first = a.n == 0
    a.n += 1
    a.sums = row.astype(np.float64) if first else a.sums + row
    a.logprob_min = min(a.logprob_min, float(row[-3]))
    means = (a.sums / a.n).astype(np.float32)
    pooled = np.concatenate([means[:-3], means[-3:-2], np.float32([a.logprob_min]), means[-2:]])

    # RAUQ: c_1 = p_1, c_i = alpha p_i + (1 - alpha) a_(i,i-1) c_(i-1); the first token's a_(i,i-1) (its attention
    # to the prompt's last token) is not counted
    a.rauq_c = np.full_like(prev_mass, p) if first else RAUQ_ALPHA * p + (1 - RAUQ_ALPHA) * prev_mass * a.rauq_c
    neg_log_c = -np.log(np.maximum(a.rauq_c, 1e-300))
    a.rauq_neg_log_c = neg_log_c if first else a.rauq_neg_log_c + neg_log_c
    a.rauq_prev = np.zeros_like(prev_mass) if first else a.rauq_prev + prev_mass
    # the means rounded to float32 as `features.prefix_means` gives them; the previous-token sum is that mean times
    # the count (so a near tie between heads is broken as offline)
    uncertainty = (a.rauq_neg_log_c / a.n).astype(np.float32)
    prev_sum = (a.rauq_prev / a.n).astype(np.float32) * np.float64(a.n)
    return pooled, np.stack([uncertainty, prev_sum])
