"""Scoring with a fitted instrument: every answer of a stored run (`score_run`), one question's answer generated or
given (`score_answer`), or a question typed at the terminal (`score_text`, tokens coloured by confidence)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .answers import _answers_of, answers_from_generations, attention_bytes, model_identity, run_attention, run_info
from .token_attention import IN_MEMORY_BYTES
from .data import MATH

if TYPE_CHECKING:
    from .instrument import Instrument

def score_run(instrument: Instrument, run_dir: str | Path, skip_damaged: bool = False) -> pd.DataFrame:
    """`attentropy score --probe PROBE RUN`: score every answer of a run with the instrument and store the token
    confidences beside its parts (`load_run` then has tokens.confidence, tokens.prefix_confidence and
    samples.answer_confidence). Returns the scores."""
    import pyarrow.parquet as pq

    from .store import load_run, write_confidence, write_json
    from .windows import run_windows

    run = load_run(run_dir, skip_damaged=skip_damaged)
    instrument.check(model_identity(run.config, run.layers, run.n_heads), f"the run {run_dir}")
    trained_on = {r["fingerprint"] for r in instrument.meta.get("training_runs", [])}
    if run_info(run)["fingerprint"] in trained_on:
        warnings.warn(f"{run_dir} is one of the instrument's training runs: its scores are in-sample (the "
                      "instrument's own out-of-fold confidences are in its predictions files)", stacklevel=2)
    if not len(run.tokens):
        return pd.DataFrame(columns=["question_id", "pos", "confidence", "prefix_confidence"])
    tokens = run.tokens.drop(columns=[c for c in ("confidence", "prefix_confidence") if c in run.tokens])
    a = _answers_of(run.samples, tokens, run_attention(run, attention_bytes(run) <= IN_MEMORY_BYTES), run.layers,
                    run.n_heads, str(run.path), windows=run_windows(run.config))
    scores = instrument.score(a)
    (Path(run_dir) / "confidence").mkdir(exist_ok=True)
    start = 0
    for part in run.parts:  # the scores of each part's tokens (those of duplicate answers left out)
        n = (int(run.kept_rows[part][1].sum()) if part in run.kept_rows
             else pq.ParquetFile(Path(run_dir) / "tokens" / f"{part}.parquet").metadata.num_rows)
        write_confidence(run_dir, part, scores.iloc[start:start + n])
        start += n
    write_json(Path(run_dir) / "confidence" / "probe.json", probe_stamp(instrument))
    return scores


def probe_stamp(instrument: Instrument) -> dict:
    """What a run's confidence/probe.json says of the instrument that scored it."""
    return {"fingerprint": instrument.fingerprint, "model": instrument.identity["name"],
            "created": instrument.meta.get("created"), "answer_models": sorted(instrument.answer_models),
            "token_model": instrument.token_model is not None}


def score_answer(instrument: Instrument, model, tokenizer, info, question, *, answer: str | None = None,
                 max_new_tokens: int | None = None, kind: str | None = None) -> tuple[pd.DataFrame, list[str], str]:
    """Scores of one question's answer: generated and recorded, or, given as text, tokenized once and read
    through the teacher-forced capture. `kind`: the question kind the answer models route by (None: the
    question's own; `attentropy serve` routes a typed question by UNKNOWN_KIND). Returns (scores per token, the
    tokens' text, the answer)."""
    from .attention import recorded_layers
    from .capture import capture
    from .data import protocol_kind
    from .generate import Generation, generate
    from .prompts import MAX_NEW_TOKENS, prompt_ids, stop_token_ids
    from .windows import layer_windows

    layers = recorded_layers(model)
    n_heads = model.config.get_text_config().num_attention_heads
    instrument.check({"name": info.name, "revision": info.revision, "layers": layers, "n_heads": n_heads},
                     f"the model {info.name!r}")
    if answer is None:
        limit = max_new_tokens or MAX_NEW_TOKENS[protocol_kind(question.benchmark)]
        gen = generate(model, tokenizer, [question], max_new_tokens=limit, record=True)[0][0]
    else:
        prompt = prompt_ids(tokenizer, question)
        completion = tokenizer.encode(answer, add_special_tokens=False) + stop_token_ids(model, tokenizer)[:1]
        gen = Generation(question, prompt, completion, answer, "given",
                         capture(model, [prompt], [completion])[0])
    a = answers_from_generations([gen], layers, n_heads, windows=layer_windows(model.config, layers))
    if kind is not None:
        a.answers["kind"] = kind
    return instrument.score(a), [tokenizer.decode([t]) for t in gen.completion_ids], gen.completion


def _ansi(text: str, confidence: float) -> str:
    """Text on a background from red (confidence 0) through yellow to green (1), in 24-bit ANSI colour; grey where
    the confidence is NaN (not scored)."""
    if np.isnan(confidence):
        return f"\x1b[48;2;210;210;210m\x1b[38;2;0;0;0m{text}\x1b[0m"
    c = float(confidence)
    r, g = (255, int(510 * c)) if c < 0.5 else (int(510 * (1 - c)), 255)
    return f"\x1b[48;2;{r};{g};60m\x1b[38;2;0;0;0m{text}\x1b[0m"


def restates_question(texts: list[str], question: str) -> np.ndarray:
    """[n_tokens] bool: tokens that carry nothing the question does not already say (their text a word of the
    question, or two characters or more found in it; or punctuation and white space). Such a token cannot be where
    the answer goes wrong, so it is shown unscored rather than flagged."""
    lowered = question.lower()
    words = set(re.findall(r"\w+", lowered))
    out = []
    for text in texts:
        core = text.strip().lower()
        out.append(not any(ch.isalnum() for ch in core) or core in words or (len(core) >= 2 and core in lowered))
    return np.array(out, dtype=bool)


def score_text(instrument: Instrument, model_name: str, question_text: str, *, answer: str | None = None,
               benchmark: str | None = None, as_json: bool = False, max_new_tokens: int | None = None) -> str:
    """`attentropy score --probe P --model M "question"`: the answer's tokens coloured by confidence (the token
    model where the instrument has one, else the prefix confidence), or JSON."""
    from .data import Question
    from .model import load_model

    if benchmark is None:
        benchmark = "facts" if "factual" in instrument.answer_models else "arith"
    model, tokenizer, info = load_model(model_name)
    question = Question("question-00000", benchmark, question_text, target="",
                        metadata={"steps": 1} if benchmark == "arith" else {})
    scores, texts, completion = score_answer(instrument, model, tokenizer, info, question, answer=answer,
                                             max_new_tokens=max_new_tokens)
    answer_confidence = float(scores.prefix_confidence.iloc[-1])
    # a typed question's kind is not known: the anchored model, built for kinds not seen in fitting, scores it
    answer_model = "dense probe" if scores.in_kind.iloc[-1] else "anchored model (question kind not seen in fitting)"
    restating = restates_question(texts, question_text)
    if as_json:
        return json.dumps({"question": question_text, "answer": completion, "benchmark": benchmark,
                           "answer_confidence": answer_confidence, "answer_model": answer_model,
                           "probe": instrument.fingerprint,
                           "tokens": [{"token": t, "confidence": None if np.isnan(c) else float(c),
                                       "prefix_confidence": float(p), "restates_question": bool(r)}
                                      for t, c, p, r in zip(texts, scores.confidence, scores.prefix_confidence,
                                                            restating)]},
                          ensure_ascii=False, indent=1)
    shown = "confidence" if instrument.token_model is not None and benchmark in MATH else "prefix_confidence"
    colour = np.where(restating, np.nan, scores[shown].to_numpy(float))
    body = "".join(_ansi(t, c) for t, c in zip(texts, colour))
    legend = " ".join(_ansi(f" {v:.1f} ", v) for v in (0.0, 0.25, 0.5, 0.75, 1.0))
    what = ("token confidence: P(not where the answer goes wrong)" if shown == "confidence"
            else "prefix confidence: P(correct) from the tokens so far")
    return (f"{question_text}\n{body}\n\nanswer confidence (P correct): {answer_confidence:.3f} ({answer_model})\n"
            f"colours: {what}  "
            f"{legend}  {_ansi(' grey ', float('nan'))}: restates the question or punctuation, not scored")
