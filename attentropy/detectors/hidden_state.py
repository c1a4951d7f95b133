"""Hidden-state probes: a logistic probe on the residual stream of the best middle layer (SAPLMA, "The Geometry of
Truth": the strongest single-pass detectors in recent work), averaged over the answer, at the last prompt token,
or at the token itself."""

from __future__ import annotations

import numpy as np

from .detector import Detector
from .fitting import best_layer_fitter


def candidate_layers(layers: list[int]) -> list[int]:
    """Indices of the kept hidden states a probe may choose from: every layer but the embeddings (index 0, the
    bag-of-tokens control), or all where only the embeddings were kept."""
    return [i for i, layer in enumerate(layers) if layer != 0] or list(range(len(layers)))


def answer_mean(a) -> np.ndarray:
    """[n_answers, L, d]: the candidate layers' hidden states averaged over the answer's rows."""
    return a.memo("hidden_mean", lambda a: a.hidden["answer_mean"][:, candidate_layers(a.hidden_layers)])


def last_prompt(a) -> np.ndarray:
    """[n_answers, L, d]: the candidate layers' hidden states at the last prompt token (before the answer)."""
    return a.hidden["last_prompt"][:, candidate_layers(a.hidden_layers)]


def token_rows(a) -> np.ndarray:
    """[n_tokens, L, d]: the candidate layers' hidden states of the row that predicted each token."""
    return a.hidden_tokens[:, candidate_layers(a.hidden_token_layers)]


# one fitter for every answer-level detector that probes a hidden layer: the same training rows, one choice
fit_best_layer = best_layer_fitter()

HIDDEN = Detector("hidden", "answer", "baseline", "hidden_state",
                  "hidden-state probe: residual stream averaged over the answer, best layer on training folds",
                  answer_mean, fit_best_layer, needs=("hidden",))
HIDDEN_PROMPT = Detector("hidden_prompt", "answer", "baseline", "hidden_state",
                         "hidden-state probe at the last prompt token (before the answer), best layer on training "
                         "folds", last_prompt, fit_best_layer, needs=("hidden",))
TOKEN_HIDDEN = Detector("hidden", "token", "baseline", "hidden_state",
                        "hidden-state probe on the token's own row, best layer on training folds", token_rows,
                        best_layer_fitter(balanced=True), needs=("hidden_tokens",))
