"""Grading a run directory: labels for its answers (DIR/grades.parquet): SimpleQA's three grades (LLM judge or
offline grader), GSM8K correctness (strict and flexible extraction), and the critic's "moment where things went
wrong" mapped to completion tokens; their metrics (DIR/metrics.json) and how they are printed.

Every LLM reply is cached on disk (DIR/llm_replies.jsonl, keyed by model and prompt), so `attentropy grade`
reruns only what is missing and a changed parser regrades from the stored replies without new calls.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .critic import CRITIC_PROMPT, critique_of, empty_critique, numbered_steps
from .gsm8k import extract_final_number, grade_gsm8k
from .judge import SIMPLEQA_JUDGE_PROMPT, parse_judge_verdict
from .llm_client import LLMClient, ReplyCache, ask_all, failure_causes
from .selective import f_score
from .simpleqa import grade_simpleqa_offline

SIMPLEQA_LABELS = ("correct", "incorrect", "not_attempted", "unparsed")
GSM8K_LABELS = ("correct", "incorrect", "unparsed")


def simpleqa_metrics(labels) -> dict:
    """SimpleQA's metrics over graded answers (`unparsed` ones excluded and counted)."""
    labels = list(labels)
    graded = [x for x in labels if x != "unparsed"]
    n = len(graded)
    correct, incorrect = graded.count("correct"), graded.count("incorrect")
    attempted = correct + incorrect
    c = correct / n if n else float("nan")
    cga = correct / attempted if attempted else float("nan")
    f = f_score(c, cga, empty=float("nan")) if attempted else float("nan")
    return {"n": n, "unparsed": len(labels) - n, "correct": c, "incorrect": incorrect / n if n else float("nan"),
            "not_attempted": graded.count("not_attempted") / n if n else float("nan"),
            "correct_given_attempted": cga, "f_score": f}


def math_metrics(strict, flexible) -> dict:
    strict, flexible = list(strict), list(flexible)
    n = len(strict)
    return {"n": n, "accuracy_strict": strict.count("correct") / n if n else float("nan"),
            "accuracy_flexible": flexible.count("correct") / n if n else float("nan"),
            "unparsed_strict": strict.count("unparsed")}


def confusion_table(rows: list[str], cols: list[str], labels: tuple[str, ...], row_name: str, col_name: str) -> str:
    counts = {(r, c): 0 for r in labels for c in labels}
    for r, c in zip(rows, cols):
        counts[(r, c)] += 1
    width = max(len(x) for x in labels) + 2
    lines = [f"{row_name} \\ {col_name}".ljust(width + 4) + "".join(c.rjust(width) for c in labels)]
    for r in labels:
        lines.append(r.ljust(width + 4) + "".join(str(counts[(r, c)]).rjust(width) for c in labels))
    agree = sum(counts[(x, x)] for x in labels)
    lines.append(f"agreement: {agree}/{len(rows)} ({agree / max(1, len(rows)):.1%})")
    return "\n".join(lines)


def grade_run(run_dir: str | Path, *, judge: str | None = None, critic: str | None = None,
              base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
              max_retries: int = 4, concurrency: int = 8, tokenizer=None, skip_damaged: bool = False,
              max_tokens: int = 512, progress: bool = True) -> dict:
    """Label every answer of a run (DIR/grades.parquet) and write DIR/metrics.json; returns the metrics.
    Idempotent: labels are rebuilt from the cached replies each time, only missing LLM calls are made. A judge or
    critic call without a reply is no label: the answer keeps its previous label or critique (or none yet), the
    failure is counted in the metrics (`failed_calls`) and asked again on the next run; an endpoint that cannot be
    used at all stops the grading at its first call (EndpointError). Replies are bounded by `max_tokens`.
    `skip_damaged`: grade the intact batches of a run with damaged ones. One `grade` per run directory at a time
    (DIR/grade.lock, as `writer_lock.writer_lock`): a second is refused, so the reply cache and the grades are written
    by one process."""
    from .writer_lock import writer_lock

    with writer_lock(run_dir, "attentropy grade", name="grade.lock"):
        return _grade_run(Path(run_dir), judge=judge, critic=critic, base_url=base_url, api_key_env=api_key_env,
                          timeout=timeout, max_retries=max_retries, concurrency=concurrency, tokenizer=tokenizer,
                          skip_damaged=skip_damaged, max_tokens=max_tokens, progress=progress)


def _previous_grades(run_dir: Path):
    """The grades of the last `attentropy grade`, by question (empty if none or unreadable: they are rebuilt)."""
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        return pq.read_table(run_dir / "grades.parquet").to_pandas().drop_duplicates("question_id").set_index(
            "question_id")
    except (OSError, ValueError):
        return pd.DataFrame()


def _grade_run(run_dir: Path, *, judge, critic, base_url, api_key_env, timeout, max_retries, concurrency, tokenizer,
               skip_damaged, max_tokens, progress) -> dict:
    import pandas as pd
    import pyarrow as pa

    from .data import FACTUAL, FREE, MATH, DataError
    from .store import _write_parquet, load_run, write_json

    run = load_run(run_dir, with_grades=False, skip_damaged=skip_damaged)  # grades are rebuilt here
    samples = run.samples
    benchmark = run.config["benchmark"]
    if benchmark == FREE:
        raise DataError(f"{run_dir} holds free prompts, which have no gold answer to grade against; "
                        f"`attentropy report {run_dir}` reads it ungraded")
    cache = ReplyCache(run_dir / "llm_replies.jsonl")
    previous = _previous_grades(run_dir)
    llm = dict(base_url=base_url, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
               concurrency=concurrency, max_tokens=max_tokens)
    rows = pd.DataFrame({"question_id": samples.question_id})
    metrics: dict = {"benchmark": benchmark, "questions": len(samples)}
    report = []
    if benchmark in FACTUAL:
        offline = [grade_simpleqa_offline(r.question, r.target, r.completion, list(r.aliases),
                                          (r.metadata or {}).get("answer_type")) for r in samples.itertuples()]
        rows["offline_label"] = offline
        if judge:
            prompts = [SIMPLEQA_JUDGE_PROMPT.format(question=r.question, target=r.target, predicted=r.completion)
                       for r in samples.itertuples()]
            replies = ask_all(LLMClient(judge, **llm), prompts, cache, "judge", progress)
            answered = [r["reply"] is not None for r in replies]
            # a call without a reply is no label: the answer keeps its previous one, or none yet
            rows["judge_label"] = [parse_judge_verdict(r["reply"]) if ok else None for r, ok in zip(replies, answered)]
            rows["judge_reply"] = [r["reply"] if ok else f"[no reply] {r['error']}" for r, ok in zip(replies, answered)]
            before = previous.reindex(rows.question_id) if len(previous) else None
            rows["label"] = [label if ok else (before.label.iloc[i] if before is not None else None)
                             for i, (label, ok) in enumerate(zip(rows.judge_label, answered))]
            rows["grader"] = [f"judge:{judge}" if ok else (before.grader.iloc[i] if before is not None else None)
                              for i, ok in enumerate(answered)]
            metrics["offline_grader"] = simpleqa_metrics(offline)
            judged = np.array(answered)
            report.append(confusion_table(list(rows.judge_label[judged]), list(np.array(offline)[judged]),
                                          SIMPLEQA_LABELS, "judge", "offline"))
            if failure_causes(replies):
                metrics["failed_calls"] = {"judge": failure_causes(replies)}
        else:
            rows["label"], rows["grader"] = offline, "offline"
        metrics.update(simpleqa_metrics([x for x in rows["label"] if isinstance(x, str)]))
        metrics["not_graded"] = int(sum(not isinstance(x, str) for x in rows["label"]))
    elif benchmark in MATH:
        rows["extracted_strict"] = [extract_final_number(c, "strict") for c in samples.completion]
        rows["extracted_flexible"] = [extract_final_number(c, "flexible") for c in samples.completion]
        rows["label"] = [grade_gsm8k(t, c, "strict") for t, c in zip(samples.target, samples.completion)]
        rows["label_flexible"] = [grade_gsm8k(t, c, "flexible") for t, c in zip(samples.target, samples.completion)]
        rows["grader"] = "strict final-answer extraction"
        metrics.update(math_metrics(rows["label"], rows["label_flexible"]))
        wrong = samples[rows["label"].to_numpy() == "incorrect"]
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(run))
        replies = [None] * len(wrong)
        if critic and len(wrong):
            prompts = [CRITIC_PROMPT.format(question=r.question, steps=numbered_steps(r.completion),
                                            reference=re.sub(r"<<[^>]*>>", "", r.reference))
                       for r in wrong.itertuples()]
            replies = ask_all(LLMClient(critic, **llm), prompts, cache, "critic", progress)
        name = f"llm:{critic}" if critic else "offline"
        found = {r.question_id: critique_of(r, tokenizer, reply, name) for r, reply in zip(wrong.itertuples(), replies)}
        for q, critique in found.items():  # no reply: the previous critique of the same critic stays
            if critique["critic_status"] == "no_reply" and q in previous.index and \
                    previous.loc[q].get("critic") == name and previous.loc[q].get("critic_status") != "no_reply":
                found[q] = {k: previous.loc[q][k] for k in critique}
        if critic and failure_causes(replies):
            metrics["failed_calls"] = {"critic": failure_causes(replies)}
        empty = empty_critique(name)
        for column in empty:
            rows[column] = [found.get(q, empty)[column] for q in rows.question_id]
        statuses = [v["critic_status"] for v in found.values()]
        metrics["critic"] = {"name": name, "incorrect_answers": len(wrong),
                             **{s: statuses.count(s) for s in ("located", "step_only", "no_error_found", "unparsed",
                                                                "no_reply")}}
    else:
        raise ValueError(f"no grader for benchmark {benchmark!r}")
    _write_parquet(pa.Table.from_pandas(rows, preserve_index=False), run_dir / "grades.parquet")
    write_json(run_dir / "metrics.json", metrics)
    metrics["_tables"] = report
    return metrics


def _tokenizer_source(run) -> str:
    """Where the run's tokenizer lives: an alias's cache directory (the embedded model, Gemma 3), or the model's
    hub id / path."""
    from .model import EMBEDDED_ALIAS, GEMMA_ALIAS, embedded_model_dir, gemma_model_dir

    name = run.config["model"]["name"]
    if name in (EMBEDDED_ALIAS, GEMMA_ALIAS):
        return str((embedded_model_dir() if name == EMBEDDED_ALIAS else gemma_model_dir())[0])
    return run.config["model"]["source"]


def format_metrics(m: dict) -> str:
    lines = [f"{m['benchmark']}: {m['questions']} answers"]
    if "f_score" in m:
        lines.append(f"  correct {m['correct']:.3f}  incorrect {m['incorrect']:.3f}  not attempted "
                     f"{m['not_attempted']:.3f}  correct given attempted {m['correct_given_attempted']:.3f}  "
                     f"F-score {m['f_score']:.3f}  (n={m['n']}, unparsed {m['unparsed']})")
    if "accuracy_strict" in m:
        lines.append(f"  accuracy strict {m['accuracy_strict']:.3f}  flexible {m['accuracy_flexible']:.3f}  "
                     f"(n={m['n']}, no strict final answer {m['unparsed_strict']})")
    if "critic" in m:
        c = m["critic"]
        lines.append(f"  critic {c['name']}: {c['incorrect_answers']} incorrect answers, wrong moment located in "
                     f"{c['located']} (+{c['step_only']} step only), none found {c['no_error_found']}, "
                     f"unparsed {c['unparsed']}, no reply {c.get('no_reply', 0)}")
    if m.get("not_graded"):
        lines.append(f"  not graded (the judge gave no reply and there was no earlier label): {m['not_graded']}")
    for who, causes in m.get("failed_calls", {}).items():
        lines.append(f"  {who}: {sum(causes.values())} calls got no reply ("
                     + ", ".join(f"{n} {cause}" for cause, n in causes.items())
                     + "); they are asked again when you rerun the same command")
    lines += m.get("_tables", [])
    return "\n".join(lines)
