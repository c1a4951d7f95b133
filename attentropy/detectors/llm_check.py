"""LLM-Check's attention score: per layer, the log-determinant of the causal attention matrix's answer rows (sum
over heads of the mean log attention on the token itself); the best layer on the training folds."""

from __future__ import annotations

import numpy as np

from ..features import segment_means
from .detector import Detector
from .fitting import fit_best_column


def llm_check_scores(a) -> np.ndarray:
    """[n_answers, L]: LLM-Check's attention score per layer, sum over heads of the mean over the answer's tokens of
    ln(attention on the token itself) (log-determinant of the causal attention matrix's answer rows)."""
    log_diag = np.log(np.maximum(a.attn["diag_mass"].astype(np.float64), 1e-30)).sum(axis=2)  # [n_tokens, L]
    return segment_means(log_diag, a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy())


LLM_CHECK = Detector("llm_check", "answer", "baseline", "llm_check",
                     "LLM-Check attention score (sum over heads of mean log own-token attention), best layer on "
                     "training folds", llm_check_scores, fit_best_column)
