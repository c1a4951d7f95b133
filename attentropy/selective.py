"""Selective answering: an answer whose confidence is below a threshold becomes "not attempted"; SimpleQA's
metrics of what is left (coverage, correct, correct given attempted, F-score) and the threshold chosen on
training answers."""

from __future__ import annotations

import numpy as np
import pandas as pd


def f_score(correct, correct_given_attempted, empty=0.0):
    """SimpleQA's F-score: the harmonic mean of the share correct and the share correct among attempted answers
    (`empty` where both are 0); numbers or arrays."""
    c, cga = np.asarray(correct, float), np.asarray(correct_given_attempted, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(c + cga > 0, 2 * c * cga / (c + cga), empty)
    return float(out) if out.ndim == 0 else out


def selective_outcome(confidence: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """SimpleQA's metrics when every answer below `threshold` becomes `not_attempted` (answers already not
    attempted stay so): correct, not attempted, correct given attempted, F-score, coverage (share attempted)."""
    attempted = (confidence >= threshold) & (labels != "not_attempted")
    correct = attempted & (labels == "correct")
    n = len(labels)
    cga = correct.sum() / attempted.sum() if attempted.any() else 0.0
    return {"coverage": attempted.mean() if n else 0.0, "correct": correct.sum() / n if n else 0.0,
            "correct_given_attempted": float(cga), "f_score": f_score(correct.sum() / max(n, 1), cga)}


def choose_threshold(confidence: np.ndarray, labels: np.ndarray) -> float:
    """The abstention threshold with the highest F-score on these (training) answers; 0 keeps every answer."""
    candidates = np.r_[0.0, np.unique(confidence)]
    scores = [selective_outcome(confidence, labels, t)["f_score"] for t in candidates]
    return float(candidates[int(np.argmax(scores))])


def coverage_curve(confidence: np.ndarray, labels: np.ndarray, points: int = 41) -> pd.DataFrame:
    """F-score, correct given attempted (= accuracy on the attempted answers) and coverage as the abstention
    threshold sweeps the confidences' quantiles."""
    qs = np.unique(np.quantile(confidence, np.linspace(0, 1, points)))
    return pd.DataFrame([{"threshold": t, **selective_outcome(confidence, labels, t)} for t in np.r_[0.0, qs]])
