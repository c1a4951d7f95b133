"""Group comparisons for the study, per cell (e.g. every layer x head): effect sizes (AUROC, Cohen's d) with 95 %
bootstrap intervals that resample *questions*, p-values from per-question aggregates, and Benjamini-Hochberg
control of the false discovery rate over all cells tested together.

Tokens of one answer are not independent: resampling tokens would give intervals far too narrow, and a test on
tokens would count one long answer many times. So the unit is always the question.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps


def auroc(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """P(X > Y) + P(X = Y) / 2 for X from `positive`, Y from `negative`, along axis 0 (other axes are cells):
    the Mann-Whitney U statistic over n1 * n0, from mid-ranks."""
    n1, n0 = len(positive), len(negative)
    ranks = sps.rankdata(np.concatenate([positive, negative]), axis=0)
    return (ranks[:n1].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def cohens_d(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """(mean1 - mean0) / pooled standard deviation (ddof 1), along axis 0; 0 where both groups are constant."""
    n1, n0 = len(positive), len(negative)
    pooled = ((n1 - 1) * positive.var(axis=0, ddof=1) + (n0 - 1) * negative.var(axis=0, ddof=1)) / (n1 + n0 - 2)
    diff = positive.mean(axis=0) - negative.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pooled > 0, diff / np.sqrt(pooled), 0.0)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Adjusted p-values (q-values) controlling the false discovery rate over all entries of `p` together."""
    flat = np.asarray(p, dtype=float).ravel()
    q = np.full_like(flat, np.nan)
    ok = np.isfinite(flat)
    if ok.any():
        q[ok] = sps.false_discovery_control(flat[ok], method="bh")
    return q.reshape(np.shape(p))


@dataclass
class Comparison:
    """One contrast over many cells; every array has the cells' shape (e.g. (n_layers, n_heads))."""

    auroc: np.ndarray
    auroc_ci: tuple[np.ndarray, np.ndarray]
    cohens_d: np.ndarray
    cohens_d_ci: tuple[np.ndarray, np.ndarray]
    p: np.ndarray  # two-sided, from per-question aggregates
    q: np.ndarray  # Benjamini-Hochberg over all cells of this comparison
    n_positive: int  # questions in each group
    n_negative: int
    alpha: float = 0.05

    @property
    def significant(self) -> np.ndarray:
        return self.q < self.alpha

    def table(self, cell_names: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
        """One row per cell; `cell_names` maps a column name to an array of the cells' shape (e.g. layer)."""
        columns = {name: np.asarray(v).ravel() for name, v in (cell_names or {}).items()}
        columns.update(auroc=self.auroc.ravel(), auroc_lo=self.auroc_ci[0].ravel(), auroc_hi=self.auroc_ci[1].ravel(),
                       cohens_d=self.cohens_d.ravel(), d_lo=self.cohens_d_ci[0].ravel(),
                       d_hi=self.cohens_d_ci[1].ravel(), p=self.p.ravel(), q=self.q.ravel(),
                       significant=self.significant.ravel(), n_positive=self.n_positive,
                       n_negative=self.n_negative)
        return pd.DataFrame(columns)


def _percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.nanpercentile(samples, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return lo, hi


def compare_answers(values: np.ndarray, positive: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05) -> Comparison:
    """Answer-level contrast: `values` [n_questions, *cells] holds one aggregate per question (e.g. the mean
    over its tokens), `positive` [n_questions] the group (e.g. incorrect). p: Mann-Whitney U, two-sided.
    Intervals: percentile bootstrap, questions resampled with replacement within each group."""
    values = np.asarray(values, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    pos, neg = values[positive], values[~positive]
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(f"each group needs at least 2 questions (got {len(pos)} and {len(neg)})")
    rng = np.random.default_rng(seed)
    boot_auc = np.empty((n_boot, *values.shape[1:]))
    boot_d = np.empty_like(boot_auc)
    for b in range(n_boot):
        bp = pos[rng.integers(0, len(pos), len(pos))]
        bn = neg[rng.integers(0, len(neg), len(neg))]
        boot_auc[b], boot_d[b] = auroc(bp, bn), cohens_d(bp, bn)
    p = sps.mannwhitneyu(pos, neg, axis=0, alternative="two-sided").pvalue
    return Comparison(auroc(pos, neg), _percentile_ci(boot_auc), cohens_d(pos, neg), _percentile_ci(boot_d),
                      p, benjamini_hochberg(p), len(pos), len(neg), alpha)


def compare_tokens(values: np.ndarray, positive: np.ndarray, question_ids: np.ndarray, *, n_boot: int = 500,
                   seed: int = 0, alpha: float = 0.05) -> Comparison:
    """Token-level contrast inside answers (e.g. the critic's wrong-moment tokens vs the other tokens of the same
    incorrect solutions). Effect sizes compare tokens; intervals resample questions (each drawn question brings
    all its tokens); p: Wilcoxon signed-rank over questions having both kinds of token, of the per-question
    difference of means. n_positive / n_negative count those questions."""
    values = np.asarray(values, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    question_ids = np.asarray(question_ids)
    questions, index = np.unique(question_ids, return_inverse=True)
    members = [np.flatnonzero(index == i) for i in range(len(questions))]
    both = [m for m in members if positive[m].any() and (~positive[m]).any()]
    if len(both) < 2:
        raise ValueError(f"need at least 2 questions with tokens of both kinds (got {len(both)})")
    diffs = np.stack([values[m][positive[m]].mean(axis=0) - values[m][~positive[m]].mean(axis=0) for m in both])
    p = sps.wilcoxon(diffs, axis=0, zero_method="wilcox").pvalue if len(both) >= 2 else np.full(diffs.shape[1:], 1.0)
    rng = np.random.default_rng(seed)
    boot_auc = np.empty((n_boot, *values.shape[1:]))
    boot_d = np.empty_like(boot_auc)
    for b in range(n_boot):
        rows = np.concatenate([both[i] for i in rng.integers(0, len(both), len(both))])
        sel, lab = values[rows], positive[rows]
        boot_auc[b], boot_d[b] = auroc(sel[lab], sel[~lab]), cohens_d(sel[lab], sel[~lab])
    rows = np.concatenate(both)
    sel, lab = values[rows], positive[rows]
    return Comparison(auroc(sel[lab], sel[~lab]), _percentile_ci(boot_auc), cohens_d(sel[lab], sel[~lab]),
                      _percentile_ci(boot_d), p, benjamini_hochberg(p), len(both), len(both), alpha)


def answer_aggregates(values: np.ndarray, question_ids: np.ndarray, how: str = "mean", k: int = 8
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(questions, [n_questions, *cells]) of per-token `values` aggregated per answer: `mean` over its tokens,
    `max`, or `first_k` (mean of its first k tokens; tokens must be in answer order)."""
    question_ids = np.asarray(question_ids)
    questions, first, index = np.unique(question_ids, return_index=True, return_inverse=True)
    order = np.argsort(first)  # keep the run's question order
    out = np.empty((len(questions), *values.shape[1:]))
    for row, i in enumerate(order):
        v = values[index == i]
        if how == "mean":
            out[row] = v.mean(axis=0)
        elif how == "max":
            out[row] = v.max(axis=0)
        elif how == "first_k":
            out[row] = v[:k].mean(axis=0)
        else:
            raise ValueError(f"aggregation must be mean, max or first_k, got {how!r}")
    return questions[order], out


def position_matched(question_ids: np.ndarray, pos: np.ndarray, in_error: np.ndarray, window: int = 8
                     ) -> np.ndarray:
    """Control tokens for a wrong-moment comparison: tokens not in the error span of their answer but within
    `window` positions of it, so both groups sit at similar positions (maximal attention entropy grows with
    ln of the number of keys). Returns a boolean mask over tokens; answers without a span contribute none."""
    question_ids, pos, in_error = np.asarray(question_ids), np.asarray(pos), np.asarray(in_error, dtype=bool)
    keep = np.zeros(len(pos), dtype=bool)
    for q in np.unique(question_ids[in_error]):
        rows = question_ids == q
        span = pos[rows & in_error]
        near = (pos >= span.min() - window) & (pos <= span.max() + window)
        keep |= rows & near & ~in_error
    return keep
