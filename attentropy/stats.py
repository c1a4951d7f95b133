"""The statistics of a group comparison, per cell (e.g. every layer x head): effect sizes (AUROC, Cohen's d) with
95 % intervals that treat *questions* as the independent unit, p-values from per-question aggregates,
Benjamini-Hochberg control of the false discovery rate over all cells tested together, and the per-question
aggregates and position-matched control tokens they are computed on.

Tokens of one answer are not independent: intervals that treat tokens as independent would be far too narrow, and a
test on tokens would count one long answer many times. So the unit is always the question.

Two interval methods (`INTERVAL_METHODS`): `clustered` (default), the analytic variances of `clustered_intervals.py`
(Obuchowski's clustered-data AUROC variance, questions as clusters; delta method for Cohen's d), one sort per cell;
and `bootstrap`, the percentile bootstrap resampling questions. The bootstrap is written with weights: a resample of
n items drawn with replacement is the same as giving item i the weight c_i = how often it was drawn (multinomial
counts). Effect sizes of weighted samples are then weighted sums: one sort per cell, then 1,000 resamples cost a
cumulative sum each instead of a sort each. The p-values do not depend on the interval method.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from scipy import stats as sps

from . import clustered_intervals

INTERVAL_METHODS = {"clustered": clustered_intervals.REFERENCE,  # the interval methods; the first is the default
                    "bootstrap": "95 % percentile bootstrap resampling questions (a question brings all its tokens)"}


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


def weighted_auroc(positive: np.ndarray, negative: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray
                   ) -> np.ndarray:
    """AUROC of weighted samples, one per row of the weights: positive [n1, C], negative [n0, C], w_pos [B, n1],
    w_neg [B, n0] -> [B, C]. With integer counts as weights this is exactly the AUROC of the resampled data:
    sum_i w_i (weight of negatives below x_i + half the weight of negatives equal to it) / (sum w * sum u).
    Weights are handled as float32 with the resamples along the fast axis (per cell: one cumulative sum and two
    row gathers; faster than float64 rows, see the `analyze` step of bench/scale.py): exact for counts while
    n1 * n0 < 2^24, float32 rounding above."""
    w_pos_t = np.ascontiguousarray(w_pos.T, dtype=np.float32)  # [n1, B]
    w_neg_t = np.ascontiguousarray(w_neg.T, dtype=np.float32)  # [n0, B]
    n0, n_boot = w_neg_t.shape
    out = np.empty((positive.shape[1], n_boot))
    below = np.zeros((n0 + 1, n_boot), np.float32)  # below[k] = weight of the k smallest negatives
    for c in range(positive.shape[1]):
        order = np.argsort(negative[:, c], kind="stable")
        sorted_neg = negative[order, c]
        np.cumsum(w_neg_t[order], axis=0, out=below[1:])
        lo = np.searchsorted(sorted_neg, positive[:, c], "left")
        hi = np.searchsorted(sorted_neg, positive[:, c], "right")
        score = 0.5 * (below[lo] + below[hi])  # [n1, B]: weight below + half the weight equal
        out[c] = np.einsum("ib,ib->b", w_pos_t, score)
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without one group: NaN
        return out.T / (w_pos.sum(1, keepdims=True) * w_neg.sum(1, keepdims=True))


def weighted_cohens_d(positive: np.ndarray, negative: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray
                      ) -> np.ndarray:
    """Cohen's d of weighted samples (weights = resampling counts), one per row of the weights -> [B, C]."""
    def moments(x, w):
        n = w.sum(1, keepdims=True)
        mean = w @ x / n
        ss = w @ (x * x) - n * mean ** 2  # sum of squared deviations
        return n, mean, np.maximum(ss, 0.0)

    n1, m1, ss1 = moments(positive, w_pos)
    n0, m0, ss0 = moments(negative, w_neg)
    pooled = (ss1 + ss0) / (n1 + n0 - 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pooled > 0, (m1 - m0) / np.sqrt(pooled), 0.0)


def resample_counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """[n_boot, n] counts of a draw of n items with replacement, per bootstrap replicate."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)


def group_draws(groups: np.ndarray, n_boot: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(counts [n_boot, n_groups], index [n]): how often each group (question) is drawn per bootstrap replicate, and
    each item's group; an item weighs as often as its group was drawn (`group_counts`)."""
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    return resample_counts(np.random.default_rng(seed), index.max() + 1, n_boot), index


def group_counts(groups: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """[n_boot, n] bootstrap weights that resample *groups* (questions): an item weighs as often as its group was
    drawn, so all answers (or tokens) of a question come and go together."""
    counts, index = group_draws(groups, n_boot, seed)
    return counts[:, index]


BOOT_BYTES = 64 * 2 ** 20  # `weight_blocks`: a block of replicates' weights takes about this much (the AUROC's
#                            work on it: a few times more)


def weight_blocks(counts: np.ndarray, index: np.ndarray, max_bytes: int = BOOT_BYTES):
    """`group_counts`' rows (from `group_draws`) a block of replicates at a time ([b, n], at most about `max_bytes`),
    in order: for items too many to hold every replicate's weights (GSM8K's tokens on Llama 3.2 90B: 266k tokens x
    1,000 replicates, 2 GB)."""
    per = max(1, max_bytes // (8 * len(index)))
    for start in range(0, len(counts), per):
        yield counts[start:start + per][:, index]


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
        columns.update(auroc=np.ravel(self.auroc), auroc_lo=np.ravel(self.auroc_ci[0]),
                       auroc_hi=np.ravel(self.auroc_ci[1]), cohens_d=np.ravel(self.cohens_d),
                       d_lo=np.ravel(self.cohens_d_ci[0]), d_hi=np.ravel(self.cohens_d_ci[1]), p=np.ravel(self.p),
                       q=np.ravel(self.q), significant=np.ravel(self.significant), n_positive=self.n_positive,
                       n_negative=self.n_negative)
        return pd.DataFrame(columns)


def _percentile_ci(samples: np.ndarray, shape: tuple, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.nanpercentile(samples, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return lo.reshape(shape), hi.reshape(shape)


@dataclass(frozen=True)
class Intervals:
    """How a comparison's intervals are computed: `method`, one of INTERVAL_METHODS; `n_boot` resamples drawn
    from `seed` for the bootstrap."""

    method: str = "clustered"
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self):
        check_interval(self.method)

    def kwargs(self) -> dict:
        """The keyword arguments of `compare_answers`, `compare_answers_stratified` and `compare_tokens`."""
        return {"interval": self.method, "n_boot": self.n_boot, "seed": self.seed}


def check_interval(interval: str) -> None:
    if interval not in INTERVAL_METHODS:
        raise ValueError(f"interval must be one of {', '.join(INTERVAL_METHODS)}, got {interval!r}")


def _clustered_effects(values: np.ndarray, positive: np.ndarray, clusters: np.ndarray | None, cells: tuple
                       ) -> tuple[np.ndarray, tuple, np.ndarray, tuple]:
    """(AUROC, its interval, Cohen's d, its interval) of `values` [n, C] by `clustered_intervals`, in `cells`'
    shape; `clusters` None: every unit its own cluster."""
    auc, se = clustered_intervals.clustered_auroc(values, positive, clusters)
    d = cohens_d(values[positive], values[~positive])
    d_ci = clustered_intervals.wald_interval(d, clustered_intervals.cohens_d_se(values, positive, clusters))
    auc_ci = clustered_intervals.auroc_interval(auc, se)
    return (auc.reshape(cells), tuple(b.reshape(cells) for b in auc_ci), d.reshape(cells),
            tuple(b.reshape(cells) for b in d_ci))


def compare_answers(values: np.ndarray, positive: np.ndarray, *, interval: str = "clustered", n_boot: int = 1000,
                    seed: int = 0, alpha: float = 0.05) -> Comparison:
    """Answer-level contrast: `values` [n_questions, *cells] holds one aggregate per question (e.g. the mean
    over its tokens), `positive` [n_questions] the group (e.g. incorrect). p: Mann-Whitney U, two-sided.
    Intervals (`interval`): DeLong's variance of the AUROC and the delta method's of d (clustered, each question
    its own cluster), or the percentile bootstrap of `n_boot` resamples of the questions within each group."""
    check_interval(interval)
    values = np.asarray(values, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    cells = values.shape[1:]
    flat = values.reshape(len(values), -1)
    pos, neg = flat[positive], flat[~positive]
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(f"each group needs at least 2 questions (got {len(pos)} and {len(neg)})")
    p = sps.mannwhitneyu(pos, neg, axis=0, alternative="two-sided").pvalue.reshape(cells)
    if interval == "clustered":
        auc, auc_ci, d, d_ci = _clustered_effects(flat, positive, None, cells)
        return Comparison(auc, auc_ci, d, d_ci, p, benjamini_hochberg(p), len(pos), len(neg), alpha)
    rng = np.random.default_rng(seed)
    w_pos, w_neg = resample_counts(rng, len(pos), n_boot), resample_counts(rng, len(neg), n_boot)
    boot_auc = weighted_auroc(pos, neg, w_pos, w_neg)
    boot_d = weighted_cohens_d(pos, neg, w_pos, w_neg)
    return Comparison(auroc(pos, neg).reshape(cells), _percentile_ci(boot_auc, cells),
                      cohens_d(pos, neg).reshape(cells), _percentile_ci(boot_d, cells), p, benjamini_hochberg(p),
                      len(pos), len(neg), alpha)


def stratified_auroc(values: np.ndarray, positive: np.ndarray, strata: np.ndarray, weights: np.ndarray
                     ) -> np.ndarray:
    """AUROC [R, C] of `values` [n, C] for `positive` against the others counting only pairs inside one stratum:
    the pair-weighted mean of the per-stratum AUROCs, per row of `weights` [R, n] (e.g. the data, then bootstrap
    resamples). Strata without both groups add no pairs."""
    total = np.zeros((len(weights), values.shape[1]))
    pairs = np.zeros((len(weights), 1))
    for st in np.unique(strata):
        m = strata == st
        p_m, w = positive[m], weights[:, m]
        if not p_m.any() or p_m.all():
            continue
        auc = weighted_auroc(values[m][p_m], values[m][~p_m], w[:, p_m], w[:, ~p_m])
        n_pairs = (w[:, p_m].sum(1) * w[:, ~p_m].sum(1))[:, None]
        total += np.nan_to_num(auc) * n_pairs
        pairs += n_pairs
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / pairs


def compare_answers_stratified(values: np.ndarray, positive: np.ndarray, strata: np.ndarray, *,
                               interval: str = "clustered", n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
                               ) -> Comparison:
    """`compare_answers` with pairs formed inside strata only (e.g. question kind, answer-length bin), so that a
    difference between the strata cannot make the effect. AUROC: the pair-weighted mean of the per-stratum AUROCs
    (strata with both groups); Cohen's d: of the values minus their stratum's mean; p: van Elteren's stratified
    rank-sum test (normal approximation); intervals as `compare_answers` (clustered: the delta-method variance of the
    stratified AUROC, `clustered_intervals.stratified_auroc`)."""
    check_interval(interval)
    values = np.asarray(values, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    strata = np.asarray(strata)
    cells = values.shape[1:]
    flat = values.reshape(len(values), -1)
    usable = [st for st in np.unique(strata) if positive[strata == st].any() and (~positive[strata == st]).any()]
    keep = np.isin(strata, usable)
    flat, positive, strata = flat[keep], positive[keep], strata[keep]
    if positive.sum() < 2 or (~positive).sum() < 2:
        raise ValueError(f"each group needs at least 2 questions in shared strata (got {positive.sum()} and "
                         f"{(~positive).sum()})")
    statistic = expected = variance = 0.0
    centred = np.empty_like(flat)
    for st in usable:
        m = strata == st
        p_m = positive[m]
        x = flat[m]
        centred[m] = x - x.mean(axis=0)
        n1, n = int(p_m.sum()), int(m.sum())
        ranks = sps.rankdata(x, axis=0)
        weight = 1.0 / (n + 1)
        statistic = statistic + weight * ranks[p_m].sum(axis=0)
        expected = expected + weight * n1 * (n + 1) / 2
        variance = variance + weight ** 2 * n1 * (n - n1) * (n + 1) / 12
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (statistic - expected) / np.sqrt(variance)
    p = (2 * sps.norm.sf(np.abs(z))).reshape(cells)
    pos, neg = centred[positive], centred[~positive]
    if interval == "clustered":
        auc, se = clustered_intervals.stratified_auroc(flat, positive, strata)
        d = cohens_d(pos, neg)
        d_ci = clustered_intervals.wald_interval(d, clustered_intervals.cohens_d_se(centred, positive))
        return Comparison(auc.reshape(cells), tuple(b.reshape(cells) for b in clustered_intervals.auroc_interval(
            auc, se)), d.reshape(cells), tuple(b.reshape(cells) for b in d_ci), p, benjamini_hochberg(p),
            int(positive.sum()), int((~positive).sum()), alpha)
    rng = np.random.default_rng(seed)
    pos_idx, neg_idx = np.flatnonzero(positive), np.flatnonzero(~positive)
    w = np.zeros((n_boot, len(positive)))
    w[:, pos_idx] = resample_counts(rng, len(pos_idx), n_boot)
    w[:, neg_idx] = resample_counts(rng, len(neg_idx), n_boot)
    auc = stratified_auroc(flat, positive, strata, np.r_[np.ones((1, len(positive))), w])  # [B+1, C]
    boot_d = weighted_cohens_d(pos, neg, w[:, positive], w[:, ~positive])
    return Comparison(auc[0].reshape(cells), _percentile_ci(auc[1:], cells), cohens_d(pos, neg).reshape(cells),
                      _percentile_ci(boot_d, cells), p, benjamini_hochberg(p), int(positive.sum()),
                      int((~positive).sum()), alpha)


def compare_tokens(values: np.ndarray, positive: np.ndarray, question_ids: np.ndarray, *,
                   interval: str = "clustered", n_boot: int = 500, seed: int = 0, alpha: float = 0.05) -> Comparison:
    """Token-level contrast inside answers (e.g. the critic's wrong-moment tokens vs the other tokens of the same
    incorrect solutions). Effect sizes compare tokens; intervals treat questions as clusters (`clustered`:
    Obuchowski's variance; `bootstrap`: each drawn question brings all its tokens); p: Wilcoxon signed-rank over
    questions having both kinds of token, of the per-question difference of means. n_positive / n_negative count
    those questions."""
    check_interval(interval)
    positive = np.asarray(positive, dtype=bool)
    cells = np.shape(values)[1:]
    _, index = np.unique(np.asarray(question_ids), return_inverse=True)
    has_pos = np.bincount(index, weights=positive, minlength=index.max() + 1) > 0
    has_neg = np.bincount(index, weights=~positive, minlength=index.max() + 1) > 0
    both = np.flatnonzero(has_pos & has_neg)
    if len(both) < 2:
        raise ValueError(f"need at least 2 questions with tokens of both kinds (got {len(both)})")
    keep = np.isin(index, both)
    values = np.asarray(values if keep.all() else values[keep], dtype=float).reshape(int(keep.sum()), -1)
    positive = positive[keep]
    question = np.searchsorted(both, index[keep])  # 0 .. len(both)-1
    diffs = _group_means(values[positive], question[positive], len(both)) \
        - _group_means(values[~positive], question[~positive], len(both))
    # scipy's default for <= 13 questions with a tie or zero anywhere is a permutation test run cell by cell (slow
    # over a run's cells, see the `analyze` step of bench/scale.py); the normal approximation there (such contrasts
    # are at or near "too small to conclude")
    tied = len(both) <= 13 and (bool((diffs == 0).any()) or _has_ties(np.abs(diffs)))
    method = "asymptotic" if tied else "auto"
    p = sps.wilcoxon(diffs, axis=0, zero_method="wilcox", method=method).pvalue.reshape(cells)
    if interval == "clustered":
        auc, auc_ci, d, d_ci = _clustered_effects(values, positive, question, cells)
        return Comparison(auc, auc_ci, d, d_ci, p, benjamini_hochberg(p), len(both), len(both), alpha)
    counts = resample_counts(np.random.default_rng(seed), len(both), n_boot)  # [B, questions]
    pos, neg = values[positive], values[~positive]
    w_pos, w_neg = counts[:, question[positive]], counts[:, question[~positive]]  # a token weighs as its question
    boot_auc = weighted_auroc(pos, neg, w_pos, w_neg)
    boot_d = weighted_cohens_d(pos, neg, w_pos, w_neg)
    return Comparison(auroc(pos, neg).reshape(cells), _percentile_ci(boot_auc, cells),
                      cohens_d(pos, neg).reshape(cells), _percentile_ci(boot_d, cells), p, benjamini_hochberg(p),
                      len(both), len(both), alpha)


def _has_ties(values: np.ndarray) -> bool:
    """Whether two rows of a column of `values` [n, C] are equal."""
    ordered = np.sort(values, axis=0)
    return bool((ordered[1:] == ordered[:-1]).any())


def _group_means(values: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """[n_groups, C]: the mean of the rows of `values` [n, C] in each group (`group` [n] in 0..n_groups-1)."""
    members = sparse.csr_matrix((np.ones(len(group)), (group, np.arange(len(group)))), shape=(n_groups, len(group)))
    return (members @ values) / np.bincount(group, minlength=n_groups)[:, None]


class AnswerGroups:
    """The tokens of each answer (`question_ids` [n_tokens], tokens in answer order), worked out once to
    `aggregate` many arrays of values of the same tokens (`analyze_run` aggregates every group of layers of every
    statistic): questions keep the order of their first token."""

    def __init__(self, question_ids: np.ndarray, k: int = 8):
        self.k = k
        self.questions, first, self.index = np.unique(np.asarray(question_ids), return_index=True,
                                                      return_inverse=True)
        order = np.argsort(self.index, kind="stable")  # tokens grouped by question, answer order kept in a group
        self.order = None if (order == np.arange(len(order))).all() else order
        self.counts = np.bincount(self.index, minlength=len(self.questions))
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.rank = np.empty(len(order), np.int64)
        self.rank[order] = np.arange(len(order)) - np.repeat(self.starts, self.counts)  # position in its answer
        self.rows = np.argsort(first)  # the run's question order
        self._summing: dict = {}  # (aggregation, dtype) -> [questions, tokens] indicator of the tokens summed

    def aggregate(self, values: np.ndarray, how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
        """(questions, [n_questions, *cells]) of per-token `values` [n_tokens, *cells] aggregated per answer: `mean`
        over its tokens, `max`, or `first_k` (mean of its first k tokens)."""
        if how not in ("mean", "max", "first_k"):
            raise ValueError(f"aggregation must be mean, max or first_k, got {how!r}")
        values = np.asarray(values)
        flat = values.reshape(len(values), -1)
        if how == "max":  # one contiguous block per answer (numpy's reduceat along axis 0 is many times slower)
            grouped = flat if self.order is None else flat[self.order]
            out = np.stack([grouped[a:a + n].max(axis=0) for a, n in zip(self.starts, self.counts)])
        else:  # sums by a sparse [questions, tokens] indicator matrix times the values, which stay where they are
            limit = self.k if how == "first_k" else len(values)
            dtype = flat.dtype if flat.dtype.kind == "f" else np.float64
            summing = self._summing.get((how, dtype))
            if summing is None:
                used = self.rank < limit
                summing = self._summing[how, dtype] = sparse.csr_matrix(
                    (np.ones(int(used.sum()), dtype), (self.index[used], np.flatnonzero(used))),
                    shape=(len(self.questions), len(values)))
            out = np.asarray(summing @ flat) / np.minimum(self.counts, limit)[:, None]
        return self.questions[self.rows], out[self.rows].reshape(len(self.questions), *values.shape[1:])


WINDOW = 8  # positions either side of the wrong moment that count as "nearby"


def position_matched(question_ids: np.ndarray, pos: np.ndarray, in_error: np.ndarray, window: int = WINDOW
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
