"""The critic: the prompt that asks an LLM for the earliest wrong step of an incorrect math solution, the parser of
its reply, and the wrong moment it names (or the offline critic finds) located in the solution's characters and in
completion tokens."""

from __future__ import annotations

import json
import re

from .offline_critic import find_error_offline, split_steps
from .token_spans import char_to_token_spans, tokens_of_span

CRITIC_PROMPT = """You check a student's solution to a grade-school math problem against the reference solution. \
The student's final answer is wrong. Find the EARLIEST step where the student's reasoning or arithmetic goes \
wrong: a wrong calculation, a wrong number carried forward, a wrong operation or a misread quantity.

Problem:
{question}

Student's solution, split into numbered steps:
{steps}

Reference solution:
{reference}

Reply with a JSON object and nothing else:
{{"step": <number of the earliest wrong step>, "error_text": "<the exact erroneous words or number, copied \
verbatim from that step>", "reason": "<one short sentence>"}}"""


def numbered_steps(solution: str) -> str:
    return "\n".join(f"Step {i + 1}: {solution[s:e]}" for i, (s, e) in enumerate(split_steps(solution)))


def parse_critic_reply(reply: str | None) -> dict | None:
    """{'step': 1-based int, 'error_text': str, 'reason': str} from a critic's reply, tolerant: the last JSON
    object with a step wins; else the last 'step N' mentioned. None when no step index is given."""
    if not reply:
        return None
    for candidate in reversed(re.findall(r"\{[^{}]*\}", reply, re.DOTALL)):
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        step = obj.get("step") if isinstance(obj, dict) else None
        if isinstance(step, str) and step.strip().lstrip("-").isdigit():
            step = int(step)
        if isinstance(step, int) and not isinstance(step, bool):
            return {"step": step, "error_text": str(obj.get("error_text") or ""), "reason": str(obj.get("reason") or "")}
    steps = re.findall(r"step\W{0,3}(\d+)", reply, re.IGNORECASE)
    if steps:
        return {"step": int(steps[-1]), "error_text": "", "reason": ""}
    return None


def locate_text(solution: str, text: str, step_span: tuple[int, int] | None) -> tuple[int, int] | None:
    """Character span of `text` in `solution`: inside the given step first, then after the step's start, then
    anywhere (first occurrence); whitespace-insensitive at the ends. None if it does not occur."""
    text = text.strip()
    if not text:
        return None
    windows = [step_span] if step_span else []
    if step_span:
        windows.append((step_span[0], len(solution)))
    windows.append((0, len(solution)))
    for lo, hi in windows:
        at = solution.find(text, lo, hi)
        if at >= 0:
            return at, at + len(text)
    return None


def critique_of(row, tokenizer, critic_reply: dict | None, critic_name: str) -> dict:
    """The critic's wrong moment for one incorrect solution, located in characters and completion tokens."""
    solution = row.completion
    steps = split_steps(solution)
    token_spans = char_to_token_spans(tokenizer, list(row.completion_ids))
    out = empty_critique(critic_name)
    # the numbered steps the critic saw, in characters and in completion tokens
    out["step_char_ranges"] = [list(span) for span in steps]
    out["step_token_ranges"] = [list(tokens_of_span(token_spans, *span)) for span in steps]
    if critic_reply is None:  # offline critic
        index, span, reason = find_error_offline(row.question, solution, row.reference)
        out.update(error_step=index, error_reason=reason)
        if index < 0:
            out["critic_status"] = "no_error_found"
            return out
        status = "located"
    else:
        if critic_reply.get("reply") is None:  # no reply: not a verdict; asked again on the next run
            out.update(critic_status="no_reply", error_reason=str(critic_reply.get("error")))
            return out
        parsed = parse_critic_reply(critic_reply.get("reply"))
        if parsed is None or not 1 <= parsed["step"] <= len(steps):
            out["critic_status"] = "unparsed"
            return out
        index = parsed["step"] - 1
        out.update(error_step=index, error_text=parsed["error_text"], error_reason=parsed["reason"])
        span = locate_text(solution, parsed["error_text"], steps[index])
        status = "located"
        if span is None:  # the critic's words are not in the solution: the whole step is the wrong moment
            span, status = steps[index], "step_only"
    out.update(critic_status=status, error_char_start=span[0], error_char_end=span[1],
               error_text=out["error_text"] or solution[span[0]:span[1]])
    first, last = tokens_of_span(token_spans, *span)
    out.update(error_token_start=first, error_token_end=last)
    return out


def empty_critique(name: str) -> dict:
    """A critique's columns before the critic has looked (`not_critiqued`, nothing located)."""
    return {"critic": name, "error_step": -1, "error_text": "", "error_reason": "", "critic_status": "not_critiqued",
            "error_char_start": -1, "error_char_end": -1, "error_token_start": -1, "error_token_end": -1,
            "step_char_ranges": [], "step_token_ranges": []}
