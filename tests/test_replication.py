"""Replication across models: `attentropy report` on runs of two models (of different depths) adds the Replication
section: per contrast and statistic the effect on each model with its interval and whether direction and
significance agree, the layer profiles on relative depth, and, with one instrument per model, the methods' figures
per model and whether their ranking holds."""

import pandas as pd
import pytest

from synthetic import write_synthetic_run

from attentropy.cli import main
from attentropy.contrasts import analyze_run
from attentropy.replication import replication_rows
from attentropy.store import load_run

LABELS = ["correct"] * 14 + ["incorrect"] * 14 + ["not_attempted"] * 4


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Facts runs of model A (4 layers) and model B (6 layers): incorrect answers' attention entropy raised at one
    cell in both (planted), so attention entropy's contrast replicates; the other statistics carry no signal."""
    root = tmp_path_factory.mktemp("replication")
    write_synthetic_run(root / "a" / "facts", benchmark="facts", labels=LABELS, planted=(1, 2), shift=12.0, seed=1,
                        model="model-a")
    write_synthetic_run(root / "b" / "facts", benchmark="facts", labels=LABELS, planted=(4, 0), shift=18.0, seed=2,
                        n_layers=6, model="model-b")
    return root


def test_replication_rows_compare_each_contrast_on_both_models(two_models):
    analyses = [analyze_run(load_run(two_models / m / "facts"), n_boot=50) for m in ("a", "b")]
    table = replication_rows(analyses, n_boot=50)
    entropy = table[(table.contrast == "incorrect_vs_correct") & (table.stat == "attn_entropy")
                    & (table.control == "none")]
    assert sorted(entropy.model) == ["model-a", "model-b"]
    assert (entropy.auroc > 0.8).all() and (entropy.auroc_lo > 0.5).all() and entropy.significant.all()
    assert set(entropy.replicates) == {"yes"} and set(entropy.direction) == {"same"}
    # a contrast with too few answers on a model is said to be not comparable, never given a verdict
    small = table[table.contrast == "incorrect_vs_not_attempted"]
    assert set(small.replicates) == {"yes", "not comparable (too few answers)"} - {"yes"} or \
        (small.n_negative >= 3).all()
    assert (table.groupby(["contrast", "stat", "control"]).model.nunique() == 2).all()
    assert set(table.control) == {"none", "within kind"}


def test_report_of_two_models_has_the_replication_section(two_models):
    assert main(["report", str(two_models / "a" / "facts"), str(two_models / "b" / "facts"), "--n-boot", "50",
                 "--quiet"]) == 0
    html = (two_models / "report.html").read_text()
    assert "<h2 id=replication>Replication across models</h2>" in html
    figures = two_models / "figures" / "replication"
    table = pd.read_csv(figures / "replication.csv")
    assert set(table.model) == {"model-a", "model-b"}
    profile = pd.read_csv(figures / "relative_depth_facts.csv")
    for model, n_layers in (("model-a", 4), ("model-b", 6)):
        depth = profile[profile.model == model].depth
        assert depth.min() == 0 and depth.max() == 1 and depth.nunique() == n_layers
