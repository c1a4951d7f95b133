"""The instrument's evaluation: every detector fitted and scored on the same question-grouped folds
(`cross_validate`), on question kinds or sources left out of fitting (`leave_one_out`) and on other runs
(`transfer_rows`), summarised as rows of metrics with intervals that resample questions (`evaluate`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import confidence_metrics, stats
from .answers import Answers, InstrumentError, near_duplicates
from .detectors import (ANSWER_DETECTORS, PRIMARY, TOKEN_DETECTORS, Detector, available, cheap, is_competitor,
                        of_family, training_free)
from .detectors.fitting import take
from .features import at_once
from .probe import INNER_FOLDS
from .selective import choose_threshold, f_score
from .token_attention import every_row
from .token_comparisons import TOKEN_COMPARISON_TITLES, token_comparisons

OUTER_FOLDS = 5
PREFIX_LENGTHS = (1, 2, 4, 8, 16, 32)
NEGATIVES_PER_POSITIVE = 20
MIN_PER_CLASS = 2  # answers of each class for a metric to be computed at all
MIN_PER_CLASS_TO_CONCLUDE = 20  # per class, as the within-kind criterion; smaller subsets are flagged
MIN_PER_CLASS_HELD_OUT = 10  # per class, for a held-out kind or source to enter the mean over held-out ones


def answer_detectors(a: Answers) -> dict[str, Detector]:
    """The answer-level detectors compared on these answers: every registered one whose inputs the runs stored
    (the hidden-state probes and the bag of tokens need the runs' hidden states)."""
    return available(ANSWER_DETECTORS, a)


def token_detectors(a: Answers) -> dict[str, Detector]:
    return available(TOKEN_DETECTORS, a)


def kinds_of(a: Answers) -> list[str]:
    """The question kinds that get a one-hot column in the kind controls."""
    return sorted(a.answers.kind.unique())


def _roles(detectors: dict[str, Detector]) -> dict:
    return {name: d.role for name, d in detectors.items()}


def outer_splits(a: Answers, rows: np.ndarray, n_splits: int = OUTER_FOLDS, seed: int = 0) -> list[np.ndarray]:
    """Fold index (0 .. n_splits-1) of every answer in `rows`, grouped by question (all answers of one question,
    across runs, fall in one fold) and stratified by label."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = a.answers.label.to_numpy()[rows]
    strata = a.answers.y.to_numpy()[rows]  # correct, incorrect, neither (not attempted, unparsed)
    n = min(n_splits, int(pd.Series(a.answers.y.to_numpy()[rows]).value_counts().get(0, 0)),
            int(pd.Series(a.answers.y.to_numpy()[rows]).value_counts().get(1, 0)))
    if n < 2:
        raise InstrumentError(f"too few correct or incorrect answers to cross-validate (labels: "
                              f"{pd.Series(labels).value_counts().to_dict()})")
    fold = np.empty(len(rows), int)
    splitter = StratifiedGroupKFold(n, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a few not-attempted answers cannot be in every fold: expected, not a fault
        warnings.filterwarnings("ignore", "The least populated class in y", UserWarning)
        for i, (_, test) in enumerate(splitter.split(rows, strata, a.answers.group.to_numpy()[rows])):
            fold[test] = i
    return fold


def sample_negatives(y: np.ndarray, ratio: int, seed: int) -> np.ndarray:
    """Rows to train a token model on: every wrong-moment token (y == 0) and at most `ratio` times as many others,
    drawn at random (the class weights are balanced anyway; this bounds the fitting time)."""
    rare, common = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    keep = min(len(common), max(ratio * len(rare), 1))
    return np.sort(np.r_[rare, np.random.default_rng(seed).choice(common, keep, replace=False)])


@dataclass
class CrossValidation:
    """Out-of-fold confidences of every method for one task's answers (and tokens)."""

    rows: np.ndarray  # answers of the task (rows of Answers.answers)
    fold: np.ndarray  # fold of each of those answers
    answer: pd.DataFrame  # per answer (rows): method -> out-of-fold confidence
    selective: pd.DataFrame  # per answer and method: the threshold chosen on its training folds
    prefix: dict[str, np.ndarray]  # detector with a prefix form -> per token of `rows`' answers: its out-of-fold
    #                               prefix confidence
    token: pd.DataFrame | None  # per token of `rows`' answers: token detector -> out-of-fold confidence (math)
    details: dict


def token_rows(a: Answers, rows: np.ndarray) -> np.ndarray:
    starts, counts = a.answers.start.to_numpy()[rows], a.answers.n_tokens.to_numpy()[rows]
    return np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)]) if len(rows) else np.zeros(0, int)


def cross_validate(a: Answers, rows: np.ndarray, *, detectors: dict[str, Detector] | None = None,
                   token_detectors_: dict[str, Detector] | None = None, seed: int = 0,
                   progress=None, jobs: int = 1) -> CrossValidation:
    """Every detector fitted on the training folds of each outer fold, scored on the held-out fold (answers
    grouped by content, `answers.content_groups`: no question or near-duplicate is in two folds). Only correct /
    incorrect answers train; every answer of a held-out fold is scored. Thresholds for selective answering come
    from the training folds' honest confidences. Detectors: `answer_detectors(a)`, `token_detectors(a)` unless
    given. `jobs`: folds fitted at once, each in its own process, when the answers' attention is held (read from
    the runs, the folds' prefix confidences are read together after them: `features.at_once`)."""
    from joblib import Parallel, delayed

    detectors = answer_detectors(a) if detectors is None else detectors
    token_dets = token_detectors(a) if token_detectors_ is None else token_detectors_
    fold = outer_splits(a, rows, seed=seed)
    kinds = kinds_of(a)
    tok_rows = token_rows(a, rows)
    with_prefix = {name: d for name, d in detectors.items() if d.prefix_features is not None}
    rows_only = a.subset(rows) if with_prefix else None  # tokens of `rows` in order: tok_rows
    target = a.tokens.target.to_numpy()[tok_rows]
    has_tokens = bool(token_dets) and (target == 1).sum() >= 2
    folds = _Folds(rows, fold, np.repeat(fold, a.answers.n_tokens.to_numpy()[rows]), a.answers.y.to_numpy(),
                   a.answers.group.to_numpy(), a.answers.label.to_numpy(), target,
                   a.answers.group.to_numpy()[a.answer_of_token[tok_rows]], seed,
                   detectors, {name: d.inputs(a, kinds) for name, d in detectors.items()},
                   {name: d.prefix_features(rows_only) for name, d in with_prefix.items()},
                   token_dets if has_tokens else {},
                   {name: _rows_of(d.inputs(a, kinds), tok_rows) for name, d in token_dets.items()} if has_tokens
                   else {})
    n_folds = int(fold.max() + 1)
    held = a.attn.held
    parallel = Parallel(n_jobs=min(jobs, n_folds) if held else 1, return_as="generator")
    answer = pd.DataFrame(index=rows, columns=list(detectors), dtype=float)
    thresholds = pd.DataFrame(index=rows, columns=list(detectors), dtype=float)
    prefix = {name: np.full(len(tok_rows), np.nan) for name in with_prefix}
    token = (pd.DataFrame(index=np.arange(len(tok_rows)), columns=list(token_dets), dtype=float) if has_tokens
             else None)
    details: dict = {"folds": n_folds, "C": {}, "threshold": {}}
    prefix_fits = []  # (detector, fold, fitted) read from the runs: prefix confidences after the folds, at once
    for k, out in enumerate(parallel(delayed(folds.fit_and_score)(k, held) for k in range(n_folds))):
        if progress:
            progress(f"fold {k + 1}")
        test, test_t = rows[fold == k], folds.token_fold == k
        for name, values in out["answer"].items():
            answer.loc[test, name], thresholds.loc[test, name] = values
        for name, values in out["prefix"].items():
            if held:
                prefix[name][test_t] = values
            else:
                prefix_fits.append((name, k, values))
        for name, values in out["token"].items():
            token.loc[test_t, name] = values
        for name, C in out["C"].items():
            details["C"].setdefault(name, []).append(C)

    def prefix_confidences():
        for name, k, fitted in prefix_fits:
            prefix[name][folds.token_fold == k] = fitted.confidence(take(folds.prefix[name], folds.token_fold == k))
    if prefix_fits:
        at_once(rows_only, prefix_confidences)
    return CrossValidation(rows, fold, answer, thresholds, prefix, token, details)


def _rows_of(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """values[rows], without a copy when `rows` are all of them in order (one task's tokens: 0.5 GB of token
    features at the 90B shape)."""
    return values if every_row(rows, len(values)) else values[rows]


@dataclass
class _Folds:
    """What an outer fold of `cross_validate` reads: the task's answers (`rows`) and their folds, labels and
    groups, their tokens' folds, targets and groups, and every detector's inputs."""

    rows: np.ndarray
    fold: np.ndarray  # of each of `rows`
    token_fold: np.ndarray  # of each of their tokens
    y: np.ndarray  # of every answer (rows index them)
    groups: np.ndarray
    labels: np.ndarray
    target: np.ndarray  # of each token of `rows`' answers
    token_groups: np.ndarray
    seed: int
    detectors: dict
    feats: dict
    prefix: dict  # detector with a prefix form -> its prefix inputs of the tokens
    token_detectors: dict
    token_feats: dict

    def fit_and_score(self, k: int, held: bool) -> dict:
        """Fold k's models fitted on the other folds: per detector its held-out answers' (confidences, thresholds),
        its prefix confidences of their tokens (`held`; else its fitted model, to read them later), its C; per token
        detector its held-out tokens' confidences."""
        rows, fold, y, groups, labels, seed = self.rows, self.fold, self.y, self.groups, self.labels, self.seed
        train = rows[(fold != k) & (y[rows] >= 0)]
        # the training folds' not-attempted answers: they do not train, but the threshold is chosen on every
        # training answer, as it is applied to every test answer (not attempted ones stay not attempted)
        abstained = rows[(fold != k) & (labels[rows] == "not_attempted")]
        test = rows[fold == k]
        out: dict = {"answer": {}, "prefix": {}, "token": {}, "C": {}}
        for name, d in self.detectors.items():
            feats = self.feats[name]
            fitted = d.fit(take(feats, train), y[train], groups[train], seed=seed + k)
            threshold = choose_threshold(np.r_[fitted.train_confidence, fitted.confidence(take(feats, abstained))],
                                         labels[np.r_[train, abstained]])
            out["answer"][name] = (fitted.confidence(take(feats, test)), threshold)
            if "C" in fitted.detail:
                out["C"][name] = fitted.detail["C"]
            if name in self.prefix:
                out["prefix"][name] = (fitted.confidence(take(self.prefix[name], self.token_fold == k)) if held
                                       else fitted)
        if self.token_detectors:
            target = self.target
            usable = np.flatnonzero((self.token_fold != k) & (target >= 0))
            train_t = usable[sample_negatives(1 - target[usable], NEGATIVES_PER_POSITIVE, seed + k)]
            test_t = self.token_fold == k
            for name, d in self.token_detectors.items():
                feats = self.token_feats[name]
                fitted = d.fit(feats[train_t], 1 - target[train_t], self.token_groups[train_t], seed=seed + k)
                out["token"][name] = fitted.confidence(feats[test_t])
                if "C" in fitted.detail:
                    out["C"][f"token:{name}"] = fitted.detail["C"]
        return out


def leave_one_out(a: Answers, rows: np.ndarray, *, by: str = "kind", detectors: dict[str, Detector] | None = None,
                  seed: int = 0, progress=None, jobs: int = 1) -> pd.DataFrame:
    """Out-of-kind confidences: each question kind (`by="kind"`), or every kind of one data source together
    (`by="source"`, a larger shift), scored by the detectors fitted on the others only (the kinds the instrument
    will meet are not the ones it was fitted on). Empty where fewer than two exist. Only for detectors evaluated
    out of kind (not those that read the kind: a kind left out has no column of its own). `jobs`: held-out kinds
    fitted at once, each in its own process (the same confidences as one at a time, up to the rounding of a
    process's BLAS threads)."""
    from joblib import Parallel, delayed

    detectors = answer_detectors(a) if detectors is None else detectors
    detectors = {name: d for name, d in detectors.items() if d.out_of_kind}
    held = a.answers[by].to_numpy()[rows]  # the kind or source of each answer
    y, groups = a.answers.y.to_numpy(), a.answers.group.to_numpy()
    feats = {name: d.inputs(a, kinds_of(a)) for name, d in detectors.items()}
    out = pd.DataFrame(index=rows, columns=list(detectors), dtype=float)
    if len(np.unique(held)) < 2:
        return out.iloc[:0]
    splits = []
    for left_out in np.unique(held):
        train = rows[(held != left_out) & (y[rows] >= 0)]
        test = rows[held == left_out]
        if min((y[train] == 1).sum(), (y[train] == 0).sum()) < 2 * INNER_FOLDS:
            continue
        if min((y[test] == 1).sum(), (y[test] == 0).sum()) < MIN_PER_CLASS_HELD_OUT:
            continue  # too small to measure on: reported as such by held_out_mean_rows, nothing fitted for it
        splits.append((left_out, train, test))
    scored = Parallel(n_jobs=min(jobs, len(splits)) or 1, return_as="generator")(
        delayed(_fit_and_score)(detectors, feats, y, groups, train, test, seed) for _, train, test in splits)
    for (left_out, _, test), confidences in zip(splits, scored):
        if progress:
            progress(f"left out {left_out}")
        for name, confidence in confidences.items():
            out.loc[test, name] = confidence
    return out


def _fit_and_score(detectors: dict[str, Detector], feats: dict, y: np.ndarray, groups: np.ndarray,
                   train: np.ndarray, test: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Each detector fitted on the `train` answers, its confidences of the `test` answers."""
    return {name: d.fit(take(feats[name], train), y[train], groups[train], seed=seed).confidence(
        take(feats[name], test)) for name, d in detectors.items()}


def held_out_mean_rows(task: str, by: str, predictions: pd.DataFrame, answers: pd.DataFrame, roles: dict, *,
                       n_boot: int, seed: int) -> list[dict]:
    """The mean AUROC over held-out kinds (or sources) of every method, with an interval that resamples both the
    held-out kinds and the questions within each (a two-level bootstrap: a new collection of kinds, each with its
    questions redrawn), and the paired difference instrument - method on the same resamples. Kinds with fewer than
    MIN_PER_CLASS_HELD_OUT answers of a class are too small to enter the mean: one row each says so."""
    y, held, groups = answers.y.to_numpy(), answers[by].to_numpy(), answers.group.to_numpy()
    rows, per_kind, point = [], [], []
    for left_out in np.unique(held):
        m = (held == left_out) & (y >= 0)
        n_pos, n_neg = int((y[m] == 1).sum()), int((y[m] == 0).sum())
        if min(n_pos, n_neg) < MIN_PER_CLASS_HELD_OUT:
            rows.append(_row(task, f"leave_one_{by}_out_too_small", left_out, "", "", "auroc", np.nan,
                             n_pos=n_pos, n_neg=n_neg))
            continue
        conf = predictions.reindex(answers.index[m])
        if conf.isna().all().all():
            continue
        weights = stats.group_counts(groups[m], n_boot, seed)
        per_kind.append({meth: confidence_metrics.weighted_auroc_rows(conf[meth].to_numpy(float), y[m] == 1, weights)
                         for meth in conf})
        point.append({meth: confidence_metrics.weighted_auroc_rows(conf[meth].to_numpy(float), y[m] == 1,
                                                                     np.ones((1, m.sum())))[0] for meth in conf})
    if len(per_kind) < 2:
        return rows
    drawn = np.random.default_rng(seed + 1).integers(0, len(per_kind), (n_boot, len(per_kind)))  # kinds resampled
    boot = {meth: np.stack([k[meth] for k in per_kind], axis=1)[np.arange(n_boot)[:, None], drawn].mean(1)
            for meth in predictions}
    value = {meth: float(np.mean([p[meth] for p in point])) for meth in predictions}
    subset = f"mean over {len(per_kind)} {by}s"
    for meth in predictions:
        lo, hi = np.nanpercentile(boot[meth], [2.5, 97.5])
        rows.append(_row(task, f"leave_one_{by}_out_mean", subset, meth, roles[meth], "auroc", value[meth], lo, hi,
                         len(per_kind), 0))
    if PRIMARY in predictions:
        for meth in predictions:
            if meth != PRIMARY:
                lo, hi = np.nanpercentile(boot[PRIMARY] - boot[meth], [2.5, 97.5])
                rows.append(_row(task, f"leave_one_{by}_out_mean", subset, meth, roles[meth],
                                 "auroc_gain_of_instrument", value[PRIMARY] - value[meth], lo, hi, len(per_kind), 0))
    return rows


def transfer_rows(train: Answers, test: Answers, name: str, *, n_boot: int, seed: int) -> list[dict]:
    """Every answer detector fitted on all of `train` (per task) and scored on the answers of another run
    (hidden-state detectors only where both kept the same layers)."""
    rows = []
    detectors = {m: d for m, d in answer_detectors(train).items() if d.available(test)}
    if not test.hidden or test.hidden_layers != train.hidden_layers:
        detectors = {m: d for m, d in detectors.items() if not {"hidden", "embeddings", "hidden_tokens"} & set(d.needs)}
    roles = _roles(detectors)
    kinds = kinds_of(train)
    for task in sorted(set(test.answers.task) & set(train.answers.task)):
        tr = np.flatnonzero((train.answers.task.to_numpy() == task) & (train.answers.y.to_numpy() >= 0))
        te = np.flatnonzero((test.answers.task.to_numpy() == task) & (test.answers.y.to_numpy() >= 0))
        conf = pd.DataFrame(index=te, columns=list(detectors), dtype=float)
        for method, d in detectors.items():
            fitted = d.fit(take(d.inputs(train, kinds), tr), train.answers.y.to_numpy()[tr],
                           train.answers.group.to_numpy()[tr], seed=seed)
            conf[method] = fitted.confidence(take(d.inputs(test, kinds), te))
        rows += discrimination_rows(task, "transfer", name, conf, test.answers.y.to_numpy()[te],
                                    test.answers.group.to_numpy()[te], roles, n_boot=n_boot, seed=seed)
    return rows


def interval_text(row) -> str:
    """An evaluation row's value and 95 % interval: "0.850 [0.812, 0.886]"."""
    return f"{row['value']:.3f} [{row['lo']:.3f}, {row['hi']:.3f}]"


def verdict(gain_row) -> str:
    """What a paired difference instrument - baseline says."""
    if gain_row["lo"] > 0:
        return "above it (the paired interval above 0)"
    if gain_row["hi"] < 0:
        return "below it (the paired interval below 0)"
    return "not distinguishable from it (the paired interval covers 0)"


def headlines(rows: pd.DataFrame, evaluation: str = "in_distribution") -> list[dict]:
    """The instrument against the best of every baseline and control (hidden-state probe and bag of tokens
    included), of the training-free scores, and of the logit / kind / length baselines: one dict per pool (pool,
    best, auroc row, gain row, verdict), from one task's evaluation rows."""
    auc = rows[(rows.evaluation == evaluation) & (rows.metric == "auroc")].set_index("method")
    gain = rows[(rows.evaluation == evaluation) & (rows.metric == "auroc_gain_of_instrument")].set_index("method")
    pools = (("every baseline and control", [m for m in auc.index if is_competitor(m)]),
             ("the training-free scores", training_free(auc.index)),
             ("the logit, kind and length baselines", cheap(auc.index)))
    out = []
    for label, pool in pools:
        if pool:
            best = auc.loc[pool].value.idxmax()
            out.append({"pool": label, "best": best, "auroc": auc.loc[best], "gain": gain.loc[best],
                        "verdict": verdict(gain.loc[best])})
    return out


CHOSEN_TRAINING_FREE = "anchor_chosen"  # the training-free score chosen on the training folds (`anchored.py`)


def held_out_comparators(means: pd.DataFrame) -> list[tuple[str, str]]:
    """(method, how it was chosen): the training-free scores a held-out mean is compared with (`means`: the held-out
    AUROC rows indexed by method): the one chosen on the training folds, as a user without the held-out labels would
    choose it, then the one that did best on the held-out answers themselves (chosen after the fact: stricter)."""
    out = [(CHOSEN_TRAINING_FREE, "chosen on the training folds")] if CHOSEN_TRAINING_FREE in means.index else []
    after = [m for m in training_free(means.index) if m != CHOSEN_TRAINING_FREE]
    if after:
        out.append((means.loc[after].value.idxmax(), "best on the held-out answers, chosen after the fact"))
    return out


def _row(task, evaluation, subset, method, role, metric, value, lo=np.nan, hi=np.nan, n_pos=0, n_neg=0) -> dict:
    return {"task": task, "evaluation": evaluation, "subset": subset, "method": method, "role": role,
            "metric": metric, "value": float(value), "lo": float(lo), "hi": float(hi), "n_positive": int(n_pos),
            "n_negative": int(n_neg)}


def discrimination_rows(task: str, evaluation: str, subset: str, confidences: pd.DataFrame, y: np.ndarray,
                        groups: np.ndarray, roles: dict, *, n_boot: int, seed: int,
                        metrics=tuple(confidence_metrics.SCORE_METRICS), positive_name: str = "correct") -> list[dict]:
    """Every method's metrics on the same items and the same bootstrap resamples of their questions, plus the
    paired AUROC difference instrument - method."""
    y = np.asarray(y, float)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        return []
    counts, index = stats.group_draws(groups, n_boot, seed)
    held = [counts[:, index]] if n_boot * len(index) * 8 <= stats.BOOT_BYTES else None  # else a block at a time

    def over_replicates(fn):  # fn(weights [b, n]) -> [b], over every replicate
        return np.concatenate([fn(w) for w in (held or stats.weight_blocks(counts, index))])

    rows, boot_auc = [], {}
    for method in confidences:
        conf = confidences[method].to_numpy(float)
        for metric, (value, lo, hi) in confidence_metrics.score_metrics(conf, y, over_replicates, metrics).items():
            rows.append(_row(task, evaluation, subset, method, roles[method], metric, value, lo, hi, n_pos, n_neg))
        boot_auc[method] = over_replicates(lambda w: confidence_metrics.weighted_auroc_rows(conf, y, w))
    if PRIMARY in boot_auc:
        point = {m: r["value"] for r in rows if r["metric"] == "auroc" for m in [r["method"]]}
        for method, boot in boot_auc.items():
            if method == PRIMARY:
                continue
            lo, hi = np.nanpercentile(boot_auc[PRIMARY] - boot, [2.5, 97.5])
            rows.append(_row(task, evaluation, subset, method, roles[method], "auroc_gain_of_instrument",
                             point[PRIMARY] - point[method], lo, hi, n_pos, n_neg))
    return rows


def stratified_rows(task: str, confidences: pd.DataFrame, y: np.ndarray, strata: np.ndarray, groups: np.ndarray,
                    roles: dict, *, n_boot: int, seed: int) -> list[dict]:
    """Stratified AUROC: only pairs (correct, incorrect) of the same stratum (question kind) count, so a method
    cannot score by telling kinds apart. The pooled pair-weighted mean of the per-stratum AUROCs."""
    usable = [s for s in np.unique(strata) if min((y[strata == s] == 1).sum(), (y[strata == s] == 0).sum()) >= 1]
    if not usable:
        return []
    weights = np.r_[np.ones((1, len(y))), stats.group_counts(groups, n_boot, seed)]
    rows = []
    for method in confidences:
        value = stats.stratified_auroc(confidences[method].to_numpy(float)[:, None], y == 1, strata, weights)[:, 0]
        lo, hi = np.nanpercentile(value[1:], [2.5, 97.5])
        rows.append(_row(task, "stratified", "pairs within a kind", method, roles[method], "auroc", value[0], lo, hi,
                         (y == 1).sum(), (y == 0).sum()))
    return rows


def selective_rows(task: str, confidence: pd.DataFrame, thresholds: pd.DataFrame, labels: np.ndarray,
                   groups: np.ndarray, roles: dict, policies: list[str], *, n_boot: int, seed: int) -> list[dict]:
    """Abstention below each answer's fold's training threshold (`thresholds`, per method), pooled over the
    held-out folds: coverage, correct, correct given attempted and F-score (SimpleQA's), next to answering
    everything; with, on the same resamples, each policy's F-score gain over answering everything and the
    instrument's F-score gain over each policy."""
    weights = np.r_[np.ones((1, len(labels))), stats.group_counts(groups, n_boot, seed)]
    rows, f_scores = [], {}
    n_correct, n_incorrect = (labels == "correct").sum(), (labels == "incorrect").sum()
    answered, n = labels != "not_attempted", weights.sum(1)
    for method in [None, *policies]:
        if method is None:
            attempted = answered
        else:
            attempted = (confidence[method].to_numpy(float) >= thresholds[method].to_numpy(float)) & answered
        correct = attempted & (labels == "correct")
        values = {"coverage": weights @ attempted / n, "correct": weights @ correct / n}
        with np.errstate(divide="ignore", invalid="ignore"):
            values["correct_given_attempted"] = weights @ correct / (weights @ attempted)
        values["f_score"] = f_score(values["correct"], values["correct_given_attempted"])
        name = method or "answer_everything"
        f_scores[name] = values["f_score"]
        for metric, v in values.items():
            lo, hi = np.nanpercentile(v[1:], [2.5, 97.5])
            rows.append(_row(task, "selective", "threshold from training folds", name,
                             roles.get(method, "reference"), metric, v[0], lo, hi, n_correct, n_incorrect))

    def paired(method, metric, difference):
        lo, hi = np.nanpercentile(difference[1:], [2.5, 97.5])
        rows.append(_row(task, "selective", "threshold from training folds", method, roles.get(method, "reference"),
                         metric, difference[0], lo, hi, n_correct, n_incorrect))

    for method in policies:
        paired(method, "f_score_gain_over_answering_everything", f_scores[method] - f_scores["answer_everything"])
    if PRIMARY in f_scores:
        for method in ["answer_everything", *policies]:
            if method != PRIMARY:
                paired(method, "f_score_gain_of_instrument", f_scores[PRIMARY] - f_scores[method])
    return rows


def evaluate(a: Answers, task: str, *, n_boot: int = 1000, seed: int = 0, progress=None, jobs: int = 1
             ) -> tuple[pd.DataFrame, dict]:
    """The whole evaluation of one task's answers: rows of (evaluation, subset, method, metric, value, interval)
    and the out-of-fold predictions behind them (for figures and the token viewer). `jobs`: folds and held-out
    kinds (and sources) fitted at once, in as many processes."""
    rows = np.flatnonzero(a.answers.task.to_numpy() == task)
    cv = cross_validate(a, rows, seed=seed, progress=progress, jobs=jobs)
    loko = leave_one_out(a, rows, seed=seed, progress=progress, jobs=jobs)
    answers = a.answers.iloc[rows]
    # every kind of one source held out together: only where some source has several kinds (else it is loko)
    several = answers.groupby("source").kind.nunique().max() > 1 and answers.source.nunique() > 1
    loso = leave_one_out(a, rows, by="source", seed=seed, progress=progress, jobs=jobs) if several else loko.iloc[:0]
    roles, token_roles = _roles(answer_detectors(a)), _roles(token_detectors(a))
    y, groups, kinds = answers.y.to_numpy(), answers.group.to_numpy(), answers.kind.to_numpy()
    lab = y >= 0
    out: list[dict] = []
    out += discrimination_rows(task, "in_distribution", "all", cv.answer[lab], y[lab], groups[lab], roles,
                               n_boot=n_boot, seed=seed)

    def held_out_rows(by: str, predictions: pd.DataFrame, left_out: str) -> list[dict]:
        m = lab & (answers[by].to_numpy() == left_out)
        if not len(predictions) or predictions.loc[rows[m]].isna().all().all():
            return []
        return discrimination_rows(task, f"leave_one_{by}_out", left_out, predictions.loc[rows[m]], y[m], groups[m],
                                   roles, n_boot=n_boot, seed=seed, metrics=("auroc",))

    for kind in np.unique(kinds):
        m = lab & (kinds == kind)
        out += discrimination_rows(task, "within_kind", kind, cv.answer[m], y[m], groups[m], roles, n_boot=n_boot,
                                   seed=seed, metrics=("auroc",))
        out += held_out_rows("kind", loko, kind)
    for source in np.unique(answers.source.to_numpy()):
        out += held_out_rows("source", loso, source)
    for by, predictions in (("kind", loko), ("source", loso)):
        if len(predictions) or by == "kind":
            out += held_out_mean_rows(task, by, predictions.reindex(rows[lab]), answers[lab], roles,
                                      n_boot=n_boot, seed=seed)
    if len(np.unique(kinds)) > 1:
        out += stratified_rows(task, cv.answer[lab], y[lab], kinds[lab], groups[lab], roles, n_boot=n_boot,
                               seed=seed)
    in_dist = pd.DataFrame(out)
    auc = in_dist.query("evaluation == 'in_distribution' and metric == 'auroc'").set_index("method").value
    best_logit = max(of_family("logit"), key=lambda m: auc.get(m, -1))
    graded = answers.label.to_numpy() != "unparsed"
    policies = [m for m in cv.answer if m not in of_family("sanity")]
    out += selective_rows(task, cv.answer[graded], cv.selective[graded], answers.label.to_numpy()[graded],
                          groups[graded], roles, policies, n_boot=n_boot, seed=seed)
    # prefix confidence: the answer model on the first k tokens (whole answers when shorter)
    tok_rows = token_rows(a, rows)
    lengths = answers.n_tokens.to_numpy()
    tok_answer = np.repeat(np.arange(len(rows)), lengths)
    local_start = np.r_[0, np.cumsum(lengths)[:-1]]
    for k in (*PREFIX_LENGTHS, None):
        pick = local_start + (lengths if k is None else np.minimum(lengths, k)) - 1
        conf = pd.DataFrame({name: prefix[pick] for name, prefix in cv.prefix.items()})
        out += discrimination_rows(task, "prefix", "whole answer" if k is None else f"first {k} tokens",
                                   conf[lab], y[lab], groups[lab], roles, n_boot=n_boot, seed=seed,
                                   metrics=("auroc",))
    token_table = None
    if cv.token is not None:
        token_table = cv.token.copy()
        if PRIMARY in cv.answer:  # controls: the answer's own confidence given to its tokens, the prefix confidence
            token_table["answer_confidence"] = cv.answer[PRIMARY].to_numpy(float)[tok_answer]
            token_table["prefix_confidence"] = cv.prefix[PRIMARY]
            token_roles.update(answer_confidence="control", prefix_confidence="control")
        tok_groups = groups[tok_answer]
        for name, (positive, negative) in token_comparisons(a, tok_rows).items():
            use = positive | negative
            if positive.sum() < MIN_PER_CLASS:
                continue
            # positive class here: the wrong moment; a method flags it by low confidence
            flagged = 1 - token_table[use].astype(float)
            out += discrimination_rows(task, f"token:{name}", TOKEN_COMPARISON_TITLES[name], flagged,
                                       positive[use].astype(float), tok_groups[use], token_roles, n_boot=n_boot,
                                       seed=seed, metrics=("auroc",))
    evaluation = pd.DataFrame(out)
    identity = answers[["run", "run_fingerprint", "question_id", "kind", "label", "y"]].reset_index(drop=True)
    predictions = identity.assign(
        fold=cv.fold, **{f"confidence:{m}": cv.answer[m].to_numpy(float) for m in cv.answer},
        **{f"threshold:{m}": cv.selective[m].to_numpy(float) for m in cv.selective},
        **({f"loko:{m}": loko[m].reindex(rows).to_numpy(float) for m in loko} if len(loko) else {}))
    tokens = a.tokens.iloc[tok_rows][["pos", "token", "target"]].reset_index(drop=True).assign(
        run=answers.run.to_numpy()[tok_answer], run_fingerprint=answers.run_fingerprint.to_numpy()[tok_answer],
        question_id=answers.question_id.to_numpy()[tok_answer],
        prefix_confidence=cv.prefix.get(PRIMARY, np.full(len(tok_rows), np.nan)))
    if token_table is not None:
        tokens = tokens.assign(**{f"confidence:{m}": token_table[m].to_numpy(float) for m in token_table})
    summary = {"answers": int(len(rows)), "labels": answers.label.value_counts().to_dict(),
               "kinds": answers.kind.value_counts().to_dict(), "folds": cv.details["folds"],
               "chosen_C": cv.details["C"], "best_logit_baseline": best_logit,
               "wrong_moment_tokens": int((a.tokens.target.to_numpy()[tok_rows] == 1).sum()),
               "groups": int(answers.group.nunique()), "near_duplicates": near_duplicates(answers)}
    return evaluation, {"answers": predictions, "tokens": tokens, "summary": summary}
