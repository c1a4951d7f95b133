"""The offline `arith` suite: its kinds, their references' arithmetic, the grader on each kind, determinism,
the balanced order, the exemplars of each kind and the errors for bad choices."""

import hashlib
import os
import re
import subprocess
import sys
from collections import Counter
from decimal import Decimal

import pytest

from attentropy.arith import KINDS, SHOTS, exemplars, make_arith, parse_difficulty, variants
from attentropy.data import DataError, Question, fewshot_exemplars, gsm8k_final_answer, load_questions, question_kind
from attentropy.gsm8k import grade_gsm8k
from attentropy.prompts import exemplar_answer, exemplar_group

EVERY_VARIANT = variants("1-4")  # every kind at every number of steps it can have
ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
UNIT_FACTORS = {12, 3, 100, 60, 7, 24, 1000, 16}  # what conversions and durations know without being told


def problems_of(kind: str, steps: int, n: int = 40) -> list[Question]:
    test = make_arith(n * len(EVERY_VARIANT), seed=0, difficulty="1-4")
    chosen = [q for q in test if (q.metadata["kind"], q.metadata["steps"]) == (kind, steps)]
    return chosen + exemplars(0, kind, steps)


def stated(text: str) -> set[Decimal]:
    """Numbers a text states: digit runs (thousands separators allowed) and number words up to twelve."""
    words = "zero one two three four five six seven eight nine ten eleven twelve".split()
    found = {Decimal(m.replace(",", "")) for m in re.findall(r"\d[\d,]*", text)}
    found |= {Decimal(i) for i, w in enumerate(words) if re.search(rf"\b{w}\b", text, re.IGNORECASE)}
    return found | ({Decimal(2)} if re.search(r"\btwice\b", text, re.IGNORECASE) else set())


def test_the_suite_has_the_kinds_the_issue_asks_for():
    assert {"add", "sub", "mul", "rate", "percent", "conversion", "comparison", "duration", "date",
            "several_steps"} <= set(KINDS)
    assert ("several_steps", 2) in variants() and {s for k, s in EVERY_VARIANT if k == "several_steps"} == {2, 3, 4}


@pytest.mark.parametrize("kind,steps", EVERY_VARIANT)
def test_every_kinds_references_compute_and_end_in_their_answer(kind, steps):
    for q in problems_of(kind, steps):
        lines = q.reference.split("\n")
        assert lines[-1] == f"#### {q.target}" and gsm8k_final_answer(q.reference) == q.target
        annotations = ANNOTATION.findall(q.reference)
        assert len(annotations) == steps == len(lines) - 1  # one calculation per line
        known = stated(q.question) | {Decimal(f) for f in UNIT_FACTORS}
        for expression, value in annotations:
            assert re.fullmatch(r"[\d+\-*/]+", expression), expression
            assert Decimal(str(eval(expression))) == Decimal(value), (q.question, expression)  # noqa: S307
            operands = {Decimal(x) for x in re.findall(r"\d+", expression)}
            assert operands <= known, (q.question, expression)  # stated, an earlier result or a unit factor
            assert f"= <<{expression}={value}>>{value}" in q.reference  # GSM8K's "a*b = <<a*b=c>>c"
            known.add(Decimal(value))
        assert annotations[-1][1] == q.target and int(q.target) > 0 and str(int(q.target)) == q.target
        assert q.metadata == {"kind": kind, "steps": steps, "seed": 0}


@pytest.mark.parametrize("kind,steps", EVERY_VARIANT)
def test_the_gsm8k_grader_grades_a_right_and_a_wrong_solution_of_every_kind(kind, steps):
    for q in problems_of(kind, steps, n=5):
        right = exemplar_answer(q.reference)  # the reference as the model is asked to write it
        assert right.endswith(f"The final answer is {q.target}") and "<<" not in right
        wrong = right.rpartition("The final answer is ")[0] + f"The final answer is {int(q.target) + 1}"
        for policy in ("strict", "flexible"):
            assert grade_gsm8k(q.target, right, policy) == "correct"
            assert grade_gsm8k(q.target, wrong, policy) == "incorrect"
        assert grade_gsm8k(q.target, f"The final answer is ${int(q.target):,}.") == "correct"


def test_no_question_states_its_own_answer():
    for kind, steps in EVERY_VARIANT:
        for q in problems_of(kind, steps, n=100):
            assert Decimal(q.target) not in stated(q.question), (kind, q.question, q.target)


def test_the_suite_is_deterministic_for_a_seed_in_any_process():
    a = make_arith(60, seed=0)
    assert a == make_arith(60, seed=0) and make_arith(20, seed=0) == a[:20]  # --limit only truncates
    assert all(x.question != y.question for x, y in zip(a, make_arith(60, seed=1)))
    code = ("from attentropy.arith import make_arith; import hashlib; "
            "print(hashlib.sha256(repr(make_arith(60, seed=0)).encode()).hexdigest())")
    for hash_seed in ("1", "2"):  # nothing depends on Python's per-process string hashing
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == hashlib.sha256(repr(a).encode()).hexdigest()


def test_a_kinds_problems_do_not_depend_on_the_other_kinds_chosen():
    alone = [q.question for q in make_arith(10, difficulty=3)]  # several_steps only
    mixed = [q.question for q in make_arith(10 * len(EVERY_VARIANT), difficulty="1-4")
             if q.metadata == {"kind": "several_steps", "steps": 3, "seed": 0}]
    assert alone == mixed
    dates = [q for q in make_arith(5 * len(KINDS)) if q.metadata["kind"] == "date"]
    assert make_arith(5, kinds=["date"]) == dates  # the same problems, with their ids in the whole suite
    assert [q.metadata["kind"] for q in make_arith(4, kinds=["rate", "add"])] == ["add", "rate"] * 2


def test_the_default_order_cycles_through_the_kinds():
    questions = make_arith(3 * len(KINDS) + 2)
    kinds = [q.metadata["kind"] for q in questions]
    assert kinds[:len(KINDS)] == list(KINDS)  # any prefix of len(KINDS) problems holds every kind
    assert set(Counter(kinds).values()) == {3, 4}
    assert [q.id for q in questions[:3]] == ["arith-00000", "arith-00001", "arith-00002"]
    assert len({q.question for q in make_arith(40 * len(KINDS))}) == 40 * len(KINDS)  # no repeats
    assert [q.metadata["kind"] for q in load_questions("arith", offset=2, limit=3)] == list(KINDS)[2:5]


def test_each_kind_has_exemplars_of_its_own_shape_and_steps_disjoint_from_its_problems():
    questions = make_arith(10 * len(EVERY_VARIANT), difficulty="1-4")
    tests = {q.question for q in questions}
    for q in questions:
        shots = fewshot_exemplars(q)
        assert len(shots) == SHOTS and not {e.question for e in shots} & tests
        assert {(e.metadata["kind"], e.metadata["steps"]) for e in shots} == {(q.metadata["kind"], q.metadata["steps"])}
    # continuous batching runs each exemplar set together: one set per kind (and number of steps)
    assert len({exemplar_group(q) for q in questions}) == len(EVERY_VARIANT)
    assert len({exemplar_group(q) for q in make_arith(3 * len(KINDS))}) == len(KINDS)


def test_a_question_without_a_kind_gets_exemplars_of_every_kind_at_its_steps():
    """A typed question (`attentropy score`) or a run made before arith had kinds."""
    typed = Question("question-00000", "arith", "Tom has 3 apples...", "", metadata={"steps": 1})
    kinds = [e.metadata["kind"] for e in fewshot_exemplars(typed)]
    one_step = [k for k, s in variants(1)]
    assert len(kinds) == SHOTS and set(kinds) == set(one_step) and {s for _, s in variants(1)} == {1}


def test_question_kind_is_the_shape_and_old_runs_keep_their_steps():
    q = make_arith(8)[7]
    assert question_kind("arith", q.metadata) == q.metadata["kind"] == "comparison"
    assert question_kind("arith", {"steps": 2, "seed": 0}) == "2 steps"


def test_difficulty_keeps_the_kinds_of_those_steps():
    assert {s for _, s in variants(1)} == {1} and ("several_steps", 4) in variants("3-4")
    assert all(len(ANNOTATION.findall(q.reference)) == q.metadata["steps"] == 2 for q in make_arith(30, difficulty=2))
    assert make_arith(5, difficulty=2) == make_arith(5, difficulty="2")  # a one-step range is the number
    for bad in ("0", "3-1", "1-5", "two"):
        with pytest.raises(DataError, match="1 to 4 steps"):
            parse_difficulty(bad)
    with pytest.raises(DataError, match="no arith kind has 1 steps; .*several_steps: 2, 3, 4"):
        variants(1, kinds=["several_steps"])
    with pytest.raises(DataError, match="unknown arith kind.*nope; known kinds: add, sub"):
        make_arith(3, kinds=["add", "nope"])
    with pytest.raises(ValueError, match="8 problems per kind"):
        make_arith(9 * len(KINDS), split="train")
    with pytest.raises(DataError, match="kind conversion .* fewer than 708 distinct problems"):
        make_arith(700, kinds=["conversion"])  # 9 units x 4 things x 8 amounts x 2 directions: 576
