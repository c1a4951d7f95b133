"""The study's contrasts on a graded run: which groups of answers (and of tokens inside answers) are compared, and
`analyze_run`, which compares them for every statistic, per layer x head and per layer, raw and under the controls of
`contrast_controls.py`, into the `Analysis` that the report shows.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from .clustered_intervals import threads, wald_interval
from .contrast_controls import (PositionFit, answer_strata, has_digit, length_bins, position_effects, position_fit,
                                position_reference, template_tokens, window_differences, wrong_moment_windows)
from .stats import (WINDOW, AnswerGroups, Comparison, Intervals, benjamini_hochberg, compare_answers,
                    compare_answers_stratified, compare_tokens, position_matched, resample_counts)
from .statistic_values import DERIVED, LOGIT_STATS, Scratch, log_keys, reads
from .store import READ_BYTES

AGGREGATIONS = ("mean", "max", "first_k")
FIRST_K = 8  # tokens of the `first_k` aggregation
MIN_QUESTIONS_TO_CONCLUDE = 10  # questions per group below which the report says "too small to conclude"
PROFILE_STATS = ("entropy", "varentropy", "entropy_norm")
LAYER_MEAN_STATS = ("entropy", "varentropy", "entropy_norm")  # kept per token and layer for the figures and viewer


@dataclass
class Contrast:
    """One of the study's comparisons as run on one run directory."""

    key: str  # e.g. "hallucinated", "wrong_moment"
    title: str
    positive: str  # the group whose higher values give AUROC > 0.5
    negative: str
    level: str  # "answer" (one aggregate per question) or "token" (tokens inside incorrect answers)
    n_positive: int  # questions
    n_negative: int
    status: str = "ok"  # ok | too_small (computed, not conclusive) | not_computed (fewer than 2 per group)
    note: str = ""  # the group sizes behind a status other than ok


@dataclass
class Analysis:
    """Everything the report shows of one graded run. AUROC > 0.5: the positive group has the higher values."""

    name: str
    path: str
    config: dict
    benchmark: str
    layers: list[int]
    n_heads: int
    excluded: dict[str, int]  # answers left out of every contrast, by reason
    contrasts: list[Contrast]
    comparisons: pd.DataFrame  # one row per (contrast, stat, aggregation, layer, head) cell
    profiles: pd.DataFrame  # per group, stat and layer: mean over answers of the answer means, with a 95 % CI
    samples: pd.DataFrame  # the run's samples with their grades (all answers, the excluded ones too)
    answers: pd.DataFrame  # one row per analysed answer: label and answer means of the headline statistics
    tokens: pd.DataFrame  # one row per token of the analysed answers
    layer_means: dict[str, np.ndarray]  # stat -> [n_tokens, n_layers], mean over heads, aligned with `tokens`, of the
    # statistics shown per token (LAYER_MEAN_STATS)
    graded: bool = True  # False: no labels (free prompts, not graded yet); one group, `ungraded`, no contrasts
    intervals: Intervals = Intervals()  # how the intervals were computed


UNGRADED = "ungraded"  # the one group of an ungraded run's answers


def contrasts_of(benchmark: str) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """(key, title, positive labels, negative labels) of the answer-level contrasts of a benchmark."""
    from .data import FACTUAL

    if benchmark in FACTUAL:
        return [("hallucinated", "hallucinated (incorrect) vs not (correct or not attempted)", ("incorrect",),
                 ("correct", "not_attempted")),
                ("incorrect_vs_correct", "incorrect vs correct", ("incorrect",), ("correct",)),
                ("incorrect_vs_not_attempted", "incorrect vs not attempted", ("incorrect",), ("not_attempted",)),
                ("not_attempted_vs_correct", "not attempted vs correct", ("not_attempted",), ("correct",))]
    return [("incorrect_vs_correct", "incorrect vs correct answers", ("incorrect",), ("correct",))]


CONTROLLED_STATS = ("entropy", "varentropy", "entropy_norm", *LOGIT_STATS)  # the statistics with controlled rows


def _join_along_layers(parts: list[np.ndarray]) -> np.ndarray:
    """Per-answer values computed one group of layers at a time ([n, layers of the group(, H)] each), joined along
    the layers; a logit statistic's single [n] array as it is."""
    return np.concatenate(parts, axis=1) if parts[0].ndim > 1 else parts[0]


def concat_comparisons(parts: list[Comparison]) -> Comparison:
    """Comparisons of consecutive groups of cells (e.g. layer groups) as one along the first cell axis, the false
    discovery rate controlled over all of their cells together."""
    if len(parts) == 1:
        return parts[0]
    joined = {name: np.concatenate([getattr(c, name) for c in parts]) for name in ("auroc", "cohens_d", "p")}
    ci = {name: tuple(np.concatenate([getattr(c, name)[i] for c in parts]) for i in (0, 1))
          for name in ("auroc_ci", "cohens_d_ci")}
    return Comparison(joined["auroc"], ci["auroc_ci"], joined["cohens_d"], ci["cohens_d_ci"], joined["p"],
                      benjamini_hochberg(joined["p"]), parts[0].n_positive, parts[0].n_negative, parts[0].alpha)


def _cells_table(c: Comparison, layers: list[int], **names) -> pd.DataFrame:
    """`c`'s table, one row per cell (per layer x head where `names`' level is `head`, else per layer; one row for
    a single cell), with `names` (contrast, stat, aggregation, level, control) as columns."""
    if c.auroc.ndim == 0:
        table = c.table({"layer": np.array([-1]), "head": np.array([-1])})
    elif names["level"] == "head":
        n_layers, n_heads = c.auroc.shape
        table = c.table({"layer": np.repeat(layers, n_heads), "head": np.tile(np.arange(n_heads), n_layers)})
    else:
        table = c.table({"layer": np.asarray(layers), "head": np.full(len(layers), -1)})
    return table.assign(**names)


# ---------------------------------------------------------------- analyze_run, step by step

class AnswerContrast(NamedTuple):
    """An answer-level contrast and its groups, as masks over the analysed answers."""

    contrast: Contrast
    positive: np.ndarray
    negative: np.ndarray


class TokenContrast(NamedTuple):
    """A token-level contrast: the rows of the analysed tokens it compares (of the questions with tokens of both
    groups), which of them are in the positive group, and their questions (as their answers' rows in `kept`)."""

    contrast: Contrast
    rows: np.ndarray
    positive: np.ndarray
    question_ids: np.ndarray


@dataclass
class AnalysedAnswers:
    """The answers of a run that its contrasts compare, and those left out."""

    samples: pd.DataFrame  # every answer with its grade (label `ungraded` where the run is not graded)
    kept: pd.DataFrame  # the analysed answers: parsed, not empty, graded
    lengths: pd.Series  # tokens per analysed answer, aligned with `kept`
    token_rows: np.ndarray  # the rows of the run's tokens table that belong to analysed answers
    tokens: pd.DataFrame  # those rows, each with its answer's label
    token_answers: np.ndarray  # the answer of each row of `tokens`: its row in `kept`
    excluded: dict[str, int]  # answers left out, by reason
    graded: bool


class TokenControls(NamedTuple):
    """What the token contrasts' controls need of a run's tokens, computed once per run: the windows of
    `correct_baseline_windows` and the fit of `position_adjusted` (None where no token contrast is controlled)."""

    windows: dict[str, tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]]
    position: PositionFit | None


NO_TOKEN_CONTROLS = TokenControls({}, None)


class Design(NamedTuple):
    """What `analyze_run` compares on a run, worked out once from its tokens and grades: the analysed answers, the
    live answer-level contrasts and their controls' strata (`answer_controls`), the live token-level contrasts and
    their controls, and each answer's tokens (for the aggregations, `first_k` included)."""

    answers: AnalysedAnswers
    answer_contrasts: list[AnswerContrast]
    answer_controls: tuple[tuple[str, np.ndarray | None], ...]
    token_contrasts: list[TokenContrast]
    token_controls: TokenControls
    answer_groups: AnswerGroups


Key = tuple[str, str, str, str]  # (contrast, aggregation, level, control): one comparison of a statistic's cells
LEVELS = ("head", "layer", "token")  # every layer x head; per layer, the mean over heads; a logit statistic
CONTROL_ORDER = ("none", "stratified", "length_matched", "correct_baseline", "position_adjusted")


class Reduced(NamedTuple):
    """A statistic's comparisons on one group of layers (`compare_layer_group`) or, joined, on all of them
    (`join_layer_groups`), with the answers' means of its per-layer values (profiles, the answers table)."""

    comparisons: dict[Key, Comparison]
    answer_means: np.ndarray  # [analysed answers, layers] mean over the answer's tokens of the mean over heads
    # (a logit statistic: [analysed answers])
    layer_mean: np.ndarray | None  # [analysed tokens, layers] mean over heads (None for a logit statistic)


def analysed_answers(run) -> AnalysedAnswers:
    """The run's answers left after removing the unparsed, the empty and the ungraded ones, with their tokens; an
    ungraded run's answers all labelled `ungraded`."""
    samples, tokens = run.samples, run.tokens
    graded = "label" in samples
    if not graded:
        samples = samples.assign(label=UNGRADED)
    lengths = samples.completion_ids.map(len)
    excluded = {"unparsed": int((samples.label == "unparsed").sum()), "empty answer": int((lengths == 0).sum()),
                "not graded": int(samples.label.isna().sum())}  # the judge gave no reply and there was no label
    kept = samples[(samples.label != "unparsed") & (lengths > 0) & samples.label.notna()]
    label_of = kept.set_index("question_id").label
    token_rows = np.flatnonzero(tokens.question_id.isin(label_of.index).to_numpy())
    tok = tokens.iloc[token_rows].reset_index(drop=True)
    tok["label"] = tok.question_id.map(label_of).to_numpy()
    token_answers = pd.Index(kept.question_id).get_indexer(tok.question_id)
    return AnalysedAnswers(samples, kept, lengths[kept.index], token_rows, tok, token_answers, excluded, graded)


def answer_contrasts(kept: pd.DataFrame, benchmark: str) -> list[AnswerContrast]:
    """The benchmark's answer-level contrasts (`contrasts_of`) on the analysed answers."""
    out = []
    for key, title, pos_labels, neg_labels in contrasts_of(benchmark):
        pos_mask, neg_mask = kept.label.isin(pos_labels).to_numpy(), kept.label.isin(neg_labels).to_numpy()
        contrast = Contrast(key, title, "+".join(pos_labels), "+".join(neg_labels), "answer",
                            int(pos_mask.sum()), int(neg_mask.sum()))
        out.append(AnswerContrast(contrast, pos_mask, neg_mask))
    return out


def token_contrasts(kept: pd.DataFrame, tok: pd.DataFrame, window: int) -> list[TokenContrast]:
    """Wrong moment (math): tokens of incorrect answers whose critic located a span, against the tokens within
    `window` positions of it, against the answer's other tokens with a digit, and after it against before it."""
    in_error = tok.in_error.to_numpy(bool)
    span = kept.set_index("question_id")
    start = tok.question_id.map(span.error_token_start).to_numpy(float)
    end = tok.question_id.map(span.error_token_end).to_numpy(float)
    pos = tok.pos.to_numpy()
    nearby = position_matched(tok.question_id.to_numpy(), pos, in_error, window)
    before = (pos < start) & (pos >= start - window)
    after = (pos >= end) & (pos < end + window)
    # the wrong moment is mostly a number; its neighbours mostly words: compare numbers with numbers too
    numeric = has_digit(tok)
    answer_of = pd.Index(kept.question_id).get_indexer(tok.question_id)  # the question as its answer's row in kept
    out = []
    for key, title, positive, negative, pos_name, neg_name in (
            ("wrong_moment", f"wrong-moment tokens vs tokens within {window} positions of it", in_error,
             nearby, "wrong moment", "nearby"),
            ("wrong_moment_numbers", "wrong-moment tokens with a digit vs the other tokens with a digit of the "
             "same answers", in_error & numeric, ~in_error & numeric, "wrong moment (digits)", "other digits"),
            ("after_vs_before", f"the {window} tokens after the wrong moment vs the {window} before it", after,
             before, "after", "before")):
        rows = np.flatnonzero(positive | negative)
        qids = tok.question_id.to_numpy()[rows]
        both = list(set(qids[positive[rows]]) & set(qids[negative[rows]]))
        rows = rows[np.isin(qids, both)]  # a question without tokens of both groups compares nothing
        out.append(TokenContrast(Contrast(key, title, pos_name, neg_name, "token", len(both), len(both)), rows,
                                 positive[rows], answer_of[rows]))
    return out


def judge_group_sizes(contrasts: list[Contrast]) -> None:
    """Mark each contrast not computed (fewer than 2 questions in a group) or too small to conclude."""
    for contrast in contrasts:
        n = min(contrast.n_positive, contrast.n_negative)
        if n < 2:
            contrast.status = "not_computed"
            contrast.note = (f"not computed: {contrast.n_positive} {contrast.positive} vs {contrast.n_negative} "
                             f"{contrast.negative} questions (at least 2 per group needed)")
        elif n < MIN_QUESTIONS_TO_CONCLUDE:
            contrast.status = "too_small"
            contrast.note = (f"{contrast.n_positive} vs {contrast.n_negative} questions (the report draws "
                             f"conclusions from {MIN_QUESTIONS_TO_CONCLUDE} per group or more)")


def build_contrasts(answers: AnalysedAnswers, benchmark: str, window: int
                    ) -> tuple[list[AnswerContrast], list[TokenContrast]]:
    """The contrasts of a run, each with its status: the answer-level ones of a graded run, and the wrong moment's
    token-level ones where the benchmark is math and the critic ran."""
    from .data import FACTUAL

    by_answer = answer_contrasts(answers.kept, benchmark) if answers.graded else []
    by_token = (token_contrasts(answers.kept, answers.tokens, window)
                if benchmark not in FACTUAL and "in_error" in answers.tokens else [])
    judge_group_sizes([c.contrast for c in (*by_answer, *by_token)])
    return by_answer, by_token


def answer_controls(answers: AnalysedAnswers, benchmark: str) -> tuple[tuple[str, np.ndarray | None], ...]:
    """(control, the stratum of each analysed answer, or None where the control does not apply) of the controlled
    answer-level comparisons."""
    return (("stratified", answer_strata(answers.kept, benchmark)),
            ("length_matched", length_bins(answers.lengths.to_numpy(float))))


def correct_baseline_windows(answers: AnalysedAnswers, live: list[TokenContrast], window: int, template: np.ndarray
                             ) -> dict[str, tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]]:
    """Token contrast -> (`wrong_moment_windows`, is_incorrect) of its correct-baseline control; `template`: the
    `template_tokens` of the analysed tokens."""
    kept, tok = answers.kept, answers.tokens
    incorrect_ids = set(kept.question_id[kept.label == "incorrect"])
    correct_ids = set(kept.question_id[kept.label == "correct"])
    return {t.contrast.key: wrong_moment_windows(tok, incorrect_ids, correct_ids, t.contrast.key, window, template)
            for t in live}


def token_controls(answers: AnalysedAnswers, live: list[TokenContrast], window: int) -> TokenControls:
    """The `TokenControls` of the live token contrasts (none where there are none)."""
    if not live:
        return NO_TOKEN_CONTROLS
    template = template_tokens(answers.tokens)
    reference = position_reference(answers.tokens, template)
    return TokenControls(correct_baseline_windows(answers, live, window, template),
                         position_fit(answers.tokens, reference, template))


def position_adjusted_comparisons(values: np.ndarray, live: list[TokenContrast], fit: PositionFit,
                                  intervals: Intervals) -> dict[str, Comparison]:
    """Token contrast -> its comparison under `position_adjusted`: the raw contrast's tokens whose (type, position)
    bin the fit has, each less its bin's effect; contrasts left with fewer than 2 questions having tokens of both
    groups are left out. The fit is made once on all the questions, not again in each bootstrap resample."""
    effects = position_effects(values, fit)
    out = {}
    for t in live:
        fitted = fit.bins[t.rows] >= 0
        rows = t.rows[fitted]
        try:
            out[t.contrast.key] = compare_tokens(values[rows] - effects[fit.bins[rows]], t.positive[fitted],
                                                 t.question_ids[fitted], **intervals.kwargs())
        except ValueError:  # too few questions keep tokens of both groups
            pass
    return out


def controlled_comparisons(agg: np.ndarray, sel: np.ndarray, positive: np.ndarray, controls: tuple,
                           intervals: Intervals) -> list[tuple[str, Comparison]]:
    """(control, comparison) of the answers `sel` under each of `answer_controls` that applies to them."""
    out = []
    for control, groups in controls:
        if groups is None or len(np.unique(groups[sel])) < 2:
            continue
        try:
            out.append((control, compare_answers_stratified(agg[sel], positive[sel], groups[sel],
                                                            **intervals.kwargs())))
        except ValueError:  # too few answers of a group inside shared strata
            pass
    return out


def compare_layer_group(values: np.ndarray, stat: str, design: Design, intervals: Intervals) -> Reduced:
    """Every comparison of one statistic on one group of layers' per-token `values` ([n_tokens, layers, H], or a
    logit statistic's [n_tokens]), per level (`head`: each layer x head; `layer`: the mean over heads; `token`: a
    logit statistic): the answer-level contrasts under each aggregation, raw and, for the mean of a statistic in
    CONTROLLED_STATS, under `answer_controls`; the token-level contrasts raw and, for those statistics, against the
    correct answers' pseudo-moments (`correct_baseline`, where each side has at least 2 answers) and with position
    and type adjusted (`position_adjusted`, where the contrast keeps 2 questions). The false discovery rate is
    controlled over all the layers' cells when the groups are joined (`join_layer_groups`)."""
    layer_mean = values.mean(axis=2) if values.ndim == 3 else None
    variants = {"head": values, "layer": layer_mean} if values.ndim == 3 else {"token": values}
    controlled = stat in CONTROLLED_STATS
    controls = design.token_controls if controlled else NO_TOKEN_CONTROLS
    found = {}
    for level, v in variants.items():
        for how in AGGREGATIONS:
            rows, agg = design.answer_groups.aggregate(v, how)
            agg = agg[np.argsort(rows)]  # in the order of `kept`
            if how == "mean" and level != "head":
                answer_means = agg
            for a in design.answer_contrasts:
                sel = a.positive | a.negative
                found[a.contrast.key, how, level, "none"] = compare_answers(agg[sel], a.positive[sel],
                                                                            **intervals.kwargs())
                if how == "mean" and controlled:
                    for control, c in controlled_comparisons(agg, sel, a.positive, design.answer_controls, intervals):
                        found[a.contrast.key, how, level, control] = c
        for t in design.token_contrasts:
            key = t.contrast.key
            found[key, "tokens", level, "none"] = compare_tokens(v[t.rows], t.positive, t.question_ids,
                                                                 **intervals.kwargs())
            if key in controls.windows:
                windows, is_incorrect = controls.windows[key]
                if is_incorrect.sum() >= 2 and (~is_incorrect).sum() >= 2:
                    found[key, "tokens", level, "correct_baseline"] = compare_answers(
                        window_differences(v, windows), is_incorrect, **intervals.kwargs())
        if controls.position is not None:
            adjusted = position_adjusted_comparisons(v, design.token_contrasts, controls.position, intervals)
            found.update({(key, "tokens", level, "position_adjusted"): c for key, c in adjusted.items()})
    return Reduced(found, answer_means, layer_mean)


def join_layer_groups(parts: list[Reduced]) -> Reduced:
    """The `compare_layer_group` results of consecutive groups of layers as those of all the layers: comparisons
    joined along the layers with the false discovery rate controlled over all their cells, values joined."""
    return Reduced({key: concat_comparisons([p.comparisons[key] for p in parts]) for key in parts[0].comparisons},
                   _join_along_layers([p.answer_means for p in parts]),
                   None if parts[0].layer_mean is None else np.concatenate([p.layer_mean for p in parts], axis=1))


def reduce_group(run, read: str, stats: list[str], group: list[int] | None, design: Design,
                 intervals: dict[str, Intervals], scratch: Scratch | None = None) -> dict[str, Reduced]:
    """`compare_layer_group` of each of `stats` (the statistics computed from the statistic `read`, `reads`) on one
    group of layers (None: all, or a logit statistic), read here once (into an array of `scratch` if given):
    entropy / ln K is divided out of entropy's values in place, after entropy's comparisons."""
    if read in LOGIT_STATS:
        return _compare_stats(run.tokens[read].to_numpy(np.float64), run, None, stats, design, intervals)
    shape = (len(run.tokens), len(run.layers if group is None else group), run.n_heads)
    with scratch.array(shape) if scratch is not None else nullcontext() as out:
        return _compare_stats(run.attn(read, group, out=out), run, group, stats, design, intervals)


def _compare_stats(values: np.ndarray, run, group: list[int] | None, stats: list[str], design: Design,
                   intervals: dict[str, Intervals]) -> dict[str, Reduced]:
    rows = design.answers.token_rows
    if len(rows) < len(values):  # (the rows are increasing: as many is all of them, no copy)
        values = values[rows]
    out = {}
    for stat in stats:
        if stat in DERIVED:
            values /= log_keys(run, group)[rows][:, :, None]
        out[stat] = compare_layer_group(values, stat, design, intervals[stat])
    return out


class RayGroups:
    """Groups of layers reduced as Ray tasks (`analyze_run(..., ray=ADDRESS)`, `attentropy report --ray`): the run
    and its design go into the object store once; each task reads its group from the run directory (a shared file
    system across machines) and returns its comparisons, in order."""

    def __init__(self, address: str | None, run, design: Design):
        from .parallel import _ray

        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
        self.ray, self.task = ray, ray.remote(reduce_group)
        self.run, self.design = ray.put(run), ray.put(design)

    def map(self, todo: list[tuple[str, list[str], list[int] | None]], intervals: dict[str, Intervals]) -> list:
        return self.ray.get([self.task.remote(self.run, read, stats, group, self.design, intervals)
                             for read, stats, group in todo])


def reduce_stats(run, stats: tuple[str, ...], groups: list, design: Design, intervals: dict[str, Intervals],
                 workers: int = 1, ray: RayGroups | None = None) -> dict[str, Reduced]:
    """Statistic -> its comparisons on all of the run's layers: `reduce_group` of every statistic read (`reads`)
    and group of `groups` (`Run.layer_groups`; a logit statistic at once), `workers` at once on threads (reading and
    numpy's work release the GIL), or as tasks on `ray`; joined in order."""
    todo = [(read, derived, group) for read, derived in reads(stats).items()
            for group in ([None] if read in LOGIT_STATS else groups)]
    workers = min(workers, len(todo))
    largest = max((len(run.layers if g is None else g) for read, _, g in todo if read not in LOGIT_STATS), default=0)
    scratch = Scratch(workers, len(run.tokens) * largest * run.n_heads) if largest and ray is None else None
    if ray is not None and len(todo) > 1:
        results = ray.map(todo, intervals)
    elif workers > 1:
        # the groups run on threads; BLAS's own threads (the position fit's products) would only compete with them
        with ThreadPoolExecutor(workers) as pool, threadpool_limits(1, user_api="blas"):
            results = list(pool.map(lambda t: reduce_group(run, *t, design, intervals, scratch), todo))
    else:
        results = [reduce_group(run, *t, design, intervals, scratch) for t in todo]
    parts: dict[str, list[Reduced]] = {}
    for result in results:
        for stat, reduced in result.items():
            parts.setdefault(stat, []).append(reduced)
    return {stat: join_layer_groups(parts[stat]) for stat in stats}


def tables_of(stat: str, reduced: Reduced, design: Design, layers: list[int]) -> list[pd.DataFrame]:
    """A statistic's comparisons as tables, in the report's order: the answer-level contrasts by aggregation, level,
    contrast and control, then the token-level contrasts by contrast, level and control."""
    answer_keys = [a.contrast.key for a in design.answer_contrasts]
    token_keys = [t.contrast.key for t in design.token_contrasts]

    def order(key: Key) -> tuple:
        contrast, how, level, control = key
        level, control = LEVELS.index(level), CONTROL_ORDER.index(control)
        if how == "tokens":
            return 1, token_keys.index(contrast), level, control
        return 0, AGGREGATIONS.index(how), level, answer_keys.index(contrast), control

    return [_cells_table(reduced.comparisons[key], layers, contrast=key[0], stat=stat, aggregation=key[1],
                         level=key[2], control=key[3]) for key in sorted(reduced.comparisons, key=order)]


def profiles(stat: str, means: np.ndarray, kept: pd.DataFrame, layers: list[int], intervals: Intervals
             ) -> list[pd.DataFrame]:
    """Per label: the mean over its answers of their per-layer means `means` [analysed answers, n_layers], with a
    95 % interval over the answers: mean +- 1.96 standard errors (`clustered`), or the percentile bootstrap."""
    out = []
    for label in sorted(kept.label.unique()):
        members = means[(kept.label == label).to_numpy()]
        if intervals.method == "clustered":
            se = members.std(axis=0, ddof=1) / np.sqrt(len(members)) if len(members) > 1 else np.zeros(len(layers))
            lo, hi = wald_interval(members.mean(axis=0), se)
        else:
            w = resample_counts(np.random.default_rng(intervals.seed), len(members), intervals.n_boot)
            lo, hi = np.percentile(w @ members / len(members), [2.5, 97.5], axis=0)
        out.append(pd.DataFrame({"group": label, "stat": stat, "layer": layers, "mean": members.mean(axis=0),
                                 "lo": lo, "hi": hi, "n": len(members)}))
    return out


def compare_answer_lengths(live: list[AnswerContrast], lengths: pd.Series, layers: list[int], intervals: Intervals
                           ) -> list[pd.DataFrame]:
    """Answer length: a confound of every answer-level mean (the maximal attention entropy grows with position)."""
    return [_cells_table(compare_answers(lengths.to_numpy(float)[a.positive | a.negative],
                                         a.positive[a.positive | a.negative], **intervals.kwargs()), layers,
                                 contrast=a.contrast.key, stat="answer_length", aggregation="count", level="answer",
                         control="none")
            for a in live]


def analyze_run(run, *, interval: str = "clustered", n_boot: int = 1000, seed: int = 0, window: int = WINDOW,
                first_k: int = FIRST_K, stats: tuple[str, ...] | None = None, read_bytes: int = READ_BYTES,
                workers: int | None = None, ray: str | None = None) -> Analysis:
    """The three contrasts of the study on a graded run (`attentropy grade` first): answer-level contrasts for
    every statistic per layer x head and per layer (mean over heads) under each aggregation, and, for math,
    the critic's wrong moment vs nearby tokens and after vs before it (token level, position-matched).
    Attention statistics are read in groups of layers of about `read_bytes` (`Run.layer_groups`): memory holds the
    run's tokens table, one group's values and the per-answer reductions, whatever the number of layers; the
    results are those of reading everything at once; `workers` groups at once (default: one per core this process
    may use), each holding its values; with `ray` (an address, "" for a local cluster or RAY_ADDRESS's) as Ray
    tasks instead, the same tables. Intervals: `interval` (`stats.INTERVAL_METHODS`; `n_boot`
    and `seed` for the bootstrap).
    An ungraded run (free prompts, or a benchmark run not graded yet) gets everything that needs no labels: its
    answers form one group, `ungraded`, with profiles and per-token values, and no contrasts (`graded` False).
    Steps: `analysed_answers`, `build_contrasts`, `token_controls` (the `Design`), then `reduce_stats`: each
    statistic read once per group of layers (`reads`; entropy / ln K from entropy's values) and compared there
    (`compare_layer_group`), the groups joined (`join_layer_groups`); per statistic `tables_of` and `profiles`;
    last `compare_answer_lengths`."""
    from .schema import ATTN_STATS

    stats = tuple(stats or (*ATTN_STATS, "entropy_norm", *LOGIT_STATS))
    intervals = Intervals(interval, n_boot, seed)
    benchmark = run.config["benchmark"]
    layers = list(run.layers)
    answers = analysed_answers(run)
    by_answer, by_token = build_contrasts(answers, benchmark, window)
    live_answer = [a for a in by_answer if a.contrast.status != "not_computed"]
    live_token = [t for t in by_token if t.contrast.status != "not_computed"]
    token_control = (token_controls(answers, live_token, window)
                     if any(stat in CONTROLLED_STATS for stat in stats) else NO_TOKEN_CONTROLS)
    design = Design(answers, live_answer, answer_controls(answers, benchmark), live_token, token_control,
                    AnswerGroups(answers.token_answers, first_k))
    groups = [None] if all(stat in LOGIT_STATS for stat in stats) else run.layer_groups(read_bytes)

    ray_groups = RayGroups(ray, run, design) if ray is not None else None
    reduced = reduce_stats(run, stats, groups, design, {stat: replace(intervals, seed=seed + s)
                                                        for s, stat in enumerate(stats)}, workers or threads(),
                           ray_groups)
    tables, profile_tables = [], []
    for stat in stats:
        tables += tables_of(stat, reduced[stat], design, layers)
        if stat in PROFILE_STATS:
            profile_tables += profiles(stat, reduced[stat].answer_means, answers.kept, layers, intervals)
    tables += compare_answer_lengths(live_answer, answers.lengths, layers, intervals)
    layer_means = {stat: r.layer_mean for stat, r in reduced.items() if stat in LAYER_MEAN_STATS}
    answer_means = {stat: r.answer_means for stat, r in reduced.items()}

    columns = ["contrast", "stat", "aggregation", "level", "control", "layer", "head"]
    comparisons = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
    comparisons = comparisons[columns + [c for c in comparisons.columns if c not in columns]]
    kept = answers.kept
    table = pd.DataFrame({"question_id": kept.question_id.to_numpy(), "label": kept.label.to_numpy(),
                          "n_tokens": answers.lengths.to_numpy()})
    for stat, v in answer_means.items():
        table[stat if stat in LOGIT_STATS else f"attn_{stat}"] = v.mean(axis=1) if v.ndim == 2 else v
    return Analysis(name=Path(run.path).name, path=str(run.path), config=run.config, benchmark=benchmark,
                    intervals=intervals,
                    layers=layers, n_heads=run.n_heads, excluded=answers.excluded,
                    contrasts=[c.contrast for c in (*by_answer, *by_token)], comparisons=comparisons,
                    profiles=pd.concat(profile_tables, ignore_index=True) if profile_tables else
                    pd.DataFrame(columns=["group", "stat", "layer", "mean", "lo", "hi", "n"]),
                    samples=answers.samples, answers=table, tokens=answers.tokens, layer_means=layer_means,
                    graded=answers.graded)
