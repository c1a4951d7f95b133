"""The GSM8K grader: a math answer's final number (strict and flexible extraction, normalised) against the
gold number."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+"
_STRICT = re.compile(r"final answer is[:\s]*\**\s*(" + _NUMBER + r")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5', '7.0' -> '7', '+3' -> '3', '-0' -> '0'; None if it is no number."""
    cleaned = text.strip().replace("$", "").replace(",", "").replace(" ", "").lstrip("+").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    normalized = format(value.normalize(), "f")
    return normalized.rstrip("0").rstrip(".") if "." in normalized else normalized


def extract_final_number(text: str, policy: str) -> str | None:
    """The answer's final number. `strict`: the number in the last "The final answer is N" (the format the prompt
    asks for); `flexible`: the last number anywhere in the text. Normalised by `normalize_number`."""
    if policy == "strict":
        matches = _STRICT.findall(text)
    elif policy == "flexible":
        matches = _ANY_NUMBER.findall(text)
    else:
        raise ValueError(f"policy must be 'strict' or 'flexible', got {policy!r}")
    for candidate in reversed(matches):
        number = normalize_number(candidate)
        if number is not None:
            return number
    return None


def grade_gsm8k(target: str, completion: str, policy: str = "strict") -> str:
    predicted = extract_final_number(completion, policy)
    if predicted is None:
        return "unparsed"
    return "correct" if Decimal(predicted) == Decimal(normalize_number(target)) else "incorrect"


def numbers_in(text: str) -> list[Decimal]:
    """Every number in the text, normalised by `normalize_number`, in order."""
    return [Decimal(n) for n in (normalize_number(m) for m in _ANY_NUMBER.findall(text)) if n is not None]
