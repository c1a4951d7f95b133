"""The instrument's features: the stored statistics of an answer's tokens pooled over the whole answer
(`answer_features`), over the tokens so far (`prefix_features`), or a token's own (`token_features`). Each is
computed a group of layers at a time (`TokenAttention.groups`): the same values whether the answers' attention is held
or read from the runs; prefix features too large to hold are read by the linear models through `PrefixFeatures`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .answers import TOKEN_LOGIT, Answers
from .token_attention import ATTN_FEATURES


def segment_means(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[n_answers, C]: the mean of each column over each answer's rows (`starts`, `counts`)."""
    return np.add.reduceat(values, starts, axis=0) / counts[:, None] if len(starts) else values[:0]


def prefix_sums(values: np.ndarray, a: Answers) -> np.ndarray:
    """[n_tokens, C] float64: the sum of each column over the answer's tokens up to and including this one."""
    csum = np.cumsum(values, axis=0, dtype=np.float64)
    first = a.answers.start.to_numpy()[a.answer_of_token]
    csum -= np.where(first[:, None] > 0, csum[np.maximum(first - 1, 0)], 0.0)  # (the operand is made first)
    return csum


def prefix_means(values: np.ndarray, a: Answers) -> np.ndarray:
    """[n_tokens, C]: the mean of each column over the answer's tokens up to and including this one."""
    sums = prefix_sums(values, a)
    sums /= (a.tokens.pos.to_numpy() + 1)[:, None]
    return sums.astype(np.float32)


def _prefix_min(values: np.ndarray, a: Answers) -> np.ndarray:
    out = values.copy()
    pos = a.tokens.pos.to_numpy()
    for t in range(1, pos.max() + 1 if len(pos) else 0):  # per position: answers are at most max_new_tokens long
        rows = np.flatnonzero(pos == t)
        out[rows] = np.minimum(out[rows], out[rows - 1])
    return out


def cell_columns(feature: int, positions: np.ndarray, n_layers: int, n_heads: int) -> np.ndarray:
    """The columns of `answer_features` of one attention feature (index in ATTN_FEATURES) at layer `positions`,
    their heads in order (columns: feature-major, then layer, then head)."""
    return (feature * n_layers * n_heads + positions[:, None] * n_heads + np.arange(n_heads)).ravel()


def attention_token_matrix(a: Answers) -> np.ndarray:
    """[n_tokens, 6 * L * H]: the normalised attention statistics of each token, feature-major."""
    return np.concatenate([a.attn[k].reshape(len(a.tokens), -1) for k in ATTN_FEATURES], axis=1)


def feature_names(layers: list[int], n_heads: int, level: str = "answer") -> list[str]:
    """Names of the columns of `answer_features` (level `answer`, also `prefix_features`) or `token_features`."""
    if level == "token":
        return [f"{k}[L{layer}]" for k in ATTN_FEATURES for layer in layers] + list(TOKEN_LOGIT)
    return ([f"{k}[L{layer}H{h}]" for k in ATTN_FEATURES for layer in layers for h in range(n_heads)]
            + ["logprob_mean", "logprob_min", "logit_entropy_mean", "logit_varentropy_mean"])


def _token_logit(a: Answers) -> np.ndarray:
    return np.column_stack([a.tokens[k].to_numpy(np.float32) for k in TOKEN_LOGIT])


def answer_features(a: Answers) -> np.ndarray:
    """[n_answers, 6 * L * H + 4]: the attention statistics per layer x head averaged over the answer, then its
    logit statistics (mean log-prob, minimum log-prob, mean entropy, mean varentropy); computed once per answers."""
    def compute(a: Answers) -> np.ndarray:
        starts, counts = a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy()
        n_layers, n_heads = len(a.layers), a.n_heads
        out = np.empty((len(starts), len(ATTN_FEATURES) * n_layers * n_heads + 4))
        for f, name in enumerate(ATTN_FEATURES):
            for positions, values in a.attn.groups(name):
                out[:, cell_columns(f, positions, n_layers, n_heads)] = segment_means(
                    values.reshape(len(values), -1), starts, counts)
        logit = _token_logit(a)
        means = segment_means(logit, starts, counts)
        out[:, -4], out[:, -2:] = means[:, 0], means[:, 1:]
        out[:, -3] = np.minimum.reduceat(logit[:, 0], starts) if len(starts) else logit[:0, 0]
        return out
    return a.memo("answer_features", compute)


def prefix_features(a: Answers):
    """[n_tokens, 6 * L * H + 4]: `answer_features` over each answer's tokens up to and including this one (an
    array when the answers' attention is held, else `PrefixFeatures`, read by the linear models that use them)."""
    if not a.attn.held:
        return PrefixFeatures(a, np.arange(len(a.tokens)))
    attn = attention_token_matrix(a)
    logit = _token_logit(a)
    means = prefix_means(np.concatenate([attn, logit], axis=1), a)
    return np.concatenate([means[:, :-3], means[:, -3:-2], _prefix_min(logit[:, 0], a)[:, None], means[:, -2:]],
                          axis=1)


@dataclass
class PrefixFeatures:
    """`prefix_features` of answers whose attention is read from the runs ([n_tokens, F]: 33 GB for Llama 3.2 90B on
    GSM8K), never held: rows of them (`[rows]`), some columns (`[:, columns]`) or their projection on weights
    (`project`), each read a group of layers at a time."""

    answers: Answers
    rows: np.ndarray  # of the answers' tokens

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(ATTN_FEATURES) * len(self.answers.layers) * self.answers.n_heads + 4

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return PrefixFeatures(self.answers, self.rows[key])
        columns = np.arange(self.shape[1])[key[1]]  # [:, columns]
        weights = np.zeros((self.shape[1], columns.size))
        weights[columns.ravel(), np.arange(columns.size)] = 1.0
        values = self.project(weights)
        return values[:, 0] if columns.ndim == 0 else values

    def project(self, weights: np.ndarray) -> np.ndarray:
        """[n_rows, m] float64: the prefix features @ `weights` [F, m] (or [F]: m = 1), each weight vector's
        projection of every token computed once (`_Projections`)."""
        weights = np.asarray(weights, np.float64).reshape(self.shape[1], -1)
        return _projections(self.answers).of(weights)[self.rows]


class _Projections:
    """The projections of one answers' prefix features asked for so far (weight vector -> [n_tokens]); while
    `recording` is a dict, those not computed yet are only noted there (and answered with zeros): `at_once`."""

    def __init__(self, a: Answers):
        self.answers, self.columns, self.recording = a, {}, None

    def of(self, weights: np.ndarray) -> np.ndarray:
        keys = [w.tobytes() for w in weights.T]
        missing = {key: w for key, w in zip(keys, weights.T) if key not in self.columns}
        if missing and self.recording is not None:
            self.recording.update(missing)
            return np.zeros((len(self.answers.tokens), weights.shape[1]))
        if missing:
            self.compute(missing)
        return np.column_stack([self.columns[key] for key in keys] or [np.zeros((len(self.answers.tokens), 0))])

    def compute(self, wanted: dict) -> None:
        """Project on every weight vector of `wanted` in one pass over the statistics. A prefix mean is linear in the
        tokens' values, so the projection of the prefix means is the prefix mean of the tokens' projections: only
        [n_tokens, m] is held; the minimum log-prob's column is the one that is not a mean."""
        if not wanted:
            return
        a, weights = self.answers, np.column_stack(list(wanted.values()))
        n_layers, n_heads = len(a.layers), a.n_heads
        projected = np.zeros((len(a.tokens), weights.shape[1]))
        for f, name in enumerate(ATTN_FEATURES):
            cells = weights[f * n_layers * n_heads:(f + 1) * n_layers * n_heads].reshape(n_layers, n_heads, -1)
            used = np.flatnonzero(cells.any(axis=(1, 2)))  # only the layers with a weight are read
            if not len(used):
                continue
            for positions, values in a.attn.groups(name, used, expansion=4):  # float64 for the product
                projected += values.reshape(len(values), -1) @ weights[cell_columns(f, positions, n_layers, n_heads)]
        logit = _token_logit(a)
        projected += logit @ weights[[-4, -2, -1]]
        out = prefix_sums(projected, a) / (a.tokens.pos.to_numpy() + 1)[:, None]
        out += _prefix_min(logit[:, 0], a)[:, None].astype(np.float64) * weights[-3]
        self.columns.update(zip(wanted, out.T.copy()))


def _projections(a: Answers) -> _Projections:
    return a.memo("prefix_projections", _Projections)


def at_once(a: Answers, score):
    """`score()`, a function that reads `prefix_features(a)`, with every projection it asks of them computed in one
    pass over the statistics: a first call only notes them (its result is discarded), then they are computed
    together, then the second call reads them. Held answers: one call, as it is."""
    if a.attn.held:
        return score()
    projections = _projections(a)
    projections.recording = {}
    try:
        score()
    finally:
        wanted, projections.recording = projections.recording, None
    projections.compute(wanted)
    return score()


def token_features(a: Answers) -> np.ndarray:
    """[n_tokens, 6 * L + 3]: a token's own attention statistics per layer (mean over heads), then its logit
    statistics (log-prob, entropy, varentropy). Per layer x head instead: compared by bench/instrument.py (out of
    reach on large models: 30,720 features per token on Llama 3.2 90B). Computed once per answers."""
    def compute(a: Answers) -> np.ndarray:
        n_layers = len(a.layers)
        out = np.empty((len(a.tokens), len(ATTN_FEATURES) * n_layers + 3), np.float32)
        for f, name in enumerate(ATTN_FEATURES):
            for positions, values in a.attn.groups(name):
                out[:, f * n_layers + positions] = values.mean(axis=2)
        out[:, -3:] = _token_logit(a)
        return out
    return a.memo("token_features", compute)


def answer_logit_statistics(a: Answers) -> np.ndarray:
    """[n_answers, 4]: mean log-prob, minimum log-prob, mean next-token entropy, mean next-token varentropy."""
    return answer_features(a)[:, -4:]


def token_logit_statistics(a: Answers) -> np.ndarray:
    """[n_tokens, 3]: the token's log-prob, next-token entropy and varentropy."""
    return token_features(a)[:, -3:]
