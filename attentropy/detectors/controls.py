"""The controls: what a result must beat to mean anything (answer length, question kind, kind with the logit
statistics, a token's position or type) and the leakage check (the instrument trained on shuffled labels)."""

from __future__ import annotations

import numpy as np

from ..features import answer_features, answer_logit_statistics
from ..token_comparisons import token_type_features
from .detector import Detector
from .fitting import probe_fitter


def log_length(a) -> np.ndarray:
    return np.log(a.answers.n_tokens.to_numpy(np.float64))[:, None]


def kind_one_hot(a, kinds: list[str]) -> np.ndarray:
    """[n_answers, len(kinds)]: the question kind, one column per kind of `kinds` (a kind not among them: none)."""
    return (a.answers.kind.to_numpy()[:, None] == np.array(kinds, dtype=object)[None]).astype(np.float64)


def kind_and_logit(a, kinds: list[str]) -> np.ndarray:
    return np.concatenate([kind_one_hot(a, kinds), answer_logit_statistics(a)], axis=1)


def log_position(a) -> np.ndarray:
    return np.log1p(a.tokens.pos.to_numpy(np.float64))[:, None]


LENGTH = Detector("length", "answer", "control", "length", "answer length alone", log_length, probe_fitter())
KIND = Detector("kind", "answer", "control", "kind", "question kind alone", kind_one_hot, probe_fitter(),
                reads_kind=True, out_of_kind=False)
KIND_LOGIT = Detector("kind_logit", "answer", "control", "kind", "question kind + logit statistics", kind_and_logit,
                      probe_fitter(), reads_kind=True, out_of_kind=False)
SHUFFLED = Detector("shuffled", "answer", "control", "sanity",
                    "the instrument trained on shuffled labels (must be at chance)", answer_features,
                    probe_fitter(shuffle=True), out_of_kind=False)
POSITION = Detector("position", "token", "control", "position", "the token's position alone", log_position,
                    probe_fitter(balanced=True))
TOKEN_TYPE = Detector("token_type", "token", "control", "token_type",
                      "the token's type alone (a digit; a result after '='), no model features", token_type_features,
                      probe_fitter(balanced=True))
