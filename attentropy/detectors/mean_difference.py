"""A direction in the attention statistics shared by the training kinds: the difference between the mean of correct
and of incorrect answers, taken within each kind and averaged over the kinds (a mass-mean probe, as in Marks &
Tegmark's "The Geometry of Truth", with the kinds weighted equally so that no kind's offset enters it). It has no
fitted weights beyond means, so it cannot learn a kind's shape the way a dense probe does. Alone
(`attention_direction`) and added to the training-free anchor of `anchored.py` (`anchored_direction`: two weights,
fitted on the direction's leave-one-kind-out scores of the training answers).

Scale: the features are standardised by the training answers' mean and standard deviation; the direction is
d = mean over kinds of (mean z of correct - mean z of incorrect), and an answer's score is z . d."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..probe import column_std, platt, sigmoid
from .anchored import ANCHORS, anchored_inputs, choose_anchor
from .detector import Detector
from .fitting import Fitted


@dataclass
class Direction:
    """score(x) = (x - mean) / scale . direction, over the attention columns of `answer_features`."""

    mean: np.ndarray
    scale: np.ndarray
    direction: np.ndarray

    def score(self, attention: np.ndarray) -> np.ndarray:
        weights = self.direction / self.scale
        return attention @ weights - self.mean @ weights


def kind_differences(attention: np.ndarray, y: np.ndarray, kinds: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """[kinds with both classes, F]: mean of correct minus mean of incorrect answers within each kind (raw units)."""
    out, usable = [], []
    for kind in np.unique(kinds):
        m = kinds == kind
        if 0 < y[m].sum() < m.sum():
            out.append(attention[m & (y == 1)].mean(0) - attention[m & (y == 0)].mean(0))
            usable.append(str(kind))
    return np.array(out).reshape(len(out), attention.shape[1]), usable


def fit_direction_scores(attention: np.ndarray, y: np.ndarray, kinds: np.ndarray) -> tuple[Direction, np.ndarray]:
    """The direction of every training kind, and each training answer's score by the direction of the other kinds
    (its own kind's difference left out: how the direction scores a kind it was not fitted on; 0 where there is no
    other kind with both classes)."""
    mean = attention.mean(0)
    scale = column_std(attention, mean)
    scale[scale < 1e-12] = 1.0
    diffs, usable = kind_differences(attention, y, kinds)
    diffs /= scale
    direction = Direction(mean, scale, diffs.mean(0) if len(diffs) else np.zeros_like(mean))
    held = direction.score(attention)  # kinds of one class: by the direction of every kind, which read no label of them
    for j, kind in enumerate(usable):
        m = kinds == kind
        held[m] = (Direction(mean, scale, np.delete(diffs, j, axis=0).mean(0)).score(attention[m])
                   if len(usable) > 1 else 0.0)
    return direction, held


def fit_attention_direction(X, y: np.ndarray, groups=None, seed: int = 0) -> Fitted:
    """The direction alone, calibrated by Platt on its leave-one-kind-out scores of the training answers."""
    _, pooled, kinds = X
    y = np.asarray(y, int)
    direction, held = fit_direction_scores(pooled[:, :-4], y, kinds)
    a, b = platt(held, y)
    return Fitted(lambda x: sigmoid(a * direction.score(x[1][:, :-4]) + b), sigmoid(a * held + b))


def fit_anchored_direction(X, y: np.ndarray, groups=None, seed: int = 0) -> Fitted:
    """The anchor chosen as `instrument_anchored` chooses it, plus the direction's score: a logistic regression on
    the two (standardised), fitted on the direction's leave-one-kind-out scores of the training answers."""
    from sklearn.linear_model import LogisticRegression

    anchors, pooled, kinds = X
    y = np.asarray(y, int)
    anchor = choose_anchor(anchors, y, kinds)
    direction, held = fit_direction_scores(pooled[:, :-4], y, kinds)
    both = np.column_stack([anchors[:, anchor], held])
    mean, scale = both.mean(0), both.std(0)
    scale[scale < 1e-12] = 1.0
    z_train = (both - mean) / scale
    model = LogisticRegression(C=1e4, max_iter=500).fit(z_train, y)
    weights, intercept = model.coef_[0], float(model.intercept_[0])

    def confidence(x):
        z = (np.column_stack([x[0][:, anchor], direction.score(x[1][:, :-4])]) - mean) / scale
        return sigmoid(z @ weights + intercept)
    return Fitted(confidence, sigmoid(z_train @ weights + intercept),
                  {"anchor": ANCHORS[anchor], "weights": weights.tolist()})


ATTENTION_DIRECTION = Detector("attention_direction", "answer", "instrument", "attention",
                               "the attention statistics projected on the difference of means (correct - incorrect) "
                               "taken within each training kind and averaged over the kinds; no other weights",
                               anchored_inputs, fit_attention_direction)
ANCHORED_DIRECTION = Detector("anchored_direction", "answer", "instrument", "attention",
                              "instrument_anchored's anchor plus attention_direction's score, two weights fitted on "
                              "the direction's leave-one-kind-out scores of the training answers", anchored_inputs,
                              fit_anchored_direction)
