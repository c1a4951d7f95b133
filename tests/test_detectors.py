"""The detectors: the contract every registered one keeps, and the published baselines computed by hand."""

import numpy as np
import pytest

from attentropy.answers import load_answers
from attentropy.detectors import ANSWER_DETECTORS, TOKEN_DETECTORS, head_entropy, llm_check, rauq
from attentropy.evaluation import answer_detectors
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
    assert fitted.confidence(take(np.arange(0))).shape == (0,)  # no answers to score (e.g. none abstained)
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
    # LLM-Check's variant over the answer's rows: per layer, sum over heads of the mean log own-token attention
    diag = np.log(first.attn["diag_mass"].astype(float))
    np.testing.assert_allclose(llm_check.llm_check_answer_rows_scores(first)[0], diag.mean(axis=0).sum(axis=1),
                               rtol=1e-5)


def test_llm_check_by_hand_from_the_log_determinant(tmp_path):
    """LLM-Check as the paper defines it: per layer, the sum over heads of log det(A_h) / N, A_h a head's causal
    attention matrix over the sequence's N rows; LM-Polygraph's form: the mean over heads of log det(A_h) at the
    middle layer. A 3-token prompt and a 2-token answer: rows 0, 1 are the prompt's (recorded at prefill), rows 2
    (the prompt's last token) and 3 (the answer's first) predict the answer's tokens; the answer's last token's row
    is never computed, so N = 4."""
    _, a = planted_answers(tmp_path, n=2, n_tokens=(2, 3), prompt_len=3)
    one = a.subset(np.array([0]))
    n_layers, n_heads = len(one.layers), one.n_heads
    rng = np.random.default_rng(3)
    A = np.zeros((n_layers, n_heads, 4, 4))  # lower-triangular, rows summing to 1
    for i in range(4):
        A[:, :, i, :i + 1] = rng.dirichlet(np.ones(i + 1), size=(n_layers, n_heads))
    A[0, 0] = [[1, 0, 0, 0], [.5, .5, 0, 0], [.2, .3, .5, 0], [.1, .2, .3, .4]]  # det = .5 * .5 * .4 = 0.1
    # what the run holds: the prompt rows' summed log-diagonal (rows 0, 1) and the answer rows' own attention
    one.prompt_log_diag = (np.log(A[..., 0, 0]) + np.log(A[..., 1, 1]))[None]
    one.prompt_diag_rows = np.array([2])
    one.attn["diag_mass"] = np.stack([A[..., 2, 2], A[..., 3, 3]]).astype(np.float32)
    log_det = np.log(np.linalg.det(A))  # [L, H]
    assert np.isclose(log_det[0, 0], np.log(0.1))
    np.testing.assert_allclose(llm_check.llm_check_scores(one)[0], (log_det / 4).sum(axis=1), rtol=1e-6)
    middle = one.layers.index(n_layers // 2)
    np.testing.assert_allclose(llm_check.llm_check_polygraph_scores(one)[0, 0], log_det[middle].mean(), rtol=1e-6)


def test_llm_check_over_the_whole_sequence_is_not_recorded_in_older_runs(tmp_path):
    older = write_synthetic_run(tmp_path / "older", benchmark="facts", n_questions=6, prompt_diagonal=False)
    a = load_answers([older])[0]
    assert a.prompt_log_diag is None
    detectors = answer_detectors(a)
    assert "llm_check_answer_rows" in detectors  # the answer's rows are in every run
    assert "llm_check" not in detectors and "llm_check_polygraph" not in detectors
    with pytest.raises(ValueError, match="did not record"):
        llm_check.llm_check_scores(a)
    # a newer run stores it per answer, float64, as recorded; mixed with an older one, it is left out
    newer = write_synthetic_run(tmp_path / "newer", benchmark="facts", n_questions=6)
    b = load_answers([newer])[0]
    assert b.prompt_log_diag.shape == (6, len(b.layers), b.n_heads) and b.prompt_log_diag.dtype == np.float64
    assert (b.prompt_diag_rows == 39).all() and "llm_check" in answer_detectors(b)
    assert load_answers([older, newer])[0].prompt_log_diag is None


