"""The offline critic: the first wrong step of a math solution found without an LLM, from its equations that do
not compute and the values neither the problem nor the reference solution supports; and `split_steps`, the
solution's steps as both critics count them (bench/critic.py measures it on solutions with a known first error)."""

from __future__ import annotations

import re
from decimal import Decimal

from .gsm8k import normalize_number, numbers_in


def split_steps(solution: str) -> list[tuple[int, int]]:
    """Character ranges of the solution's steps: its non-empty lines, and within a line its sentences (a
    sentence ends at '.', '!' or '?' followed by a space and an upper-case letter or digit). Whitespace
    around a step is not part of it."""
    steps = []
    for line in re.finditer(r"[^\n]+", solution):
        start = line.start()
        pieces = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9$])", line.group())
        for piece in pieces:
            offset = solution.index(piece, start)
            stripped = piece.strip()
            if stripped:
                lead = len(piece) - len(piece.lstrip())
                steps.append((offset + lead, offset + lead + len(stripped)))
            start = offset + len(piece)
    return steps


_OPERAND = r"\$?\(?\d[\d,]*(?:\.\d+)?\)?%?"
_OPERATOR = r"\s*(?:[-+*/×÷x]|times|divided by|minus|plus)\s*"
_EQUATION = re.compile(rf"({_OPERAND}(?:{_OPERATOR}{_OPERAND})+)\s*=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)(%?)")
_CONTINUES_LEFT = re.compile(r"(?:[-+*/×÷x]|times|divided by|minus|plus)\s*(?:[a-zA-Z$]+\s*)?$")
_NUMBER_WORDS = {w: Decimal(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": Decimal(30), "forty": Decimal(40), "fifty": Decimal(50), "sixty": Decimal(60),
                      "seventy": Decimal(70), "eighty": Decimal(80), "ninety": Decimal(90),
                      "hundred": Decimal(100), "thousand": Decimal(1000), "half": Decimal(2), "twice": Decimal(2),
                      "double": Decimal(2), "triple": Decimal(3), "thrice": Decimal(3), "dozen": Decimal(12),
                      "quarter": Decimal(4), "third": Decimal(3), "fourth": Decimal(4), "fifth": Decimal(5)})


def _evaluate(expression: str) -> Decimal | None:
    expr = expression.replace("×", "*").replace("÷", "/").replace("$", "").replace(",", "")
    expr = re.sub(r"(?<=[\d)])\s*x\s*(?=[\d($])", "*", expr)
    expr = expr.replace("times", "*").replace("divided by", "/").replace("minus", "-").replace("plus", "+")
    expr = re.sub(r"(\d+(?:\.\d+)?)%", r"(\1/100)", expr)
    if not re.fullmatch(r"[\d.+\-*/()\s]+", expr):
        return None
    try:
        value = eval(expr, {"__builtins__": {}}, {})  # noqa: S307 - digits, operators and brackets only
    except (SyntaxError, ZeroDivisionError, TypeError):
        return None
    return Decimal(str(round(float(value), 6)))


def _reference_values(question: str, reference: str) -> tuple[set[Decimal], set[Decimal]]:
    """(operands, results) the reference supports: operands are the question's numbers (digits or number words)
    and every number of the reference; results are the numbers of the reference (annotations, text, answer)."""
    operands = set(numbers_in(question))
    operands.update(v for w, v in _NUMBER_WORDS.items() if re.search(rf"\b{w}\b", question, re.IGNORECASE))
    results = set(numbers_in(reference))
    for expression, result in re.findall(r"<<([^=<>]*)=([^<>]*)>>", reference):
        operands.update(numbers_in(expression))
        results.update(numbers_in(result))
    return operands | results, results


_COMMON_CONSTANTS = {Decimal(n) for n in ("0", "1", "2", "3", "4", "7", "10", "12", "24", "30", "52", "60", "100",
                                          "365", "1000")}


def find_error_offline(question: str, solution: str, reference: str) -> tuple[int, tuple[int, int] | None, str]:
    """(index of the first wrong step or -1, character span of the wrong moment, reason). A step is wrong when one
    of its equations `a op b = c` does not compute (span: the result), when an operand is supported neither by the
    problem, the reference's calculator annotations, an earlier result nor a common constant (span: the operand), or
    when a result that computes is none of the reference's results (a wrong operation; span: the operator)."""
    supported, reference_results = _reference_values(question, reference)
    supported |= _COMMON_CONSTANTS
    earlier: set[Decimal] = set()
    for index, (start, end) in enumerate(split_steps(solution)):
        text = solution[start:end]
        for m in _EQUATION.finditer(text):
            expression, shown = m.group(1), normalize_number(m.group(2))
            # an equation whose left side continues further left ("60g * 4/5 = 48") is not checked as written
            computed = None if _CONTINUES_LEFT.search(text[:m.start()]) else _evaluate(expression)
            result_span = (start + m.start(2), start + m.end(2))
            if computed is not None and shown is not None:
                candidates = (computed, computed * 100) if m.group(3) else (computed,)  # "12/20 x 100% = 60%"
                if all(abs(c - Decimal(shown)) > Decimal("0.01") for c in candidates):
                    return index, result_span, f"{expression.strip()} is {computed}, not {shown}"
            for operand in re.finditer(_OPERAND, expression):
                value = normalize_number(operand.group().strip("()%"))
                if value is not None and Decimal(value) not in supported | earlier:
                    span = (start + m.start(1) + operand.start(), start + m.start(1) + operand.end())
                    return index, span, f"{value} is not supported by the problem or earlier steps"
            if shown is not None and Decimal(shown) not in reference_results:
                # the equation computes and its operands are supported: the operation chosen is what went wrong,
                # so the wrong moment is the operator, not the result it correctly gives
                operator = re.search(r"[-+*/×÷x]|times|divided by|minus|plus", expression[1:])
                span = ((start + m.start(1) + 1 + operator.start(), start + m.start(1) + 1 + operator.end())
                        if computed is not None and operator else result_span)
                return index, span, f"{shown} is not among the reference solution's results"
            if shown is not None:
                earlier.add(Decimal(shown))
    return -1, None, "no wrong calculation or unsupported value found"


def locate_error_offline(question: str, solution: str, reference: str) -> int:
    """Index into `split_steps(solution)` of the first wrong step, -1 if none is found."""
    return find_error_offline(question, solution, reference)[0]
