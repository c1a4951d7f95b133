"""LLM-Check's attention score (Sriramanan et al., NeurIPS 2024) and two forms beside it.

`llm_check`, as the authors compute it (`get_attn_eig_prod` in their repository, over prompt and response: their
`--use_toklens`, which keeps the response only, is off in their scripts): per layer, the log-determinant of each
head's causal attention matrix over the whole sequence, normalised by the sequence's length, summed over the heads.
The matrix is lower triangular, so its log-determinant is the sum of the log-diagonal: the score is
    sum over heads h of (1/N) sum over rows i of ln A_h[i, i]
(A_h[i, i]: row i's attention on its own token; N rows). The authors score every layer and report the best one;
here the layer (and the sign) is the best on the training folds.

`llm_check_polygraph`, LM-Polygraph's `AttentionScore` (its estimator of LLM-Check): at the middle layer
(num_hidden_layers // 2, the nearest recorded one) the mean over heads of the *sum* over the whole sequence's rows
of ln A_h[i, i], not normalised by length; nothing is chosen on labels (training-free). LM-Polygraph takes
ln(A + 1e-12) where this takes ln A: they differ only on rows whose own-token attention is below ~1e-10.

`llm_check_answer_rows`, a variant: the authors' formula over the answer's rows only (the only rows recorded
before the prompt's were).

Rows: the run keeps the prompt's rows but its last (`Answers.prompt_log_diag`, `prompt_diag_rows`) and the rows that
predict the answer's tokens (`diag_mass`: the prompt's last token's row and every answer token's but the last). The
row of the answer's last token is never computed (a drawn token is fed back only to draw the next), so the whole
sequence here is every token but the answer's last: N = len(prompt) + n_tokens - 1 rows, one fewer than the
authors' forward over the full text."""

from __future__ import annotations

import numpy as np

from ..features import segment_means
from .detector import Detector
from .fitting import fit_best_column, fit_fixed


def _log_diag_groups(a):
    """(layer positions, [n_tokens, l, H] float64) per group of layers: ln of each answer row's attention on its own
    token (0 floored at 1e-30)."""
    for positions, values in a.attn.groups("diag_mass", expansion=6):  # float64 logs
        yield positions, np.log(np.maximum(values.astype(np.float64), 1e-30))


def whole_sequence_log_diag(a) -> tuple[np.ndarray, np.ndarray]:
    """(sums [n_answers, L, H], rows [n_answers]): the sum of ln(attention on the own token) over every row of the
    answer's sequence (its prompt's and its own), and the number of rows. Computed once per answers."""
    if a.prompt_log_diag is None:
        raise ValueError("LLM-Check over the whole sequence needs the prompt rows' log own-token attention, which "
                         "these runs did not record (config.json's capture has no prompt_log_diag: runs written "
                         "before it was); rerun them, or use llm_check_answer_rows")
    def compute(a):
        starts, counts = a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy()
        sums = a.prompt_log_diag.copy()
        if len(starts):
            for positions, log_diag in _log_diag_groups(a):
                sums[:, positions] += np.add.reduceat(log_diag, starts, axis=0)
        return sums, a.prompt_diag_rows + counts
    return a.memo("whole_sequence_log_diag", compute)


def llm_check_scores(a) -> np.ndarray:
    """[n_answers, L]: LLM-Check's attention score per layer over the whole sequence, the sum over heads of the
    mean over its rows of ln(attention on the own token)."""
    sums, rows = whole_sequence_log_diag(a)
    return (sums / rows[:, None, None]).sum(axis=2)


def middle_layer(layers: list[int]) -> int:
    """Index in `layers` of LM-Polygraph's layer: num_hidden_layers // 2, or the nearest recorded one (the last
    layer is a self-attention layer in every supported model, so num_hidden_layers is the last index + 1)."""
    target = (max(layers) + 1) // 2
    return int(np.argmin([abs(layer - target) for layer in layers]))


def llm_check_polygraph_scores(a) -> np.ndarray:
    """[n_answers, 1]: LM-Polygraph's AttentionScore (its confidence, the negated uncertainty): at the middle layer,
    the mean over heads of the sum over the whole sequence's rows of ln(attention on the own token)."""
    sums, _ = whole_sequence_log_diag(a)
    return sums[:, middle_layer(a.layers)].mean(axis=1, keepdims=True)


def llm_check_answer_rows_scores(a) -> np.ndarray:
    """[n_answers, L]: the variant, per layer the sum over heads of the mean over the answer's rows only of
    ln(attention on the own token)."""
    starts, counts = a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy()
    out = np.empty((len(starts), len(a.layers)))
    for positions, log_diag in _log_diag_groups(a):
        out[:, positions] = segment_means(log_diag.sum(axis=2), starts, counts)  # the heads' sum per row, then means
    return out


LLM_CHECK = Detector("llm_check", "answer", "baseline", "llm_check",
                     "LLM-Check's attention score as its authors compute it: per layer, sum over heads of the mean "
                     "log own-token attention over the whole sequence (prompt and answer rows), best layer on "
                     "training folds", llm_check_scores, fit_best_column, needs=("prompt_diagonal",))
LLM_CHECK_POLYGRAPH = Detector("llm_check_polygraph", "answer", "baseline", "llm_check",
                               "LLM-Check's attention score as LM-Polygraph computes it (AttentionScore): at the "
                               "middle layer, mean over heads of the summed log own-token attention over the whole "
                               "sequence", llm_check_polygraph_scores, fit_fixed, needs=("prompt_diagonal",),
                               training_free=True)
LLM_CHECK_ANSWER_ROWS = Detector("llm_check_answer_rows", "answer", "baseline", "llm_check",
                                 "variant of LLM-Check's attention score over the answer's rows only (the authors' "
                                 "also covers the prompt's rows): per layer, sum over heads of the mean log own-token "
                                 "attention, best layer on training folds", llm_check_answer_rows_scores,
                                 fit_best_column)
