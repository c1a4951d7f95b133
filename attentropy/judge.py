"""The SimpleQA judge: the prompt that asks an LLM for one of SimpleQA's grades, and the parser of its verdict."""

from __future__ import annotations

import re

SIMPLEQA_JUDGE_PROMPT = """You grade answers to short factual questions. Compare the predicted answer with the \
gold target and reply with one letter.

A = CORRECT: the predicted answer contains the gold target's essential information and nothing that \
contradicts it. Hedging ("I think", "probably") is fine when the gold answer is given and no other candidate is \
offered as the answer. Small misspellings of names are fine. A number must match the gold to its last \
significant figure (gold 120 accepts "about 120", not "100"). Extra correct detail is fine. Only the information \
the question asks for must be present (gold "San Francisco, California" accepts "San Francisco" for a city).
B = INCORRECT: the predicted answer contains a factual statement that contradicts the gold, or gives several \
candidates of which at least one is wrong, even when hedged ("it could be X or Y").
C = NOT_ATTEMPTED: the gold's essential information is missing and nothing contradicts it: "I don't know", a \
refusal, a request for more context, or an answer too vague to be judged.

Question: {question}
Gold target: {target}
Predicted answer: {predicted}

Reply with exactly one letter: A, B or C."""

_VERDICT = {"a": "correct", "b": "incorrect", "c": "not_attempted", "correct": "correct",
            "incorrect": "incorrect", "not_attempted": "not_attempted", "not attempted": "not_attempted"}
_VERDICT_PATTERN = re.compile(r"\b(not[ _]attempted|incorrect|correct|[abc])\b", re.IGNORECASE)


def parse_judge_verdict(reply: str | None) -> str:
    """The judge's label; the last verdict given wins (a reply may reason first). No verdict -> 'unparsed'."""
    if not reply:
        return "unparsed"
    text = reply.strip()
    letter = re.fullmatch(r"\W*([ABCabc])\W*", text)
    if letter:
        return _VERDICT[letter.group(1).lower()]
    candidates = [m.group(1) for m in _VERDICT_PATTERN.finditer(text)
                  if len(m.group(1)) > 1 or m.group(1).isupper()]  # a lone lower-case "a" is an article
    return _VERDICT[candidates[-1].lower()] if candidates else "unparsed"
