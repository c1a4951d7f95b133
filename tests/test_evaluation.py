"""The evaluation's fairness: folds grouped by content, a row-order-free shuffled control, selective answering with
paired gains, headlines against every baseline."""

import numpy as np
import pandas as pd

from attentropy.answers import content_groups, load_answers, near_duplicates
from attentropy.detectors import ANSWER_DETECTORS
from attentropy.detectors.fitting import shuffled_labels
from attentropy.evaluation import evaluate, headlines, held_out_comparators, outer_splits
from synthetic import write_synthetic_run


def test_near_duplicates_share_a_group():
    questions = np.array(["arith\nAnna has 3 apples...", "arith\nTom has 3 pens...", "arith\nTom has 4 pens...",
                          "facts\nCapital of Peru?", "facts\nWhat is the capital of Peru?", "facts\nCapital of Chile?"])
    contents = np.array(["arith\n3+2=5", "arith\n3+2=5", "arith\n4+2=6", "", "", ""])
    golds = np.array(["", "", "", "facts\ncapital\nlima", "facts\ncapital\nlima", "facts\ncapital\nsantiago"])
    groups = content_groups(questions, contents, golds)
    assert groups[0] == groups[1] != groups[2]  # the same computation under other names
    assert groups[3] == groups[4] != groups[5]  # the same gold answer of one kind
    frame = pd.DataFrame({"group": groups, "question": questions, "question_id": [f"q{i}" for i in range(6)]})
    assert near_duplicates(frame) == 4


def test_folds_keep_near_duplicates_together(tmp_path):
    path = write_synthetic_run(tmp_path / "arith", n_questions=60, seed=3)
    a = load_answers([path])[0]
    fold = outer_splits(a, np.arange(len(a.answers)))
    assert a.answers.assign(fold=fold).groupby("group").fold.nunique().max() == 1


def test_the_shuffled_control_does_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    groups = np.array([f"q{i // 2}" for i in range(40)])
    labels = shuffled_labels(y, groups, seed=7)
    order = rng.permutation(40)
    again = shuffled_labels(y[order], groups[order], seed=7)
    # the same permuted label per (question, label) whatever the order the rows come in
    assert sorted(zip(groups, y, labels)) == sorted(zip(groups[order], y[order], again))
    assert not np.array_equal(labels, y)


def test_selective_answering_and_headlines_cover_every_method(tmp_path):
    labels = ["incorrect" if i % 2 else "correct" for i in range(60)]
    labels[::7] = ["not_attempted"] * len(labels[::7])
    path = write_synthetic_run(tmp_path / "facts", benchmark="facts", labels=labels, n_questions=60,
                               planted=(1, 1), shift=1.0)
    a = load_answers([path])[0]
    rows, predictions = evaluate(a, "factual", n_boot=50)
    selective = rows[rows.evaluation == "selective"]
    methods = set(predictions["answers"].filter(like="confidence:").columns.str[11:]) - {"shuffled"}
    assert set(selective[selective.metric == "f_score"].method) == methods | {"answer_everything"}
    assert set(selective[selective.metric == "f_score_gain_over_answering_everything"].method) == methods
    gains = selective[selective.metric == "f_score_gain_of_instrument"].set_index("method")
    f = selective[selective.metric == "f_score"].set_index("method").value
    assert np.isclose(gains.loc["mean_logprob", "value"], f["instrument"] - f["mean_logprob"])
    pools = {h["pool"]: h for h in headlines(rows)}
    auc = rows[(rows.evaluation == "in_distribution") & (rows.metric == "auroc")].set_index("method").value
    every = pools["every baseline and control"]
    variants = [m for m in auc.index if ANSWER_DETECTORS[m].role == "instrument"]
    assert every["best"] not in variants + ["shuffled"]
    assert auc[every["best"]] == auc.drop(variants + ["shuffled"]).max()
    assert pools["the training-free scores"]["best"] in ("mean_logprob", "min_logprob", "logit_entropy",
                                                         "logit_varentropy", "rauq", "rauq_fixed_heads",
                                                         "llm_check_polygraph", "anchor_chosen")


def test_a_held_out_mean_is_compared_with_the_score_chosen_on_training_folds_then_the_best_after_the_fact():
    means = pd.DataFrame({"value": [0.60, 0.62, 0.65, 0.70, 0.90]},
                         index=["instrument", "anchor_chosen", "mean_logprob", "rauq", "hidden"])
    assert held_out_comparators(means) == [("anchor_chosen", "chosen on the training folds"),
                                           ("rauq", "best on the held-out answers, chosen after the fact")]
    assert held_out_comparators(means.drop(index="anchor_chosen"))[0][0] == "rauq"  # runs fitted before it existed


def test_leave_one_source_out_holds_out_every_kind_of_a_source(tmp_path):
    kinds = [["capital", "city", "element", "number"][i % 4] for i in range(120)]
    sources = [{"capital": "atlas", "city": "atlas", "element": "table", "number": "table"}[k] for k in kinds]
    labels = ["incorrect" if (i // 4) % 2 else "correct" for i in range(120)]
    path = write_synthetic_run(tmp_path / "facts", benchmark="facts", labels=labels, n_questions=120, kinds=kinds,
                               sources=sources, planted=(1, 1), shift=1.0)
    a = load_answers([path])[0]
    assert sorted(a.answers.source.unique()) == ["atlas", "table"]
    rows, _ = evaluate(a, "factual", n_boot=20)
    loso = rows[(rows.evaluation == "leave_one_source_out") & (rows.metric == "auroc")]
    assert set(loso.subset) == {"atlas", "table"}
    assert set(loso.method) == set(rows[rows.evaluation == "leave_one_kind_out"].method)
    for source, r in loso.groupby("subset"):  # each source's row counts every labelled answer of its kinds
        assert int(r.n_positive.iloc[0] + r.n_negative.iloc[0]) == (a.answers.source == source).sum()

