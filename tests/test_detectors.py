"""The detectors: the contract every registered one keeps, and the published baselines computed by hand."""

import numpy as np
import pytest

from attentropy.answers import load_answers
from attentropy.detectors import ANSWER_DETECTORS, TOKEN_DETECTORS, head_entropy, rauq
from attentropy.detectors.llm_check import llm_check_scores
from attentropy.detectors.lookback_lens import lookback_ratios
from attentropy.evaluation import kinds_of
from synthetic import write_synthetic_run


def planted_answers(tmp_path, n=4, **kw):
    labels = ["incorrect" if i % 2 else "correct" for i in range(n)]
    path = write_synthetic_run(tmp_path / "facts", benchmark="facts", labels=labels, n_questions=n, **kw)
    return path, load_answers([path])[0]


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """Answers with everything a detector may read: kinds, hidden states with the embeddings, wrong moments."""
    root = tmp_path_factory.mktemp("detectors")
    labels = ["incorrect" if i % 3 == 0 else "correct" for i in range(30)]
    kinds = [["capital", "element"][i % 2] for i in range(30)]
    facts = write_synthetic_run(root / "facts", benchmark="facts", labels=labels, n_questions=30, kinds=kinds,
                                hidden=([0, 2, 4], 8), hidden_shift=1.0, planted=(1, 1))
    return load_answers([facts])[0]


@pytest.mark.parametrize("name", list(ANSWER_DETECTORS))
def test_every_answer_detector_keeps_the_contract(answers, name):
    detector = ANSWER_DETECTORS[name]
    assert detector.level == "answer" and detector.role in ("instrument", "baseline", "control")
    assert detector.available(answers)
    X = detector.inputs(answers, kinds_of(answers))
    parts = X if isinstance(X, tuple) else (X,)
    for part in parts:  # one row per answer, finite (or labels, as the kinds a detector routes by)
        assert len(part) == len(answers.answers)
        assert np.isfinite(part).all() if part.dtype.kind in "fiub" else part.dtype.kind in "UO"
    again = detector.inputs(answers, kinds_of(answers))
    for first, second in zip(parts, again if isinstance(again, tuple) else (again,)):
        np.testing.assert_array_equal(first, second)
    y, groups = answers.answers.y.to_numpy(), answers.answers.group.to_numpy()
    train = np.arange(20)
    take = (lambda rows: tuple(p[rows] for p in X)) if isinstance(X, tuple) else (lambda rows: X[rows])
    fitted = detector.fit(take(train), y[train], groups[train], seed=0)
    confidence = fitted.confidence(take(np.arange(20, 30)))
    assert confidence.shape == (10,) and np.all((confidence >= 0) & (confidence <= 1))
    assert len(fitted.train_confidence) == 20
    refitted = detector.fit(take(train), y[train], groups[train], seed=0)  # deterministic
    np.testing.assert_array_equal(refitted.confidence(take(np.arange(20, 30))), confidence)
    if detector.prefix_features is not None:  # the prefix form: one row per token, equal to the answer's at its end
        prefix = detector.prefix_features(answers)
        prefix_parts = prefix if isinstance(prefix, tuple) else (prefix,)
        last = answers.answers.start.to_numpy() + answers.answers.n_tokens.to_numpy() - 1
        for whole, part in zip(parts, prefix_parts):
            assert len(part) == len(answers.tokens)
            if part.dtype.kind in "fiub":
                np.testing.assert_allclose(part[last], whole, rtol=1e-4, atol=1e-5)
            else:
                np.testing.assert_array_equal(part[last], whole)


@pytest.mark.parametrize("name", list(TOKEN_DETECTORS))
def test_every_token_detector_keeps_the_contract(tmp_path, name):
    detector = TOKEN_DETECTORS[name]
    path = write_synthetic_run(tmp_path / "arith", n_questions=12, wrong_moment_shift=1.0)
    a = load_answers([path])[0]
    # token hidden states (the synthetic store writes none): random rows of three kept layers
    a.hidden_tokens = np.random.default_rng(0).normal(size=(len(a.tokens), 3, 6)).astype(np.float16)
    a.hidden_token_layers = [0, 1, 2]
    assert detector.available(a)
    X = detector.inputs(a, kinds_of(a))
    assert len(X) == len(a.tokens) and np.isfinite(np.asarray(X, float)).all()
    target = a.tokens.target.to_numpy()
    rows = np.flatnonzero(target >= 0)
    fitted = detector.fit(X[rows], 1 - target[rows], a.answers.group.to_numpy()[a.answer_of_token[rows]], seed=0)
    confidence = fitted.confidence(X)
    assert confidence.shape == (len(a.tokens),) and np.all((confidence >= 0) & (confidence <= 1))


def test_published_baselines_by_hand(tmp_path):
    path, a = planted_answers(tmp_path, n_tokens=(3, 4))
    # one answer by hand: RAUQ's recurrence and Lookback Lens' ratio
    first = a.subset(np.array([0]))
    p = np.exp(first.tokens.logprob.to_numpy(float))
    mid = rauq.rauq_layers(first.layers)
    prev = first.attn["prev_mass"][:, mid].astype(float)
    c = [p[0] * np.ones(prev.shape[1:])]
    n = len(first.tokens)
    for t in range(1, n):
        c.append(rauq.RAUQ_ALPHA * p[t] + (1 - rauq.RAUQ_ALPHA) * prev[t] * c[-1])
    expected = -np.mean(np.log(np.stack(c)), axis=0)
    np.testing.assert_allclose(rauq.rauq_features(first)[0, 0], expected, rtol=1e-6)
    # RAUQ as its authors choose heads: per layer the head with the most attention to the previous generated token
    # over this answer; the answer's uncertainty is the largest over those layers
    chosen = [int(np.argmax(prev[1:n, layer].mean(axis=0))) for layer in range(prev.shape[1])]
    by_hand = max(expected[layer, head] for layer, head in enumerate(chosen))
    assert np.isclose(rauq.rauq_uncertainty(rauq.rauq_features(first))[0], by_hand)
    # Attention Head Entropy: each head's entropy in nats averaged over the answer's tokens
    nats = first.attn["entropy_norm"] * np.log(first.tokens.n_keys.to_numpy(float))[:, None, None]
    np.testing.assert_allclose(head_entropy.entropy_over_answer(first)[0], nats.mean(axis=0).ravel(), rtol=1e-5)
    ratio = lookback_ratios(first)[0].reshape(len(first.layers), first.n_heads)
    prompt = first.attn["prompt_mass"].astype(float)
    n_keys, pos = first.tokens.n_keys.to_numpy(float), first.tokens.pos.to_numpy(float)
    per = [np.ones_like(prompt[0])] + [
        (prompt[t] / (n_keys[t] - pos[t])) / (prompt[t] / (n_keys[t] - pos[t]) + (1 - prompt[t]) / pos[t])
        for t in (1, 2)]
    np.testing.assert_allclose(ratio, np.mean(per, axis=0), rtol=1e-5)
    # LLM-Check: per layer, sum over heads of the answer's mean log own-token attention
    diag = np.log(first.attn["diag_mass"].astype(float))
    np.testing.assert_allclose(llm_check_scores(first)[0], diag.mean(axis=0).sum(axis=1), rtol=1e-5)


