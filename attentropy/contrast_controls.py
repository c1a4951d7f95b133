"""The controls of a contrast: what each one holds fixed (`CONTROLS`), the strata of the answer-level ones
(question kind, answer-length bins), the correct-answer baseline of a wrong moment (its windows and their
differences of means), with the template tokens that no window holds, and the position-and-type adjustment of token
values (`PositionFit`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from .stats import WINDOW

LENGTH_BIN_WIDTH = 0.05  # the length control: pairs of answers whose lengths differ by at most ~5 %
CONTROLS = {"none": "raw: as computed",
            "stratified": "pairs inside one question kind only (facts: the kind; SimpleQA: the topic; arith: the "
                          "number of steps)",
            "length_matched": "pairs of answers whose lengths differ by at most ~5 % only",
            "correct_baseline": "difference in differences: the wrong moment against its window in incorrect "
                                "answers, minus a pseudo-moment at the same token position against its window "
                                "in correct answers (template tokens left out of every window)",
            "position_adjusted": "each token's value minus what its position in the answer and its type (with a "
                                 "digit or not) predict, fitted with one offset per answer on the tokens before "
                                 "any wrong moment (correct answers', incorrect ones' up to it), then compared "
                                 "inside answers as raw (template tokens left out)"}


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


def has_digit(tok: pd.DataFrame) -> np.ndarray:
    """Whether each token holds a digit: the token type that the digit contrast and the position adjustment hold
    fixed."""
    return tok.token.astype(str).str.contains(r"\d").to_numpy(bool)


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
    digits = has_digit(tok)
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
    """[n_windows, *cells] float64: per (moment rows, window rows) of `wrong_moment_windows`, the mean of `values`
    over the moment minus its mean over the window, each mean summed in the values' precision in row order (as
    numpy's mean over the rows of per-cell values; a 1-D array numpy sums pairwise) by one sparse product for all
    the windows."""
    if not windows:
        return np.zeros((0, *values.shape[1:]))
    flat = values.reshape(len(values), -1)

    def means(rows: list[np.ndarray]) -> np.ndarray:
        counts = np.array([len(r) for r in rows], np.int64)
        members = sparse.csr_matrix((np.ones(int(counts.sum()), flat.dtype),
                                     (np.repeat(np.arange(len(rows)), counts), np.concatenate(rows))),
                                    shape=(len(rows), len(flat)))
        return (members @ flat) / counts[:, None].astype(flat.dtype)

    out = means([first for first, _ in windows]) - means([second for _, second in windows])
    return out.astype(np.float64).reshape(len(windows), *values.shape[1:])


def position_reference(tok: pd.DataFrame, template: np.ndarray) -> np.ndarray:
    """The tokens the position adjustment is fitted on: those before anything went wrong as far as the critic says
    (every token of a correct answer, those of an incorrect answer before its located wrong moment), template tokens
    left out. `tok` needs `label`, `in_error` and `after_error`."""
    located = tok.question_id.isin(tok.question_id[tok.in_error]).to_numpy()
    before = ~(tok.in_error.to_numpy(bool) | tok.after_error.to_numpy(bool))
    return ((tok.label.to_numpy() == "correct") | located) & before & ~template


@dataclass
class PositionFit:
    """The `position_adjusted` control's least-squares fit on a run's analysed tokens, value = the offset of the
    answer + the effect of the token's (type, position) bin + noise, on the reference tokens: what depends on the
    tokens alone, computed once per run; `position_effects` gives one statistic's bin effects."""

    bins: np.ndarray  # per analysed token, its bin; -1 where no reference token has it, and for template tokens
    by_bin: sparse.csr_matrix  # [bins, analysed tokens] 1 where a reference token is in the bin
    by_answer: sparse.csr_matrix  # [answers with reference tokens, analysed tokens] 1 where a reference token is
    # of the answer
    overlap: np.ndarray  # [answers, bins] reference tokens of each answer in each bin
    solve: np.ndarray  # [bins, bins] pseudo-inverse of the bins' normal matrix, the answers' offsets profiled out


def position_fit(tok: pd.DataFrame, reference: np.ndarray, template: np.ndarray) -> PositionFit:
    """The `PositionFit` of the analysed tokens `tok` (`pos`, `token`, `question_id`) on the tokens `reference`
    (`position_reference`): one bin per position in the answer and type, so any function of the position is fitted
    exactly."""
    key = 2 * tok.pos.to_numpy(np.int64) + has_digit(tok)
    rows = np.flatnonzero(reference)
    keys, ref_bin = np.unique(key[rows], return_inverse=True)
    _, ref_answer = np.unique(tok.question_id.to_numpy()[rows], return_inverse=True)
    at = np.minimum(np.searchsorted(keys, key), max(len(keys) - 1, 0))
    bins = np.where((keys[at] == key if len(keys) else False) & ~template, at, -1)
    ones = np.ones(len(rows), np.float32)
    by_bin = sparse.csr_matrix((ones, (ref_bin, rows)), shape=(len(keys), len(tok)))
    by_answer = sparse.csr_matrix((ones, (ref_answer, rows)), shape=(ref_answer.max(initial=-1) + 1, len(tok)))
    overlap = (by_answer @ by_bin.T).toarray().astype(np.float64)
    # Least squares with the answers' offsets profiled out (Frisch-Waugh-Lovell): with C = `overlap` and n_a the
    # answers' reference tokens, the bin effects b solve (diag(bin counts) - C' diag(1/n_a) C) b = bin sums - C'
    # (answer means). The matrix is singular: a constant added to the bins of a set of answers and bins joined by
    # tokens, and taken from those answers, fits as well; the pseudo-inverse picks one solution. Differences between
    # bins so joined (a run's answers all share their first positions) are the same in every solution, and the
    # control compares only tokens of one answer
    normal = np.diag(overlap.sum(axis=0)) - overlap.T @ (overlap / overlap.sum(axis=1, keepdims=True))
    eigenvalues, vectors = np.linalg.eigh(normal)
    kept = eigenvalues > 1e-9 * max(eigenvalues.max(initial=0.0), 1.0)
    solve = (vectors[:, kept] / eigenvalues[kept]) @ vectors[:, kept].T
    return PositionFit(bins, by_bin, by_answer, overlap, solve)


def position_effects(values: np.ndarray, fit: PositionFit) -> np.ndarray:
    """[bins, *cells]: the effect of each (type, position) bin of `fit` on the analysed tokens' `values` [n_tokens,
    *cells], each cell fitted on its own. The sums over tokens are taken in the values' own precision (no copy of
    them); the solve in float64."""
    flat = values.reshape(len(values), -1)
    bin_sums = np.asarray(fit.by_bin.astype(flat.dtype) @ flat, np.float64)
    answer_means = np.asarray(fit.by_answer.astype(flat.dtype) @ flat, np.float64) / fit.overlap.sum(axis=1)[:, None]
    effects = fit.solve @ (bin_sums - fit.overlap.T @ answer_means)
    return effects.reshape(len(effects), *values.shape[1:])
