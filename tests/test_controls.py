"""Controlled contrasts: a planted confound (question kind, answer length, position) makes a raw contrast
significant and its control removes it; a planted true effect survives every control.

A confound-only run has no effect to find, so its controlled test is significant with probability about alpha
(5 %), and in all cells at once: every cell of an answer shares that answer's offset, as in real runs. One run
could therefore fail by chance; each confound is planted in four runs (seeds 0-3) and the control must leave no
significant cell in at least three (by chance two or more of four at 5 % each: 1.4 %)."""

from collections import Counter

import numpy as np
import pandas as pd

from attentropy import load_run
from attentropy.contrast_controls import position_effects, position_fit, window_differences
from attentropy.contrasts import analyze_run
from synthetic import write_synthetic_run

SEEDS = range(4)


def significant(a, contrast, control, stat="entropy", aggregation="mean", level="head"):
    rows = a.comparisons.query("contrast == @contrast and stat == @stat and aggregation == @aggregation and "
                               "level == @level and control == @control")
    assert len(rows), f"no {control} rows for {contrast}"
    return int(rows.significant.sum())


def check_confound(make_run, contrast, control, aggregation="mean"):
    raw, controlled = [], []
    for seed in SEEDS:
        a = analyze_run(load_run(make_run(seed)), n_boot=100, stats=("entropy",))
        raw.append(significant(a, contrast, "none", aggregation=aggregation))
        controlled.append(significant(a, contrast, control, aggregation=aggregation))
    assert min(raw) >= 6, raw  # of 12 cells, in every run: the confound looks like an effect
    assert sum(n > 0 for n in controlled) <= 1, controlled


def test_a_kind_confound_vanishes_inside_kinds(tmp_path):
    def make_run(seed):
        rng = np.random.default_rng(seed)
        kinds = ["capital" if i % 2 else "element" for i in range(160)]
        # capitals are mostly answered right, elements mostly wrong, and element answers attend with more entropy
        labels = ["correct" if rng.random() < (0.8 if k == "capital" else 0.2) else "incorrect" for k in kinds]
        return write_synthetic_run(tmp_path / f"run{seed}", benchmark="facts", labels=labels, n_questions=160,
                                   kinds=kinds, kind_shift={"element": 0.6}, seed=seed)
    check_confound(make_run, "incorrect_vs_correct", "stratified")


def test_a_length_confound_vanishes_between_answers_of_a_length(tmp_path):
    labels = ["incorrect" if i % 2 else "correct" for i in range(160)]
    # wrong answers are longer; attention entropy grows with position (0.5 ln K, K from 5 keys), not with being wrong
    check_confound(lambda seed: write_synthetic_run(
        tmp_path / f"run{seed}", benchmark="facts", labels=labels, n_questions=160, prompt_len=5, seed=seed,
        n_tokens_by_label={"correct": (6, 40), "incorrect": (20, 70)}), "incorrect_vs_correct", "length_matched")


def test_a_position_confound_of_the_wrong_moment_vanishes_against_correct_answers(tmp_path):
    # the wrong moment sits late; tokens after it are later still, so their entropy is higher in any answer
    check_confound(lambda seed: write_synthetic_run(tmp_path / f"run{seed}", n_questions=120, late_moment=True,
                                                    n_tokens=(30, 60), seed=seed),
                   "after_vs_before", "correct_baseline", aggregation="tokens")


def test_a_planted_effect_survives_every_control(tmp_path):
    kinds = ["capital" if i % 3 else "element" for i in range(120)]
    run = load_run(write_synthetic_run(tmp_path / "facts", benchmark="facts", n_questions=120, kinds=kinds,
                                       planted=(2, 1), shift=1.0))
    a = analyze_run(run, n_boot=100, stats=("entropy",))
    for control in ("none", "stratified", "length_matched"):
        rows = a.comparisons.query("contrast == 'incorrect_vs_correct' and stat == 'entropy' and aggregation == "
                                   "'mean' and level == 'head' and control == @control")
        assert rows.loc[rows.significant, ["layer", "head"]].values.tolist() == [[2, 1]], control
    arith = load_run(write_synthetic_run(tmp_path / "arith", n_questions=120, wrong_moment_shift=1.5))
    a = analyze_run(arith, n_boot=100, stats=("entropy",))
    for contrast in ("wrong_moment", "wrong_moment_numbers"):
        for control in ("correct_baseline", "position_adjusted"):
            assert significant(a, contrast, control, aggregation="tokens", level="layer") == 4, (contrast, control)


def best_controlled_shares(a, stat):
    """Contrast -> the smallest share of layer x head cells significant at FDR 5 % among its controlled versions,
    at the aggregation the report's findings use (the answer mean; the tokens)."""
    rows = a.comparisons.query("stat == @stat and level == 'head' and aggregation in ('mean', 'tokens') and "
                               "control != 'none'")
    return rows.groupby(["contrast", "control"]).significant.mean().groupby("contrast").min()


def test_a_position_only_effect_vanishes_under_the_best_control_of_every_contrast(tmp_path):
    # entropy in every cell: a function of the token's position alone, plus noise; incorrect answers are longer and
    # their wrong moments anywhere in them. The digit contrast's correct baseline keeps most cells significant here
    failed = Counter()
    for seed in SEEDS:
        run = write_synthetic_run(tmp_path / f"run{seed}", n_questions=120, n_heads=6, seed=seed,
                                  entropy_of_position=np.log1p,
                                  n_tokens_by_label={"correct": (15, 40), "incorrect": (30, 70)})
        a = analyze_run(load_run(run), n_boot=100, stats=("entropy", "entropy_norm"))
        contrasts = {c.key for c in a.contrasts}
        assert len(contrasts) == 4 and all(c.status == "ok" for c in a.contrasts)
        for stat in ("entropy", "entropy_norm"):
            shares = best_controlled_shares(a, stat)
            assert set(shares.index) == contrasts, stat  # every contrast has a controlled version
            failed.update((stat, key) for key, share in shares.items() if share > 0.05)
    assert all(n <= 1 for n in failed.values()), failed


def test_the_position_fit_recovers_any_function_of_position_and_type_beside_answer_offsets():
    """Values = the answer's offset + any function of (position, has a digit), no noise: less the fitted bin
    effects, every token of an answer is left with one value (its offset, up to a constant), the tokens outside the
    reference included; a bin that no reference token has is not fitted, nor is a template token."""
    rng = np.random.default_rng(0)
    lengths = [5, 9, 14, 7]
    tok = pd.DataFrame({"question_id": np.repeat(np.arange(4), lengths),
                        "pos": np.concatenate([np.arange(n) for n in lengths])})
    digit = ((tok.pos + (tok.question_id == 3)) % 2 == 0).to_numpy()  # answer 3: the other type at each position
    tok["token"] = np.where(digit, " 7", " word")
    effect = rng.normal(0, 1, (2, 14))  # an arbitrary effect per (type, position)
    offset = rng.normal(0, 3, 4)
    values = (offset[tok.question_id] + effect[digit.astype(int), tok.pos])[:, None] * np.array([1.0, -2.0])
    reference = ~((tok.question_id == 2) & (tok.pos >= 6)).to_numpy()  # as if answer 2 went wrong at 6
    template = np.zeros(len(tok), bool)
    template[0] = True
    fit = position_fit(tok, reference, template)
    fitted = fit.bins >= 0
    known = set(zip(tok.pos[reference], digit[reference]))
    assert fitted.tolist() == [(p, d) in known and not t for p, d, t in zip(tok.pos, digit, template)]
    assert (fitted & ~reference).sum() == 3 and (~fitted & ~reference).sum() == 5  # fitted on other answers, or not
    residual = values[fitted] - position_effects(values, fit)[fit.bins[fitted]]
    for q in range(4):
        mine = residual[tok.question_id.to_numpy()[fitted] == q]
        assert np.allclose(mine, mine[0]), q


def test_window_differences_are_those_of_each_windows_means():
    """All the windows at once (one sparse product per side) give each window's numpy means in the values' own
    precision: bit for bit for per-cell values (numpy sums rows in order, as the product does), within rounding for
    a logit statistic's one value per token (numpy sums a 1-D array pairwise)."""
    rng = np.random.default_rng(5)
    windows = [(np.sort(rng.choice(200, rng.integers(1, 4), replace=False)),
                np.sort(rng.choice(200, rng.integers(1, 17), replace=False))) for _ in range(40)]
    for values in (rng.normal(size=(200, 3, 5)).astype(np.float32), rng.normal(size=200)):
        by_hand = np.stack([values[a].mean(axis=0) - values[b].mean(axis=0) for a, b in windows]).astype(float)
        if values.ndim > 1:
            assert np.array_equal(window_differences(values, windows), by_hand)
        np.testing.assert_allclose(window_differences(values, windows), by_hand, rtol=1e-12, atol=1e-15)
    assert window_differences(np.zeros((5, 2)), []).shape == (0, 2)
