"""The metrics of a confidence score: how well a score that is higher where an answer is more likely correct
separates correct from incorrect answers (AUROC, AUPRC of the errors, prediction rejection ratio) and how well it is
calibrated (Brier score, expected calibration error, the reliability table).

Every metric takes `w` [B, n]: one row of weights per evaluation (a row of ones: the data as they are; a row of
bootstrap counts, e.g. `stats.group_counts`: a resample), so a point estimate and its 1,000 resamples are one
vectorised call. `y` [n] is 1 where the answer is correct; `confidence` [n] is higher where the answer is more likely
correct.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .stats import weighted_auroc


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
    `stats.group_counts`), the same rows for every score compared, so differences between scores can be paired; or
    a function that applies a function of weights [b, n] -> [b] to every replicate and returns [B]."""
    confidence, y = np.asarray(confidence, float), np.asarray(y, float)
    ones = np.ones((1, len(y)))
    over_replicates = boot_weights if callable(boot_weights) else (lambda fn: fn(boot_weights))
    out = {}
    for name in metrics:
        fn = SCORE_METRICS[name]
        value = float(fn(confidence, y, ones)[0])
        lo, hi = np.nanpercentile(over_replicates(lambda w: fn(confidence, y, w)), [2.5, 97.5])
        out[name] = (value, float(lo), float(hi))
    return out
