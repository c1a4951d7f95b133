"""RAUQ (recurrent attention-based uncertainty): per layer of the middle third, the head that attends most to the
previous token over the answer (chosen per answer, as its authors do); token confidences propagated along the answer
through that head's attention; the answer's uncertainty is the largest over those layers. Training-free: only the
calibration is fitted. A variant beside it, `rauq_fixed_heads`, chooses each layer's head once on the training
answers."""

from __future__ import annotations

import numpy as np

from ..features import prefix_means, segment_means
from .detector import Detector
from .fitting import Fitted, fit_fixed


def rauq_layers(layers: list[int]) -> list[int]:
    """RAUQ's layers: the middle third of the recorded ones (indices into `layers`)."""
    n = len(layers)
    return list(range(n // 3, max(n // 3 + 1, 2 * n // 3)))


RAUQ_ALPHA = 0.5  # the recurrence's weight of the token's own probability (the RAUQ paper's choice for instruct models)


def rauq_token_terms(a, prev: np.ndarray, alpha: float = RAUQ_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Per token, layer and head of `prev` ([n_tokens, l, H]: attention to the previous token at some layers of the
    middle third) [n_tokens, l * H]: -ln c_i with c_1 = p_1, c_i = alpha p_i + (1 - alpha) a_(i,i-1) c_(i-1) (p_i the
    token's probability, a_(i,i-1) that head's attention to the previous token), and a_(i,i-1) where token i-1 was
    generated (else 0)."""
    prev = prev.astype(np.float64)
    p = np.exp(a.tokens.logprob.to_numpy(np.float64))[:, None, None]
    pos = a.tokens.pos.to_numpy()
    c = np.zeros_like(prev)
    for t in range(pos.max() + 1 if len(pos) else 0):  # recurrence along positions, all answers at once
        rows = np.flatnonzero(pos == t)
        c[rows] = p[rows] if t == 0 else alpha * p[rows] + (1 - alpha) * prev[rows] * c[rows - 1]
    n_cells = prev.shape[1] * prev.shape[2]
    inside = prev.reshape(len(prev), n_cells)
    inside[pos == 0] = 0.0  # a_(i,i-1) with i-1 generated
    neg_log_c = np.log(np.maximum(c, 1e-300, out=c), out=c).reshape(len(prev), n_cells)  # in place: [n, l, H] each
    return np.negative(neg_log_c, out=neg_log_c), inside


def _rauq_groups(a, alpha: float):
    """(positions in the middle third [l], `rauq_token_terms` [n_tokens, l * H] each) per group of layers."""
    mid = rauq_layers(a.layers)
    for positions, prev in a.attn.groups("prev_mass", mid, expansion=16):  # float64 c, ln c, their prefix means
        yield positions - mid[0], *rauq_token_terms(a, prev, alpha)


def rauq_features(a, alpha: float = RAUQ_ALPHA) -> np.ndarray:
    """[n_answers, 2, L_mid, H]: per answer, layer of the middle third and head, the RAUQ uncertainty -mean_i ln c_i
    (`rauq_token_terms`) and (second) the answer's summed attention to the previous token over its tokens after the
    first (both generated), from which each layer's head is chosen. Computed once per answers and alpha."""
    def compute(a):
        starts, counts = a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy()
        out = np.empty((len(starts), 2, len(rauq_layers(a.layers)), a.n_heads))
        for positions, neg_log_c, inside in _rauq_groups(a, alpha):
            out[:, 0, positions] = segment_means(neg_log_c, starts, counts).reshape(len(starts), len(positions), -1)
            out[:, 1, positions] = (np.add.reduceat(inside, starts, axis=0) if len(starts) else inside[:0]).reshape(
                len(starts), len(positions), -1)
        return out
    return a.memo(f"rauq_features {alpha}", compute)


def rauq_prefix_uncertainty(a, alpha: float = RAUQ_ALPHA) -> np.ndarray:
    """[n_tokens]: `rauq_uncertainty` of each answer's tokens up to and including this one."""
    out = np.full(len(a.tokens), -np.inf)
    counts = (a.tokens.pos.to_numpy() + 1)[:, None]
    for positions, neg_log_c, inside in _rauq_groups(a, alpha):
        shape = (len(neg_log_c), 2, len(positions), a.n_heads)
        uncertainty = prefix_means(neg_log_c, a)
        del neg_log_c
        prev_sum = prefix_means(inside, a) * counts
        del inside
        feats = np.stack([uncertainty, prev_sum], axis=1).reshape(shape)
        del uncertainty, prev_sum
        out = np.maximum(out, rauq_uncertainty(feats))  # the largest over the layers, group by group
    return out


def rauq_uncertainty(feats: np.ndarray) -> np.ndarray:
    """[n_answers]: RAUQ's uncertainty as its authors define it: per layer the head with the highest attention to
    the previous token over this answer, the answer's uncertainty at that head, the largest over the layers."""
    heads = feats[:, 1].argmax(axis=2)  # [n_answers, L_mid]
    return np.take_along_axis(feats[:, 0], heads[:, :, None], axis=2)[:, :, 0].max(axis=1)


def fit_rauq(feats: np.ndarray, y: np.ndarray, groups=None, seed: int = 0) -> Fitted:
    """RAUQ: confidence = -uncertainty, calibrated as `fit_fixed` (nothing else is fitted)."""
    inner = fit_fixed(-rauq_uncertainty(feats)[:, None], y)
    return Fitted(lambda f: inner.confidence(-rauq_uncertainty(f)[:, None]), inner.train_confidence)


def fit_rauq_fixed_heads(feats: np.ndarray, y: np.ndarray, groups=None, seed: int = 0) -> Fitted:
    """The variant: per layer of the middle third the head with the highest mean attention to the previous token on
    the training answers (no labels used); answer uncertainty = max over those layers; confidence = its negative,
    calibrated as `fit_fixed`."""
    heads = feats[:, 1].sum(axis=0).argmax(axis=1)  # [L_mid]

    def score(f):
        return -f[:, 0, np.arange(len(heads)), heads].max(axis=1, keepdims=True)

    inner = fit_fixed(score(feats), y)
    return Fitted(lambda f: inner.confidence(score(f)), inner.train_confidence, {"heads": heads.tolist()})


RAUQ = Detector("rauq", "answer", "baseline", "rauq",
                "RAUQ (alpha 0.5, middle third of layers, each answer's previous-token head per layer)",
                rauq_features, fit_rauq, training_free=True)
RAUQ_FIXED_HEADS = Detector("rauq_fixed_heads", "answer", "baseline", "rauq",
                            "variant of RAUQ: each layer's previous-token head chosen once on the training answers "
                            "(the authors choose it per answer)", rauq_features, fit_rauq_fixed_heads,
                            training_free=True)
