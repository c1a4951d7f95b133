"""Benchmark: the offline critic on solutions whose first error is known (ProcessBench-style F1).

Solutions are reference solutions (calculator annotations removed, the final line in the protocol's format),
either untouched or corrupted at one step, with the corruption carried forward:
  - wrong result: the step's result is off by a small amount, and later steps use the wrong value;
  - wrong operation: the step's operator is swapped (+ <-> -, * <-> /), its result recomputed, and carried forward.
Reports exact first-error-step accuracy on corrupted solutions, accuracy (no error found) on untouched ones,
and their harmonic mean (ProcessBench's F1). Target for the offline critic: F1 >= 0.80.

    .venv/bin/python bench/critic.py                          # arith suite (offline), difficulties 1-4
    .venv/bin/python bench/critic.py --gsm8k gsm8k_test.jsonl # also real GSM8K reference solutions
"""

from __future__ import annotations

import argparse
import random
import re

from attentropy.arith import make_arith
from attentropy.data import read_gsm8k
from attentropy.gsm8k import normalize_number
from attentropy.offline_critic import locate_error_offline, split_steps

ANNOTATION = re.compile(r"<<([^=<>]*)=([^<>]*)>>")


def as_model_output(reference: str) -> str:
    body, _, final = reference.rpartition("####")
    return ANNOTATION.sub("", body).strip() + f"\nThe final answer is {final.strip()}"


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}".rstrip("0").rstrip(".")


def _substitute(text: str, subst: dict[str, str]) -> str:
    for old, new in subst.items():
        text = re.sub(rf"(?<![\d.]){re.escape(old)}(?![\d.])", new, text)
    return text


_OPERATORS = {"+": r"\+", "-": r"-", "*": r"[*x×]", "/": r"/"}
_SWAP = {"+": "-", "-": "+", "*": "/", "/": "*"}


def corrupt(reference: str, rng: random.Random, kind: str) -> tuple[str, int] | None:
    """A solution with one corrupted step (the change carried into every later step, whose results are
    recomputed from the wrong value) and the index into split_steps of that step; None if not possible."""
    annotations = list(ANNOTATION.finditer(reference))
    usable = [j for j, m in enumerate(annotations) if re.fullmatch(r"[\d.+\-*/() ]+", m.group(1))
              and normalize_number(m.group(2)) is not None]
    if kind == "wrong_operation":
        usable = [j for j in usable if re.search(r"(?<=\d)\s*[-+*/]\s*(?=\d)", annotations[j].group(1))]
    if not usable:
        return None
    k = rng.choice(usable)
    out, subst, pos, changed_at = [], {}, 0, None
    for j, m in enumerate(annotations):
        before = _substitute(reference[pos:m.start()], subst)
        expression = _substitute(m.group(1), subst)
        old = normalize_number(m.group(2))
        if j == k and kind == "wrong_operation":
            ops = list(re.finditer(r"(?<=\d)\s*([-+*/])\s*(?=\d)", expression))
            op = rng.choice(ops)
            written = list(re.finditer(rf"(?<=[\d)])\s*{_OPERATORS[op.group(1)]}\s*(?=[\d($])", before))
            if not written:
                return None  # the operator is not written out in the text: nothing visible to corrupt
            w = written[-1] if len(ops) == 1 else written[len(written) - len(ops) + ops.index(op)]
            before = before[:w.start()] + f" {_SWAP[op.group(1)]} " + before[w.end():]
            expression = expression[:op.start(1)] + _SWAP[op.group(1)] + expression[op.end(1):]
        try:
            value = eval(expression, {"__builtins__": {}}, {})  # noqa: S307 - digits and operators only
        except (ZeroDivisionError, SyntaxError):
            return None
        if j == k and kind == "wrong_result":
            value += rng.choice([-2, -1, 1, 2, 10])
        new = normalize_number(_fmt(value)) if (j >= k and old is not None) else old
        if j == k and (new == old or value < 0):
            return None
        out.append(before)
        if j == k:
            changed_at = len("".join(out))
        shown = re.match(re.escape(m.group(2).strip()), reference[m.end():])
        if shown is None and j >= k:
            return None  # the text shows the result differently (e.g. "1,200"): cannot carry the change reliably
        if old != new:
            subst[old] = new
        out.append(new if shown else "")
        pos = m.end() + (shown.end() if shown else 0)
    body = _substitute(reference[pos:].rpartition("####")[0], subst)
    final = normalize_number(reference.rpartition("####")[2]) or ""
    solution = ("".join(out) + body).strip() + f"\nThe final answer is {subst.get(final, final)}"
    lead = len("".join(out) + body) - len(("".join(out) + body).lstrip())
    for index, (s, e) in enumerate(split_steps(solution)):
        if s <= changed_at - lead <= e:
            return solution, index
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gsm8k", help="GSM8K JSONL whose reference solutions are used too")
    parser.add_argument("--n", type=int, default=200, help="problems per source")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sources = {f"arith d{d}": make_arith(args.n // 4, seed=args.seed, difficulty=d) for d in (1, 2, 3, 4)}
    if args.gsm8k:
        sources["gsm8k"] = read_gsm8k(args.gsm8k)[: args.n]
    total = {"corrupted": [0, 0], "untouched": [0, 0]}
    for name, questions in sources.items():
        counts = {"corrupted": [0, 0], "untouched": [0, 0]}
        for q in questions:
            untouched = as_model_output(q.reference)
            counts["untouched"][0] += locate_error_offline(q.question, untouched, q.reference) == -1
            counts["untouched"][1] += 1
            for kind in ("wrong_result", "wrong_operation"):
                case = corrupt(q.reference, rng, kind)
                if case is None:
                    continue
                solution, first_wrong = case
                counts["corrupted"][0] += locate_error_offline(q.question, solution, q.reference) == first_wrong
                counts["corrupted"][1] += 1
        for key in total:
            total[key][0] += counts[key][0]
            total[key][1] += counts[key][1]
        print(f"{name:9s} " + report(counts))
    print(f"{'all':9s} " + report(total))


def report(counts: dict) -> str:
    err = counts["corrupted"][0] / max(1, counts["corrupted"][1])
    ok = counts["untouched"][0] / max(1, counts["untouched"][1])
    f1 = 2 * err * ok / (err + ok) if err + ok else 0.0
    return (f"first-error accuracy {err:.3f} (n={counts['corrupted'][1]})  untouched accuracy {ok:.3f} "
            f"(n={counts['untouched'][1]})  F1 {f1:.3f}")


if __name__ == "__main__":
    main()
