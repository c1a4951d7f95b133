"""The confidence instrument: metric definitions, planted signals, chance under shuffled labels, question-grouped
folds, the instrument directory, refusal of another model, live scores equal to offline scores, the CLI."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from attentropy import load_run
from attentropy import instrument as ins
from attentropy.answers import answers_from_generations, load_answers
from attentropy.detectors import ANSWER_DETECTORS
from attentropy.detectors.fitting import fit_fixed
from attentropy.evaluation import cross_validate, evaluate, leave_one_out, outer_splits
from attentropy.detectors.anchored import AnchoredModel
from attentropy.detectors.instrument import RoutedModel
from attentropy.features import feature_names
from attentropy.probe import LinearProbe, fit_probe, inner_splits
from attentropy.scoring import restates_question
from attentropy.selective import choose_threshold, selective_outcome
from attentropy.token_comparisons import token_types
from attentropy.cli import main
from synthetic import write_synthetic_run

def planted_answers(tmp_path, n=80, seed=0, kinds=None, **kw):
    labels = ["incorrect" if i % 2 else "correct" for i in range(n)]
    path = write_synthetic_run(tmp_path / f"facts{seed}", benchmark="facts", labels=labels, n_questions=n,
                               seed=seed, kinds=kinds, **kw)
    return path, load_answers([path])[0]


def test_a_planted_head_is_found_and_ranked_first(tmp_path):
    _, a = planted_answers(tmp_path, planted=(2, 1), shift=1.0)
    rows = np.arange(len(a.answers))
    cv = cross_validate(a, rows, detectors={k: ANSWER_DETECTORS[k] for k in ("instrument", "shuffled")})
    y = a.answers.y.to_numpy()
    assert roc_auc_score(y, cv.answer.instrument) > 0.9  # out of fold
    models, _ = ins.fit_final(a)
    names = feature_names(a.layers, a.n_heads)
    assert names[int(np.argmax(np.abs(models["factual"].dense.coef)))] == "entropy_norm[L2H1]"


def test_shuffled_labels_and_no_signal_give_chance(tmp_path):
    path, a = planted_answers(tmp_path, n=120)  # nothing planted
    rows, _ = evaluate(a, "factual", n_boot=200)
    auc = rows.query("evaluation == 'in_distribution' and metric == 'auroc'").set_index("method")
    for method in ("instrument", "shuffled"):
        assert auc.loc[method, "lo"] < 0.5 < auc.loc[method, "hi"], method
    _, a = planted_answers(tmp_path, n=120, seed=1, planted=(0, 0), shift=1.0)
    rows, _ = evaluate(a, "factual", n_boot=200)
    auc = rows.query("evaluation == 'in_distribution' and metric == 'auroc'").set_index("method")
    assert auc.loc["instrument", "lo"] > 0.8 and auc.loc["shuffled", "lo"] < 0.5 < auc.loc["shuffled", "hi"]


def test_no_question_is_in_two_folds(tmp_path):
    # the same questions answered in two runs (e.g. two sampling seeds): one group per question across runs
    first = write_synthetic_run(tmp_path / "a", benchmark="facts", n_questions=60, seed=0)
    second = write_synthetic_run(tmp_path / "b", benchmark="facts", n_questions=60, seed=1)
    a, infos, _ = load_answers([first, second])
    assert len(a.answers) == 120 and a.answers.group.nunique() == 60
    rows = np.arange(len(a.answers))
    fold = outer_splits(a, rows)
    assert a.answers.assign(fold=fold).groupby("group").fold.nunique().max() == 1
    for train, test in inner_splits(a.answers.y.to_numpy(), a.answers.group.to_numpy()):
        assert not set(a.answers.group.iloc[train]) & set(a.answers.group.iloc[test])
    assert infos[0]["fingerprint"] != infos[1]["fingerprint"]


def test_leave_one_kind_out_scores_each_kind_with_models_fitted_on_the_others(tmp_path):
    kinds = [["k1", "k2", "k3"][i % 3] for i in range(90)]
    _, a = planted_answers(tmp_path, n=90, kinds=kinds, planted=(1, 1), shift=1.0)
    seen = []

    def spy(score, y, groups=None, seed=0):
        seen.append(set(groups))
        return fit_fixed(score, y, groups, seed)

    spied = dataclasses.replace(ANSWER_DETECTORS["mean_logprob"], fit=spy)
    out = leave_one_out(a, np.arange(90), detectors={"mean_logprob": spied})
    assert out.notna().all().all() and len(seen) == 3
    groups_of = a.answers.groupby("kind").group.agg(set)
    for kind, trained_on in zip(sorted(groups_of.index), seen):
        assert not trained_on & groups_of[kind]
    # held-out kinds fitted at once in two processes: the same confidences
    detectors = {k: ANSWER_DETECTORS[k] for k in ("instrument", "rauq", "head_entropy", "mean_logprob")}
    one_by_one = leave_one_out(a, np.arange(90), detectors=detectors)
    pd.testing.assert_frame_equal(leave_one_out(a, np.arange(90), detectors=detectors, jobs=2), one_by_one)
    assert one_by_one.notna().all().all()


def test_folds_fitted_at_once_give_the_same_evaluation(tmp_path):
    path = write_synthetic_run(tmp_path / "arith", benchmark="arith", n_questions=60, planted=(1, 1), shift=0.8,
                               wrong_moment_shift=0.8)
    a = load_answers([path])[0]
    detectors = {k: ANSWER_DETECTORS[k] for k in ("instrument", "instrument_anchored", "rauq", "logit_probe")}
    rows = np.arange(len(a.answers))
    serial, parallel = (cross_validate(a, rows, detectors=detectors, jobs=jobs) for jobs in (1, 2))
    for part in ("answer", "selective", "token"):
        pd.testing.assert_frame_equal(getattr(parallel, part), getattr(serial, part))
    for name in serial.prefix:
        np.testing.assert_array_equal(parallel.prefix[name], serial.prefix[name])
    assert parallel.details == serial.details and serial.token.notna().all().all()


def test_selective_answering_keeps_not_attempted_and_picks_the_best_training_threshold():
    labels = np.array(["correct", "correct", "incorrect", "incorrect", "not_attempted"])
    conf = np.array([0.9, 0.6, 0.55, 0.1, 0.95])
    out = selective_outcome(conf, labels, 0.5)
    assert out["coverage"] == pytest.approx(3 / 5) and out["correct"] == pytest.approx(2 / 5)
    assert out["correct_given_attempted"] == pytest.approx(2 / 3)
    assert choose_threshold(conf, labels) == pytest.approx(0.6)  # drops both incorrect answers, keeps both correct
    # answering everything: correct 2 / 5, correct given attempted 2 / 4 (the abstention stays one): F = 4 / 9
    assert selective_outcome(conf, labels, 0.0)["f_score"] == pytest.approx(4 / 9)


def test_token_types_digits_and_results():
    tokens = pd.Series(["One", " of", " ", "1", "3", " bags", " is", " 4", " *", " ", "2", " =", " ", "8", ".",
                        " 1", "0", "%", "=", "5", " apples"])
    digits, results = token_types(tokens)
    assert [t for t, d in zip(tokens, digits) if d] == ["1", "3", " 4", "2", "8", " 1", "0", "5"]
    assert [t for t, r in zip(tokens, results) if r] == ["8", "5"]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """An instrument fitted by the command line on two synthetic runs (factual with kinds, math with wrong
    moments)."""
    root = tmp_path_factory.mktemp("instrument")
    kinds = [["capital", "element", "city"][(i // 2) % 3] for i in range(60)]  # both labels in every kind
    write_synthetic_run(root / "facts", benchmark="facts", n_questions=60, kinds=kinds, planted=(1, 2), seed=1)
    write_synthetic_run(root / "arith", n_questions=60, planted=(2, 1), wrong_moment_shift=1.5, seed=2)
    assert main(["fit", str(root / "facts"), str(root / "arith"), "--out", str(root / "probe"), "--n-boot", "50",
                 "--transfer", str(root / "facts"), "--quiet"]) == 0
    return root


def test_the_instrument_directory_round_trips(probe, capsys):
    out = probe / "probe"
    # fitting again on the same runs, labels and settings changes nothing
    written = (out / "arrays.npz").stat().st_mtime_ns
    assert main(["fit", str(probe / "facts"), str(probe / "arith"), "--out", str(out), "--n-boot", "50",
                 "--transfer", str(probe / "facts")]) == 0
    assert "up to date" in capsys.readouterr().out and (out / "arrays.npz").stat().st_mtime_ns == written
    for name in ("probe.json", "arrays.npz", "evaluation.json", "evaluation.csv", "predictions.parquet",
                 "token_predictions.parquet"):
        assert (out / name).stat().st_size > 0, name
    meta = json.loads((out / "probe.json").read_text())
    assert meta["model"]["name"] == "synthetic" and meta["model"]["layers"] == [0, 1, 2, 3]
    assert [r["benchmark"] for r in meta["training_runs"]] == ["facts", "arith"]
    assert meta["answer_models"] == ["factual", "math"] and meta["token_model"] is True
    with np.load(out / "arrays.npz", allow_pickle=False) as z:  # no pickle anywhere
        assert all(z[k].dtype != object for k in z.files)
    loaded = ins.load_instrument(out)
    a, _, _ = load_answers([probe / "arith"])
    again = ins.Instrument(loaded.identity, loaded.answer_models, loaded.token_model, {})
    again.save(probe / "copy")
    np.testing.assert_allclose(ins.load_instrument(probe / "copy").score(a).prefix_confidence,
                               loaded.score(a).prefix_confidence)
    ev = pd.read_csv(out / "evaluation.csv")
    assert {"in_distribution", "within_kind", "stratified", "leave_one_kind_out", "selective", "prefix",
            "transfer", "token:type_matched_digits"} <= set(ev.evaluation)
    # every baseline on the same answers as the instrument, with its paired difference
    ind = ev[(ev.task == "factual") & (ev.evaluation == "in_distribution")]
    # the synthetic runs keep no hidden states (they record the prompt rows' log-diagonal)
    stored = {name for name, d in ANSWER_DETECTORS.items() if set(d.needs) <= {"prompt_diagonal"}}
    assert set(ind.method) == stored
    assert ind.groupby("method").n_positive.nunique().max() == 1
    assert set(ind[ind.metric == "auroc_gain_of_instrument"].method) == stored - {"instrument"}


def test_score_a_run_and_read_it_back(probe):
    with pytest.warns(UserWarning, match="in-sample"):  # a training run: its scores are in-sample
        assert main(["score", "--probe", str(probe / "probe"), str(probe / "arith")]) == 0
    run = load_run(probe / "arith")
    assert {"confidence", "prefix_confidence"} <= set(run.tokens) and run.tokens.confidence.between(0, 1).all()
    last = run.tokens.groupby("question_id", sort=False).prefix_confidence.last()
    np.testing.assert_allclose(run.samples.set_index("question_id").answer_confidence.loc[last.index], last)
    stamp = json.loads((probe / "arith" / "confidence" / "probe.json").read_text())
    assert stamp["fingerprint"] == ins.load_instrument(probe / "probe").fingerprint
    # the wrong moments (planted) get the lowest token confidence
    assert roc_auc_score(run.tokens.in_error, -run.tokens.confidence) > 0.9


def test_another_model_or_layout_is_refused(probe, tmp_path, capsys):
    other = write_synthetic_run(tmp_path / "other", benchmark="facts", n_questions=10, model="another-model")
    assert main(["score", "--probe", str(probe / "probe"), str(other)]) == 2
    assert "another model" in capsys.readouterr().err
    wider = write_synthetic_run(tmp_path / "wider", benchmark="facts", n_questions=10, n_layers=5)
    with pytest.raises(ins.InstrumentError, match="layers"):
        ins.score_run(ins.load_instrument(probe / "probe"), wider)
    with pytest.raises(ins.InstrumentError, match="one model"):
        load_answers([probe / "facts", other])


def random_instrument(model, info, seed=0) -> ins.Instrument:
    """An instrument with random weights for a real model's identity (the fitting is not what these tests test)."""
    from attentropy.attention import recorded_layers

    layers, heads = recorded_layers(model), model.config.get_text_config().num_attention_heads
    rng = np.random.default_rng(seed)

    def probe(n):
        return LinearProbe(np.zeros(n), np.ones(n), rng.normal(0, 1, n) / np.sqrt(n), 0.1, (1.0, 0.0), 1.0)

    def answer_model():  # kinds of the facts suite's first questions: some answers routed to each model
        anchored = AnchoredModel(int(rng.integers(3)), np.array([0, 5]), np.zeros(3), np.ones(3), rng.normal(0, 1, 3),
                                 0.1, (-0.5, 0.5), (1.0, 0.0))
        return RoutedModel(probe(n_answer), anchored, ["country_capital", "element_name"])

    n_answer = len(feature_names(layers, heads))
    n_token = len(feature_names(layers, heads, "token"))
    identity = {"name": info.name, "source": info.source, "revision": info.revision,
                "architecture": info.architecture, "layers": layers, "n_heads": heads}
    return ins.Instrument(identity, {"factual": answer_model(), "math": answer_model()}, probe(n_token),
                          {"created": "test"})


def test_live_scores_equal_offline_scores(tmp_path, tiny_model_dir):
    from attentropy.model import load_model
    from attentropy.run import run_benchmark

    model, _, info = load_model(tiny_model_dir)
    random_instrument(model, info).save(tmp_path / "probe")
    for attn_dtype in ("float32", "float16"):
        out = tmp_path / f"run-{attn_dtype}"
        run_benchmark("facts", out, model=tiny_model_dir, limit=5, batch_size=2, max_new_tokens=6,
                      attn_dtype=attn_dtype, probe=tmp_path / "probe", progress=False)
        live = load_run(out).tokens[["question_id", "pos", "confidence", "prefix_confidence"]]
        assert live.confidence.notna().all() and live.prefix_confidence.notna().all()
        offline = ins.score_run(ins.load_instrument(tmp_path / "probe"), out)
        np.testing.assert_allclose(live.prefix_confidence, offline.prefix_confidence, atol=1e-6)
        np.testing.assert_allclose(live.confidence, offline.confidence, atol=1e-6)
    # another instrument on a run scored live is refused rather than mixed
    random_instrument(model, info, seed=1).save(tmp_path / "other")
    with pytest.raises(ins.InstrumentError, match="another instrument"):
        run_benchmark("facts", tmp_path / "run-float32", model=tiny_model_dir, limit=7, batch_size=2,
                      max_new_tokens=6, probe=tmp_path / "other", progress=False)


def test_score_one_question_on_the_embedded_model(tmp_path, embedded, capsys):
    model, tokenizer, info = embedded
    instrument = random_instrument(model, info)
    instrument.save(tmp_path / "probe")
    from attentropy.data import Question

    from attentropy.capture import capture
    from attentropy.generate import Generation, generate

    question = Question("q-0", "facts", "What is the capital of France?", "Paris")
    generated, _, answer = ins.score_answer(instrument, model, tokenizer, info, question, max_new_tokens=12)
    # the same ids through the teacher-forced capture (the path of a given answer): the same scores
    gen = generate(model, tokenizer, [question], max_new_tokens=12, record=True)[0][0]
    assert gen.completion == answer
    forced = Generation(question, gen.prompt_ids, gen.completion_ids, answer, "given",
                        capture(model, [gen.prompt_ids], [gen.completion_ids])[0])
    layers, heads = instrument.identity["layers"], instrument.identity["n_heads"]
    teacher = instrument.score(answers_from_generations([forced], layers, heads))
    np.testing.assert_allclose(teacher.prefix_confidence, generated.prefix_confidence, atol=1e-4)
    np.testing.assert_allclose(teacher.confidence, generated.confidence, atol=1e-4)
    assert main(["score", "--probe", str(tmp_path / "probe"), "--model", "smollm2-135m",
                 "What is the capital of France?", "--answer", "The capital of France is Paris.", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "".join(t["token"] for t in printed["tokens"]).startswith("The capital of France is Paris.")
    assert printed["answer_confidence"] == pytest.approx(printed["tokens"][-1]["prefix_confidence"])
    assert main(["score", "--probe", str(tmp_path / "probe"), "--model", "smollm2-135m", "What is 2 + 3?",
                 "--benchmark", "arith", "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert "\x1b[48;2;" in text and "answer confidence" in text


def test_tokens_that_restate_the_question_are_not_scored():
    texts = ["The", " capital", " of", " Peru", " is", " Lima", ".", " 3", " *", " 4", " =", " 12"]
    restating = restates_question(texts, "What is the capital of Peru? And 3 * 4?")
    assert [t for t, r in zip(texts, restating) if not r] == [" Lima", " 12"]


def test_the_probe_standardises_with_numpys_mean_and_std():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 9)) * rng.uniform(0.1, 50, 9) + rng.normal(size=9) * 20
    X[:, 4] = 3.0  # a constant column: scale 1
    y = (X[:, 0] + rng.normal(size=120) > X[:, 0].mean()).astype(int)
    probe, _ = fit_probe(X, y, np.arange(120))
    scale = X.std(0)
    scale[4] = 1.0
    np.testing.assert_array_equal(probe.mean, X.mean(0))
    np.testing.assert_array_equal(probe.scale, scale)


def test_column_std_about_a_mean_is_numpys_std():
    from attentropy.probe import column_std

    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 7)) * rng.uniform(0.1, 50, 7) + rng.normal(size=7) * 20
    np.testing.assert_array_equal(column_std(X, X.mean(0)), X.std(0))
    np.testing.assert_array_equal(column_std(X - X.mean(0)), X.std(0))  # centred already
