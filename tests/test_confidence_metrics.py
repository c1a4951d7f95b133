"""The metrics of a confidence score against their definitions and scikit-learn."""

import itertools

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from attentropy import confidence_metrics


def prr_by_definition(confidence, y):
    """lm-polygraph's PRR written out: mean retained quality over every rejection level, normalised."""
    def area(order):
        kept = y[order]
        return np.mean(np.cumsum(kept) / np.arange(1, len(kept) + 1))
    model, oracle, random = area(np.argsort(-confidence, kind="stable")), area(np.argsort(-y, kind="stable")), y.mean()
    return (model - random) / (oracle - random)


def test_score_metrics_follow_their_definitions():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(6, 50))
        y = np.r_[0.0, 1.0, rng.integers(0, 2, n - 2)].astype(float)
        conf = rng.random(n)
        if trial % 2:
            conf = np.round(conf, 1)  # ties
        ones = np.ones((1, n))
        assert np.isclose(confidence_metrics.weighted_auroc_rows(conf, y, ones)[0], roc_auc_score(y, conf))
        assert np.isclose(confidence_metrics.weighted_average_precision(conf, y, ones)[0],
                          average_precision_score(1 - y, -conf))
        assert np.isclose(confidence_metrics.brier_score(conf, y, ones)[0], brier_score_loss(y, conf))
        if trial % 2 == 0:  # no ties: PRR exactly as written out
            assert np.isclose(confidence_metrics.prediction_rejection_ratio(conf, y, ones)[0],
                              prr_by_definition(conf, y))
        # a row of bootstrap counts is the metric of the resample itself
        counts = rng.integers(1, 3, n).astype(float)
        idx = np.repeat(np.arange(n), counts.astype(int))
        expanded = np.ones((1, len(idx)))
        for name in confidence_metrics.SCORE_METRICS:
            fn = confidence_metrics.SCORE_METRICS[name]
            if name == "prr" and trial % 2:
                continue
            assert np.isclose(fn(conf, y, counts[None])[0], fn(conf[idx], y[idx], expanded)[0]), name
    # ties in PRR: the expectation over the orders of the tied answers (enumerated)
    y = np.array([1, 0, 1, 0, 0, 1.0])
    conf = np.array([0.5, 0.5, 0.5, 0.2, 0.9, 0.9])
    orders = []
    for tied_hi in itertools.permutations([4, 5]):
        for tied_mid in itertools.permutations([0, 1, 2]):
            orders.append([*tied_hi, *tied_mid, 3])
    areas = [np.mean(np.cumsum(y[o]) / np.arange(1, 7)) for o in orders]
    oracle = np.mean(np.cumsum(np.sort(y)[::-1]) / np.arange(1, 7))
    expected = (np.mean(areas) - y.mean()) / (oracle - y.mean())
    assert np.isclose(confidence_metrics.prediction_rejection_ratio(conf, y, np.ones((1, 6)))[0], expected)
    # ECE by hand: two bins
    conf, y = np.array([0.05, 0.05, 0.95, 0.95]), np.array([0.0, 1.0, 1.0, 1.0])
    assert np.isclose(confidence_metrics.expected_calibration_error(conf, y, np.ones((1, 4)))[0],
                      0.5 * 0.45 + 0.5 * 0.05)
