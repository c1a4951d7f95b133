"""How a detector is fitted on training rows: a published score calibrated as it is (`fit_fixed`), its best
column (`fit_best_column`), a logistic probe (`probe_fitter`) or a probe on the best hidden layer
(`best_layer_fitter`); each returns a `Fitted`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..probe import fit_probe, platt, sigmoid


@dataclass
class Fitted:
    """A method fitted on training rows: calibrated confidence of any rows of its features, and honest confidences of
    its own training rows (inner out of fold for probes)."""

    confidence: object  # callable: feature rows -> [n] calibrated P(correct)
    train_confidence: np.ndarray
    detail: dict = field(default_factory=dict)


def fit_fixed(score: np.ndarray, y: np.ndarray, groups=None, seed: int = 0) -> Fitted:
    """A published score used as it is defined (one column, higher = more confident), calibrated by Platt on the
    training rows (a monotone map: only the scale is learned, or the sign where the training rows reverse it)."""
    a, b = platt(score[:, 0], y)
    return Fitted(lambda s: sigmoid(a * s[:, 0] + b), sigmoid(a * score[:, 0] + b), {"platt": [a, b]})


def fit_best_column(scores: np.ndarray, y: np.ndarray, groups=None, seed: int = 0) -> Fitted:
    """The column (e.g. layer) and sign with the highest training AUROC, then calibrated as `fit_fixed`."""
    from sklearn.metrics import roc_auc_score

    auc = np.array([roc_auc_score(y, c) for c in scores.T])
    best = int(np.argmax(np.abs(auc - 0.5)))
    sign = 1.0 if auc[best] >= 0.5 else -1.0
    inner = fit_fixed(sign * scores[:, [best]], y)
    return Fitted(lambda s: inner.confidence(sign * s[:, [best]]), inner.train_confidence,
                  {"column": best, "sign": sign})


def probe_fitter(penalty: str = "l2", balanced: bool = False, shuffle: bool = False):
    """A calibrated logistic probe (`fit_probe`); `shuffle`: on permuted labels (a leakage check)."""
    def fit(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> Fitted:
        if shuffle:  # the labels permuted: whatever this scores beyond chance is leakage
            y = shuffled_labels(y, groups, seed + 7)
        probe, train_conf = fit_probe(X, y, groups, penalty=penalty, balanced=balanced, seed=seed)
        return Fitted(probe.confidence, train_conf, {"C": probe.C, "probe": probe})
    return fit


def shuffled_labels(y: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """The labels permuted in an order that does not depend on the rows' order: the permutation is drawn over the
    rows sorted by question (then label), so listing the runs in another order gives the same labels per answer."""
    order = np.lexsort((y, np.asarray(groups).astype(str)))
    out = np.empty_like(y)
    out[order] = np.random.default_rng(seed).permutation(y[order])
    return out


def best_layer_fitter(balanced: bool = False):
    """A probe on hidden states [n, L, d] of the candidate layer whose probe has the highest inner cross-validated
    AUROC on the training rows (one regularisation strength for the choice, the usual grid for the chosen layer).
    X may also be (other features [n, F], hidden [n, L, d]): the chosen layer's hidden states are then appended to
    the other features. Detectors that share one fitter share the choice for the same training rows."""
    chosen: dict = {}

    def fit(X, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> Fitted:
        from sklearn.metrics import roc_auc_score

        hidden = X[1] if isinstance(X, tuple) else X
        key = hashlib.sha1(np.ascontiguousarray(hidden).tobytes() + np.asarray(y).tobytes()).hexdigest() + str(seed)
        if key not in chosen:
            if len(chosen) > 256:
                chosen.clear()
            scores = [roc_auc_score(y, fit_probe(np.asarray(hidden[:, i], np.float32), y, groups, Cs=(1e-2,),
                                                 balanced=balanced, seed=seed)[1]) for i in range(hidden.shape[1])]
            chosen[key] = int(np.argmax(scores))
        best = chosen[key]

        def features(x):
            h = np.asarray((x[1] if isinstance(x, tuple) else x)[:, best], np.float32)
            return np.concatenate([x[0], h], axis=1) if isinstance(x, tuple) else h

        probe, train_conf = fit_probe(features(X), y, groups, balanced=balanced, seed=seed)
        return Fitted(lambda x: probe.confidence(features(x)), train_conf, {"C": probe.C})
    return fit


def take(features, rows):
    """Rows of a feature array, or of each array of a tuple of them."""
    return tuple(f[rows] for f in features) if isinstance(features, tuple) else features[rows]
