"""The instrument as a detector, and its variants. The instrument routes each answer by an applicability check: an
answer of a question kind it was fitted on is scored by the dense probe (`instrument_dense`: a logistic probe on
the attention statistics per layer x head and the logit statistics), any other answer (a kind not seen in fitting,
or one not known) by the instrument built to transfer (`instrument_anchored`, `anchored.py`). Variants: attention
alone, with the best hidden layer; per token: the token's statistics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..features import answer_features, token_features
from ..probe import LinearProbe
from .anchored import AnchoredModel, anchored_inputs, anchored_prefix_inputs, fit_anchored
from .detector import Detector
from .fitting import Fitted, probe_fitter
from .hidden_state import answer_mean, fit_best_layer

UNKNOWN_KIND = ""  # the kind of an answer to a question typed by a user: never one the instrument was fitted on


@dataclass
class RoutedModel:
    """The fitted instrument of one task: the dense probe for the kinds it was fitted on, the anchored model for
    the others. Inputs: `anchored_inputs` (or their prefix form)."""

    dense: LinearProbe
    anchored: AnchoredModel
    kinds: list[str]  # the question kinds of the training answers

    def in_kind(self, kinds: np.ndarray) -> np.ndarray:
        return np.isin(np.asarray(kinds).astype(str), self.kinds)

    def confidence(self, x) -> np.ndarray:
        anchors, pooled, kinds = x
        return np.where(self.in_kind(kinds), self.dense.confidence(pooled), self.anchored.confidence(anchors, pooled))

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {**self.dense.arrays(f"{prefix}.dense"), **self.anchored.arrays(f"{prefix}.anchored"),
                f"{prefix}.kinds": np.array(self.kinds, dtype=str)}

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "RoutedModel":
        return cls(LinearProbe.from_arrays(arrays, f"{prefix}.dense"),
                   AnchoredModel.from_arrays(arrays, f"{prefix}.anchored"), arrays[f"{prefix}.kinds"].tolist())


def fit_routed(X, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> Fitted:
    """Both models on the same training answers; the kinds they hold decide which one scores an answer."""
    dense = probe_fitter()(X[1], y, groups, seed)
    anchored = fit_anchored(X, y, groups, seed)
    model = RoutedModel(dense.detail["probe"], anchored.detail["model"], sorted(set(np.asarray(X[2]).astype(str))))
    return Fitted(model.confidence, dense.train_confidence, {"C": dense.detail["C"], "model": model})


def attention_only(a):
    """`answer_features` without the four logit statistics."""
    return answer_features(a)[:, :-4]


def with_hidden(a):
    return answer_features(a), answer_mean(a)


INSTRUMENT = Detector("instrument", "answer", "instrument", "attention",
                      "applicability-routed: instrument_dense for answers of kinds seen in fitting, "
                      "instrument_anchored for any other", anchored_inputs, fit_routed,
                      prefix_features=anchored_prefix_inputs)
INSTRUMENT_DENSE = Detector("instrument_dense", "answer", "instrument", "attention",
                            "attention (6 statistics per layer x head) + logit statistics, L2 logistic probe",
                            answer_features, probe_fitter())
ATTENTION = Detector("attention", "answer", "instrument", "attention", "attention statistics alone, L2 logistic probe",
                     attention_only, probe_fitter())
ATTENTION_HIDDEN = Detector("attention_hidden", "answer", "instrument", "attention",
                            "the instrument's features + the hidden-state probe's (its best layer)", with_hidden,
                            fit_best_layer, needs=("hidden",))
TOKEN_INSTRUMENT = Detector("instrument", "token", "instrument", "attention",
                            "the token's attention statistics (per layer, mean over heads) + its logit statistics, L2 "
                            "logistic probe", token_features, probe_fitter(balanced=True))
