"""Group comparisons for the study, per cell (e.g. every layer x head): effect sizes (AUROC, Cohen's d) with 95 %
bootstrap intervals that resample *questions*, p-values from per-question aggregates, and Benjamini-Hochberg
control of the false discovery rate over all cells tested together.

Tokens of one answer are not independent: resampling tokens would give intervals far too narrow, and a test on
tokens would count one long answer many times. So the unit is always the question.

The bootstrap is written with weights: a resample of n items drawn with replacement is the same as giving item i
the weight c_i = how often it was drawn (multinomial counts). Effect sizes of weighted samples are then weighted
sums: one sort per cell, then 1,000 resamples cost a cumulative sum each instead of a sort each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from .store import READ_BYTES


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
    row gathers; 2.5x faster than float64 rows): exact for counts while n1 * n0 < 2^24, float32 rounding above."""
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


def compare_answers(values: np.ndarray, positive: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05) -> Comparison:
    """Answer-level contrast: `values` [n_questions, *cells] holds one aggregate per question (e.g. the mean
    over its tokens), `positive` [n_questions] the group (e.g. incorrect). p: Mann-Whitney U, two-sided.
    Intervals: percentile bootstrap, questions resampled with replacement within each group."""
    values = np.asarray(values, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    cells = values.shape[1:]
    pos, neg = values[positive].reshape(positive.sum(), -1), values[~positive].reshape((~positive).sum(), -1)
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(f"each group needs at least 2 questions (got {len(pos)} and {len(neg)})")
    rng = np.random.default_rng(seed)
    w_pos, w_neg = resample_counts(rng, len(pos), n_boot), resample_counts(rng, len(neg), n_boot)
    boot_auc = weighted_auroc(pos, neg, w_pos, w_neg)
    boot_d = weighted_cohens_d(pos, neg, w_pos, w_neg)
    p = sps.mannwhitneyu(pos, neg, axis=0, alternative="two-sided").pvalue.reshape(cells)
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


def compare_answers_stratified(values: np.ndarray, positive: np.ndarray, strata: np.ndarray, *, n_boot: int = 1000,
                               seed: int = 0, alpha: float = 0.05) -> Comparison:
    """`compare_answers` with pairs formed inside strata only (e.g. question kind, answer-length bin), so that a
    difference between the strata cannot make the effect. AUROC: the pair-weighted mean of the per-stratum AUROCs
    (strata with both groups); Cohen's d: of the values minus their stratum's mean; p: van Elteren's stratified
    rank-sum test (normal approximation); intervals: questions resampled within each group, as `compare_answers`."""
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
    rng = np.random.default_rng(seed)
    pos_idx, neg_idx = np.flatnonzero(positive), np.flatnonzero(~positive)
    w = np.zeros((n_boot, len(positive)))
    w[:, pos_idx] = resample_counts(rng, len(pos_idx), n_boot)
    w[:, neg_idx] = resample_counts(rng, len(neg_idx), n_boot)
    auc = stratified_auroc(flat, positive, strata, np.r_[np.ones((1, len(positive))), w])  # [B+1, C]
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
    boot_d = weighted_cohens_d(pos, neg, w[:, positive], w[:, ~positive])
    return Comparison(auc[0].reshape(cells), _percentile_ci(auc[1:], cells), cohens_d(pos, neg).reshape(cells),
                      _percentile_ci(boot_d, cells), p, benjamini_hochberg(p), int(positive.sum()),
                      int((~positive).sum()), alpha)


def compare_tokens(values: np.ndarray, positive: np.ndarray, question_ids: np.ndarray, *, n_boot: int = 500,
                   seed: int = 0, alpha: float = 0.05) -> Comparison:
    """Token-level contrast inside answers (e.g. the critic's wrong-moment tokens vs the other tokens of the same
    incorrect solutions). Effect sizes compare tokens; intervals resample questions (each drawn question brings
    all its tokens); p: Wilcoxon signed-rank over questions having both kinds of token, of the per-question
    difference of means. n_positive / n_negative count those questions."""
    values = np.asarray(values, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    cells = values.shape[1:]
    values = values.reshape(len(values), -1)
    _, index = np.unique(np.asarray(question_ids), return_inverse=True)
    has_pos = np.bincount(index, weights=positive, minlength=index.max() + 1) > 0
    has_neg = np.bincount(index, weights=~positive, minlength=index.max() + 1) > 0
    both = np.flatnonzero(has_pos & has_neg)
    if len(both) < 2:
        raise ValueError(f"need at least 2 questions with tokens of both kinds (got {len(both)})")
    keep = np.isin(index, both)
    values, positive = values[keep], positive[keep]
    question = np.searchsorted(both, index[keep])  # 0 .. len(both)-1
    diffs = _group_means(values[positive], question[positive], len(both)) \
        - _group_means(values[~positive], question[~positive], len(both))
    # scipy's default for <= 13 questions with a tie or zero anywhere is a permutation test run cell by cell (minutes
    # on 5,000 cells); the normal approximation there (such contrasts are at or near "too small to conclude")
    tied = len(both) <= 13 and (bool((diffs == 0).any()) or _has_ties(np.abs(diffs)))
    method = "asymptotic" if tied else "auto"
    p = sps.wilcoxon(diffs, axis=0, zero_method="wilcox", method=method).pvalue.reshape(cells)
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
    sums = np.zeros((n_groups, values.shape[1]))
    np.add.at(sums, group, values)
    return sums / np.bincount(group, minlength=n_groups)[:, None]


def answer_aggregates(values: np.ndarray, question_ids: np.ndarray, how: str = "mean", k: int = 8
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(questions, [n_questions, *cells]) of per-token `values` aggregated per answer: `mean` over its tokens,
    `max`, or `first_k` (mean of its first k tokens; tokens must be in answer order). Questions keep the order
    of their first token."""
    if how not in ("mean", "max", "first_k"):
        raise ValueError(f"aggregation must be mean, max or first_k, got {how!r}")
    values = np.asarray(values)
    questions, first, index = np.unique(np.asarray(question_ids), return_index=True, return_inverse=True)
    order = np.argsort(index, kind="stable")  # tokens grouped by question, answer order kept inside a group
    counts = np.bincount(index, minlength=len(questions))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    grouped = values[order].reshape(len(values), -1)
    if how == "first_k":
        rank = np.arange(len(values)) - np.repeat(starts, counts)  # position of each token inside its answer
        mask = rank < k
        grouped, counts = grouped[mask], np.minimum(counts, k)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if how == "max":
        out = np.maximum.reduceat(grouped, starts, axis=0)
    else:
        out = np.add.reduceat(grouped, starts, axis=0) / counts[:, None]
    rows = np.argsort(first)  # the run's question order
    return questions[rows], out[rows].reshape(len(questions), *values.shape[1:])


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


# ---------------------------------------------------------------- the study's contrasts on a graded run

AGGREGATIONS = ("mean", "max", "first_k")
FIRST_K = 8  # tokens of the `first_k` aggregation
WINDOW = 8  # positions either side of the wrong moment that count as "nearby"
MIN_TO_CONCLUDE = 10  # questions per group below which the report says "too small to conclude"
PROFILE_STATS = ("entropy", "varentropy", "entropy_norm")
LAYER_MEAN_STATS = ("entropy", "varentropy", "entropy_norm")  # kept per token and layer for the figures and viewer
LOGIT_STATS = ("logit_entropy", "logit_varentropy", "logprob")


@dataclass
class Contrast:
    """One of the study's comparisons as run on one run directory."""

    key: str  # e.g. "hallucinated", "wrong_moment"
    title: str
    positive: str  # the group whose higher values give AUROC > 0.5
    negative: str
    level: str  # "answer" (one aggregate per question) or "token" (tokens inside incorrect answers)
    n_positive: int  # questions
    n_negative: int
    status: str = "ok"  # ok | too_small (computed, not conclusive) | not_computed (fewer than 2 per group)
    note: str = ""  # the group sizes behind a status other than ok


@dataclass
class Analysis:
    """Everything the report shows of one graded run. AUROC > 0.5: the positive group has the higher values."""

    name: str
    path: str
    config: dict
    benchmark: str
    layers: list[int]
    n_heads: int
    excluded: dict[str, int]  # answers left out of every contrast, by reason
    contrasts: list[Contrast]
    comparisons: pd.DataFrame  # one row per (contrast, stat, aggregation, layer, head) cell
    profiles: pd.DataFrame  # per group, stat and layer: mean over answers of the answer means, with a 95 % CI
    samples: pd.DataFrame  # the run's samples with their grades (all answers, the excluded ones too)
    answers: pd.DataFrame  # one row per analysed answer: label and answer means of the headline statistics
    tokens: pd.DataFrame  # one row per token of the analysed answers
    layer_means: dict[str, np.ndarray]  # stat -> [n_tokens, n_layers], mean over heads, aligned with `tokens`, of the
    # statistics shown per token (LAYER_MEAN_STATS)
    graded: bool = True  # False: no labels (free prompts, not graded yet); one group, `ungraded`, no contrasts


UNGRADED = "ungraded"  # the one group of an ungraded run's answers


def contrasts_of(benchmark: str) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """(key, title, positive labels, negative labels) of the answer-level contrasts of a benchmark."""
    from .data import FACTUAL

    if benchmark in FACTUAL:
        return [("hallucinated", "hallucinated (incorrect) vs not (correct or not attempted)", ("incorrect",),
                 ("correct", "not_attempted")),
                ("incorrect_vs_correct", "incorrect vs correct", ("incorrect",), ("correct",)),
                ("incorrect_vs_not_attempted", "incorrect vs not attempted", ("incorrect",), ("not_attempted",)),
                ("not_attempted_vs_correct", "not attempted vs correct", ("not_attempted",), ("correct",))]
    return [("incorrect_vs_correct", "incorrect vs correct answers", ("incorrect",), ("correct",))]


CONTROLLED_STATS = ("entropy", "varentropy", "entropy_norm", *LOGIT_STATS)  # the statistics with controlled rows
LENGTH_BIN_WIDTH = 0.05  # the length control: pairs of answers whose lengths differ by at most ~5 %
CONTROLS = {"none": "raw: as computed",
            "stratified": "pairs inside one question kind only (facts: the kind; SimpleQA: the topic; arith: the "
                          "number of steps)",
            "length_matched": "pairs of answers whose lengths differ by at most ~5 % only",
            "correct_baseline": "difference in differences: the wrong moment against its window in incorrect "
                                "answers, minus a pseudo-moment at the same token position against its window "
                                "in correct answers (template tokens left out of every window)"}


def answer_strata(kept: pd.DataFrame, benchmark: str) -> np.ndarray | None:
    """The stratum of each answer for the stratified control, or None when the benchmark has no kinds."""
    from .data import question_kind

    if benchmark == "gsm8k":
        return None
    kinds = np.array([question_kind(benchmark, m) for m in kept.metadata])
    return kinds if len(np.unique(kinds)) > 1 else None


def length_bins(lengths: np.ndarray, width: float = LENGTH_BIN_WIDTH) -> np.ndarray:
    """The length stratum of each answer: bins of `width` in ln(length), so answers paired inside one differ in
    length by at most ~5 % (exactly equal up to 20 tokens): a coarser binning leaves a length difference inside
    each bin that the statistics' growth with position still shows."""
    return np.floor(np.log(np.maximum(np.asarray(lengths, float), 1.0)) / width).astype(int)


_TEMPLATE = re.compile(r"The final answer is")


def template_tokens(tok: pd.DataFrame) -> np.ndarray:
    """Tokens of the protocol's template: the closing "The final answer is N" sentence and chat markup
    (<|...|> tokens), whatever the answer. Windows around a wrong moment leave them out: any answer, right or
    wrong, has them at its end."""
    out = np.array(tok.token.astype(str).str.fullmatch(r"\s*<\|[^|]+\|>\s*"), dtype=bool)
    for _, rows in tok.groupby("question_id", sort=False).indices.items():
        text, starts = "", []
        for t in tok.token.iloc[rows].astype(str):
            starts.append(len(text))
            text += t
        m = None
        for m in _TEMPLATE.finditer(text):
            pass
        if m is not None:
            out[rows[np.searchsorted(starts, m.start(), side="right") - 1:]] = True
    return out


def wrong_moment_windows(tok: pd.DataFrame, incorrect: set, correct: set, kind: str, window: int = 8,
                         template: np.ndarray | None = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Per answer, the two token sets whose difference of means (moment - its window) is behind the
    `correct_baseline` control (`window_differences`): in
    incorrect answers the critic's wrong moment; in correct answers a pseudo-moment of the same length at the
    same token position (the correct answers, in question order, take the located incorrect ones' positions in
    turn; moved earlier where the answer is shorter): the statistics grow with the number of visible keys, so the
    same position, not the same share of the answer, is what cancels that growth. `kind`: wrong_moment (window:
    tokens within `window` positions), wrong_moment_numbers (the moment's digit tokens against the answer's other
    digit tokens; the pseudo-moment is the number nearest the position), after_vs_before (the `window` tokens after
    minus the `window` before). Template tokens are in no window.
    `template`: `template_tokens(tok)` when already computed. Returns ([(moment rows, window rows)] as rows of
    `tok`, is_incorrect) per answer with both sets non-empty."""
    template = template_tokens(tok) if template is None else template
    digits = tok.token.astype(str).str.contains(r"\d").to_numpy(bool)
    in_error = tok.in_error.to_numpy(bool)
    groups = tok.groupby("question_id", sort=False).indices
    located = sorted(q for q in incorrect if q in groups and in_error[groups[q]].any())
    shapes = [(int(np.flatnonzero(in_error[groups[q]])[0]), int(in_error[groups[q]].sum())) for q in located]
    windows, is_incorrect = [], []
    for i, q in enumerate(located + sorted(q for q in correct if q in groups)):
        rows = groups[q]
        n, keep = len(rows), ~template[rows]
        if i < len(located):
            span = np.flatnonzero(in_error[rows])
        else:
            if not shapes:
                break
            start, length = shapes[(i - len(located)) % len(shapes)]
            free = int(keep.sum())
            start = int(min(start, max(free - length, 0)))
            span = np.arange(start, min(start + length, n))
            if kind == "wrong_moment_numbers":  # the number nearest that position
                candidates = np.flatnonzero(digits[rows] & keep)
                if not len(candidates):
                    continue
                centre = candidates[np.argmin(np.abs(candidates - start))]
                span = np.array([centre])
        if kind == "wrong_moment_numbers":
            moment = span[digits[rows][span]]
            other = np.setdiff1d(np.flatnonzero(digits[rows] & keep), span)
            first, second = moment, other
        elif kind == "after_vs_before":
            positions = np.arange(n)
            first = positions[(positions >= span[-1] + 1) & (positions <= span[-1] + window) & keep]
            second = positions[(positions < span[0]) & (positions >= span[0] - window) & keep]
        else:
            positions = np.arange(n)
            near = (positions >= span[0] - window) & (positions <= span[-1] + window) & keep
            first, second = span, np.setdiff1d(positions[near], span)
        if len(first) and len(second):
            windows.append((rows[first], rows[second]))
            is_incorrect.append(i < len(located))
    return windows, np.array(is_incorrect, bool)


def window_differences(values: np.ndarray, windows: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """[n_windows, *cells]: per (moment rows, window rows) of `wrong_moment_windows`, the mean of `values` over the
    moment minus its mean over the window."""
    out = np.zeros((len(windows), *values.shape[1:]))
    for i, (first, second) in enumerate(windows):
        out[i] = values[first].mean(axis=0) - values[second].mean(axis=0)
    return out


def token_values(run, stat: str, layers: list[int] | None = None) -> np.ndarray:
    """Per-token values of a statistic: attention stats [n_tokens, len(layers), H] (default: all recorded layers);
    `entropy_norm` = entropy / ln n_keys (the fraction of the maximal entropy, which removes the growth with
    position); logit stats [n_tokens]."""
    if stat in LOGIT_STATS:
        return run.tokens[stat].to_numpy(np.float64)
    if stat == "entropy_norm":
        log_keys = np.log(np.maximum(run.tokens["n_keys"].to_numpy(np.float64), 2.0))
        return run.attn("entropy", layers) / log_keys[:, None, None].astype(np.float32)
    return run.attn(stat, layers)


def _join_layer_groups(parts: list[np.ndarray]) -> np.ndarray:
    """Per-answer values computed one group of layers at a time ([n, layers of the group(, H)] each), joined along
    the layers; a logit statistic's single [n] array as it is."""
    return np.concatenate(parts, axis=1) if parts[0].ndim > 1 else parts[0]


def concat_comparisons(parts: list[Comparison]) -> Comparison:
    """Comparisons of consecutive groups of cells (e.g. layer groups) as one along the first cell axis, the false
    discovery rate controlled over all of their cells together."""
    if len(parts) == 1:
        return parts[0]
    joined = {name: np.concatenate([getattr(c, name) for c in parts]) for name in ("auroc", "cohens_d", "p")}
    ci = {name: tuple(np.concatenate([getattr(c, name)[i] for c in parts]) for i in (0, 1))
          for name in ("auroc_ci", "cohens_d_ci")}
    return Comparison(joined["auroc"], ci["auroc_ci"], joined["cohens_d"], ci["cohens_d_ci"], joined["p"],
                      benjamini_hochberg(joined["p"]), parts[0].n_positive, parts[0].n_negative, parts[0].alpha)


def _cells_table(c: Comparison, layers: list[int], per_head: bool) -> pd.DataFrame:
    if c.auroc.ndim == 0:
        return c.table({"layer": np.array([-1]), "head": np.array([-1])})
    if per_head:
        n_layers, n_heads = c.auroc.shape
        return c.table({"layer": np.repeat(layers, n_heads), "head": np.tile(np.arange(n_heads), n_layers)})
    return c.table({"layer": np.asarray(layers), "head": np.full(len(layers), -1)})


def analyze_run(run, *, n_boot: int = 1000, seed: int = 0, window: int = WINDOW, first_k: int = FIRST_K,
                stats: tuple[str, ...] | None = None, read_bytes: int = READ_BYTES) -> Analysis:
    """The three contrasts of the study on a graded run (`attentropy grade` first): answer-level contrasts for
    every statistic per layer x head and per layer (mean over heads) under each aggregation, and, for math,
    the critic's wrong moment vs nearby tokens and after vs before it (token level, position-matched).
    Attention statistics are read in groups of layers of about `read_bytes` (`Run.layer_groups`): memory holds the
    run's tokens table, one group's values and the per-answer reductions, whatever the number of layers; the
    results are those of reading everything at once.
    An ungraded run (free prompts, or a benchmark run not graded yet) gets everything that needs no labels: its
    answers form one group, `ungraded`, with profiles and per-token values, and no contrasts (`graded` False)."""
    from .schema import ATTN_STATS
    from .data import FACTUAL

    samples, tokens = run.samples, run.tokens
    graded = "label" in samples
    if not graded:
        samples = samples.assign(label=UNGRADED)
    stats = tuple(stats or (*ATTN_STATS, "entropy_norm", *LOGIT_STATS))
    benchmark = run.config["benchmark"]
    lengths = samples.completion_ids.map(len)
    excluded = {"unparsed": int((samples.label == "unparsed").sum()), "empty answer": int((lengths == 0).sum()),
                "not graded": int(samples.label.isna().sum())}  # the judge gave no reply and there was no label
    kept = samples[(samples.label != "unparsed") & (lengths > 0) & samples.label.notna()]
    label_of = kept.set_index("question_id").label
    token_rows = np.flatnonzero(tokens.question_id.isin(label_of.index).to_numpy())
    tok = tokens.iloc[token_rows].reset_index(drop=True)
    tok["label"] = tok.question_id.map(label_of).to_numpy()
    layers = list(run.layers)

    answer_contrasts = []
    contrasts: list[Contrast] = []
    for key, title, pos_labels, neg_labels in contrasts_of(benchmark) if graded else []:
        pos_mask, neg_mask = kept.label.isin(pos_labels).to_numpy(), kept.label.isin(neg_labels).to_numpy()
        contrast = Contrast(key, title, "+".join(pos_labels), "+".join(neg_labels), "answer",
                            int(pos_mask.sum()), int(neg_mask.sum()))
        contrasts.append(contrast)
        answer_contrasts.append((contrast, pos_mask, neg_mask))

    # Wrong moment (math): tokens of incorrect answers whose critic located a span.
    token_contrasts = []
    if benchmark not in FACTUAL and "in_error" in tok:
        in_error = tok.in_error.to_numpy(bool)
        span = kept.set_index("question_id")
        start = tok.question_id.map(span.error_token_start).to_numpy(float)
        end = tok.question_id.map(span.error_token_end).to_numpy(float)
        pos = tok.pos.to_numpy()
        nearby = position_matched(tok.question_id.to_numpy(), pos, in_error, window)
        before = (pos < start) & (pos >= start - window)
        after = (pos >= end) & (pos < end + window)
        # the wrong moment is mostly a number; its neighbours mostly words: compare numbers with numbers too
        numeric = tok.token.str.contains(r"\d").to_numpy(bool)
        for key, title, positive, negative, pos_name, neg_name in (
                ("wrong_moment", f"wrong-moment tokens vs tokens within {window} positions of it", in_error,
                 nearby, "wrong moment", "nearby"),
                ("wrong_moment_numbers", "wrong-moment tokens with a digit vs the other tokens with a digit of the "
                 "same answers", in_error & numeric, ~in_error & numeric, "wrong moment (digits)", "other digits"),
                ("after_vs_before", f"the {window} tokens after the wrong moment vs the {window} before it", after,
                 before, "after", "before")):
            rows = np.flatnonzero(positive | negative)
            qids = tok.question_id.to_numpy()[rows]
            n_both = len(set(qids[positive[rows]]) & set(qids[negative[rows]]))
            contrast = Contrast(key, title, pos_name, neg_name, "token", n_both, n_both)
            contrasts.append(contrast)
            token_contrasts.append((contrast, rows, positive[rows], qids))

    for contrast in contrasts:
        n = min(contrast.n_positive, contrast.n_negative)
        if n < 2:
            contrast.status = "not_computed"
            contrast.note = (f"not computed: {contrast.n_positive} {contrast.positive} vs {contrast.n_negative} "
                             f"{contrast.negative} questions (at least 2 per group needed)")
        elif n < MIN_TO_CONCLUDE:
            contrast.status = "too_small"
            contrast.note = (f"{contrast.n_positive} vs {contrast.n_negative} questions (the report draws "
                             f"conclusions from {MIN_TO_CONCLUDE} per group or more)")

    strata = answer_strata(kept, benchmark)
    bins = length_bins(lengths[kept.index].to_numpy(float))
    windows = {}  # token contrast -> (wrong-moment windows, is_incorrect) of its correct-baseline control
    if any(stat in CONTROLLED_STATS for stat in stats):
        live = [c for c, *_ in token_contrasts if c.status != "not_computed"]
        template = template_tokens(tok) if live else None
        incorrect_ids = set(kept.question_id[kept.label == "incorrect"])
        correct_ids = set(kept.question_id[kept.label == "correct"])
        for contrast in live:
            windows[contrast.key] = wrong_moment_windows(tok, incorrect_ids, correct_ids, contrast.key, window,
                                                         template)

    def controlled(agg: np.ndarray, sel: np.ndarray, pos_mask: np.ndarray, s: int) -> list[tuple[str, Comparison]]:
        out = []
        for control, groups in (("stratified", strata), ("length_matched", bins)):
            if groups is None or len(np.unique(groups[sel])) < 2:
                continue
            try:
                out.append((control, compare_answers_stratified(agg[sel], pos_mask[sel], groups[sel], n_boot=n_boot,
                                                                seed=seed + s)))
            except ValueError:  # too few answers of a group inside shared strata
                pass
        return out

    qids, kept_ids = tok.question_id.to_numpy(), kept.question_id
    groups = [None] if all(stat in LOGIT_STATS for stat in stats) else run.layer_groups(read_bytes)
    tables = []
    layer_means: dict[str, np.ndarray] = {}
    answer_means: dict[str, np.ndarray] = {}
    profiles = []
    for s, stat in enumerate(stats):
        # Everything the contrasts need of the per-token values, reduced one group of layers at a time: per level
        # (head: every layer x head; layer: mean over heads; token: a logit statistic) the answers' aggregates,
        # the wrong-moment differences, and the token contrasts (compared per group, joined after).
        aggregates, differences, token_parts = {}, {}, {}
        per_layer = []
        for group in ([None] if stat in LOGIT_STATS else groups):
            values = token_values(run, stat, group)[token_rows]
            if values.ndim == 3:
                per_layer.append(values.mean(axis=2))  # [n_tokens, len(group)]
            variants = [("head", values), ("layer", per_layer[-1])] if values.ndim == 3 else [("token", values)]
            for level, v in variants:
                for how in AGGREGATIONS:
                    questions, agg = answer_aggregates(v, qids, how, first_k)
                    aggregates.setdefault((how, level), []).append(agg[pd.Index(questions).get_indexer(kept_ids)])
                for key, (wins, _) in windows.items() if stat in CONTROLLED_STATS else ():
                    differences.setdefault((key, level), []).append(window_differences(v, wins))
                for contrast, rows, positive, row_qids in token_contrasts:
                    if contrast.status != "not_computed":
                        token_parts.setdefault((contrast.key, level), []).append(
                            compare_tokens(v[rows], positive, row_qids, n_boot=n_boot, seed=seed + s))
            del values
        joined = {k: _join_layer_groups(v) for k, v in aggregates.items()}
        if per_layer and stat in LAYER_MEAN_STATS:
            layer_means[stat] = np.concatenate(per_layer, axis=1)
        levels = ("head", "layer") if stat not in LOGIT_STATS else ("token",)
        for how in AGGREGATIONS:
            for level in levels:
                agg = joined[(how, level)]
                if how == "mean" and level != "head":
                    answer_means[stat] = agg
                for contrast, pos_mask, neg_mask in answer_contrasts:
                    if contrast.status == "not_computed":
                        continue
                    sel = pos_mask | neg_mask
                    c = compare_answers(agg[sel], pos_mask[sel], n_boot=n_boot, seed=seed + s)
                    found = [("none", c)]
                    if how == "mean" and stat in CONTROLLED_STATS:
                        found += controlled(agg, sel, pos_mask, s)
                    for control, c in found:
                        tables.append(_cells_table(c, layers, level == "head").assign(
                            contrast=contrast.key, stat=stat, aggregation=how, level=level, control=control))
        for contrast, *_ in token_contrasts:
            if contrast.status == "not_computed":
                continue
            for level in levels:
                c = concat_comparisons(token_parts[(contrast.key, level)])
                tables.append(_cells_table(c, layers, level == "head").assign(
                    contrast=contrast.key, stat=stat, aggregation="tokens", level=level, control="none"))
                if stat not in CONTROLLED_STATS:
                    continue
                is_incorrect = windows[contrast.key][1]
                if is_incorrect.sum() >= 2 and (~is_incorrect).sum() >= 2:
                    diffs = _join_layer_groups(differences[(contrast.key, level)])
                    c = compare_answers(diffs, is_incorrect, n_boot=n_boot, seed=seed + s)
                    tables.append(_cells_table(c, layers, level == "head").assign(
                        contrast=contrast.key, stat=stat, aggregation="tokens", level=level,
                        control="correct_baseline"))
        if stat in PROFILE_STATS and stat in answer_means:
            for label in sorted(kept.label.unique()):
                members = answer_means[stat][(kept.label == label).to_numpy()]
                w = resample_counts(np.random.default_rng(seed), len(members), n_boot)
                boot = w @ members / len(members)
                lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
                profiles.append(pd.DataFrame({"group": label, "stat": stat, "layer": layers,
                                              "mean": members.mean(axis=0), "lo": lo, "hi": hi,
                                              "n": len(members)}))

    # Answer length: a confound of every answer-level mean (the maximal attention entropy grows with position).
    for contrast, pos_mask, neg_mask in answer_contrasts:
        if contrast.status != "not_computed":
            sel = pos_mask | neg_mask
            c = compare_answers(lengths[kept.index].to_numpy(float)[sel], pos_mask[sel], n_boot=n_boot, seed=seed)
            tables.append(_cells_table(c, layers, False).assign(contrast=contrast.key, stat="answer_length",
                                                               aggregation="count", level="answer", control="none"))

    columns = ["contrast", "stat", "aggregation", "level", "control", "layer", "head"]
    comparisons = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
    comparisons = comparisons[columns + [c for c in comparisons.columns if c not in columns]]
    answers = pd.DataFrame({"question_id": kept.question_id.to_numpy(), "label": kept.label.to_numpy(),
                            "n_tokens": lengths[kept.index].to_numpy()})
    for stat, v in answer_means.items():
        answers[stat if stat in LOGIT_STATS else f"attn_{stat}"] = v.mean(axis=1) if v.ndim == 2 else v
    return Analysis(name=Path(run.path).name, path=str(run.path), config=run.config, benchmark=benchmark,
                    layers=layers, n_heads=run.n_heads, excluded=excluded, contrasts=contrasts,
                    comparisons=comparisons, profiles=pd.concat(profiles, ignore_index=True) if profiles else
                    pd.DataFrame(columns=["group", "stat", "layer", "mean", "lo", "hi", "n"]),
                    samples=samples, answers=answers, tokens=tok, layer_means=layer_means, graded=graded)


# ---------------------------------------------------------------- how good a confidence score is
# Every function takes `w` [B, n]: one row of weights per evaluation (a row of ones: the data as they are; a row of
# bootstrap counts: a resample), so a point estimate and its 1,000 resamples are one vectorised call. `y` [n] is 1
# where the answer is correct; `confidence` [n] is higher where the answer is more likely correct.

def group_counts(groups: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """[n_boot, n] bootstrap weights that resample *groups* (questions): an item weighs as often as its group was
    drawn, so all answers (or tokens) of a question come and go together."""
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    counts = resample_counts(np.random.default_rng(seed), index.max() + 1, n_boot)
    return counts[:, index]


def _tie_blocks(sorted_scores: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted array."""
    return np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])


def weighted_auroc_rows(score: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC [B] of `score` for y == 1 against y == 0, per row of weights."""
    y = np.asarray(y, bool)
    return weighted_auroc(score[y][:, None], score[~y][:, None], w[:, y], w[:, ~y])[:, 0]


def harmonic(x: np.ndarray) -> np.ndarray:
    """H(x) = 1 + 1/2 + ... + 1/x for non-negative integers x (as floats), H(0) = 0."""
    from scipy.special import digamma

    return digamma(np.asarray(x, float) + 1) + np.euler_gamma


def _retained_quality_area(order: np.ndarray, score_sorted: np.ndarray | None, y: np.ndarray, w: np.ndarray
                           ) -> np.ndarray:
    """(1/N) sum over m = 1..N of the mean quality of the m most confident answers, N = sum of the weights, with
    answers taken in `order` (most confident first) and each answer counted w times; answers of equal score
    (`score_sorted`, None: no ties) share their mean quality (the expectation over orderings of the ties).
    Inside an answer's block of copies C_(i-1) < m <= C_i the retained total is S_(i-1) + (m - C_(i-1)) y_i, so
    the block's sum of retained means is (S_(i-1) - C_(i-1) y_i)(H(C_i) - H(C_(i-1))) + w_i y_i."""
    w, yy = w[:, order], np.broadcast_to(y[order].astype(float), w.shape)
    if score_sorted is not None:
        starts = _tie_blocks(score_sorted)
        sizes = np.diff(np.r_[starts, len(order)])
        tie_w = np.add.reduceat(w, starts, axis=1)
        tie_q = np.add.reduceat(w * yy, starts, axis=1)
        yy = np.repeat(np.divide(tie_q, tie_w, out=np.zeros_like(tie_q), where=tie_w > 0), sizes, axis=1)
    c = np.cumsum(w, axis=1)
    s = np.cumsum(w * yy, axis=1)
    c0, s0 = c - w, s - w * yy
    total = ((s0 - c0 * yy) * (harmonic(c) - harmonic(c0)) + w * yy).sum(axis=1)
    return total / c[:, -1]


def prediction_rejection_ratio(confidence: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """PRR [B] as lm-polygraph defines it: reject answers from the least confident, average the retained answers'
    quality (here: 1 if correct) over every rejection level; PRR = (area - random) / (oracle - random), where
    random keeps the mean quality at every level and the oracle rejects the incorrect answers first. 1: the
    oracle's order, 0: no better than chance."""
    order = np.argsort(-confidence, kind="stable")
    area = _retained_quality_area(order, confidence[order], y, w)
    oracle = _retained_quality_area(np.argsort(-np.asarray(y, float), kind="stable"), None, y, w)
    random = (w * y).sum(axis=1) / w.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (area - random) / (oracle - random)


def weighted_average_precision(confidence: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUPRC [B] (average precision) of finding the *incorrect* answers (y == 0) by low confidence, as
    scikit-learn's average_precision_score with equal scores forming one threshold."""
    order = np.argsort(confidence, kind="stable")  # least confident first
    ends = np.r_[_tie_blocks(confidence[order])[1:], len(order)] - 1  # last index of each block of equal scores
    w = w[:, order]
    wrong = w * (1 - np.asarray(y, float)[order])
    tp, seen = np.cumsum(wrong, axis=1)[:, ends], np.cumsum(w, axis=1)[:, ends]
    positives = tp[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(seen > 0, tp / seen, 0.0)
        recall_gain = np.diff(np.c_[np.zeros(len(tp)), tp], axis=1) / positives
    return (recall_gain * precision).sum(axis=1)


def brier_score(confidence: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    return w @ (confidence - y) ** 2 / w.sum(axis=1)


CALIBRATION_BINS = 10


def expected_calibration_error(confidence: np.ndarray, y: np.ndarray, w: np.ndarray,
                               bins: int = CALIBRATION_BINS) -> np.ndarray:
    """ECE [B]: over `bins` equal-width bins of confidence, the answers' share of the bin times |mean confidence -
    fraction correct| in it, summed."""
    which = np.minimum((np.asarray(confidence) * bins).astype(int), bins - 1)
    gap = np.zeros((len(confidence), bins))
    gap[np.arange(len(confidence)), which] = confidence - y
    return np.abs(w @ gap).sum(axis=1) / w.sum(axis=1)


def reliability_table(confidence: np.ndarray, y: np.ndarray, bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """Per bin of confidence: answers, their mean confidence and the fraction of them correct."""
    which = np.minimum((np.asarray(confidence) * bins).astype(int), bins - 1)
    frame = pd.DataFrame({"bin": which, "confidence": confidence, "correct": y})
    table = frame.groupby("bin").agg(n=("correct", "size"), mean_confidence=("confidence", "mean"),
                                     fraction_correct=("correct", "mean")).reset_index()
    table.insert(1, "lo", table["bin"] / bins)
    table.insert(2, "hi", (table["bin"] + 1) / bins)
    return table


SCORE_METRICS = {"auroc": weighted_auroc_rows, "auprc": weighted_average_precision,
                 "prr": prediction_rejection_ratio, "brier": brier_score, "ece": expected_calibration_error}


def score_metrics(confidence: np.ndarray, y: np.ndarray, boot_weights: np.ndarray,
                  metrics: tuple[str, ...] = tuple(SCORE_METRICS)) -> dict[str, tuple[float, float, float]]:
    """metric -> (value, 95 % lo, hi) of one confidence score; the intervals from `boot_weights` [B, n] (e.g.
    `group_counts`), the same rows for every score compared, so differences between scores can be paired."""
    confidence, y = np.asarray(confidence, float), np.asarray(y, float)
    ones = np.ones((1, len(y)))
    out = {}
    for name in metrics:
        fn = SCORE_METRICS[name]
        value = float(fn(confidence, y, ones)[0])
        lo, hi = np.nanpercentile(fn(confidence, y, boot_weights), [2.5, 97.5])
        out[name] = (value, float(lo), float(hi))
    return out
