"""Intervals of a contrast's effect sizes with questions as clusters, without resampling: the nonparametric
variance of the AUROC for clustered data (Obuchowski 1997, which extends DeLong, DeLong & Clarke-Pearson 1988)
and the cluster-robust delta-method variance of Cohen's d. One sort per cell instead of one per bootstrap replicate,
vectorised over the cells (a 90B-shaped run has 80 layers x 64 heads = 5,120 of them) and spread over threads.

AUROC (Obuchowski NA, "Nonparametric analysis of clustered ROC curve data", Biometrics 53:567-578, 1997). Clusters
i = 1..I (questions) hold m_i positive units X_ik and n_i negative units Y_il (tokens; an answer-level contrast has
one unit per cluster, where the formula is DeLong's); M = sum m_i, N = sum n_i; psi(x, y) = 1 if x > y, 1/2 if
x = y, else 0. The AUROC is theta = sum psi(X, Y) / (M N). Structural components: V10(X) = mean over all negatives
of psi(X, Y), V01(Y) = mean over all positives of psi(X, Y), summed per cluster: V10_i, V01_i. With I10 (I01) the
clusters holding a positive (negative) unit:
    S10 = I10 / ((I10 - 1) M) sum_i (V10_i - m_i theta)^2
    S01 = I01 / ((I01 - 1) N) sum_i (V01_i - n_i theta)^2
    S11 = I / (I - 1) sum_i (V10_i - m_i theta)(V01_i - n_i theta)
    var(theta) = S10 / M + S01 / N + 2 S11 / (M N)
V10 and V01 come from one sort of the pooled values per cell: the negatives below a value plus half those equal to
it (mid-ranks), so a cell costs O(n log n).

The stratified AUROC (pairs inside a stratum only, `stats.stratified_auroc`) is a ratio of two such U-statistics,
theta = sum_s (sum of psi over the stratum's pairs) / sum_s n1_s n0_s; its delta-method (DeLong) variance, answers
independent within each group: with c_i the negatives of i's stratum below it (+ half the equal ones) and P the
number of pairs, a positive's influence is (c_i - theta n0_s(i)) n1 / P, a negative's likewise, and
var = sum over positives of influence^2 / (n1 (n1 - 1)) + the same over negatives.

Intervals: 95 % Wald intervals on the logit scale, theta in (0, 1) (Pepe, "The statistical evaluation of medical
tests for classification and prediction", 2003, sec. 5.2; the AUROC is bounded and its sampling distribution skewed
away from 0.5, which the logit scale follows). Cohen's d: d = (mean1 - mean0) / s, s^2 the pooled variance; each
unit's influence (x - mean_g) / (s n_g) (sign of its group) - d (e_t^2 - s^2) / (2 s^2 n), e_t its deviation from
its group's mean, summed per cluster; var = I / (I - 1) sum_i (U_i - mean U)^2 (the sandwich estimator, clusters
independent); a Wald interval d +- 1.96 se.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import sparse
from scipy import stats as sps

LEVEL = 0.95
CHUNK_ELEMENTS = 1 << 16  # values x cells handled at once per thread: each array of a chunk (0.5 MB at float64)
# stays in the CPU's caches (chunks of 2^21 ran the token contrasts 1.5x slower)
REFERENCE = ("Obuchowski (1997), Biometrics 53:567-578: the nonparametric variance of the AUROC for clustered data "
             "(DeLong's, with questions as clusters), logit-scale Wald intervals; Cohen's d: the cluster-robust "
             "delta-method variance")


def threads() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cluster_placements(values: np.ndarray, positive: np.ndarray, cluster: np.ndarray, n_clusters: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per cell (column) of `values` [n, C] and cluster (`cluster` [n] in 0..n_clusters-1): the sum over the
    cluster's positive units of the negatives below each plus half those equal to it (N V10_i), and over its
    negative units of the positives above each plus half those equal (M V01_i); two [C, n_clusters] arrays. One sort
    per cell; ties count half, as in the Mann-Whitney U statistic: a run of equal values shares its counts."""
    by_cell = np.ascontiguousarray(values.T)
    n_cells, n = by_cell.shape
    order = np.argsort(by_cell, axis=1)
    ordered = np.take_along_axis(by_cell, order, axis=1)
    # each sorted value's (cell, cluster, group) as one index: 2 (cell n_clusters + cluster) + is negative
    key = (2 * cluster + ~positive)[order] + 2 * n_clusters * np.arange(n_cells)[:, None]
    is_neg = (key & 1).astype(bool)
    first = np.empty((n_cells, n), bool)  # the first of a run of equal values (a cell starts a run)
    first[:, 0] = True
    np.not_equal(ordered[:, 1:], ordered[:, :-1], out=first[:, 1:])
    first = first.ravel()
    run = np.cumsum(first) - 1  # the run of each sorted value, runs numbered over all the cells
    start = np.flatnonzero(first)  # where each run starts and ends (flat indices)
    end = np.append(start[1:], first.size) - 1
    neg_upto = np.cumsum(is_neg, axis=1).ravel()  # negatives up to here in the cell
    is_neg = is_neg.ravel()
    neg_below = neg_upto[start] - is_neg[start]
    neg_equal = neg_upto[end] - neg_below
    pos_below = start % n - neg_below
    pos_equal = end - start + 1 - neg_equal
    n_pos = int(positive.sum())
    # per run, a positive's count and a negative's, side by side: a value takes its group's count of its run
    counts = np.stack([neg_below + 0.5 * neg_equal, n_pos - pos_below - 0.5 * pos_equal], axis=1).ravel()
    # summed by (cell, cluster, group) in one pass
    sums = np.bincount(key.ravel(), weights=counts[2 * run + is_neg], minlength=2 * n_cells * n_clusters)
    sums = sums.reshape(n_cells, n_clusters, 2)
    return sums[..., 0], sums[..., 1]


def _over_chunks(fn, values: np.ndarray, *args) -> list:
    """fn(values[:, chunk], *args) over chunks of cells small enough to stay in the CPU's caches, on all the cores
    there are (numpy's sorts and gathers release the GIL), results in order."""
    width = max(1, CHUNK_ELEMENTS // max(1, len(values)))
    chunks = [slice(c, c + width) for c in range(0, values.shape[1], width)]
    if len(chunks) == 1:
        return [fn(values, *args)]
    with ThreadPoolExecutor(min(threads(), len(chunks))) as pool:
        return list(pool.map(lambda s: fn(values[:, s], *args), chunks))


def _indicator(clusters: np.ndarray, rows: np.ndarray, n_clusters: int) -> sparse.csr_matrix:
    """[n_clusters, n] with 1 where unit j (one of `rows`) is in cluster i."""
    return sparse.csr_matrix((np.ones(len(rows)), (clusters[rows], rows)), shape=(n_clusters, len(clusters)))


def _clustered_chunk(values: np.ndarray, positive: np.ndarray, cluster: np.ndarray, m: np.ndarray, n: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    v10, v01 = cluster_placements(values, positive, cluster, len(m))
    big_m, big_n = m.sum(), n.sum()
    v10, v01 = v10.T / big_n, v01.T / big_m  # [I, C]: per cluster, the sum of its positives' V10 (negatives' V01)
    theta = v10.sum(axis=0) / big_m
    dx, dy = v10 - m[:, None] * theta, v01 - n[:, None] * theta
    i10, i01, i = (m > 0).sum(), (n > 0).sum(), len(m)
    with np.errstate(divide="ignore", invalid="ignore"):
        s10 = i10 / ((i10 - 1) * big_m) * (dx * dx).sum(axis=0)
        s01 = i01 / ((i01 - 1) * big_n) * (dy * dy).sum(axis=0)
        s11 = i / (i - 1) * (dx * dy).sum(axis=0)
    var = s10 / big_m + s01 / big_n + 2 * s11 / (big_m * big_n)
    return theta, np.sqrt(np.maximum(var, 0.0))


def clustered_auroc(values: np.ndarray, positive: np.ndarray, clusters: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(AUROC [C], its standard error [C]) of `values` [n, C] for `positive` [n] against the other units, with
    units of one cluster (`clusters` [n], e.g. question ids; None: every unit its own cluster, DeLong's variance)
    dependent and clusters independent (Obuchowski 1997, see the module's docstring)."""
    values = np.asarray(values)
    positive = np.asarray(positive, bool)
    if clusters is None:
        index = np.arange(len(values))
    else:
        _, index = np.unique(np.asarray(clusters), return_inverse=True)
    n_clusters = int(index.max()) + 1
    m = np.bincount(index, weights=positive, minlength=n_clusters)
    n = np.bincount(index, weights=~positive, minlength=n_clusters)
    parts = _over_chunks(_clustered_chunk, values, positive, index, m, n)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _stratified_chunk(values: np.ndarray, positive: np.ndarray, strata: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = np.empty(values.shape)  # within its stratum: N_s V10 of a positive, M_s V01 of a negative
    other = np.empty(len(values))  # units of the other group in the unit's stratum
    for s in np.unique(strata):
        rows = np.flatnonzero(strata == s)
        v10, v01 = cluster_placements(values[rows], positive[rows], np.arange(len(rows)), len(rows))
        counts[rows] = (v10 + v01).T  # each unit its own cluster: a positive's V10, a negative's V01
        n1 = positive[rows].sum()
        other[rows] = np.where(positive[rows], len(rows) - n1, n1)
    pairs = (other[positive]).sum()
    theta = counts[positive].sum(axis=0) / pairs
    n1, n0 = positive.sum(), (~positive).sum()
    # the influence of a unit, (c - theta * other) / pairs * (its group's size), squared and summed per group
    dev = (counts - theta * other[:, None]) / pairs
    with np.errstate(divide="ignore", invalid="ignore"):
        var = n1 / (n1 - 1) * (dev[positive] ** 2).sum(axis=0) + n0 / (n0 - 1) * (dev[~positive] ** 2).sum(axis=0)
    return theta, np.sqrt(np.maximum(var, 0.0))


def stratified_auroc(values: np.ndarray, positive: np.ndarray, strata: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUROC [C], standard error [C]) counting only pairs inside one stratum: the pair-weighted mean of the
    per-stratum AUROCs (as `stats.stratified_auroc`), answers independent; every stratum must hold both groups."""
    values = np.asarray(values)
    positive = np.asarray(positive, bool)
    parts = _over_chunks(_stratified_chunk, values, positive, np.asarray(strata))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def cohens_d_se(values: np.ndarray, positive: np.ndarray, clusters: np.ndarray | None = None) -> np.ndarray:
    """The standard error [C] of Cohen's d (`stats.cohens_d`) of `values` [n, C], `positive` [n] against the
    others, clusters independent (None: every unit its own cluster), by the delta method (module docstring)."""
    values = np.asarray(values)
    positive = np.asarray(positive, bool)
    index = np.arange(len(values)) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    n_clusters = int(index.max()) + 1
    by_cluster = None if clusters is None else _indicator(index, np.arange(len(values)), n_clusters)
    n1, n0 = positive.sum(), (~positive).sum()

    def chunk(x):
        x = np.asarray(x, np.float64)
        m1, m0 = x[positive].mean(axis=0), x[~positive].mean(axis=0)
        e = x - np.where(positive[:, None], m1, m0)
        var = (e * e).sum(axis=0) / (n1 + n0 - 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.sqrt(var)
            d = (m1 - m0) / s
            influence = (np.where(positive[:, None], e / n1, -e / n0) / s
                         - d * (e * e - var) / (2 * var * (n1 + n0)))
        u = influence if clusters is None else by_cluster @ influence  # [I, C]: summed per cluster
        u -= u.mean(axis=0)
        se = np.sqrt(n_clusters / (n_clusters - 1) * (u * u).sum(axis=0))
        return np.where(var > 0, se, 0.0)

    return np.concatenate(_over_chunks(chunk, values))


def auroc_interval(theta: np.ndarray, se: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Wald interval of an AUROC on the logit scale: logit(theta) +- z se / (theta (1 - theta)), mapped back;
    [theta, theta] where theta is 0 or 1 (every pair ordered: the variance is 0), NaN where the variance is."""
    z = sps.norm.ppf(0.5 + level / 2)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        logit = np.log(theta / (1 - theta))
        half = z * se / (theta * (1 - theta))
        lo, hi = 1 / (1 + np.exp(-(logit - half))), 1 / (1 + np.exp(-(logit + half)))
    edge = ((theta <= 0) | (theta >= 1)) & np.isfinite(se)
    return np.where(edge, theta, lo), np.where(edge, theta, hi)


def wald_interval(estimate: np.ndarray, se: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """estimate +- z se."""
    z = sps.norm.ppf(0.5 + level / 2)
    return estimate - z * se, estimate + z * se
