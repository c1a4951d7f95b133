"""The bag-of-tokens control: the mean input embedding of the answer's tokens (hidden state 0), what the answer
says rather than how the model computed it."""

from __future__ import annotations

import numpy as np

from .detector import Detector
from .fitting import probe_fitter


def mean_embedding(a) -> np.ndarray:
    """[n_answers, d]: the answer's mean input embedding."""
    return a.hidden["answer_mean"][:, a.hidden_layers.index(0)]


BAG_OF_TOKENS = Detector("bag_of_tokens", "answer", "control", "bag_of_tokens",
                         "mean input embedding of the answer's tokens (what it says), L2 probe", mean_embedding,
                         probe_fitter(), needs=("hidden", "embeddings"))
