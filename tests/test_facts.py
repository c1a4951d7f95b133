"""The `facts` suite: its kinds, gold answers the offline grader can judge, no question that gives its answer away,
the balanced order, and selecting kinds."""

import random
import sys

import pytest

from attentropy import facts
from attentropy.data import DataError, load_questions, make_facts, question_kind
from attentropy.facts import FactsError, facts_pool, ordered_facts
from attentropy.facts_kinds import DEFAULT_KINDS, DROPPED, KINDS
from attentropy.simpleqa import grade_simpleqa_offline, normalise

# kinds whose source holds fewer than 60 questions (each a bound of the data, not a choice)
SOURCE_LIMITED = {
    "state_capital": 50, "capital_state": 50, "abbreviation_state": 50, "state_abbreviation": 50,  # 50 states
    "statehood_year": 50, "greek_letter": 48,  # 24 letters, small and capital
    "native_country_name": 20,  # Latin-script native names on which CLDR and countryinfo agree
    "language_script": 40,  # official languages whose script is not in their name, Latin at most half
}


@pytest.fixture(scope="module")
def pool():
    return facts_pool()


def test_at_least_30_kinds_from_6_sources_each_with_its_metadata(pool):
    # the suite has 30 kinds or more from 6 sources or more; the default suite keeps those of them on which the
    # embedded model is right 15-85 % of the time (bench/kinds.py), still from 6 sources or more
    assert len(KINDS) >= 30 and len({k.source for k in KINDS.values()}) >= 6
    assert set(DROPPED) <= set(KINDS) and len({KINDS[k].source for k in DEFAULT_KINDS}) >= 6
    for kind, why in DROPPED.items():
        assert why.endswith(("below 15 %", "above 85 %")), kind
    for kind, items in pool.items():
        assert len(items) >= min(60, SOURCE_LIMITED.get(kind, 60)) * (0.9 if kind in SOURCE_LIMITED else 1), kind
        assert len({f.question for f in items}) == len(items), kind
        for f in items:
            meta = f.metadata
            assert meta["kind"] == kind and meta["source"] == KINDS[kind].source
            assert meta["answer_type"] in ("Person", "Place", "Number", "Date", "Other") and meta["topic"]
            assert f.answer.strip() and f.question.endswith(("?", "word."))


def test_no_question_holds_its_gold_answer_or_an_alias(pool):
    for kind, items in pool.items():
        for f in items:
            question = f" {normalise(f.question)} "
            for gold in (f.answer, *f.aliases):
                assert f" {normalise(gold)} " not in question, (kind, f.question, gold)


def _examples(items, k=4):
    return random.Random(0).sample(list(items), min(k, len(items)))


def _wrong_answer(f, items):
    """Another question's gold of the same kind that neither holds nor is held by this one's golds."""
    golds = [normalise(g) for g in (f.answer, *f.aliases)]
    for other in items:
        o = normalise(other.answer)
        if all(f" {g} " not in f" {o} " and f" {o} " not in f" {g} " for g in golds):
            return other.answer
    raise AssertionError(f"no wrong answer for {f}")


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_offline_grader_judges_every_kind(pool, kind):
    """Right answers (bare, in a sentence, hedged) are correct; a wrong one, hedged or not, is incorrect; an
    abstention is not attempted."""
    items = pool[kind]
    for f in _examples(items):
        def grade(answer):
            return grade_simpleqa_offline(f.question, f.answer, answer, list(f.aliases), f.metadata["answer_type"])

        wrong = _wrong_answer(f, items)
        assert grade(f.answer) == "correct", (f, f.answer)
        assert grade(f"The answer is {f.answer}.") == "correct", f
        assert grade(f"I think it is {f.answer}, but I am not completely sure.") == "correct", f
        for alias in f.aliases:
            assert grade(f"It is {alias}.") == "correct", (f, alias)
        assert grade(f"The answer is {wrong}.") == "incorrect", (f, wrong)
        assert grade(f"I believe it is {wrong}, but I am not sure.") == "incorrect", (f, wrong)
        assert grade("I'm sorry, I don't know.") == "not_attempted", f


def test_a_day_of_a_month_is_graded_as_a_date_not_a_number():
    """"May 25" was read as the number 25 (its month too short to count as words): "June 25" was correct."""
    question = "On what day and month does Jordan celebrate its Independence Day?"
    assert grade_simpleqa_offline(question, "May 25", "It is June 25.", ["25 May"], "Date") == "incorrect"
    assert grade_simpleqa_offline(question, "May 25", "It is on 25 May.", ["25 May"], "Date") == "correct"


def test_golds_agree_with_the_second_source(pool):
    """Spot checks of the agreement rule against the second package itself."""
    from countryinfo import CountryInfo

    for f in _examples(pool["country_capital"], 10):
        country = f.question.removeprefix("What is the capital of ").removesuffix("?")
        assert normalise(CountryInfo(country).capital()) == normalise(f.answer), f
    for f in _examples(pool["country_name_fr"], 10):
        country = f.question.removeprefix("What is the French name of the country ").removesuffix("?")
        assert normalise(CountryInfo(country).translations()["fr"]) == normalise(f.answer), f


def test_the_order_takes_every_kind_in_turn_and_is_deterministic():
    questions = make_facts(3 * len(DEFAULT_KINDS), seed=0)
    for start in range(0, len(questions), len(DEFAULT_KINDS)):
        assert {q.metadata["kind"] for q in questions[start:start + len(DEFAULT_KINDS)]} == set(DEFAULT_KINDS)
    assert make_facts(50, seed=0) == questions[:50] and make_facts(50, seed=1) != questions[:50]
    assert not DROPPED or not {q.metadata["kind"] for q in make_facts(2000)} & set(DROPPED)
    # a kind's questions come in the same order whatever other kinds are chosen
    alone = [f.question for f in ordered_facts(0, ["element_name"])]
    mixed = [f.question for f in ordered_facts(0, ["element_name", "country_capital"]) if f.kind == "element_name"]
    assert alone == mixed


def test_kinds_select_questions_and_an_unknown_kind_lists_the_known_ones():
    chosen = load_questions("facts", kinds=("greek_letter", "atomic_number"), limit=10)
    assert [q.metadata["kind"] for q in chosen] == ["greek_letter", "atomic_number"] * 5
    assert {question_kind("facts", q.metadata) for q in chosen} == {"greek_letter", "atomic_number"}
    with pytest.raises(DataError, match=r"unknown facts kind\(s\) nope; known kinds: .*country_capital"):
        load_questions("facts", kinds=("nope", "greek_letter"))
    with pytest.raises(DataError, match=r"unknown arith kind\(s\) nope; known kinds"):
        load_questions("arith", kinds=("nope",))
    with pytest.raises(DataError, match="offline suites"):
        load_questions("gsm8k", "x.jsonl", kinds=("a",))
    arith = load_questions("arith", limit=4)
    one = question_kind("arith", arith[0].metadata)
    selected = load_questions("arith", kinds=(one,), limit=4)
    assert selected and all(question_kind("arith", q.metadata) == one for q in selected)


def test_question_kind_reads_the_metadata_kind():
    assert question_kind("arith", {"kind": "rates", "steps": 2}) == "rates"
    assert question_kind("simpleqa", {"topic": "Art"}) == "Art"


def test_a_missing_source_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "holidays", None)  # `import holidays` now raises ImportError
    with pytest.raises(FactsError, match=r"needs the package 'holidays' \(pip install holidays\)"):
        facts._holiday_facts()
