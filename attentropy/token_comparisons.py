"""The token-level comparisons: which tokens a wrong-moment detector is asked to tell apart (the critic's
wrong-moment tokens against tokens of the same type, the other tokens of the same answers, nearby tokens), and the
token-type features of the control that knows only that."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .answers import Answers
from .stats import WINDOW, position_matched

def token_types(tokens: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(digits, results): tokens holding a digit; and those of them in a number written right after '=' (the
    result of a step: "3 * 4 = 12" -> the tokens of 12)."""
    text = tokens.astype(str).to_numpy()
    digits = np.array(["".join(ch for ch in t if not ch.isspace()).replace(",", "").replace(".", "").isdigit()
                       and any(ch.isdigit() for ch in t) for t in text])
    results = np.zeros(len(text), bool)
    after_equals = False
    for i, t in enumerate(text):
        stripped = t.strip()
        if digits[i]:
            results[i] = after_equals
        elif stripped.endswith("="):
            after_equals = True
            continue
        elif stripped in ("", "$"):
            continue
        if not digits[i]:
            after_equals = False
    return digits, results


def token_comparisons(a: Answers, tok_rows: np.ndarray, window: int = WINDOW) -> dict[str, tuple[np.ndarray,
                                                                                                  np.ndarray]]:
    """name -> (positive, negative) masks over `tok_rows`: the critic's wrong-moment tokens against
    the other tokens of the same incorrect answers; those within `window` positions of it; and, token type held
    fixed, wrong-moment digit tokens against the digit tokens of *all* answers (correct ones included), and the
    same for results written after '='."""
    tok = a.tokens.iloc[tok_rows]
    target = tok.target.to_numpy()
    answer = tok.answer.to_numpy()
    in_error = target == 1
    known = target >= 0
    error_answers = np.unique(answer[in_error])
    in_wrong = np.isin(answer, error_answers)
    near = position_matched(answer, tok.pos.to_numpy(), in_error, window)
    digits, results = token_types(tok.token)
    return {"type_matched_results": (in_error & results, known & ~in_error & results),
            "type_matched_digits": (in_error & digits, known & ~in_error & digits),
            "same_answers": (in_error, in_wrong & ~in_error),
            "position_matched": (in_error, near)}


# the first is the headline: token type held fixed, it asks whether a score sees the error rather than a kind of
# token (the critic marks mostly the digits of a result after '=')
TOKEN_COMPARISON_TITLES = {
    "type_matched_results": "wrong-moment results (after '=') vs results of all answers (correct ones included)",
    "type_matched_digits": "wrong-moment digit tokens vs digit tokens of all answers (correct ones included)",
    "same_answers": "wrong-moment tokens vs the other tokens of the same incorrect answers",
    "position_matched": f"wrong-moment tokens vs tokens within {WINDOW} positions of them",
}


def token_type_features(a: Answers) -> np.ndarray:
    """[n_tokens, 2]: whether the token holds a digit and whether it is a result written after '=' (no model
    features: what the token is, not how the model computed it)."""
    digits, results = token_types(a.tokens.token)
    return np.column_stack([digits, results]).astype(np.float64)
