"""Token spans: the characters of each generated token in the decoded completion, and the tokens that cover a
span of characters."""

from __future__ import annotations


def char_to_token_spans(tokenizer, token_ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each generated token inside decode(token_ids, skip_special_tokens=True), from decoding
    growing prefixes of the ids (never re-tokenizing). A token holding only part of a multi-byte character
    (its prefix decodes to a trailing U+FFFD) also covers that character, so spans of neighbours may overlap."""
    spans, previous = [], 0
    for i in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:i], skip_special_tokens=True)
        complete = max(len(text.rstrip("\ufffd")), previous)
        spans.append((previous, complete + (1 if text.endswith("\ufffd") else 0)))
        previous = complete
    return spans


def tokens_of_span(token_spans: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """[first, last + 1) of the tokens whose characters overlap [start, end)."""
    inside = [i for i, (s, e) in enumerate(token_spans) if s < end and e > start]
    if not inside:
        raise ValueError(f"no token covers characters [{start}, {end})")
    return inside[0], inside[-1] + 1
