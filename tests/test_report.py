"""The study's analysis on graded runs (planted signals, shuffled labels, small groups) and the HTML report,
checked in a real headless Chromium (Debian's chromium + chromedriver, installed by scripts/setup.sh)."""

import io
import json
import re

import numpy as np
import pandas as pd
import pytest

from attentropy import load_run
from attentropy.cli import main
from attentropy.contrasts import analyze_run
from attentropy.schema import ATTN_STATS
from synthetic import write_synthetic_run


def significant_cells(a, contrast, stat="entropy", aggregation="mean", level="head", control="none"):
    rows = a.comparisons.query("contrast == @contrast and stat == @stat and aggregation == @aggregation "
                               "and level == @level and control == @control")
    return rows.loc[rows.significant, ["layer", "head"]].values.tolist(), rows


def test_the_planted_head_is_found_in_a_run(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "run", planted=(2, 1), shift=1.0))
    a = analyze_run(run, n_boot=200)
    found, rows = significant_cells(a, "incorrect_vs_correct")
    assert found == [[2, 1]]
    cell = rows[(rows.layer == 2) & (rows["head"] == 1)].iloc[0]
    assert cell.auroc > 0.7 and cell.auroc_lo > 0.5 and cell.n_positive == 30 and cell.n_negative == 30
    # per layer (mean over heads) the planted head lifts layer 2 alone; entropy / ln K finds the same head
    assert significant_cells(a, "incorrect_vs_correct", level="layer")[0] == [[2, -1]]
    assert significant_cells(a, "incorrect_vs_correct", stat="entropy_norm")[0] == [[2, 1]]


def test_shuffled_labels_give_no_discoveries(tmp_path):
    labels = np.array(["incorrect" if i % 2 else "correct" for i in range(60)])
    runs_with_a_discovery = 0
    for seed in range(10):
        shuffled = np.random.default_rng(seed).permutation(labels)
        run = load_run(write_synthetic_run(tmp_path / f"run{seed}", labels=shuffled, planted=None, seed=seed))
        a = analyze_run(run, n_boot=20, stats=("entropy",))
        runs_with_a_discovery += bool(significant_cells(a, "incorrect_vs_correct")[0])
    assert runs_with_a_discovery <= 2  # BH at 5 % over the 12 cells: P(any discovery) <= 0.05 under the null


def test_wrong_moment_position_matched_and_normalised(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "run", wrong_moment_shift=1.5))
    a = analyze_run(run, n_boot=100, stats=("entropy", "entropy_norm"))
    moment = next(c for c in a.contrasts if c.key == "wrong_moment")
    assert moment.status == "ok" and moment.n_positive == 30
    for stat in ("entropy", "entropy_norm"):
        found, rows = significant_cells(a, "wrong_moment", stat=stat, aggregation="tokens", level="layer")
        assert len(found) == 4 and (rows.auroc > 0.8).all()
    # the same with token type held fixed: span tokens with a digit vs the other tokens with a digit
    by_type = next(c for c in a.contrasts if c.key == "wrong_moment_numbers")
    assert by_type.status == "ok" and 10 <= by_type.n_positive < 30
    found, rows = significant_cells(a, "wrong_moment_numbers", stat="entropy_norm", aggregation="tokens",
                                    level="layer")
    assert len(found) == 4 and (rows.auroc > 0.8).all()
    # control tokens are the span's neighbours (within 8 positions) in the same answers, not the whole answer
    nearby = a.tokens[a.tokens.question_id.isin(a.samples.question_id[a.samples.label == "incorrect"])]
    assert nearby.in_error.sum() == 90


def test_analysis_layer_by_layer_equals_the_analysis_of_everything_at_once(tmp_path, monkeypatch):
    """`read_bytes` small enough for one layer per read: the same tables (BH over all cells, not per layer), within
    float32 rounding (means of float32 values summed in another order); every statistic read once per layer,
    entropy / ln K from entropy's read."""
    run = load_run(write_synthetic_run(tmp_path / "run", n_layers=5, planted=(3, 1), wrong_moment_shift=1.0))
    whole = analyze_run(run, n_boot=50)
    reads = []
    real = type(run).attn
    monkeypatch.setattr(type(run), "attn", lambda self, stat, layers=None, **kw: reads.append((stat, *layers)) or
                        real(self, stat, layers, **kw))
    by_layer = analyze_run(run, n_boot=50, read_bytes=1)
    assert sorted(reads) == sorted((stat, layer) for stat in ATTN_STATS for layer in run.layers)
    pd.testing.assert_frame_equal(whole.comparisons, by_layer.comparisons, rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(whole.profiles, by_layer.profiles)
    for stat, v in whole.layer_means.items():
        assert np.array_equal(v, by_layer.layer_means[stat])
    assert set(whole.comparisons.control) >= {"none", "length_matched", "correct_baseline"}


def test_each_statistic_read_once_and_compared_per_group_equals_the_whole_computation(tmp_path):
    """The shortcuts of `reduce_stats` against the plain computation on all of a statistic's values at once
    (`token_values`, every answer and layer): one read of entropy for entropy and entropy / ln K (divided in place,
    after entropy's comparisons; here two layers of sliding windows), groups of one layer compared on two threads in
    reused scratch arrays and joined with BH over all their cells, an unparsed answer's tokens left out."""
    from attentropy.contrasts import (Design, analysed_answers, answer_controls, build_contrasts,
                                      compare_layer_group, reduce_stats, token_controls)
    from attentropy.statistic_values import token_values
    from attentropy.stats import AnswerGroups, Intervals

    labels = ["incorrect" if i % 3 == 0 else "correct" for i in range(44)] + ["unparsed"]
    path = write_synthetic_run(tmp_path / "run", labels=labels, n_layers=4, planted=(2, 1), wrong_moment_shift=1.0)
    config = json.loads((path / "config.json").read_text())
    config["capture"]["windows"] = [None, 16, None, 8]
    (path / "config.json").write_text(json.dumps(config))
    run = load_run(path)
    answers = analysed_answers(run)
    by_answer, by_token = build_contrasts(answers, "arith", 8)
    live = [t for t in by_token if t.contrast.status != "not_computed"]
    assert live and len(answers.token_rows) < len(run.tokens)
    design = Design(answers, [a for a in by_answer if a.contrast.status != "not_computed"],
                    answer_controls(answers, "arith"), live, token_controls(answers, live, 8),
                    AnswerGroups(answers.token_answers, 8))
    stats = ("entropy", "entropy_norm", "varentropy", "logprob")
    intervals = {stat: Intervals() for stat in stats}
    reduced = reduce_stats(run, stats, [[layer] for layer in run.layers], design, intervals, workers=2)
    for stat in stats:
        whole = compare_layer_group(token_values(run, stat)[answers.token_rows], stat, design, intervals[stat])
        assert list(reduced[stat].comparisons) == list(whole.comparisons)
        for key, c in whole.comparisons.items():
            r = reduced[stat].comparisons[key]
            for name in ("auroc", "cohens_d", "p", "q"):
                np.testing.assert_allclose(getattr(r, name), getattr(c, name), rtol=1e-9, atol=1e-12,
                                           err_msg=f"{stat} {key} {name}")
            for name in ("auroc_ci", "cohens_d_ci"):
                np.testing.assert_allclose(getattr(r, name), getattr(c, name), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(reduced[stat].answer_means, whole.answer_means, rtol=1e-6)
        if whole.layer_mean is not None:
            assert np.array_equal(reduced[stat].layer_mean, whole.layer_mean)


def test_scratch_arrays_are_lent_to_one_task_at_a_time_and_reused():
    from attentropy.statistic_values import Scratch

    scratch = Scratch(2, 12)
    with scratch.array((2, 3)) as a, scratch.array((3, 4)) as b:
        assert a.shape == (2, 3) and b.shape == (3, 4) and not np.shares_memory(a, b)
        a[:], b[:] = 1, 2
    with scratch.array((12,)) as c:
        assert np.shares_memory(c, a) or np.shares_memory(c, b)


def test_small_groups_are_flagged_and_unparsed_answers_excluded(tmp_path):
    labels = ["correct"] * 20 + ["incorrect"] * 4 + ["unparsed"] * 3
    a = analyze_run(load_run(write_synthetic_run(tmp_path / "run", labels=labels, planted=(0, 0))), n_boot=20,
                    stats=("entropy",))
    contrast = next(c for c in a.contrasts if c.key == "incorrect_vs_correct")
    assert contrast.status == "too_small" and (contrast.n_positive, contrast.n_negative) == (4, 20)
    assert a.excluded["unparsed"] == 3 and "unparsed" not in set(a.answers.label)
    labels = ["correct"] * 20 + ["incorrect"] * 1
    a = analyze_run(load_run(write_synthetic_run(tmp_path / "run1", labels=labels)), n_boot=20, stats=("entropy",))
    assert next(c for c in a.contrasts if c.key == "incorrect_vs_correct").status == "not_computed"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Two graded runs side by side: factual (with a group too small to conclude) and math."""
    root = tmp_path_factory.mktemp("report")
    facts_labels = ["correct"] * 16 + ["incorrect"] * 16 + ["not_attempted"] * 4 + ["unparsed"] * 2
    write_synthetic_run(root / "facts", benchmark="facts", labels=facts_labels, planted=(1, 2), seed=1)
    write_synthetic_run(root / "arith", planted=(2, 1), n_questions=40, wrong_moment_shift=1.0, seed=2)
    assert main(["fit", str(root / "facts"), str(root / "arith"), "--out", str(root / "probe"), "--n-boot", "50",
                 "--quiet"]) == 0
    assert main(["report", str(root / "facts"), str(root / "arith"), "--n-boot", "50", "--probe",
                 str(root / "probe"), "--quiet"]) == 0
    return root


def test_report_files_and_text(report):
    html = (report / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # self-contained: nothing fetched
    for run in ("facts", "arith"):
        figures = report / "figures" / run
        pngs = sorted(figures.glob("*.png"))
        assert len(pngs) >= 6
        for png in pngs:  # the numbers behind every figure
            assert png.with_suffix(".csv").stat().st_size > 0
        assert (figures / "comparisons.parquet").exists()
    assert "Too small to conclude" in html  # 4 not_attempted answers
    assert "not computed" not in html or "at least 2 per group" in html
    assert "unparsed 2" in html and "n = 20 incorrect vs 20 correct questions" in html
    assert "smollm2" not in html and "synthetic" in html  # the runs' own config is shown
    # Findings open the report: the planted effects survive their controls, in one table with the raw AUROC
    findings = html[html.index("<h2 id=findings>"):html.index("<h2>Runs")]
    assert html.index("<h2 id=findings>") < html.index("<h2>Contrasts")
    for text in ("length-matched", "vs correct answers", "wrong-moment tokens vs tokens within 8 positions",
                 "hallucinated (incorrect) vs not", "raw AUROC"):
        assert text in findings, text
    comparisons = pd.read_csv(report / "figures" / "arith" / "comparisons.csv")
    assert set(comparisons.control) == {"none", "length_matched", "correct_baseline", "position_adjusted"}
    for control in ("correct_baseline", "position_adjusted"):
        assert set(comparisons.query("control == @control").contrast) == {
            "wrong_moment", "wrong_moment_numbers", "after_vs_before"}, control
    # the instrument's section: its metrics against every baseline, for both tasks, with figures
    section = html[html.index("<h2 id=instrument>"):html.index("<h2>Profiles")]
    for text in ("factual answers: 38", "math answers: 40", "Shuffled-label control", "Δ AUROC of the instrument",
                 "lookback_lens", "rauq", "llm_check", "head_entropy", "kind_logit", "Selective answering",
                 "type-matched", "the best of every baseline and control", "training-free", "token type (control)",
                 "F-score gain over answering everything"):
        assert text in section, text
    # the findings open with the verdict against the strongest baseline
    first_finding = section[section.index("<ul><li>", section.index("<h3>")) + 8:]
    assert first_finding.startswith(("<b>Attention adds nothing measurable", "<b>The instrument is above"))
    # and so does the report: the instrument's verdict per task before everything else
    verdict = html[html.index("<h2 id=verdict>"):html.index("<h2 id=findings>")]
    assert html.index("<h2 id=verdict>") < html.index("<h2 id=findings>") < html.index("<h2 id=instrument>")
    for task in ("factual", "math"):
        item = verdict[verdict.index(f"<li><b>{task}</b>: ") + len(f"<li><b>{task}</b>: "):]
        assert item.startswith(("<b>Attention adds nothing measurable", "<b>The instrument is above")), task
    for name in ("roc", "reliability", "coverage", "prefix"):
        assert (report / "figures" / "instrument" / "factual" / f"{name}.png").exists()
    assert (report / "figures" / "instrument" / "math" / "tokens.csv").exists()


def test_report_of_an_ungraded_run_shows_what_needs_no_labels_and_says_how_to_grade(tmp_path):
    path = write_synthetic_run(tmp_path / "run")
    (path / "grades.parquet").unlink()
    assert main(["report", str(path), "--n-boot", "20", "--quiet"]) == 0
    html = (path / "report.html").read_text()
    assert f"it is not graded yet (<code>attentropy grade {path}</code>)" in html
    assert "AUROC per layer" not in html and "per-layer profiles by label" in html and "token traces" in html


def test_report_in_a_real_browser(report, browser):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get((report / "report.html").as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    assert browser.execute_script("return document.querySelectorAll('img').length") >= 12
    assert browser.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")

    assert browser.execute_script("return document.querySelectorAll('table.metrics').length") >= 4
    # the Findings tables (one column per control) fit a 1,200-pixel window: no sideways scrolling
    size = browser.get_window_size()
    browser.set_window_size(1200, size["height"])
    widths = browser.execute_script("return [...document.querySelectorAll('.findings table')]"
                                    ".map(t => [t.scrollWidth, t.parentElement.clientWidth])")
    browser.set_window_size(size["width"], size["height"])
    assert widths and all(table <= page for table, page in widths), widths
    Select(browser.find_element(By.ID, "run")).select_by_visible_text("arith")
    stats = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "stat")).options]
    assert {"confidence", "prefix_confidence"} <= set(stats)  # the instrument's out-of-fold confidences
    tokens = browser.find_elements(By.CSS_SELECTOR, ".tok")
    assert len(tokens) > 100 and browser.find_elements(By.CSS_SELECTOR, ".tok.err")  # the wrong moment outlined

    def colours():
        return browser.execute_script("return [...document.querySelectorAll('.tok')].map(s => s.style.backgroundColor)")

    before = colours()
    Select(browser.find_element(By.ID, "layer")).select_by_index(3)  # layer 2, which holds the planted head
    after = colours()
    assert len(set(before)) > 5 and sum(x != y for x, y in zip(before, after)) > len(before) // 2
    title = browser.find_elements(By.CSS_SELECTOR, ".tok")[0].get_attribute("title")
    assert re.search(r"layer 2 \(mean over heads\): -?\d+\.\d{4}$", title)  # the value on hover

    browser.find_element(By.CSS_SELECTOR, "input[data-filter='correct']").click()
    shown = browser.execute_script("return [...document.querySelectorAll('.answer')]"
                                   ".filter(d => d.style.display !== 'none').map(d => d.dataset.label)")
    assert shown and set(shown) == {"incorrect"}

    browser.execute_script("document.getElementById('controls').scrollIntoView()")
    png = browser.get_screenshot_as_png()
    (report / "viewer.png").write_bytes(png)
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    # not blank (a blank page is one colour): the tokens' colour scale and the text show
    assert len(np.unique(image, axis=0)) >= 50 and (image.min(axis=1) < 200).mean() >= 0.02
