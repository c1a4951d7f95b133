"""The study's contrasts on a graded run: which groups of answers (and of tokens inside answers) are compared, the
controls of a contrast (question kind, answer length, a correct-answer baseline of the wrong moment), and
`analyze_run`, which compares them for every statistic, per layer x head and per layer, into the `Analysis` that the
report shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .stats import (WINDOW, Comparison, answer_aggregates, benjamini_hochberg, compare_answers,
                    compare_answers_stratified, compare_tokens, position_matched, resample_counts)
from .store import READ_BYTES

AGGREGATIONS = ("mean", "max", "first_k")
FIRST_K = 8  # tokens of the `first_k` aggregation
MIN_QUESTIONS_TO_CONCLUDE = 10  # questions per group below which the report says "too small to conclude"
PROFILE_STATS = ("entropy", "varentropy", "entropy_norm")
LAYER_MEAN_STATS = ("entropy", "varentropy", "entropy_norm")  # kept per token and layer for the figures and viewer
LOGIT_STATS = ("logit_entropy", "logit_varentropy", "logprob")


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
LENGTH_BIN_WIDTH = 0.05  # the length control: pairs of answers whose lengths differ by at most ~5 %
CONTROLS = {"none": "raw: as computed",
            "stratified": "pairs inside one question kind only (facts: the kind; SimpleQA: the topic; arith: the "
                          "number of steps)",
            "length_matched": "pairs of answers whose lengths differ by at most ~5 % only",
            "correct_baseline": "difference in differences: the wrong moment against its window in incorrect "
                                "answers, minus a pseudo-moment at the same token position against its window "
                                "in correct answers (template tokens left out of every window)"}


def answer_strata(kept: pd.DataFrame, benchmark: str) -> np.ndarray | None:
    """The stratum of each answer for the stratified control, or None when the benchmark has no kinds."""
    from .data import question_kind

    if benchmark == "gsm8k":
        return None
    kinds = np.array([question_kind(benchmark, m) for m in kept.metadata])
    return kinds if len(np.unique(kinds)) > 1 else None


def length_bins(lengths: np.ndarray, width: float = LENGTH_BIN_WIDTH) -> np.ndarray:
    """The length stratum of each answer: bins of `width` in ln(length), so answers paired inside one differ in
    length by at most ~5 % (exactly equal up to 20 tokens): a coarser binning leaves a length difference inside
    each bin that the statistics' growth with position still shows."""
    return np.floor(np.log(np.maximum(np.asarray(lengths, float), 1.0)) / width).astype(int)


_TEMPLATE = re.compile(r"The final answer is")


def template_tokens(tok: pd.DataFrame) -> np.ndarray:
    """Tokens of the protocol's template: the closing "The final answer is N" sentence and chat markup
    (<|...|> tokens), whatever the answer. Windows around a wrong moment leave them out: any answer, right or
    wrong, has them at its end."""
    out = np.array(tok.token.astype(str).str.fullmatch(r"\s*<\|[^|]+\|>\s*"), dtype=bool)
    for _, rows in tok.groupby("question_id", sort=False).indices.items():
        text, starts = "", []
        for t in tok.token.iloc[rows].astype(str):
            starts.append(len(text))
            text += t
        m = None
        for m in _TEMPLATE.finditer(text):
            pass
        if m is not None:
            out[rows[np.searchsorted(starts, m.start(), side="right") - 1:]] = True
    return out


def wrong_moment_windows(tok: pd.DataFrame, incorrect: set, correct: set, kind: str, window: int = WINDOW,
                         template: np.ndarray | None = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Per answer, the two token sets whose difference of means (moment - its window) is behind the
    `correct_baseline` control (`window_differences`): in
    incorrect answers the critic's wrong moment; in correct answers a pseudo-moment of the same length at the
    same token position (the correct answers, in question order, take the located incorrect ones' positions in
    turn; moved earlier where the answer is shorter): the statistics grow with the number of visible keys, so the
    same position, not the same share of the answer, is what cancels that growth. `kind`: wrong_moment (window:
    tokens within `window` positions), wrong_moment_numbers (the moment's digit tokens against the answer's other
    digit tokens; the pseudo-moment is the number nearest the position), after_vs_before (the `window` tokens after
    minus the `window` before). Template tokens are in no window.
    `template`: `template_tokens(tok)` when already computed. Returns ([(moment rows, window rows)] as rows of
    `tok`, is_incorrect) per answer with both sets non-empty."""
    template = template_tokens(tok) if template is None else template
    digits = tok.token.astype(str).str.contains(r"\d").to_numpy(bool)
    in_error = tok.in_error.to_numpy(bool)
    groups = tok.groupby("question_id", sort=False).indices
    located = sorted(q for q in incorrect if q in groups and in_error[groups[q]].any())
    shapes = [(int(np.flatnonzero(in_error[groups[q]])[0]), int(in_error[groups[q]].sum())) for q in located]
    windows, is_incorrect = [], []
    for i, q in enumerate(located + sorted(q for q in correct if q in groups)):
        rows = groups[q]
        n, keep = len(rows), ~template[rows]
        if i < len(located):
            span = np.flatnonzero(in_error[rows])
        else:
            if not shapes:
                break
            start, length = shapes[(i - len(located)) % len(shapes)]
            free = int(keep.sum())
            start = int(min(start, max(free - length, 0)))
            span = np.arange(start, min(start + length, n))
            if kind == "wrong_moment_numbers":  # the number nearest that position
                candidates = np.flatnonzero(digits[rows] & keep)
                if not len(candidates):
                    continue
                centre = candidates[np.argmin(np.abs(candidates - start))]
                span = np.array([centre])
        if kind == "wrong_moment_numbers":
            moment = span[digits[rows][span]]
            other = np.setdiff1d(np.flatnonzero(digits[rows] & keep), span)
            first, second = moment, other
        elif kind == "after_vs_before":
            positions = np.arange(n)
            first = positions[(positions >= span[-1] + 1) & (positions <= span[-1] + window) & keep]
            second = positions[(positions < span[0]) & (positions >= span[0] - window) & keep]
        else:
            positions = np.arange(n)
            near = (positions >= span[0] - window) & (positions <= span[-1] + window) & keep
            first, second = span, np.setdiff1d(positions[near], span)
        if len(first) and len(second):
            windows.append((rows[first], rows[second]))
            is_incorrect.append(i < len(located))
    return windows, np.array(is_incorrect, bool)


def window_differences(values: np.ndarray, windows: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """[n_windows, *cells]: per (moment rows, window rows) of `wrong_moment_windows`, the mean of `values` over the
    moment minus its mean over the window."""
    out = np.zeros((len(windows), *values.shape[1:]))
    for i, (first, second) in enumerate(windows):
        out[i] = values[first].mean(axis=0) - values[second].mean(axis=0)
    return out


def token_values(run, stat: str, layers: list[int] | None = None) -> np.ndarray:
    """Per-token values of a statistic: attention stats [n_tokens, len(layers), H] (default: all recorded layers);
    `entropy_norm` = entropy / ln n_keys (the fraction of the maximal entropy, which removes the growth with
    position); logit stats [n_tokens]."""
    if stat in LOGIT_STATS:
        return run.tokens[stat].to_numpy(np.float64)
    if stat == "entropy_norm":
        log_keys = np.log(np.maximum(run.tokens["n_keys"].to_numpy(np.float64), 2.0))
        return run.attn("entropy", layers) / log_keys[:, None, None].astype(np.float32)
    return run.attn(stat, layers)


def _join_layer_groups(parts: list[np.ndarray]) -> np.ndarray:
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


def _cells_table(c: Comparison, layers: list[int], per_head: bool) -> pd.DataFrame:
    if c.auroc.ndim == 0:
        return c.table({"layer": np.array([-1]), "head": np.array([-1])})
    if per_head:
        n_layers, n_heads = c.auroc.shape
        return c.table({"layer": np.repeat(layers, n_heads), "head": np.tile(np.arange(n_heads), n_layers)})
    return c.table({"layer": np.asarray(layers), "head": np.full(len(layers), -1)})


def analyze_run(run, *, n_boot: int = 1000, seed: int = 0, window: int = WINDOW, first_k: int = FIRST_K,
                stats: tuple[str, ...] | None = None, read_bytes: int = READ_BYTES) -> Analysis:
    """The three contrasts of the study on a graded run (`attentropy grade` first): answer-level contrasts for
    every statistic per layer x head and per layer (mean over heads) under each aggregation, and, for math,
    the critic's wrong moment vs nearby tokens and after vs before it (token level, position-matched).
    Attention statistics are read in groups of layers of about `read_bytes` (`Run.layer_groups`): memory holds the
    run's tokens table, one group's values and the per-answer reductions, whatever the number of layers; the
    results are those of reading everything at once.
    An ungraded run (free prompts, or a benchmark run not graded yet) gets everything that needs no labels: its
    answers form one group, `ungraded`, with profiles and per-token values, and no contrasts (`graded` False)."""
    from .schema import ATTN_STATS
    from .data import FACTUAL

    samples, tokens = run.samples, run.tokens
    graded = "label" in samples
    if not graded:
        samples = samples.assign(label=UNGRADED)
    stats = tuple(stats or (*ATTN_STATS, "entropy_norm", *LOGIT_STATS))
    benchmark = run.config["benchmark"]
    lengths = samples.completion_ids.map(len)
    excluded = {"unparsed": int((samples.label == "unparsed").sum()), "empty answer": int((lengths == 0).sum()),
                "not graded": int(samples.label.isna().sum())}  # the judge gave no reply and there was no label
    kept = samples[(samples.label != "unparsed") & (lengths > 0) & samples.label.notna()]
    label_of = kept.set_index("question_id").label
    token_rows = np.flatnonzero(tokens.question_id.isin(label_of.index).to_numpy())
    tok = tokens.iloc[token_rows].reset_index(drop=True)
    tok["label"] = tok.question_id.map(label_of).to_numpy()
    layers = list(run.layers)

    answer_contrasts = []
    contrasts: list[Contrast] = []
    for key, title, pos_labels, neg_labels in contrasts_of(benchmark) if graded else []:
        pos_mask, neg_mask = kept.label.isin(pos_labels).to_numpy(), kept.label.isin(neg_labels).to_numpy()
        contrast = Contrast(key, title, "+".join(pos_labels), "+".join(neg_labels), "answer",
                            int(pos_mask.sum()), int(neg_mask.sum()))
        contrasts.append(contrast)
        answer_contrasts.append((contrast, pos_mask, neg_mask))

    # Wrong moment (math): tokens of incorrect answers whose critic located a span.
    token_contrasts = []
    if benchmark not in FACTUAL and "in_error" in tok:
        in_error = tok.in_error.to_numpy(bool)
        span = kept.set_index("question_id")
        start = tok.question_id.map(span.error_token_start).to_numpy(float)
        end = tok.question_id.map(span.error_token_end).to_numpy(float)
        pos = tok.pos.to_numpy()
        nearby = position_matched(tok.question_id.to_numpy(), pos, in_error, window)
        before = (pos < start) & (pos >= start - window)
        after = (pos >= end) & (pos < end + window)
        # the wrong moment is mostly a number; its neighbours mostly words: compare numbers with numbers too
        numeric = tok.token.str.contains(r"\d").to_numpy(bool)
        for key, title, positive, negative, pos_name, neg_name in (
                ("wrong_moment", f"wrong-moment tokens vs tokens within {window} positions of it", in_error,
                 nearby, "wrong moment", "nearby"),
                ("wrong_moment_numbers", "wrong-moment tokens with a digit vs the other tokens with a digit of the "
                 "same answers", in_error & numeric, ~in_error & numeric, "wrong moment (digits)", "other digits"),
                ("after_vs_before", f"the {window} tokens after the wrong moment vs the {window} before it", after,
                 before, "after", "before")):
            rows = np.flatnonzero(positive | negative)
            qids = tok.question_id.to_numpy()[rows]
            n_both = len(set(qids[positive[rows]]) & set(qids[negative[rows]]))
            contrast = Contrast(key, title, pos_name, neg_name, "token", n_both, n_both)
            contrasts.append(contrast)
            token_contrasts.append((contrast, rows, positive[rows], qids))

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

    strata = answer_strata(kept, benchmark)
    bins = length_bins(lengths[kept.index].to_numpy(float))
    windows = {}  # token contrast -> (wrong-moment windows, is_incorrect) of its correct-baseline control
    if any(stat in CONTROLLED_STATS for stat in stats):
        live = [c for c, *_ in token_contrasts if c.status != "not_computed"]
        template = template_tokens(tok) if live else None
        incorrect_ids = set(kept.question_id[kept.label == "incorrect"])
        correct_ids = set(kept.question_id[kept.label == "correct"])
        for contrast in live:
            windows[contrast.key] = wrong_moment_windows(tok, incorrect_ids, correct_ids, contrast.key, window,
                                                         template)

    def controlled(agg: np.ndarray, sel: np.ndarray, pos_mask: np.ndarray, s: int) -> list[tuple[str, Comparison]]:
        out = []
        for control, groups in (("stratified", strata), ("length_matched", bins)):
            if groups is None or len(np.unique(groups[sel])) < 2:
                continue
            try:
                out.append((control, compare_answers_stratified(agg[sel], pos_mask[sel], groups[sel], n_boot=n_boot,
                                                                seed=seed + s)))
            except ValueError:  # too few answers of a group inside shared strata
                pass
        return out

    qids, kept_ids = tok.question_id.to_numpy(), kept.question_id
    groups = [None] if all(stat in LOGIT_STATS for stat in stats) else run.layer_groups(read_bytes)
    tables = []
    layer_means: dict[str, np.ndarray] = {}
    answer_means: dict[str, np.ndarray] = {}
    profiles = []
    for s, stat in enumerate(stats):
        # Everything the contrasts need of the per-token values, reduced one group of layers at a time: per level
        # (head: every layer x head; layer: mean over heads; token: a logit statistic) the answers' aggregates,
        # the wrong-moment differences, and the token contrasts (compared per group, joined after).
        aggregates, differences, token_parts = {}, {}, {}
        per_layer = []
        for group in ([None] if stat in LOGIT_STATS else groups):
            values = token_values(run, stat, group)[token_rows]
            if values.ndim == 3:
                per_layer.append(values.mean(axis=2))  # [n_tokens, len(group)]
            variants = [("head", values), ("layer", per_layer[-1])] if values.ndim == 3 else [("token", values)]
            for level, v in variants:
                for how in AGGREGATIONS:
                    questions, agg = answer_aggregates(v, qids, how, first_k)
                    aggregates.setdefault((how, level), []).append(agg[pd.Index(questions).get_indexer(kept_ids)])
                for key, (wins, _) in windows.items() if stat in CONTROLLED_STATS else ():
                    differences.setdefault((key, level), []).append(window_differences(v, wins))
                for contrast, rows, positive, row_qids in token_contrasts:
                    if contrast.status != "not_computed":
                        token_parts.setdefault((contrast.key, level), []).append(
                            compare_tokens(v[rows], positive, row_qids, n_boot=n_boot, seed=seed + s))
            del values
        joined = {k: _join_layer_groups(v) for k, v in aggregates.items()}
        if per_layer and stat in LAYER_MEAN_STATS:
            layer_means[stat] = np.concatenate(per_layer, axis=1)
        levels = ("head", "layer") if stat not in LOGIT_STATS else ("token",)
        for how in AGGREGATIONS:
            for level in levels:
                agg = joined[(how, level)]
                if how == "mean" and level != "head":
                    answer_means[stat] = agg
                for contrast, pos_mask, neg_mask in answer_contrasts:
                    if contrast.status == "not_computed":
                        continue
                    sel = pos_mask | neg_mask
                    c = compare_answers(agg[sel], pos_mask[sel], n_boot=n_boot, seed=seed + s)
                    found = [("none", c)]
                    if how == "mean" and stat in CONTROLLED_STATS:
                        found += controlled(agg, sel, pos_mask, s)
                    for control, c in found:
                        tables.append(_cells_table(c, layers, level == "head").assign(
                            contrast=contrast.key, stat=stat, aggregation=how, level=level, control=control))
        for contrast, *_ in token_contrasts:
            if contrast.status == "not_computed":
                continue
            for level in levels:
                c = concat_comparisons(token_parts[(contrast.key, level)])
                tables.append(_cells_table(c, layers, level == "head").assign(
                    contrast=contrast.key, stat=stat, aggregation="tokens", level=level, control="none"))
                if stat not in CONTROLLED_STATS:
                    continue
                is_incorrect = windows[contrast.key][1]
                if is_incorrect.sum() >= 2 and (~is_incorrect).sum() >= 2:
                    diffs = _join_layer_groups(differences[(contrast.key, level)])
                    c = compare_answers(diffs, is_incorrect, n_boot=n_boot, seed=seed + s)
                    tables.append(_cells_table(c, layers, level == "head").assign(
                        contrast=contrast.key, stat=stat, aggregation="tokens", level=level,
                        control="correct_baseline"))
        if stat in PROFILE_STATS and stat in answer_means:
            for label in sorted(kept.label.unique()):
                members = answer_means[stat][(kept.label == label).to_numpy()]
                w = resample_counts(np.random.default_rng(seed), len(members), n_boot)
                boot = w @ members / len(members)
                lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
                profiles.append(pd.DataFrame({"group": label, "stat": stat, "layer": layers,
                                              "mean": members.mean(axis=0), "lo": lo, "hi": hi,
                                              "n": len(members)}))

    # Answer length: a confound of every answer-level mean (the maximal attention entropy grows with position).
    for contrast, pos_mask, neg_mask in answer_contrasts:
        if contrast.status != "not_computed":
            sel = pos_mask | neg_mask
            c = compare_answers(lengths[kept.index].to_numpy(float)[sel], pos_mask[sel], n_boot=n_boot, seed=seed)
            tables.append(_cells_table(c, layers, False).assign(contrast=contrast.key, stat="answer_length",
                                                               aggregation="count", level="answer", control="none"))

    columns = ["contrast", "stat", "aggregation", "level", "control", "layer", "head"]
    comparisons = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
    comparisons = comparisons[columns + [c for c in comparisons.columns if c not in columns]]
    answers = pd.DataFrame({"question_id": kept.question_id.to_numpy(), "label": kept.label.to_numpy(),
                            "n_tokens": lengths[kept.index].to_numpy()})
    for stat, v in answer_means.items():
        answers[stat if stat in LOGIT_STATS else f"attn_{stat}"] = v.mean(axis=1) if v.ndim == 2 else v
    return Analysis(name=Path(run.path).name, path=str(run.path), config=run.config, benchmark=benchmark,
                    layers=layers, n_heads=run.n_heads, excluded=excluded, contrasts=contrasts,
                    comparisons=comparisons, profiles=pd.concat(profiles, ignore_index=True) if profiles else
                    pd.DataFrame(columns=["group", "stat", "layer", "mean", "lo", "hi", "n"]),
                    samples=samples, answers=answers, tokens=tok, layer_means=layer_means, graded=graded)
