"""Questions: the published SimpleQA / GSM8K files (local or from their published locations) and the
two offline suites, `facts` (SimpleQA-shaped, from `attentropy.facts`) and `arith` (GSM8K-shaped), generated
deterministically."""

from __future__ import annotations

import ast
import csv
import functools
import json
import re
import urllib.request
from pathlib import Path

from platformdirs import user_cache_dir

from . import arith
from .question import DataError, Question

SIMPLEQA_URL = "https://openaipublic.blob.core.windows.net/simple-evals/simple_qa_test_set.csv"
GSM8K_HUB_ID = "openai/gsm8k"

# Benchmarks graded like SimpleQA (short factual answers) and like GSM8K (chain of thought + number); `prompts`:
# free prompts for exploring ordinary text generation, never graded.
FACTUAL = ("simpleqa", "facts")
MATH = ("gsm8k", "arith")
FREE = "prompts"


def protocol_kind(benchmark: str) -> str:
    """The protocol (and the instrument's task) of a benchmark: factual, math or free."""
    if benchmark in FACTUAL:
        return "factual"
    if benchmark in MATH:
        return "math"
    if benchmark == FREE:
        return "free"
    raise ValueError(f"unknown benchmark {benchmark!r}")


def question_kind(benchmark: str, metadata: dict) -> str:
    """The stratum of a question: its metadata's `kind` where it has one (the offline suites), else SimpleQA's
    topic, arith's number of steps (runs made before arith had kinds), or the benchmark."""
    if metadata.get("kind"):
        return str(metadata["kind"])
    if benchmark == "facts":
        return "facts"
    if benchmark == "simpleqa":
        return str(metadata.get("topic", "simpleqa"))
    if benchmark == "arith":
        return f"{metadata.get('steps', '?')} steps"
    return benchmark


# ---------------------------------------------------------------- published formats


def read_simpleqa(path: str | Path) -> list[Question]:
    """The published SimpleQA CSV: columns `metadata` (a Python-dict literal), `problem`, `answer`."""
    path = Path(path)
    questions = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"metadata", "problem", "answer"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: line 1: expected columns metadata, problem, answer; missing {sorted(missing)}")
        for row in reader:
            line = reader.line_num
            try:
                metadata = ast.literal_eval(row["metadata"])
            except (ValueError, SyntaxError) as e:
                raise DataError(f"{path}: line {line}: field 'metadata' is not a Python dict literal ({e})") from None
            if not isinstance(metadata, dict):
                raise DataError(f"{path}: line {line}: field 'metadata' must be a dict, got {type(metadata).__name__}")
            for name in ("problem", "answer"):
                if not (row[name] or "").strip():
                    raise DataError(f"{path}: line {line}: field '{name}' is empty")
            i = len(questions)
            questions.append(
                Question(f"simpleqa-{i:05d}", "simpleqa", row["problem"].strip(), row["answer"].strip(), metadata=metadata)
            )
    if not questions:
        raise DataError(f"{path}: no rows")
    return questions


GSM8K_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def gsm8k_final_answer(solution: str) -> str | None:
    """The number after the last line's `#### `, thousands separators removed."""
    m = GSM8K_FINAL.search(solution.strip())
    return m.group(1).replace(",", "") if m else None


def read_gsm8k(path: str | Path, benchmark: str = "gsm8k") -> list[Question]:
    """The published GSM8K JSONL: one object per line with `question` and `answer` (ending in `#### N`)."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
                raise DataError(f"{path}: line {line_no}: expected an object with string fields 'question' and 'answer'")
            rows.append((line_no, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return [_gsm8k_question(row, i, benchmark, f"{path}: line {line_no}") for i, (line_no, row) in enumerate(rows)]


_PROMPT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
PROMPT_FIELDS = {"id": str, "prompt": str, "system": str, "max_new_tokens": int}


def read_prompts(path: str | Path, raw: bool = False) -> list[Question]:
    """Free prompts: a text file with one prompt per line (blank lines skipped; `\\n` inside a line is a newline),
    or JSONL (`.jsonl`, or every line starting with `{`) with `prompt` and optional `id`, `system` (a system turn)
    and `max_new_tokens`. `raw`: sent as plain text to continue, without the chat template (a system turn is then
    an error). Ids: given ones or `prompts-<line>`; they must be unique."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    jsonl = path.suffix == ".jsonl" or (numbered and all(line.lstrip().startswith("{") for _, line in numbered))
    questions, seen = [], {}
    for line_no, line in numbered:
        where = f"{path}: line {line_no}"
        if jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object with a string field 'prompt'")
            unknown = set(row) - set(PROMPT_FIELDS)
            if unknown:
                raise DataError(f"{where}: unknown field(s) {sorted(unknown)}; expected {', '.join(PROMPT_FIELDS)}")
            for key, kind in PROMPT_FIELDS.items():
                if key in row and (not isinstance(row[key], kind) or isinstance(row[key], bool)):
                    raise DataError(f"{where}: field {key!r} must be {'a string' if kind is str else 'an integer'}, "
                                    f"got {json.dumps(row[key])}")
            if not row.get("prompt", "").strip():
                raise DataError(f"{where}: field 'prompt' is missing or empty")
            if row.get("max_new_tokens", 1) < 1:
                raise DataError(f"{where}: field 'max_new_tokens' must be at least 1, got {row['max_new_tokens']}")
        else:
            row = {"prompt": line.replace("\\n", "\n")}
        qid = row.get("id", f"prompts-{line_no:05d}")
        if not _PROMPT_ID.fullmatch(qid):
            raise DataError(f"{where}: field 'id' must be 1-100 letters, digits or _ . : -, got {qid!r}")
        if qid in seen:
            raise DataError(f"{where}: id {qid!r} already used on line {seen[qid]}")
        if raw and "system" in row:
            raise DataError(f"{where}: field 'system' needs the chat template (not --raw)")
        seen[qid] = line_no
        metadata = {"line": line_no, "raw": raw, **{k: row[k] for k in ("system", "max_new_tokens") if k in row}}
        questions.append(Question(qid, FREE, row["prompt"], "", metadata=metadata))
    if not questions:
        raise DataError(f"{path}: no prompts")
    return questions


def _gsm8k_question(row: dict, i: int, benchmark: str, where: str) -> Question:
    target = gsm8k_final_answer(row["answer"])
    if target is None:
        raise DataError(f"{where}: field 'answer' must end with a line '#### <number>'")
    return Question(f"{benchmark}-{i:05d}", benchmark, row["question"].strip(), target, reference=row["answer"].strip())


def _download_simpleqa() -> Path:
    dest = Path(user_cache_dir("attentropy")) / "simple_qa_test_set.csv"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".part")
        try:
            urllib.request.urlretrieve(SIMPLEQA_URL, tmp)
        except OSError as e:
            raise DataError(
                f"could not download SimpleQA from {SIMPLEQA_URL} ({e}); without network, pass the CSV with --data PATH"
            ) from None
        tmp.replace(dest)
    return dest


def _hub_gsm8k(split: str) -> list[Question]:
    import datasets

    try:
        ds = datasets.load_dataset(GSM8K_HUB_ID, "main", split=split)
    except Exception as e:  # datasets raises many types when offline (ConnectionError, OSError, HfHubHTTPError...)
        raise DataError(
            f"could not load {GSM8K_HUB_ID} ({split}) from the Hugging Face hub ({type(e).__name__}: {e}); "
            "without network, pass the JSONL file with --data PATH"
        ) from None
    return [_gsm8k_question(row, i, "gsm8k", f"{GSM8K_HUB_ID}[{split}] row {i}") for i, row in enumerate(ds)]


# ---------------------------------------------------------------- offline suite: facts


def make_facts(n: int = 200, seed: int = 0, kinds=None) -> list[Question]:
    """The first `n` questions of the `facts` suite (`attentropy.facts`) of `kinds` (default: the default suite),
    the same for the same seed: kinds taken in turn, so any prefix of the list mixes them evenly."""
    from .facts import FactsError, ordered_facts

    try:
        facts = ordered_facts(seed, kinds)[:n]
    except FactsError as e:
        raise DataError(str(e)) from None
    return [Question(f"facts-{i:05d}", "facts", f.question, f.answer, aliases=list(f.aliases), metadata=f.metadata)
            for i, f in enumerate(facts)]


# ---------------------------------------------------------------- entry point

SUITE_SIZE = {"facts": 200, "arith": 100}


def load_questions(benchmark: str, data: str | Path | None = None, *, offset: int = 0, limit: int | None = None,
                   seed: int = 0, difficulty: int | str | None = None, raw: bool = False,
                   kinds: tuple[str, ...] | None = None) -> list[Question]:
    """The questions of `benchmark` (simpleqa, gsm8k, facts, arith, prompts), rows [offset, offset+limit).
    `difficulty`: arith's numbers of steps (None: every kind at its own). `raw`: prompts only, plain continuation
    without the chat template. `kinds`: the offline suites only, the questions of these kinds (`question_kind`;
    arith's keep their ids in the whole suite); an unknown kind is an error listing the known ones."""
    if raw and benchmark != FREE:
        raise DataError(f"--raw applies to --benchmark {FREE} only")
    if kinds is not None and benchmark not in ("facts", "arith"):
        raise DataError(f"--kinds applies to the offline suites facts and arith only, not {benchmark!r}")
    if benchmark == FREE:
        if not data:
            raise DataError(f"--benchmark {FREE} needs --data FILE (one prompt per line, or JSONL)")
        questions = read_prompts(data, raw)
    elif benchmark == "simpleqa":
        questions = read_simpleqa(data if data else _download_simpleqa())
    elif benchmark == "gsm8k":
        questions = read_gsm8k(data) if data else _hub_gsm8k("test")
    elif benchmark in ("facts", "arith"):
        if data:
            raise DataError(f"--data does not apply to the generated suite '{benchmark}'")
        size = SUITE_SIZE[benchmark] if limit is None else offset + limit
        questions = (make_facts(size, seed, kinds) if benchmark == "facts"
                     else arith.make_arith(size, seed, difficulty, kinds=kinds))
    else:
        raise DataError(f"unknown benchmark {benchmark!r}; expected one of simpleqa, gsm8k, facts, arith, {FREE}")
    end = None if limit is None else offset + limit
    return questions[offset:end]


def fewshot_exemplars(question: Question | None = None) -> list[Question]:
    """The 8 chain-of-thought exemplars of a math question, from its benchmark's train split: for GSM8K the
    first 8 rows of GSM8K train (MIT, shipped in the package); for arith 8 problems of the suite's train split
    of the question's kind and number of steps (`arith.exemplars`)."""
    if question is not None and question.benchmark == "arith":
        meta = question.metadata
        return arith.exemplars(meta.get("seed", 0), meta.get("kind"), meta.get("steps"))
    return _gsm8k_exemplars()


@functools.cache
def _gsm8k_exemplars() -> list[Question]:  # read once, not once per prompt
    return read_gsm8k(Path(__file__).with_name("gsm8k_fewshot.jsonl"), benchmark="gsm8k-train")
