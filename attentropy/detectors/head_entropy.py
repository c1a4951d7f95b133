"""Attention Head Entropy: the entropy of every head's attention averaged over the answer's tokens, with a sparse
(L1) logistic probe over the heads, as its authors build it; and a variant on the row before the answer only.

The authors' entropy is Rényi's of order 2, -ln sum p^2; the capture records Shannon's, -sum p ln p, which stands
in here (both are 0 for one key and ln K for uniform attention over K keys; Rényi-2 <= Shannon). Adding Rényi-2 to
the capture would change every run directory's layout: not done yet."""

from __future__ import annotations

import numpy as np

from ..features import segment_means
from .detector import Detector
from .fitting import probe_fitter


def shannon_entropy(a) -> np.ndarray:
    """[n_tokens, L, H]: each head's attention entropy in nats (the stored entropy / ln K, times ln K)."""
    return _nats(a.attn["entropy_norm"], a.keys)


def _nats(entropy_norm: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Entropy / ln K [n, l, H] of rows attending to `keys` [n, l] keys, times ln K: the entropy in nats."""
    return entropy_norm * np.log(np.maximum(keys, 2))[:, :, None]


def _per_head(a) -> dict[str, np.ndarray]:
    """Each head's attention entropy in nats [n_answers, L * H], reduced over each answer's tokens in one pass over
    the entropies: `over_answer` their mean, `before_answer` at the row that predicts the answer's first token.
    Computed once per answers."""
    def compute(a):
        starts, counts, keys, n_heads = a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy(), a.keys, a.n_heads
        out = {k: np.empty((len(starts), len(a.layers), n_heads)) for k in ("over_answer", "before_answer")}
        for positions, values in a.attn.groups("entropy_norm", expansion=6):  # float64 nats
            nats = _nats(values, keys[:, positions])
            out["before_answer"][:, positions] = nats[starts]
            nats = nats.reshape(len(nats), -1).astype(np.float64)
            out["over_answer"][:, positions] = segment_means(nats, starts, counts).reshape(len(starts), -1, n_heads)
        return {k: v.reshape(len(starts), -1) for k, v in out.items()}
    return a.memo("head_entropy", compute)


def entropy_over_answer(a) -> np.ndarray:
    """[n_answers, L * H]: each head's attention entropy averaged over the answer's tokens."""
    return _per_head(a)["over_answer"]


def entropy_before_answer(a) -> np.ndarray:
    """[n_answers, L * H]: each head's attention entropy at the row that predicts the answer's first token."""
    return _per_head(a)["before_answer"]


HEAD_ENTROPY = Detector("head_entropy", "answer", "baseline", "head_entropy",
                        "Attention Head Entropy: per-head entropy averaged over the answer (Shannon standing in for "
                        "the authors' Renyi-2), L1 logistic probe", entropy_over_answer, probe_fitter("l1"))
HEAD_ENTROPY_PRE_ANSWER = Detector("head_entropy_pre_answer", "answer", "baseline", "head_entropy",
                                   "variant of Attention Head Entropy: per-head entropy of the row before the answer "
                                   "only, L1 logistic probe", entropy_before_answer, probe_fitter("l1"))
