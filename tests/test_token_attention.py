"""Attention statistics read from the runs a group of layers at a time: every feature, detector input and score
equals the one computed from the statistics held in memory."""

import numpy as np
import pytest

from attentropy import instrument as ins
from attentropy.answers import load_answers
from attentropy.detectors.anchored import anchored_prefix_inputs
from attentropy.evaluation import answer_detectors, cross_validate, kinds_of, token_detectors
from attentropy.token_attention import TokenAttention, concat_attention
from synthetic import write_synthetic_run

KINDS = ["capital", "element", "currency", "script"]


def held_and_read(tmp_path, n=80):
    labels = ["incorrect" if i % 2 else "correct" for i in range(n)]
    path = write_synthetic_run(tmp_path / "run", benchmark="arith", labels=labels, n_questions=n, n_layers=7,
                               planted=(4, 1), shift=0.6, wrong_moment_shift=0.8)
    held = load_answers([path])[0]
    read = load_answers([path], in_memory_bytes=0)[0]
    read.attn.read_bytes = len(read.tokens) * read.n_heads * 4 * 2  # groups of 2 layers: 4 groups of 7
    assert held.attn.held and not read.attn.held
    assert [list(p) for p, _ in read.attn.groups("entropy_norm")] == [[0, 1], [2, 3], [4, 5], [6]]
    return path, held, read


def assert_same(x, y):
    if isinstance(x, tuple):
        for u, v in zip(x, y):
            assert_same(u, v)
    else:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_every_detector_reads_the_same_inputs(tmp_path):
    _, held, read = held_and_read(tmp_path)
    kinds = kinds_of(held)
    for name, d in {**answer_detectors(held), **token_detectors(held)}.items():
        assert_same(d.inputs(held, kinds), d.inputs(read, kinds))
    for name in ("entropy_norm", "prev_mass"):
        np.testing.assert_array_equal(held.attn[name], read.attn[name])
    # a subset (as the folds take) reads the same tokens
    rows = np.arange(3, 60, 4)
    np.testing.assert_array_equal(held.subset(rows).attn["diag_mass"], read.subset(rows).attn["diag_mass"])


def test_prefix_features_are_read_projected(tmp_path):
    _, held, read = held_and_read(tmp_path)
    anchors, pooled, kinds = anchored_prefix_inputs(held)
    read_anchors, lazy, read_kinds = anchored_prefix_inputs(read)
    assert isinstance(pooled, np.ndarray) and not isinstance(lazy, np.ndarray) and lazy.shape == pooled.shape
    np.testing.assert_allclose(read_anchors, anchors, rtol=1e-5, atol=1e-6)
    weights = np.random.default_rng(0).normal(size=(pooled.shape[1], 2))
    np.testing.assert_allclose(lazy.project(weights), pooled.astype(np.float64) @ weights, rtol=1e-5, atol=1e-5)
    some = np.array([3, 40, pooled.shape[1] - 3])  # attention columns and the minimum log-prob
    rows = np.arange(len(pooled)) % 3 == 0
    np.testing.assert_allclose(lazy[rows][:, some], pooled[rows][:, some], rtol=1e-5, atol=1e-6)


def test_the_instrument_scores_and_evaluates_the_same(tmp_path, monkeypatch):
    _, held, read = held_and_read(tmp_path)
    projections = []  # the passes that project prefix features (over the entropy's layers)
    groups = TokenAttention.groups

    def counted(self, name, layers=None, expansion=1):
        if name == "entropy_norm" and expansion == 4:
            projections.append(1)
        return groups(self, name, layers, expansion)
    monkeypatch.setattr(TokenAttention, "groups", counted)
    models, token_model = ins.fit_final(held)
    instrument = ins.Instrument({}, models, token_model)
    scores, read_scores = instrument.score(held), instrument.score(read)
    np.testing.assert_allclose(read_scores.prefix_confidence, scores.prefix_confidence, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(read_scores.confidence, scores.confidence)
    rows = np.arange(len(held.answers))
    detectors = {k: d for k, d in answer_detectors(held).items() if k in ("instrument", "rauq", "head_entropy")}
    cv, read_cv = (cross_validate(x, rows, detectors=detectors, token_detectors_={}) for x in (held, read))
    np.testing.assert_array_equal(read_cv.answer.to_numpy(float), cv.answer.to_numpy(float))
    np.testing.assert_allclose(read_cv.prefix["instrument"], cv.prefix["instrument"], rtol=1e-5, atol=1e-6)
    assert len(projections) == 2  # one pass to score, one for the prefix confidences of all five folds


def test_held_and_read_statistics_are_not_joined(tmp_path):
    _, held, read = held_and_read(tmp_path, n=20)
    with pytest.raises(ValueError, match="held and read"):
        concat_attention([held.attn, read.attn])
    with pytest.raises(KeyError, match="unknown attention feature"):
        next(read.attn.groups("entropy"))
    both = concat_attention([read.attn, read.attn])
    np.testing.assert_array_equal(both["sink_mass"], np.concatenate([held.attn["sink_mass"]] * 2))


def test_rows_taken_from_read_groups(tmp_path):
    """Tokens taken in another order, from two runs joined, group by group: the held values of those tokens (the
    groups share one buffer, so each is copied out before the next is read)."""
    _, held, read = held_and_read(tmp_path, n=20)
    rows = np.random.default_rng(0).permutation(2 * len(read.tokens))[: len(read.tokens)]
    both = concat_attention([read.attn, read.attn]).take(rows)
    for name in ("entropy_norm", "prev_mass"):
        np.testing.assert_array_equal(both[name], np.concatenate([held.attn[name]] * 2)[rows])
    groups = [(p, v.copy()) for p, v in both.groups("varentropy_norm")]
    assert len(groups) > 1
    for positions, values in groups:
        np.testing.assert_array_equal(values, np.concatenate([held.attn["varentropy_norm"]] * 2)[rows][:, positions])


def test_one_group_read_at_a_time(tmp_path):
    _, _, read = held_and_read(tmp_path, n=20)
    first = read.attn.groups("entropy_norm")
    next(first)
    with pytest.raises(RuntimeError, match="at a time"):
        next(read.attn.groups("sink_mass"))
    first.close()
    assert len(list(read.attn.groups("sink_mass"))) == 4
