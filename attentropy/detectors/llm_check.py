"""LLM-Check's attention score, a variant: per layer, the log-determinant of the causal attention matrix restricted to
the answer's rows (sum over heads of the mean log attention on the token itself); the best layer on the training
folds. The authors take the whole sequence, prompt rows included; the capture records only the answer's rows."""

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


LLM_CHECK = Detector("llm_check_answer_rows", "answer", "baseline", "llm_check",
                     "variant of LLM-Check's attention score: sum over heads of the mean log own-token attention over "
                     "the answer's rows only (the authors' log-determinant also covers the prompt's rows, which the "
                     "capture does not record), best layer on training folds", llm_check_scores, fit_best_column)
