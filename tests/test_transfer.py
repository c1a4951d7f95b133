"""Transfer to question kinds left out of fitting: the mean over held-out kinds with its two-level interval, and the
anchored instrument (a training-free anchor plus a correction chosen by leave-one-kind-out)."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from attentropy.detectors import anchored
from attentropy.detectors.anchored import ANCHORS, fit_anchored, fit_anchored_model, stable_order, within_kind_auroc
from attentropy.probe import sigmoid
from attentropy.evaluation import MIN_PER_CLASS_HELD_OUT, held_out_mean_rows


@pytest.mark.parametrize("columns_at_a_time", [None, 2])
def test_within_kind_auroc_is_sklearns_per_kind(monkeypatch, columns_at_a_time):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(90, 5)), rng.integers(0, 2, 90)
    X[:, 1] = np.round(X[:, 1])  # ties
    kinds = np.repeat(["a", "b", "c"], 30)
    if columns_at_a_time:  # ranked in blocks of 2 columns (the last of 1)
        monkeypatch.setattr(anchored, "RANK_BYTES", 8 * 30 * columns_at_a_time)
    auc = within_kind_auroc(X, y, kinds)
    for i, kind in enumerate("abc"):
        m = kinds == kind
        assert np.allclose(auc[i], [roc_auc_score(y[m], X[m, j]) for j in range(5)])


def test_stable_features_keep_one_sign_in_every_kind():
    y = np.tile([1, 1, 0, 0], 6)
    kinds = np.repeat(["a", "b", "c"], 8)
    steady = y + np.tile([0.1, 0.2, 0.1, 0.3], 6)  # higher for correct answers in every kind
    flips = np.where(kinds == "b", -1, 1) * y  # reversed in kind b
    weak = np.tile([1.0, 0.0, 0.5, 0.0], 6)  # AUROC 0.625 in every kind
    X = np.column_stack([flips, weak, steady])
    order = stable_order(X, y, kinds)
    assert 0 not in order  # its effect changes sign between kinds
    assert list(order) == [2, 1]  # the strongest effect in its weakest kind first


def _kinds_data(n_kinds: int, signal: float, seed: int = 0):
    """Answers of `n_kinds` kinds: an anchor that ranks answers weakly, one attention column whose within-kind signal
    is `signal` standard deviations, 20 noise columns, and a kind offset on every column (the kinds differ)."""
    rng = np.random.default_rng(seed)
    kinds = np.repeat([f"k{i}" for i in range(n_kinds)], 80)
    y = rng.integers(0, 2, len(kinds))
    offset = rng.normal(scale=3.0, size=(n_kinds, 21))[np.unique(kinds, return_inverse=True)[1]]
    attention = rng.normal(size=(len(kinds), 21)) + offset
    attention[:, 0] += signal * y
    anchors = np.column_stack([0.5 * y + rng.normal(size=len(y)) for _ in range(3)])
    logit = rng.normal(size=(len(kinds), 4))  # the pooled features end in four logit statistics
    return (anchors, np.column_stack([attention, logit]), kinds), y


def test_too_few_kinds_leave_the_anchor_alone():
    X, y = _kinds_data(2, signal=3.0)
    fitted = fit_anchored(X, y)
    assert fitted.detail["k"] == 0
    anchor = X[0][:, ["mean_logprob", "logit_entropy", "rauq"].index(fitted.detail["anchor"])]
    conf = fitted.confidence(X)
    assert roc_auc_score(y, conf) == roc_auc_score(y, anchor)  # a monotone map of the anchor


def test_a_signal_stable_across_kinds_is_used_and_holds_on_a_new_kind():
    X, y = _kinds_data(6, signal=2.0)
    train, test = X[2] != "k5", X[2] == "k5"
    fitted = fit_anchored(tuple(x[train] for x in X), y[train])
    assert fitted.detail["k"] > 0 and 0 in fitted.detail["columns"]
    anchor = X[0][test][:, ["mean_logprob", "logit_entropy", "rauq"].index(fitted.detail["anchor"])]
    assert roc_auc_score(y[test], fitted.confidence(tuple(x[test] for x in X))) > roc_auc_score(y[test], anchor)


def test_answers_of_a_one_class_kind_get_an_out_of_kind_decision_on_the_models_scale():
    X, y = _kinds_data(6, signal=2.0)
    X = tuple(np.r_[x, x[:40]] for x in X[:2]) + (np.r_[X[2], np.repeat("all_correct", 40)],)
    y = np.r_[y, np.ones(40, int)]
    fitted = fit_anchored(X, y)
    assert fitted.detail["k"] > 0
    rest = X[2] == "all_correct"
    # the chosen candidate fitted on the kinds with both classes decides them, calibrated like the held-out kinds
    outer = fit_anchored_model(X[0][~rest], X[1][~rest, :-4], y[~rest], X[2][~rest],
                               ANCHORS.index(fitted.detail["anchor"]), fitted.detail["k"], fitted.detail["C"])
    a, b = fitted.detail["model"].calibration
    expected = sigmoid(a * outer.decision(X[0][rest], X[1][rest, :-4]) + b)
    np.testing.assert_allclose(fitted.train_confidence[rest], expected, rtol=1e-6)


def test_a_fit_on_the_same_answers_is_reused_and_one_on_other_answers_is_not():
    X, y = _kinds_data(4, signal=2.0, seed=3)
    first = fit_anchored(X, y)
    assert fit_anchored(tuple(np.copy(x) for x in X), y.copy()) is first  # the same inputs: the same fit
    flipped = y.copy()
    flipped[0] = 1 - flipped[0]
    assert fit_anchored(X, flipped) is not first


def test_held_out_mean_is_the_mean_over_kinds_large_enough():
    rng = np.random.default_rng(1)
    kinds = np.repeat(["a", "b", "c", "tiny"], [60, 60, 60, 30])
    y = np.r_[rng.integers(0, 2, 180), np.r_[np.ones(25), np.zeros(MIN_PER_CLASS_HELD_OUT - 5)]].astype(int)
    answers = pd.DataFrame({"y": y, "kind": kinds, "group": [f"q{i}" for i in range(len(y))]})
    predictions = pd.DataFrame({"instrument": y + rng.normal(size=len(y)), "mean_logprob": rng.normal(size=len(y))})
    rows = pd.DataFrame(held_out_mean_rows("factual", "kind", predictions, answers,
                                           {"instrument": "instrument", "mean_logprob": "baseline"}, n_boot=200,
                                           seed=0))
    small = rows[rows.evaluation == "leave_one_kind_out_too_small"]
    assert list(small.subset) == ["tiny"]
    mean = rows[(rows.evaluation == "leave_one_kind_out_mean") & (rows.metric == "auroc")].set_index("method")
    by_hand = np.mean([roc_auc_score(y[kinds == k], predictions.instrument[kinds == k]) for k in "abc"])
    assert np.isclose(mean.loc["instrument", "value"], by_hand)
    assert mean.loc["instrument", "lo"] < by_hand < mean.loc["instrument", "hi"]
    gain = rows[rows.metric == "auroc_gain_of_instrument"].set_index("method").loc["mean_logprob"]
    assert np.isclose(gain.value, by_hand - mean.loc["mean_logprob", "value"])


def test_the_prefix_form_at_the_last_token_is_the_answer_form(tmp_path):
    from attentropy.answers import load_answers
    from attentropy.detectors.anchored import anchored_inputs, anchored_prefix_inputs
    from synthetic import write_synthetic_run

    path = write_synthetic_run(tmp_path / "facts", benchmark="facts", n_questions=12, planted=(1, 1),
                               kinds=[["a", "b", "c"][i % 3] for i in range(12)])
    a = load_answers([path])[0]
    whole, prefix = anchored_inputs(a), anchored_prefix_inputs(a)
    last = a.answers.start.to_numpy() + a.answers.n_tokens.to_numpy() - 1
    assert np.allclose(prefix[0][last], whole[0], rtol=1e-4, atol=1e-5)
    assert np.allclose(prefix[1][last], whole[1], rtol=1e-4, atol=1e-5)
    assert (prefix[2][last] == whole[2]).all()
    first = a.answers.start.to_numpy()
    assert not np.allclose(prefix[0][first], whole[0])  # one token is not the whole answer


def test_the_chosen_anchor_alone_is_the_anchors_ranking_and_the_anchored_models_anchor():
    from attentropy.detectors.anchored import fit_anchor_alone

    X, y = _kinds_data(6, signal=2.0)
    alone, anchored_fit = fit_anchor_alone(X, y), fit_anchored(X, y)
    assert alone.detail["k"] == 0 and alone.detail["anchor"] == anchored_fit.detail["anchor"]
    anchor = X[0][:, ANCHORS.index(alone.detail["anchor"])]
    assert roc_auc_score(y, alone.confidence(X)) == roc_auc_score(y, anchor)


def test_the_variant_with_attention_keeps_a_correction_where_the_one_se_rule_drops_it():
    from attentropy.detectors.anchored import fit_with_attention

    X, y = _kinds_data(6, signal=0.0, seed=5)  # attention carries nothing
    assert fit_anchored(X, y).detail["k"] == 0
    assert fit_with_attention(X, y).detail["k"] > 0


def _flipping_data(seed: int = 0):
    """Six kinds: column 0 higher for correct answers in every kind, column 1 higher in three kinds and lower in
    the other three (a kind's own signal), 10 noise columns; every column shifted by a kind offset."""
    rng = np.random.default_rng(seed)
    kinds = np.repeat([f"k{i}" for i in range(6)], 100)
    y = rng.integers(0, 2, len(kinds))
    sign = np.where(np.isin(kinds, ["k0", "k1", "k2"]), 1.0, -1.0)
    attention = rng.normal(size=(len(kinds), 12)) + rng.normal(scale=3.0, size=(6, 12))[
        np.unique(kinds, return_inverse=True)[1]]
    attention[:, 0] += 1.5 * y
    attention[:, 1] += 1.5 * sign * y
    anchors = np.column_stack([0.3 * y + rng.normal(size=len(y)) for _ in range(3)])
    return (anchors, np.column_stack([attention, rng.normal(size=(len(y), 4))]), kinds), y


def test_the_direction_keeps_what_the_kinds_share_and_cancels_what_they_do_not():
    from attentropy.detectors.mean_difference import fit_direction_scores

    X, y = _flipping_data()
    direction, _ = fit_direction_scores(X[1][:, :-4], y, X[2])
    raw = direction.direction * direction.scale  # the mean within-kind difference, in the columns' units
    # (each kind's difference has a standard error of about 0.2; the mean of six about 0.08)
    assert abs(raw[0] - 1.5) < 0.3 and abs(raw[1]) < 0.4 and np.abs(raw[2:]).max() < 0.4


def test_each_kind_is_scored_by_the_direction_of_the_other_kinds():
    from attentropy.detectors.mean_difference import fit_direction_scores

    X, y = _kinds_data(6, signal=2.0)  # a signal on column 0 in every kind, offsets between kinds
    _, held = fit_direction_scores(X[1][:, :-4], y, X[2])
    for kind in np.unique(X[2]):
        m = X[2] == kind
        assert roc_auc_score(y[m], held[m]) > 0.75


def test_with_one_kind_of_both_classes_its_answers_get_no_held_out_score():
    from attentropy.detectors.mean_difference import fit_direction_scores

    X, y = _kinds_data(3, signal=2.0)
    y[X[2] != "k0"] = 1  # kinds k1 and k2: every answer correct
    _, held = fit_direction_scores(X[1][:, :-4], y, X[2])
    assert (held[X[2] == "k0"] == 0).all()  # no other kind to take a direction from
    assert np.ptp(held[X[2] != "k0"]) > 0  # the others: scored by k0's direction, which read none of their labels


def test_a_kinds_held_out_scores_do_not_read_its_own_labels():
    from attentropy.detectors.mean_difference import fit_direction_scores

    X, y = _flipping_data(seed=2)
    _, held = fit_direction_scores(X[1][:, :-4], y, X[2])
    relabelled = y.copy()
    k0 = X[2] == "k0"
    relabelled[k0] = np.random.default_rng(9).permutation(y[k0])  # same counts: the same moments
    _, held_again = fit_direction_scores(X[1][:, :-4], relabelled, X[2])
    np.testing.assert_allclose(held_again[k0], held[k0])
    assert not np.allclose(held_again[~k0], held[~k0])  # the other kinds' directions read kind k0's labels


def test_the_anchored_direction_beats_its_anchor_on_a_new_kind_when_the_kinds_share_a_signal():
    from attentropy.detectors.mean_difference import fit_anchored_direction

    X, y = _kinds_data(6, signal=2.0, seed=3)
    train, test = X[2] != "k5", X[2] == "k5"
    fitted = fit_anchored_direction(tuple(x[train] for x in X), y[train])
    anchor = X[0][test][:, ANCHORS.index(fitted.detail["anchor"])]
    assert roc_auc_score(y[test], fitted.confidence(tuple(x[test] for x in X))) > roc_auc_score(y[test], anchor) + 0.1
