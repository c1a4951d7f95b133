"""The instrument's features: the stored statistics of an answer's tokens pooled over the whole answer
(`answer_features`), over the tokens so far (`prefix_features`), or a token's own (`token_features`)."""

from __future__ import annotations

import numpy as np

from .answers import ATTN_FEATURES, TOKEN_LOGIT, Answers


def segment_means(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[n_answers, C]: the mean of each column over each answer's rows (`starts`, `counts`)."""
    return np.add.reduceat(values, starts, axis=0) / counts[:, None] if len(starts) else values[:0]


def prefix_means(values: np.ndarray, a: Answers) -> np.ndarray:
    """[n_tokens, C]: the mean of each column over the answer's tokens up to and including this one."""
    csum = np.cumsum(values, axis=0, dtype=np.float64)
    first = a.answers.start.to_numpy()[a.answer_of_token]
    before = np.where(first[:, None] > 0, csum[np.maximum(first - 1, 0)], 0.0)
    return ((csum - before) / (a.tokens.pos.to_numpy() + 1)[:, None]).astype(np.float32)


def _prefix_min(values: np.ndarray, a: Answers) -> np.ndarray:
    out = values.copy()
    pos = a.tokens.pos.to_numpy()
    for t in range(1, pos.max() + 1 if len(pos) else 0):  # per position: answers are at most max_new_tokens long
        rows = np.flatnonzero(pos == t)
        out[rows] = np.minimum(out[rows], out[rows - 1])
    return out


def attention_token_matrix(a: Answers) -> np.ndarray:
    """[n_tokens, 6 * L * H]: the normalised attention statistics of each token, feature-major."""
    return np.concatenate([a.attn[k].reshape(len(a.tokens), -1) for k in ATTN_FEATURES], axis=1)


def feature_names(layers: list[int], n_heads: int, level: str = "answer") -> list[str]:
    """Names of the columns of `answer_features` (level `answer`, also `prefix_features`) or `token_features`."""
    if level == "token":
        return [f"{k}[L{layer}]" for k in ATTN_FEATURES for layer in layers] + list(TOKEN_LOGIT)
    return ([f"{k}[L{layer}H{h}]" for k in ATTN_FEATURES for layer in layers for h in range(n_heads)]
            + ["logprob_mean", "logprob_min", "logit_entropy_mean", "logit_varentropy_mean"])


def answer_features(a: Answers) -> np.ndarray:
    """[n_answers, 6 * L * H + 4]: the attention statistics per layer x head averaged over the answer, then its
    logit statistics (mean log-prob, minimum log-prob, mean entropy, mean varentropy); computed once per answers."""
    return a.memo("answer_features", lambda a: _pooled(a, "answer"))


def prefix_features(a: Answers) -> np.ndarray:
    """[n_tokens, 6 * L * H + 4]: `answer_features` over each answer's tokens up to and including this one."""
    return _pooled(a, "prefix")


def _pooled(a: Answers, level: str) -> np.ndarray:
    logit = np.column_stack([a.tokens[k].to_numpy(np.float32) for k in TOKEN_LOGIT])
    attn = attention_token_matrix(a)
    if level == "answer":
        starts, counts = a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy()
        means = segment_means(np.concatenate([attn, logit], axis=1), starts, counts)
        lp_min = np.minimum.reduceat(logit[:, 0], starts) if len(starts) else logit[:0, 0]
    else:
        means = prefix_means(np.concatenate([attn, logit], axis=1), a)
        lp_min = _prefix_min(logit[:, 0], a)
    return np.concatenate([means[:, :-3], means[:, -3:-2], lp_min[:, None], means[:, -2:]], axis=1)


def token_features(a: Answers) -> np.ndarray:
    """[n_tokens, 6 * L + 3]: a token's own attention statistics per layer (mean over heads), then its logit
    statistics (log-prob, entropy, varentropy). Per layer x head instead: compared by bench/instrument.py (out of
    reach on large models: 30,720 features per token on Llama 3.2 90B). Computed once per answers."""
    def compute(a: Answers) -> np.ndarray:
        logit = np.column_stack([a.tokens[k].to_numpy(np.float32) for k in TOKEN_LOGIT])
        per_layer = [a.attn[k].mean(axis=2) for k in ATTN_FEATURES]  # [n_tokens, L] each
        return np.concatenate([*per_layer, logit], axis=1)
    return a.memo("token_features", compute)


def answer_logit_statistics(a: Answers) -> np.ndarray:
    """[n_answers, 4]: mean log-prob, minimum log-prob, mean next-token entropy, mean next-token varentropy."""
    return answer_features(a)[:, -4:]


def token_logit_statistics(a: Answers) -> np.ndarray:
    """[n_tokens, 3]: the token's log-prob, next-token entropy and varentropy."""
    return token_features(a)[:, -3:]
