"""Attention Head Entropy: the Shannon entropy of every head's attention before the answer (the last prompt
token's row), with a sparse (L1) logistic probe over the heads."""

from __future__ import annotations

import numpy as np

from .detector import Detector
from .fitting import probe_fitter


def entropy_before_answer(a) -> np.ndarray:
    """[n_answers, L * H]: each head's attention entropy (nats) at the row that predicts the answer's first token."""
    first = a.answers.start.to_numpy()
    log_k = np.log(np.maximum(a.tokens.n_keys.to_numpy()[first], 2))[:, None, None]
    return (a.attn["entropy_norm"][first] * log_k).reshape(len(first), -1)


HEAD_ENTROPY = Detector("head_entropy", "answer", "baseline", "head_entropy",
                        "Attention Head Entropy: per-head entropy before the answer (Shannon), L1 logistic probe",
                        entropy_before_answer, probe_fitter("l1"))
