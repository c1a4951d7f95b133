"""Intervals with questions as clusters: Obuchowski's variance as written in the paper, and agreement with the
bootstrap that resamples questions on a small synthetic clustered data set."""

import numpy as np
import pytest
from scipy import stats as sps

from attentropy import clustered_intervals as ci
from attentropy.stats import auroc, compare_answers, compare_answers_stratified, compare_tokens, stratified_auroc


def obuchowski_by_the_paper(x: np.ndarray, positive: np.ndarray, cluster: np.ndarray) -> tuple[float, float]:
    """AUROC and its standard error from the formulas of Obuchowski (1997), pair by pair."""
    psi = lambda a, b: float(a > b) + 0.5 * float(a == b)  # noqa: E731
    xs, ys = x[positive], x[~positive]
    big_m, big_n = len(xs), len(ys)
    theta = sum(psi(a, b) for a in xs for b in ys) / (big_m * big_n)
    v10, v01, m, n = [], [], [], []
    for k in np.unique(cluster):
        mine_x, mine_y = x[(cluster == k) & positive], x[(cluster == k) & ~positive]
        v10.append(sum(np.mean([psi(a, b) for b in ys]) for a in mine_x))
        v01.append(sum(np.mean([psi(a, b) for a in xs]) for b in mine_y))
        m.append(len(mine_x))
        n.append(len(mine_y))
    v10, v01, m, n = map(np.array, (v10, v01, m, n))
    i, i10, i01 = len(m), (m > 0).sum(), (n > 0).sum()
    s10 = i10 / ((i10 - 1) * big_m) * ((v10 - m * theta) ** 2).sum()
    s01 = i01 / ((i01 - 1) * big_n) * ((v01 - n * theta) ** 2).sum()
    s11 = i / (i - 1) * ((v10 - m * theta) * (v01 - n * theta)).sum()
    return theta, np.sqrt(s10 / big_m + s01 / big_n + 2 * s11 / (big_m * big_n))


def test_the_variance_is_obuchowskis_with_ties_and_clusters_holding_one_group_only():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(70, 4)).astype(float)  # many ties
    positive = rng.random(70) < 0.35
    cluster = rng.integers(0, 15, 70)
    theta, se = ci.clustered_auroc(x, positive, cluster)
    for c in range(4):
        np.testing.assert_allclose((theta[c], se[c]), obuchowski_by_the_paper(x[:, c], positive, cluster), rtol=1e-12)
    np.testing.assert_allclose(theta, auroc(x[positive], x[~positive]), rtol=1e-12)


def test_one_unit_a_cluster_is_delongs_variance_and_one_stratum_the_plain_auroc():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3))
    positive = np.arange(50) < 20
    theta, se = ci.clustered_auroc(x, positive)
    # DeLong: placements V10 of the positives, V01 of the negatives, se^2 = var(V10)/m + var(V01)/n (ddof 1)
    below = (x[positive][:, None] > x[~positive][None]).mean(axis=1)
    above = (x[positive][:, None] > x[~positive][None]).mean(axis=0)
    delong = np.sqrt(below.var(axis=0, ddof=1) / 20 + above.var(axis=0, ddof=1) / 30)
    np.testing.assert_allclose(se, delong, rtol=1e-12)
    one = ci.stratified_auroc(x, positive, np.zeros(50))
    np.testing.assert_allclose(one, (theta, se), rtol=1e-12)
    strata = np.arange(50) % 3
    np.testing.assert_allclose(ci.stratified_auroc(x, positive, strata)[0],
                               stratified_auroc(x, positive, strata, np.ones((1, 50)))[0], rtol=1e-12)


N_QUESTIONS = 100


def clustered_tokens(n_questions=N_QUESTIONS, n_cells=60, seed=2):
    """Tokens of `n_questions` answers (1-6 positive and 5-30 negative tokens each) sharing a per-answer offset
    (the dependence that makes tokens of one answer a cluster); the positive tokens' shift grows over the cells
    from 0 to 1.2 standard deviations."""
    rng = np.random.default_rng(seed)
    m, n = rng.integers(1, 7, n_questions), rng.integers(5, 31, n_questions)
    question = np.repeat(np.arange(n_questions), m + n)
    positive = np.concatenate([np.arange(a + b) < a for a, b in zip(m, n)])
    values = rng.normal(size=(len(question), n_cells)) + rng.normal(size=(n_questions, n_cells))[question]
    values[positive] += np.linspace(0, 1.2, n_cells)
    return values, positive, question


# The bootstrap is a Monte Carlo estimate: with B resamples the 2.5 % (97.5 %) quantile of a roughly normal
# distribution of standard deviation s has a standard error of sqrt(0.025 * 0.975 / B) / phi(1.96) * s = 0.060 s at
# B = 2,000. Four of those (0.24 s) bound a bound's Monte Carlo error alone in all but ~1 in 15,000 cases; half as
# much again (0.12 s) is left for the two methods' own difference (the bootstrap's variance carries second-order
# terms that the linearised one drops, and the percentile interval follows skewness that the logit scale only
# approximates). The widths, averaged over cells, must agree within 5 %. That difference is of relative order 1 / n,
# n the units resampled per group: measured on normal answers (AUROC 0.58), the clustered intervals of d are
# narrower than the bootstrap's by 5.0, 2.3, 1.1 and 0.5 % at 20, 40, 80 and 160 answers per group (the stratified
# AUROC's likewise; the plain AUROC's by about a third of that). With 20 answers per group this test failed at 5.3 %;
# it runs at 100 questions (50 answers per group), between the report's smallest conclusive groups (10) and the
# main job's runs (100 to 200 per group).
B = 2000
BOUND_TOLERANCE = 0.36  # in standard errors


@pytest.mark.parametrize("level", ["tokens", "answers", "stratified"])
def test_clustered_intervals_agree_with_the_question_bootstrap(level):
    values, positive, question = clustered_tokens()
    if level == "tokens":
        clus = compare_tokens(values, positive, question, interval="clustered")
        boot = compare_tokens(values, positive, question, interval="bootstrap", n_boot=B, seed=3)
    else:  # one value per answer: the mean of its positive tokens, labelled by whether the answer is odd
        means = np.stack([values[(question == q)].mean(axis=0) for q in range(N_QUESTIONS)])
        odd = np.arange(N_QUESTIONS) % 2 == 1
        means[odd] += 0.3
        if level == "answers":
            clus = compare_answers(means, odd, interval="clustered")
            boot = compare_answers(means, odd, interval="bootstrap", n_boot=B, seed=3)
        else:
            strata = np.arange(N_QUESTIONS) % 4 // 2  # two strata, both holding both groups
            clus = compare_answers_stratified(means, odd, strata, interval="clustered")
            boot = compare_answers_stratified(means, odd, strata, interval="bootstrap", n_boot=B, seed=3)
    np.testing.assert_array_equal(clus.p, boot.p)  # the p-values do not depend on the interval method
    z = sps.norm.ppf(0.975)
    for est, clus_ci, boot_ci in ((clus.auroc, clus.auroc_ci, boot.auroc_ci),
                                  (clus.cohens_d, clus.cohens_d_ci, boot.cohens_d_ci)):
        se = (boot_ci[1] - boot_ci[0]) / (2 * z)  # the bootstrap's standard error, from its interval
        for c_bound, b_bound in zip(clus_ci, boot_ci):
            assert (np.abs(c_bound - b_bound) <= BOUND_TOLERANCE * se).all(), np.abs(c_bound - b_bound) / se
        width_ratio = (clus_ci[1] - clus_ci[0]) / (boot_ci[1] - boot_ci[0])
        assert abs(np.mean(width_ratio) - 1) < 0.05, np.mean(width_ratio)
        assert ((clus_ci[0] <= est) & (est <= clus_ci[1])).all()


def test_cohens_d_standard_error_matches_the_textbook_formula_for_normal_samples():
    """Answers independent and normal, the delta method gives se^2 ~ 1/n1 + 1/n0 + d^2 / (2 (n1 + n0)) (Hedges &
    Olkin 1985) in expectation; averaged over 400 cells its standard error is within 3 % of it (the estimate's own
    spread over cells is ~1 %)."""
    rng = np.random.default_rng(4)
    n1, n0 = 150, 250
    x = rng.normal(size=(n1 + n0, 400))
    positive = np.arange(n1 + n0) < n1
    x[positive] += 0.5
    se = ci.cohens_d_se(x, positive)
    textbook = np.sqrt(1 / n1 + 1 / n0 + 0.5 ** 2 / (2 * (n1 + n0)))
    assert abs(se.mean() / textbook - 1) < 0.03


def test_interval_edges():
    lo, hi = ci.auroc_interval(np.array([1.0, 0.0, 0.5, 0.7]), np.array([0.0, 0.0, np.nan, 0.05]))
    assert lo[:2].tolist() == [1.0, 0.0] and hi[:2].tolist() == [1.0, 0.0]
    assert np.isnan(lo[2]) and np.isnan(hi[2])
    # logit scale: asymmetric about 0.7, longer towards 0.5, inside (0, 1)
    assert 0 < lo[3] < 0.7 < hi[3] < 1 and 0.7 - lo[3] > hi[3] - 0.7
    assert np.isclose(ci.wald_interval(np.array([0.3]), np.array([0.1]))[0][0], 0.3 - 1.959964 * 0.1)
