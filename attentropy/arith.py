"""The offline GSM8K-shaped suite `arith`: grade-school word problems of several kinds (shapes: adding, taking away,
multiplying, sharing, rates, percentages, unit conversions, comparisons, durations, dates, several steps), each with
a reference solution in GSM8K's format (one line per calculation with its `<<a*b=c>>` annotation, then `#### N`),
an integer answer that the question never states, the same for the same seed."""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable

from .gsm8k import numbers_in
from .question import DataError, Question

SHOTS = 8  # exemplars per kind: the first SHOTS distinct problems of a kind's stream are its train split

_PEOPLE = [("Maria", "she"), ("James", "he"), ("Aisha", "she"), ("Tom", "he"), ("Lena", "she"), ("Ravi", "he"),
           ("Sofia", "she"), ("Omar", "he"), ("Mei", "she"), ("Lucas", "he"), ("Nora", "she"), ("Ben", "he")]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "cards", "eggs"]

Problem = tuple[str, list[str], int]  # (question, solution lines without the final "#### N", answer)


def _calc(*terms) -> tuple[str, int]:
    """`a op b [op c]` evaluated left to right (integers, exact division) as GSM8K writes it:
    ("4 * 3 = <<4*3=12>>12", 12)."""
    value = terms[0]
    for op, x in zip(terms[1::2], terms[2::2]):
        if op == "/":
            assert value % x == 0, f"{value} / {x} is not an integer"
        value = {"+": value + x, "-": value - x, "*": value * x, "/": value // x}[op]
    return f"{' '.join(map(str, terms))} = <<{''.join(map(str, terms))}={value}>>{value}", value


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


# ---------------------------------------------------------------- today's shapes: one change to a number of items


def _change(rng: random.Random, op: str, name: str, pronoun: str, item: str, value: int) -> tuple[str, str, int]:
    """One change to `value` items: (the question's sentence, the solution's line, the new value)."""
    he = pronoun.capitalize()
    if op == "add":
        n = rng.randint(2, 9)
        text, new = _calc(value, "+", n)
        return f"{he} gets {n} more {item}.", f"After getting {n} more, {name} has {text} {item}.", new
    if op == "sub":
        n = rng.randint(1, min(9, value - 2))
        text, new = _calc(value, "-", n)
        return f"{he} gives {n} {item} to a friend.", f"After giving away {n}, {name} has {text} {item}.", new
    if op == "mul":
        n = rng.choice([2, 3])
        word = {2: "twice", 3: "three times"}[n]
        text, new = _calc(value, "*", n)
        return (f"Then the number of {item} {pronoun} has becomes {word} as large.",
                f"{word.capitalize()} as many is {text} {item}.", new)
    n = rng.choice([d for d in (2, 3, 4, 5) if value % d == 0 and value // d >= 2])
    text, new = _calc(value, "/", n)
    return (f"{he} splits the {item} equally into {n} bags and keeps one bag.",
            f"One of {n} equal bags holds {text} {item}.", new)


def _changes(rng: random.Random, steps: int, value: int, choose: Callable[[int], str]) -> Problem:
    """`steps` changes to `value` items, each of the kind `choose` picks for the number of items so far."""
    name, pronoun = rng.choice(_PEOPLE)
    item = rng.choice(_ITEMS)
    sentences, lines = [f"{name} has {value} {item}."], []
    for _ in range(steps):
        sentence, line, value = _change(rng, choose(value), name, pronoun, item, value)
        sentences.append(sentence)
        lines.append(line)
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), lines, value


def _one_change(rng, value: int, op: str, n: int) -> Problem:
    """One change to `value` items by `n` (today's wording), with the kind's own operands."""
    name, pronoun = rng.choice(_PEOPLE)
    item = rng.choice(_ITEMS)
    he = pronoun.capitalize()
    text, answer = _calc(value, {"add": "+", "sub": "-", "mul": "*", "div": "/"}[op], n)
    word = {2: "twice", 3: "three times", 4: "four times", 5: "five times", 6: "six times"}.get(n)
    sentence, line = {
        "add": (f"{he} gets {n} more {item}.", f"After getting {n} more, {name} has {text} {item}."),
        "sub": (f"{he} gives {n} {item} to a friend.", f"After giving away {n}, {name} has {text} {item}."),
        "mul": (f"Then the number of {item} {pronoun} has becomes {word} as large.",
                f"{str(word).capitalize()} as many is {text} {item}."),
        "div": (f"{he} splits the {item} equally into {n} bags and keeps one bag.",
                f"One of {n} equal bags holds {text} {item}."),
    }[op]
    return f"{name} has {value} {item}. {sentence} How many {item} does {name} have now?", [line], answer


# the operands of the one-change kinds: where the embedded model is right about half the time (with the chains'
# one-digit operands it was right on 11 of 12 additions, 30 of 30 multiplications and 24 of 30 splits)
def _add(rng, steps):
    return _one_change(rng, rng.randint(15, 60), "add", rng.randint(12, 39))


def _sub(rng, steps):
    value = rng.randint(4, 15)
    return _one_change(rng, value, "sub", rng.randint(1, min(9, value - 2)))


def _mul(rng, steps):
    return _one_change(rng, rng.randint(12, 35), "mul", rng.randint(3, 6))


def _div(rng, steps):
    n = rng.randint(3, 8)
    return _one_change(rng, n * rng.randint(4, 12), "div", n)


def _several(rng, steps):
    """`steps` changes of random kinds, each kept feasible (a split needs a divisor, taking away needs enough)."""
    def choose(value):
        op = rng.choice(["add", "sub", "mul", "div"])
        if op == "div" and not any(value % d == 0 and value // d >= 2 for d in (2, 3, 4, 5)):
            op = "add"
        if op == "sub" and value < 4:
            op = "add"
        if op == "mul" and value > 12:
            op = "sub"
        return op
    return _changes(rng, steps, rng.randint(3, 15), choose)


# ---------------------------------------------------------------- rates, percentages, unit conversions


_RATES = [  # (the rate, the question for a time, the solution's line, the question for an amount, its line)
    ("{name} earns {r} dollars every hour.", "How many dollars does {name} earn in {t} hours?",
     "In {t} hours {name} earns {calc} dollars.", "How many hours does {name} need to earn {x} dollars?",
     "To earn {x} dollars {name} needs {calc} hours."),
    ("A machine fills {r} bottles every minute.", "How many bottles does it fill in {t} minutes?",
     "In {t} minutes it fills {calc} bottles.", "How many minutes does it take to fill {x} bottles?",
     "Filling {x} bottles takes {calc} minutes."),
    ("{name} reads {r} pages every day.", "How many pages does {pronoun} read in {t} days?",
     "In {t} days {pronoun} reads {calc} pages.", "How many days does {pronoun} need to read {x} pages?",
     "Reading {x} pages takes {calc} days."),
    ("A bus travels {r} miles every hour.", "How many miles does it travel in {t} hours?",
     "In {t} hours it travels {calc} miles.", "How many hours does it take to travel {x} miles?",
     "Travelling {x} miles takes {calc} hours."),
    ("{name} plants {r} trees every day.", "How many trees does {pronoun} plant in {t} days?",
     "In {t} days {pronoun} plants {calc} trees.", "How many days does {pronoun} need to plant {x} trees?",
     "Planting {x} trees takes {calc} days."),
]


def _rate(rng, steps):
    """An amount per unit of time: the amount in a time (multiply) or the time for an amount (divide)."""
    rate, ask_time, line_time, ask_amount, line_amount = rng.choice(_RATES)
    name, pronoun = rng.choice(_PEOPLE)
    r, t = rng.randint(2, 12), rng.randint(2, 9)
    if rng.random() < 0.5:
        calc, answer = _calc(r, "*", t)
        ask, line = ask_time, line_time
    else:
        calc, answer = _calc(r * t, "/", r)
        ask, line = ask_amount, line_amount
    words = {"name": name, "pronoun": pronoun, "r": r, "t": t, "x": r * t, "calc": calc}
    return f"{rate} {ask}".format(**words), [line.format(**words)], answer


_PERCENTS = [  # (the whole and its part, the question, what is counted)
    ("There are {n} students in a class. {p}% of them walk to school.", "How many students walk to school?",
     "students"),
    ("A shop has {n} shirts. {p}% of them are blue.", "How many shirts are blue?", "shirts"),
    ("{name} has {n} dollars and spends {p}% of them on a book.", "How many dollars does the book cost?", "dollars"),
    ("A farm has {n} animals. {p}% of them are cows.", "How many cows are on the farm?", "animals"),
    ("A jar holds {n} candies. {p}% of them are red.", "How many candies are red?", "candies"),
]


def _percent(rng, steps):
    """A percentage of a whole: n * p / 100, a whole number."""
    whole, ask, counted = rng.choice(_PERCENTS)
    p = rng.choice([10, 20, 25, 50, 75])
    step = {10: 10, 20: 5, 25: 4, 50: 2, 75: 4}[p]  # n * p / 100 is a whole number
    n = step * rng.randint(2, 100 // step)
    calc, answer = _calc(n, "*", p, "/", 100)
    name, _ = rng.choice(_PEOPLE)
    return f"{whole} {ask}".format(name=name, n=n, p=p), [f"{p}% of {n} {counted} is {calc} {counted}."], answer


_UNITS = {  # measure: [(larger unit, its plural, smaller units, how many of them in one)]
    "long": [("foot", "feet", "inches", 12), ("yard", "yards", "feet", 3), ("meter", "meters", "centimeters", 100)],
    "last": [("hour", "hours", "minutes", 60), ("minute", "minutes", "seconds", 60), ("week", "weeks", "days", 7),
             ("day", "days", "hours", 24)],
    "weigh": [("kilogram", "kilograms", "grams", 1000), ("pound", "pounds", "ounces", 16)],
}
_MEASURED = {"long": ["rope", "ribbon", "board", "hallway"], "last": ["trip", "game", "camp", "show"],
             "weigh": ["bag of rice", "box", "dog", "suitcase"]}


def _conversion(rng, steps):
    """A quantity in a larger unit asked in a smaller one (multiply) or the reverse (divide)."""
    measure = rng.choice(sorted(_UNITS))
    one, larger, smaller, factor = rng.choice(_UNITS[measure])
    thing = rng.choice(_MEASURED[measure])
    amount = rng.randint(2, 9)
    if rng.random() < 0.5:
        given, asked = f"{amount} {larger}", smaller
        calc, answer = _calc(amount, "*", factor)
        line = f"One {one} is {factor} {smaller}, so {given} is {calc} {smaller}."
    else:
        given, asked = f"{amount * factor} {smaller}", larger
        calc, answer = _calc(amount * factor, "/", factor)
        line = f"One {one} is {factor} {smaller}, so {given} is {calc} {larger}."
    if measure == "long":
        question = f"A {thing} is {given} long. How many {asked} long is the {thing}?"
    elif measure == "last":
        question = f"A {thing} lasts {given}. How many {asked} does the {thing} last?"
    else:
        question = f"A {thing} weighs {given}. How many {asked} does the {thing} weigh?"
    return question, [line], answer


# ---------------------------------------------------------------- comparisons, durations, dates


def _comparison(rng, steps):
    """How many more: one quantity is k times another; the difference."""
    (a_name, _), (b_name, _) = rng.sample(_PEOPLE, 2)
    a, k = rng.randint(2, 9), rng.randint(3, 5)
    if rng.random() < 0.5:
        item = rng.choice(_ITEMS)
        times, b = _calc(a, "*", k)
        more, answer = _calc(b, "-", a)
        question = (f"{a_name} has {a} {item}. {b_name} has {k} times as many {item} as {a_name}. "
                    f"How many more {item} does {b_name} have than {a_name}?")
        lines = [f"{b_name} has {times} {item}.", f"{b_name} has {more} more {item} than {a_name}."]
    else:
        times, b = _calc(a, "*", k)
        more, answer = _calc(b, "-", a)
        question = (f"{a_name} is {a} years old. {b_name} is {k} times as old as {a_name}. "
                    f"How many years older than {a_name} is {b_name}?")
        lines = [f"{b_name} is {times} years old.", f"{b_name} is {more} years older than {a_name}."]
    return question, lines, answer


def _duration(rng, steps):
    """Minutes in a span of hours and minutes: given as such, or between two clock times."""
    hours, minutes = rng.randint(1, 3), 5 * rng.randint(1, 11)
    if rng.random() < 0.5:
        thing = rng.choice(["movie", "train ride", "concert", "football game"])
        in_minutes, x = _calc(hours, "*", 60)
        total, answer = _calc(x, "+", minutes)
        question = (f"A {thing} lasts {_plural(hours, 'hour', 'hours')} and {minutes} minutes. "
                    f"How many minutes does the {thing} last?")
        lines = [f"{_plural(hours, 'hour', 'hours')} is {in_minutes} minutes.",
                 f"The {thing} lasts {total} minutes."]
    else:
        name, pronoun = rng.choice(_PEOPLE)
        activity = rng.choice(["reading", "painting", "practicing the piano", "studying"])
        start = rng.randint(1, 5)
        end = start + hours
        between, _ = _calc(end, "-", start)
        total, answer = _calc(hours, "*", 60, "+", minutes)
        question = (f"{name} starts {activity} at {start}:00 pm and stops at {end}:{minutes:02d} pm. "
                    f"For how many minutes is {name} {activity}?")
        lines = [f"From {start}:00 pm to {end}:00 pm is {between} {'hour' if hours == 1 else 'hours'}.",
                 f"With the {minutes} minutes after {end}:00 pm, {pronoun} spends {total} minutes."]
    return question, lines, answer


_MONTHS = [("January", 31), ("February", 28), ("March", 31), ("April", 30), ("May", 31), ("June", 30), ("July", 31),
           ("August", 31), ("September", 30), ("October", 31), ("November", 30), ("December", 31)]


_TRIPS = [  # (the start and its length, the question: which day of the next month it ends)
    ("A package is sent on {month} {day} and arrives {later} days later.",
     "On which day of {following} does the package arrive?"),
    ("{name} leaves for a trip on {month} {day} and comes back {later} days later.",
     "On which day of {following} does {name} come back?"),
    ("A ship sets sail on {month} {day} and reaches port {later} days later.",
     "On which day of {following} does the ship reach port?"),
]


def _date(rng, steps):
    """The day of the next month reached some days after a date near a month's end (the month's length given).
    One shape only: exemplars mixing it with the days between two dates left the embedded model right on 1 of 30."""
    m = rng.randrange(12)
    month, days = _MONTHS[m]
    following = _MONTHS[(m + 1) % 12][0]
    day = rng.randint(days - 9, days - 1)
    later = rng.randint(days - day + 2, days - day + 14)  # ends on day 2-14 of the next month
    name, _ = rng.choice(_PEOPLE)
    start, ask = rng.choice(_TRIPS)
    counted, reached = _calc(day, "+", later)
    calc, answer = _calc(reached, "-", days)
    words = {"name": name, "month": month, "day": day, "later": later, "following": following}
    question = f"{start.format(**words)} {month} has {days} days. {ask.format(**words)}"
    lines = [f"Counting {later} days from {month} {day} gives day {counted} of {month}.",
             f"{month} has {days} days, so that is day {calc} of {following}."]
    return question, lines, answer


# ---------------------------------------------------------------- the kinds


@dataclass(frozen=True)
class Kind:
    name: str
    shape: str  # what its problems ask, in a few words
    steps: tuple[int, ...]  # the numbers of calculations its problems can have; the first is the default
    write: Callable[[random.Random, int], Problem]


KINDS = {k.name: k for k in [
    Kind("add", "items, then some more", (1,), _add),
    Kind("sub", "items, then some given away", (1,), _sub),
    Kind("mul", "items, then 3-6 times as many", (1,), _mul),
    Kind("div", "items split equally into 3-8 bags", (1,), _div),
    Kind("rate", "an amount per hour or day: in a time, or the time for an amount", (1,), _rate),
    Kind("percent", "10, 20, 25, 50 or 75 % of a whole", (1,), _percent),
    Kind("conversion", "a length, duration or weight in another unit", (1,), _conversion),
    Kind("comparison", "how many more: one quantity k times another", (2,), _comparison),
    Kind("duration", "minutes in hours and minutes, or between clock times", (2,), _duration),
    Kind("date", "the day of the next month some days after a date", (2,), _date),
    # 2 steps by default: at 3 the embedded model is right on 2 of 30 (at 2: 6 of 30)
    Kind("several_steps", "items changed several times (today's chains)", (2, 3, 4), _several),
]}

_STATED_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())} | {"twice": 2}


def stated_numbers(question: str) -> set[Decimal]:
    """The numbers a question states, in digits or as words (`twice` is 2)."""
    words = {Decimal(v) for w, v in _STATED_WORDS.items() if re.search(rf"\b{w}\b", question, re.IGNORECASE)}
    return set(numbers_in(question)) | words


def parse_difficulty(difficulty: int | str) -> int | str:
    """`--difficulty`: a number of calculation steps (1-4) or a range "lo-hi"; returns the int, or "lo-hi"."""
    text = str(difficulty).strip()
    match = re.fullmatch(r"([1-4])(?:-([1-4]))?", text)
    if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
        raise DataError(f"arith difficulty must be 1 to 4 steps or a range such as 1-3, got {difficulty!r}")
    lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
    return lo if lo == hi else f"{lo}-{hi}"


def variants(difficulty: int | str | None = None, kinds: list[str] | None = None) -> list[tuple[str, int]]:
    """The (kind, steps) pairs a suite cycles through, in KINDS' order: every kind (or those of `kinds`) at its
    default number of steps, or with a difficulty at each number of steps it can have within the difficulty's
    range."""
    unknown = sorted(set(kinds or []) - set(KINDS))
    if unknown or kinds is not None and not kinds:
        raise DataError(f"unknown arith kind(s) {', '.join(unknown) or '(none given)'}; known kinds: "
                        f"{', '.join(KINDS)}")
    chosen = [k for k in KINDS.values() if kinds is None or k.name in kinds]  # in the suite's order
    if difficulty is None:
        return [(k.name, k.steps[0]) for k in chosen]
    difficulty = parse_difficulty(difficulty)
    lo, hi = (difficulty, difficulty) if isinstance(difficulty, int) else map(int, difficulty.split("-"))
    found = [(k.name, s) for k in chosen for s in sorted(k.steps) if lo <= s <= hi]
    if not found:
        raise DataError(f"no arith kind has {difficulty} steps; "
                        + "; ".join(f"{k.name}: {', '.join(map(str, sorted(k.steps)))}" for k in chosen))
    return found


@functools.cache
def _stream(seed: int, kind: str, steps: int, count: int) -> tuple[Problem, ...]:
    """The first `count` distinct problems of one kind and number of steps for a seed (the first SHOTS are the
    train split, the rest test's): a problem that states its own answer, or repeats an earlier one, is skipped."""
    rng = random.Random(f"arith-{seed}-{kind}-{steps}")
    problems, seen = [], set()
    for _ in range(200 * count):
        question, lines, answer = KINDS[kind].write(rng, steps)
        if question in seen or Decimal(answer) in stated_numbers(question):
            continue
        seen.add(question)
        problems.append((question, lines, answer))
        if len(problems) == count:
            return tuple(problems)
    raise DataError(f"arith kind {kind} ({steps} steps) has fewer than {count} distinct problems (including its "
                    f"{SHOTS} exemplars) for seed {seed}; ask for fewer problems of it")


def make_arith(n: int = 100, seed: int = 0, difficulty: int | str | None = None, split: str = "test",
               kinds: list[str] | tuple[str, ...] | None = None) -> list[Question]:
    """`n` word problems with GSM8K-format references, cycling through the kinds (`variants`) so any prefix
    holds every kind; with `kinds`, the problems of those kinds only, with their ids in the whole suite. A kind's
    problem depends only on the seed, the kind, its number of steps and its place among that kind's problems. The
    `train` split (a kind's exemplars: the first SHOTS problems of its stream, at most SHOTS per kind) is disjoint
    from `test`'s (the rest)."""
    if split not in ("test", "train"):
        raise ValueError(f"split must be test or train, got {split!r}")
    suite, pairs = variants(difficulty), variants(difficulty, kinds)
    per_kind = -(-n // len(pairs))
    if split == "train" and per_kind > SHOTS:
        raise ValueError(f"the train split holds {SHOTS} problems per kind, asked for {per_kind}")
    out = []
    for i in range(n):
        kind, steps = pairs[i % len(pairs)]
        j = i // len(pairs)
        problem = _stream(seed, kind, steps, SHOTS + per_kind)[j + (SHOTS if split == "test" else 0)]
        place = j * len(suite) + suite.index((kind, steps))  # its place in the suite of every kind
        qid = f"arith-{place:05d}" if split == "test" else f"arith-train-{kind}-{steps}-{j}"
        out.append(_question(qid, kind, steps, seed, problem))
    return out


def _question(qid: str, kind: str, steps: int, seed: int, problem: Problem) -> Question:
    question, lines, answer = problem
    return Question(qid, "arith", question, str(answer), reference="\n".join(lines + [f"#### {answer}"]),
                    metadata={"kind": kind, "steps": steps, "seed": seed})


@functools.cache
def exemplars(seed: int = 0, kind: str | None = None, steps: int | None = None) -> list[Question]:
    """A problem's SHOTS chain-of-thought exemplars: SHOTS of its kind at its number of steps; without a kind (a
    typed question, a run made before arith had kinds), the train split's first SHOTS of every kind at `steps`."""
    if kind is None:
        return make_arith(SHOTS, seed=seed, difficulty=steps, split="train")
    return [_question(f"arith-train-{kind}-{steps}-{j}", kind, steps, seed, problem)
            for j, problem in enumerate(_stream(seed, kind, steps, SHOTS))]
