"""SimpleQA's grading rubric without an LLM: `grade_simpleqa_offline`.

The rubric (openai/simple-evals, simpleqa_eval.py), as rules this grader applies:
  correct        the answer holds the gold's information (any accepted alias; a gold's part the question implies
                 may be missing: "San Francisco" for "San Francisco, California", "Michelle" for "Michelle Obama"
                 when the question names Obama; extra given or middle names, titles, initials and small typos in a
                 person's name are fine), hedged or not, and offers no other candidate;
  incorrect      it names something else (a different number, place or family name), hedged or not, or offers
                 several candidates of which one is wrong ("Lyon or maybe Marseille"), or gives part of a
                 several-part gold as if complete ("Malia." for "Malia and Sasha");
  not_attempted  it abstains (no information, cannot look it up, cannot remember, needs more context, an AI's
                 disclaimer) without guessing, gives only part of the gold while saying it is unsure of the rest,
                 or is too vague to contradict the gold: a bound or a round number coarser than the gold that agrees
                 with it ("around 100k", "more than 50k" for 120k), a decade or century for a year, a region for a
                 town.
Numbers are compared to the gold's last significant figure: for 120k, 115k and 124k are correct, 113k is not
(trailing zeros of an integer gold are not significant from 1,000 up, years excepted); separators, k / M / B and
thousand / million / billion suffixes and number words are read.

Known limits (the LLM judge, `attentropy grade --judge`, has none of them): a wrong side statement next to an
abstention ("I don't know their names, but he has three children") is not attempted here, not incorrect; whether
a place is inside the gold's region is not known ("a city in France" for Lyon is vague whatever the country); an
"or" between two spellings of the same name counts as two candidates; a person's name is matched by spelling,
not by identity.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

# ---------------------------------------------------------------- text

_ABSTAIN = re.compile(
    r"\b(i (do not|really do not|did not) know|no idea|not sure|unsure|uncertain|not certain|i am not aware|"
    r"(cannot|can not|could not|unable to|am not able to|was not able to) (answer|provide|determine|find|confirm|"
    r"say|help|access|verify|recall|remember|look|browse|search|know|tell|give|be certain)|"
    r"(do not|cannot) (recall|remember)|no (reliable |specific |available |public |publicly available )?"
    r"(information|data|record|records|details) (is |are )?(available|about|on|regarding|of)|"
    r"i (do not|did not) (have|find) (any |enough |specific |the |reliable |that )?(information|data|access|"
    r"knowledge|details|record)|(not|is not) (publicly )?(available|known|documented|recorded)|"
    r"(could|can|would) you (please )?(provide|give|clarify|specify|tell)|(please )?provide more (context|"
    r"information|details)|more (context|information|details) (is |would be )?(needed|required)|need more "
    r"(context|information|details)|as an ai|as a language model|my (knowledge|training) (cutoff|data)|"
    r"real[- ]time (information|data|access)|(without|no) (access to|browsing|searching|the internet|the web|"
    r"researching)|(is|remains) unknown|unknown to me)\b")
_GUESS = re.compile(
    r"\b(i think|i believe|i guess|my (best )?guess|probably|possibly|perhaps|maybe|likely|might be|may be|"
    r"could be|it is possible|if i recall|if i remember|i would say|seems to be)\b")
_ALTERNATIVE = re.compile(r"\b(or|either|or maybe|or perhaps|or possibly|alternatively|another possibility)\b")
_VAGUE_PLACE = re.compile(
    r"\b(somewhere in|a (city|town|village|place|region|area|province|state|country) (in|of|near)|(in|from) the "
    r"(north|south|east|west|northern|southern|eastern|western|central)[a-z]*( part| region)? of)\b")
_TITLES = {"dr", "sir", "mr", "mrs", "ms", "miss", "prof", "professor", "lord", "lady", "saint", "st", "dame",
           "king", "queen", "prince", "princess", "rev", "reverend", "jr", "sr", "ii", "iii"}


_CONTRACTIONS = ((r"\bcan't\b", "cannot"), (r"\bwon't\b", "will not"), (r"n't\b", " not"), (r"'m\b", " am"),
                 (r"'re\b", " are"), (r"'ll\b", " will"), (r"'ve\b", " have"), (r"'d\b", " would"),
                 (r"\b(it|that|there|he|she|what|who|here)'s\b", r"\1 is"), (r"'s\b", ""))


def normalise(text: str) -> str:
    """Lower case, accents and punctuation removed (decimal points and thousands separators kept),
    contractions written out ("I'm" -> "i am", "it's" -> "it is"), possessive 's dropped, single spaces."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(c for c in text if not unicodedata.combining(c)).lower().replace("\u2019", "'")
    for pattern, replacement in _CONTRACTIONS:
        text = re.sub(pattern, replacement, text)
    text = re.sub(r"(?!(?<=\d),(?=\d{3}\b))[^\w\s.]|_", " ", text)  # thousands separators are kept
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    return " ".join(text.split())


def _contains(haystack: str, needle: str) -> re.Match | None:
    return re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack) if needle else None


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?;])\s+|\n+", text) if s.strip()]


# ---------------------------------------------------------------- numbers

_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
# "m" and "b" alone are left out: "1.73 m" is a height, not 1.73 million
_SCALES = {"hundred": 100, "thousand": 10 ** 3, "k": 10 ** 3, "million": 10 ** 6, "mn": 10 ** 6,
           "billion": 10 ** 9, "bn": 10 ** 9, "trillion": 10 ** 12}
_NUMERAL = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?:\s?(thousand|million|billion|trillion|k|mn|"
                      r"bn)\b)?(?!\w)")
_WORD_NUMBER = re.compile(r"\b((?:(?:" + "|".join([*_UNITS, *_TENS, "hundred", "thousand", "million", "billion", "and",
                                                       "a"]) + r")[\s-]+)*(?:" + "|".join([*_UNITS, *_TENS, "hundred",
                                                                                         "thousand", "million",
                                                                                         "billion"]) + r"))\b")
_APPROX = re.compile(r"\b(about|around|roughly|approximately|approx|nearly|almost|some|circa|ca|estimated|over|more "
                     r"than|at least|above|upwards of|under|less than|fewer than|below|up to|at most)\s+$")
_LOWER_BOUND = ("over", "more than", "at least", "above", "upwards of")
_UPPER_BOUND = ("under", "less than", "fewer than", "below", "up to", "at most")


def _words_to_number(words: str) -> int | None:
    total, current, seen = 0, 0, False
    for w in re.split(r"[\s-]+", words.strip()):
        if w in ("and", "a"):
            current = current or (1 if w == "a" else 0)
            continue
        if w in _UNITS:
            current += _UNITS[w]
        elif w in _TENS:
            current += _TENS[w]
        elif w == "hundred":
            current = (current or 1) * 100
        elif w in _SCALES:
            total += (current or 1) * _SCALES[w]
            current = 0
        else:
            return None
        seen = True
    return total + current if seen else None


def numbers(text: str) -> list[tuple[Decimal, Decimal, str]]:
    """(value, the unit of its last significant figure, the words just before it) of every number in `text`:
    numerals with separators and k / M / B or thousand / million / billion suffixes, and number words."""
    text = normalise(text)
    found = []
    for m in _NUMERAL.finditer(text):
        digits, fraction, scale = m.group(1).replace(",", ""), m.group(2) or "", m.group(3)
        value = Decimal(digits + fraction)
        unit = (Decimal(1).scaleb(-(len(fraction) - 1)) if fraction else  # a year has no separator or suffix
                _integer_unit(digits, year_ok=not scale and "," not in m.group(1), from_=1 if scale else 1000))
        if scale:
            multiplier = Decimal(_SCALES[scale])
            value, unit = value * multiplier, unit * multiplier
        found.append((value, unit, text[:m.start()]))
    for m in _WORD_NUMBER.finditer(text):
        value = _words_to_number(m.group(1))
        if value is not None and any(w in _UNITS or w in _TENS for w in re.split(r"[\s-]+", m.group(1))):
            found.append((Decimal(value), _integer_unit(str(value), year_ok=False), text[:m.start()]))
    return found


def _integer_unit(digits: str, year_ok: bool = True, from_: int = 1000) -> Decimal:
    """The unit of an integer's last significant figure: 1, except that from 1,000 up (before a k / thousand /
    million suffix: always) its trailing zeros are not significant (120,000 and 120k -> 10,000), a year
    (1000-2099) excepted."""
    n = int(digits)
    if n < from_ or n == 0 or (year_ok and 1000 <= n <= 2099 and len(digits) == 4):
        return Decimal(1)
    zeros = len(digits) - len(digits.rstrip("0"))
    return Decimal(10) ** zeros


def gold_number(target: str) -> tuple[Decimal, Decimal] | None:
    """(value, unit of its last significant figure) when the gold is a number (units and currency signs aside)."""
    cleaned = normalise(target.replace("$", " ").replace("%", " ").replace("£", " ").replace("€", " "))
    cleaned = re.sub(r"\b(approximately|about|around|over|more than)\b", " ", cleaned)
    found = numbers(cleaned)
    if len(found) != 1:
        return None
    rest = _NUMERAL.sub(" ", cleaned)
    if re.search(rf"\b{_MONTH}\b", rest):
        return None  # a day of a month ("May 25"): a date without its year, not a quantity
    if re.search(r"[a-z]{4,}", re.sub(r"\b(thousand|million|billion|trillion)\b", " ", rest)) and not re.fullmatch(
            r"\s*[a-z]{1,3}\s*|\s*(meters|metres|kilometers|kilometres|miles|feet|years|people|km|kg|m|cm|mm|percent|"
            r"dollars|pounds|euros|points|goals|votes|seats|episodes|pages|copies|sq|square)\s*", rest):
        return None  # words around the number: a name or a date, not a quantity
    value, unit, _ = found[0]
    return value, unit


def _rounds_to(value: Decimal, target: Decimal, unit: Decimal) -> bool:
    try:
        return (value / unit).quantize(Decimal(1), ROUND_HALF_UP) == (target / unit).quantize(Decimal(1),
                                                                                              ROUND_HALF_UP)
    except InvalidOperation:
        return False


# ---------------------------------------------------------------- dates

_MONTHS = {name: i for i, name in enumerate(
    "january february march april may june july august september october november december".split(), 1)}
_MONTHS.update({name[:3]: i for name, i in list(_MONTHS.items())} | {"sept": 9})
_MONTH = "(" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + ")"
_DATE_PATTERNS = (  # on normalised text: (regex, order of its groups)
    (re.compile(rf"\b(\d{{1,2}})(?:st|nd|rd|th)? (?:of )?{_MONTH} (\d{{4}})\b"), "dmy"),
    (re.compile(rf"\b{_MONTH} (\d{{1,2}})(?:st|nd|rd|th)? (\d{{4}})\b"), "mdy"),
    (re.compile(rf"\b{_MONTH} (?:of )?(\d{{4}})\b"), "my"),
    (re.compile(r"\b(\d{4}) (\d{2}) (\d{2})\b"), "ymd"),  # 1998-03-03
)


def dates(text: str) -> list[tuple[int | None, int | None, int | None]]:
    """(year, month, day) of the dates written with a month (a day may be missing) in `text`."""
    text = normalise(text)
    found, taken = [], []
    for pattern, order in _DATE_PATTERNS:
        for m in pattern.finditer(text):
            if any(a <= m.start() < b for a, b in taken):
                continue
            parts = dict(zip(order, m.groups()))
            month = _MONTHS.get(parts["m"]) if not parts["m"].isdigit() else int(parts["m"])
            day = int(parts["d"]) if "d" in parts else None
            if month and 1 <= month <= 12 and (day is None or 1 <= day <= 31):
                found.append((int(parts["y"]), month, day))
                taken.append((m.start(), m.end()))
    return found


def _grade_date(gold, predicted, answer, abstains) -> str:
    year, month, day = gold
    given = dates(predicted)
    exact = [d for d in given if d[0] == year and d[1] == month and (day is None or d[2] == day)]
    conflicting = [d for d in given if d[0] != year or d[1] != month or (day and d[2] and d[2] != day)]
    if exact and not conflicting:
        return "correct"
    if exact:
        return "incorrect" if _ALTERNATIVE.search(answer) else "correct"
    if conflicting:
        return "incorrect"
    coarse = [d for d in given if d[2] is None]  # month and year only, agreeing with the gold
    if coarse or re.search(rf"\b{year}\b", answer):
        return "not_attempted"  # agrees, without the gold's day (or month)
    return "not_attempted" if abstains or not re.search(r"\d", answer) else "incorrect"


# ---------------------------------------------------------------- the grader

def grade_simpleqa_offline(question: str, target: str, predicted: str, aliases: list[str] | tuple = (),
                           answer_type: str | None = None) -> str:
    """SimpleQA's label (`correct`, `incorrect`, `not_attempted`) of a predicted answer, by the rubric's rules
    (module docstring). `answer_type`: SimpleQA's metadata (Person, Number, Date, Place, Other), when known."""
    answer = normalise(predicted)
    if not answer:
        return "not_attempted"
    abstains = bool(_ABSTAIN.search(answer))
    guesses = bool(_GUESS.search(answer))
    gold_dates = dates(target)
    if len(gold_dates) == 1 and answer_type in (None, "Date", "Other"):
        return _grade_date(gold_dates[0], predicted, answer, abstains)
    number = gold_number(target) if answer_type not in ("Person", "Place") else None
    if number is not None:
        return _grade_number(question, number, predicted, answer, abstains, guesses, answer_type == "Date")
    return _grade_text(question, target, predicted, answer, aliases, abstains, guesses, answer_type)


def _grade_number(question, gold, predicted, answer, abstains, guesses, is_date) -> str:
    value, unit = gold
    if is_date or (1000 <= value <= 2099 and unit == 1 and value == value.to_integral()):
        unit = Decimal(1)  # a year is exact
    question_numbers = {n for n, _, _ in numbers(question)}
    found = [(n, u, before) for n, u, before in numbers(predicted) if n not in question_numbers or n == value]
    hits = [n for n, u, _ in found if _rounds_to(n, value, unit)]
    others = [(n, u, before) for n, u, before in found if not _rounds_to(n, value, unit)]
    if hits:
        alternatives = [n for n, _, before in others if re.search(r"\b(or|either)\s+$", before[-12:] + " ")
                        or re.search(r"\bor\b", before[-25:])]
        return "incorrect" if alternatives and _ALTERNATIVE.search(answer) else "correct"
    for n, u, before in others:
        qualifier = _APPROX.search(before[-20:])
        if qualifier is None:
            continue
        word = qualifier.group(1)
        if word in _LOWER_BOUND:
            return "not_attempted" if value >= n else "incorrect"
        if word in _UPPER_BOUND:
            return "not_attempted" if value <= n else "incorrect"
        # "around 100k": a round number, coarser than the gold, that the gold agrees with
        if u > unit and _rounds_to(value, n, u):
            return "not_attempted"
        return "incorrect"
    decade = re.search(r"\b(1\d|20)(\d)0s\b", answer)
    century = re.search(r"\b(\d{1,2})(st|nd|rd|th) century\b", answer)
    if decade or century:
        if decade:
            agrees = int(value) // 10 == int(decade.group(1) + decade.group(2))
        else:
            agrees = (int(value) - 1) // 100 + 1 == int(century.group(1))
        return "not_attempted" if agrees else "incorrect"
    if others:
        return "incorrect"
    return "not_attempted"  # no number at all: neither contains nor contradicts the gold


def _gold_variants(question: str, gold: str) -> list[str]:
    """The gold and what the rubric also accepts of it: the part before a comma, colon or bracket ("San
    Francisco, California"), the part after a colon ("Season 7, Episode 20: White Wedding"), and the gold without
    the words the question already holds ("Outstanding Paper" when the question asks which award)."""
    parts = [normalise(part) for part in re.split(r"\s*[,:(]\s*", str(gold))]
    gold = normalise(gold)
    q_words = set(normalise(question).split())
    variants = {gold}
    variants.update(part for part in parts if len(part) > 2)
    implied = [w for w in gold.split() if w not in q_words]
    if implied and len(implied) < len(gold.split()):
        variants.add(" ".join(implied))
    return sorted((v for v in variants if v and len(v) > 1), key=len, reverse=True)


def _name_matches(gold: str, answer: str, question: str) -> bool:
    """A person's name in the answer: every gold name (titles aside) is there, spelled within a typo or as an
    initial, in order, extra given or middle names allowed; the family name may be missing if the question has it
    ("Michelle" for Michelle Obama when the question asks about Obama)."""
    g = [w for w in normalise(gold).split() if w not in _TITLES]
    a = [w for w in answer.split() if w not in _TITLES]
    if not g:
        return False
    q_words = set(normalise(question).split())
    needed = g[:-1] if g[-1] in q_words and len(g) > 1 else g

    def same(x, y):
        return x == y or (len(x) > 3 and difflib.SequenceMatcher(None, x, y).ratio() >= 0.75)

    joined = "".join(needed)
    for start in range(len(a)):  # "hyungwon chung" for hyung won chung: adjacent answer words joined
        for stop in range(start + 1, min(len(a), start + len(needed) + 2) + 1):
            if same("".join(a[start:stop]), joined):
                return True
    position = 0
    for k, word in enumerate(needed):
        last = k == len(needed) - 1
        while position < len(a) and not (same(word, a[position]) or (not last and len(a[position]) == 1
                                                                     and a[position] == word[0])):
            position += 1
        if position == len(a):
            return False
        position += 1
    return True


def _gold_parts(gold: str) -> list[str]:
    """The parts of a several-part gold ("Malia and Sasha", "red, green and blue")."""
    parts = [p.strip() for p in re.split(r",|\band\b|&", normalise(gold)) if p.strip()]
    return parts if len(parts) > 1 else []


def _part_present(part: str, answer: str, parts: list[str]) -> bool:
    """A part of a several-part gold in the answer: as written, or its first word when the family name it shares
    with the other parts is in the answer too ("sasha and malia obama" for "Malia Obama and Sasha Obama")."""
    if _contains(answer, part):
        return True
    words = part.split()
    return len(words) > 1 and bool(_contains(answer, words[0])) and bool(_contains(answer, words[-1]))


def _extra_items(answer: str, parts: list[str], question: str) -> bool:
    """A list in the answer with an item that is none of the gold's parts ("Malia, Sasha, and Susan")."""
    q_words = set(normalise(question).split())
    part_words = {w for p in parts for w in p.split()}
    for sentence in _sentences(answer):
        if not any(_contains(sentence, p.split()[0]) for p in parts):
            continue
        items = [i.strip() for i in re.split(r",|\band\b|&", sentence) if i.strip()]
        for item in items:
            words = [w for w in item.split() if w not in _FILLER and w not in q_words and len(w) > 2]
            if len(words) == 1 and words[0] not in part_words:
                return True
    return False


def _candidate_span(answer: str, question: str, matched: re.Match | None) -> bool:
    """Whether the answer offers another candidate beside the matched gold: an alternative ("or", "either",
    "or maybe") in the same sentence or a sentence that starts with one, naming words the question and the gold
    do not hold."""
    if not _ALTERNATIVE.search(answer):
        return False
    q_words = set(normalise(question).split())
    gold_words = set(matched.group(0).split()) if matched else set()
    for sentence in _sentences(answer):
        m = _ALTERNATIVE.search(sentence)
        if not m or re.search(r"\b(known as|called|referred to as|also spelled|spelled)\b", sentence):
            continue  # another name of the same thing
        if matched and matched.group(0) not in sentence and not sentence.lstrip().startswith(("or ", "either ")):
            continue
        others = [w for w in re.split(r"\W+", sentence[m.end():]) if len(w) > 2 and w not in q_words
                  and w not in gold_words and w not in _FILLER]
        if others:
            return True
    return False


_FILLER = set("the this that these those was were is are has have had its his her their they them with from for "
              "also not but maybe perhaps possibly could might would may been being will can just one which who "
              "what when where why how some any all other another likely probably think believe guess sure know "
              "answer correct named called city town country state capital".split())


def _grade_text(question, target, predicted, answer, aliases, abstains, guesses, answer_type) -> str:
    golds = [g for g in (target, *aliases) if g and str(g).strip()]
    person = answer_type == "Person" or (answer_type is None and re.fullmatch(
        r"(?:[A-Z][\w'.-]+\s+){1,3}[A-Z][\w'-]+", str(target).strip() or "") is not None)
    matched = None
    for gold in golds:
        for variant in _gold_variants(question, gold):
            matched = matched or _contains(answer, variant)
        if person and not matched and _name_matches(gold, answer, question):
            matched = re.search(r".+", answer)  # the whole answer names the person
    if matched:
        return "incorrect" if _candidate_span(answer, question, matched) else "correct"
    parts = _gold_parts(target)
    present = [p for p in parts if _part_present(p, answer, parts)]
    if present and len(present) == len(parts):  # every part, in another order or wording
        return "incorrect" if _extra_items(answer, parts, question) else "correct"
    if present:  # part of a several-part gold
        return "not_attempted" if abstains else "incorrect"
    if abstains and not guesses:
        return "not_attempted"
    if _VAGUE_PLACE.search(answer) and not guesses and not _candidates(predicted, question, vague_spans=True):
        return "not_attempted"  # only a region, no place of its own
    return "incorrect"


def _candidates(predicted: str, question: str, vague_spans: bool = False) -> list[str]:
    """Proper names the answer brings that the question does not hold (capitalised words not starting a
    sentence); with `vague_spans`, not counting the region named by a vague phrase ("somewhere in the south of
    France")."""
    text = predicted
    if vague_spans:
        text = re.sub(r"\b(?i:somewhere in|(?:a|an) (?:city|town|village|place|region|area|province|state|country) "
                      r"(?:in|of|near)|(?:in|from) the (?:north|south|east|west|northern|southern|eastern|western|"
                      r"central)\w*(?: part| region)? of)((?:\s+(?:the\s+)?[A-Z][\w'-]*)+)", " ", text)
    q_words = set(normalise(question).split())
    names = []
    for sentence in _sentences(text):
        for word in re.findall(r"(?<=\s)[A-Z][\w'-]+", " " + sentence.strip())[1:]:  # not the first word
            if normalise(word) not in q_words and normalise(word) not in _FILLER:
                names.append(word)
    return names
