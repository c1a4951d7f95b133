"""The answers data set: graded answers of one model's runs with their tokens' statistics, the input of every
detector and of the instrument (`Answers`, `load_answers`, `answers_from_generations`), and what identifies the
model and the runs they came from (`model_identity`, `run_info`)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .data import FREE, MATH, protocol_kind, question_kind
from .schema import ATTN_STATS
from .token_attention import ATTN_FEATURES, IN_MEMORY_BYTES, TokenAttention, concat_attention, normalised_attention
from .windows import attended_keys, run_windows

TOKEN_LOGIT = ("logprob", "logit_entropy", "logit_varentropy")


class InstrumentError(ValueError):
    """A probe that does not fit the runs or the model it is applied to."""


@dataclass
class Answers:
    """Answers (of one or several runs of one model) with their tokens' statistics, the input of every feature.

    Tokens of an answer are contiguous and in answer order; `answers.start` is the row of its first token."""

    answers: pd.DataFrame  # run, benchmark, task, question_id, question, group (`content_groups`; in answers
    #                        not read by `load_answers`: the question), kind, source (facts' data source, else
    #                        the benchmark), label, y, n_tokens,
    #                        start; y: 1 correct, 0 incorrect, -1 neither (not attempted, unparsed, ungraded)
    tokens: pd.DataFrame  # answer (row of `answers`), pos, token, logprob, logit_entropy, logit_varentropy, n_keys,
    #                       target: 1 wrong moment, 0 not, -1 unknown (an incorrect answer without a located span)
    attn: TokenAttention  # ATTN_FEATURES -> [n_tokens, L, H] float32, held or read a group of layers at a time
    layers: list[int]
    n_heads: int
    hidden: dict[str, np.ndarray] = field(default_factory=dict)  # last_prompt, answer_mean -> [n_answers, L_h, d]
    hidden_layers: list[int] = field(default_factory=list)  # their output_hidden_states indices
    hidden_tokens: np.ndarray | None = None  # [n_tokens, L_t, d] float16
    hidden_token_layers: list[int] = field(default_factory=list)
    windows: list = field(default_factory=list)  # per layer, its sliding window or None (empty: full attention)
    # LLM-Check's prompt part (`store.Run.prompt_diagonal`): per answer the sum over its prompt's rows but the last of
    # ln(attention on the own token) [n_answers, L, H] float64, and their number [n_answers]; None: not recorded
    prompt_log_diag: np.ndarray | None = None
    prompt_diag_rows: np.ndarray | None = None
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # features computed once

    def memo(self, key: str, compute):
        """`compute(self)`, computed once for these answers (features read by several detectors)."""
        if key not in self._memo:
            self._memo[key] = compute(self)
        return self._memo[key]

    @property
    def keys(self) -> np.ndarray:
        """[n_tokens, L] keys each layer's row attends to (`windows.attended_keys`): ln of them is its maximal
        entropy."""
        return attended_keys(self.tokens.n_keys.to_numpy(), self.windows or [None] * len(self.layers))

    @property
    def answer_of_token(self) -> np.ndarray:
        return self.tokens["answer"].to_numpy()

    def subset(self, answer_rows: np.ndarray) -> "Answers":
        answer_rows = np.asarray(answer_rows)
        starts, counts = self.answers.start.to_numpy()[answer_rows], self.answers.n_tokens.to_numpy()[answer_rows]
        token_rows = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)] or [np.zeros(0, int)])
        answers = self.answers.iloc[answer_rows].reset_index(drop=True)
        answers["start"] = np.r_[0, np.cumsum(answers.n_tokens.to_numpy())[:-1]].astype(int)
        tokens = self.tokens.iloc[token_rows].reset_index(drop=True)
        tokens["answer"] = np.repeat(np.arange(len(answers)), answers.n_tokens.to_numpy())
        return Answers(answers, tokens, self.attn.take(token_rows), self.layers, self.n_heads,
                       {k: v[answer_rows] for k, v in self.hidden.items()}, self.hidden_layers,
                       None if self.hidden_tokens is None else self.hidden_tokens[token_rows],
                       self.hidden_token_layers, self.windows,
                       None if self.prompt_log_diag is None else self.prompt_log_diag[answer_rows],
                       None if self.prompt_diag_rows is None else self.prompt_diag_rows[answer_rows])


def _task(benchmark: str) -> str:
    if benchmark == FREE:
        raise InstrumentError(f"no instrument task for benchmark {benchmark!r}: free prompts are never graded")
    return protocol_kind(benchmark)


_CALCULATION = re.compile(r"<<([^>]*)>>")


def _content(benchmark: str, reference: str) -> str:
    """A math problem's computation: the reference solution's calculator annotations, e.g. "7+3=10;10*2=20"."""
    steps = _CALCULATION.findall(reference or "") if benchmark in MATH else []
    return f"{benchmark}\n" + ";".join(s.replace(" ", "") for s in steps) if steps else ""


def _normal(text: str) -> str:
    return " ".join(str(text).lower().split())


def load_answers(run_dirs: list[str | Path], *, require_labels: bool = True, skip_damaged: bool = False,
                 in_memory_bytes: int = IN_MEMORY_BYTES) -> tuple[Answers, list[dict], dict]:
    """The answers of graded runs of one model, one description per run (path, fingerprint, benchmark, labels)
    and the model's identity (`model_identity`). `skip_damaged`: read the intact batches of a damaged run. The
    attention statistics are held when they take at most `in_memory_bytes`, else read from the runs a group of
    layers at a time whenever a feature is computed (`TokenAttention`)."""
    from .store import load_run

    parts, infos = [], []
    model = None
    runs = [load_run(run_dir, skip_damaged=skip_damaged) for run_dir in run_dirs]
    held = sum(attention_bytes(run) for run in runs) <= in_memory_bytes
    for run in runs:
        if require_labels and "label" not in run.samples:
            raise InstrumentError(f"{run.path} has no labels: run `attentropy grade {run.path}` first")
        identity = model_identity(run.config, run.layers, run.n_heads)
        if model is None:
            model = identity
        elif identity != model:
            raise InstrumentError(f"{run.path} is a run of {identity}, not of {model} like the runs before it; an "
                                  "instrument belongs to one model")
        infos.append(run_info(run))
        part = _answers_of(run.samples, run.tokens, run_attention(run, held), run.layers, run.n_heads,
                           str(run.path), hidden_of(run), run_windows(run.config), run.prompt_diagonal)
        part.answers["run_fingerprint"] = infos[-1]["fingerprint"]
        parts.append(part)
    if not parts:
        raise InstrumentError("no runs given")
    out = concat_answers(parts)
    out.answers["group"] = content_groups(out.answers.question.to_numpy(), out.answers.pop("content").to_numpy(),
                                          out.answers.pop("gold").to_numpy())
    return out, infos, model


def attention_bytes(run) -> int:
    """Bytes of a run's attention features held in memory (float32)."""
    return len(run.tokens) * len(run.layers) * run.n_heads * len(ATTN_FEATURES) * 4


def run_attention(run, held: bool):
    """What `_answers_of` makes a run's `TokenAttention` of: its stored statistics, or (`held` False) the run to read
    them from."""
    return {s: run.attn(s) for s in ATTN_STATS} if held else run


def content_groups(questions: np.ndarray, contents: np.ndarray, golds: np.ndarray) -> np.ndarray:
    """The group of each answer for folds and intervals: answers are in one group when they share their question,
    their content (a math problem's operations and numbers: the same computation under other names is a near-
    duplicate) or their gold answer within a question kind (factual). The group is named by its first question."""
    parent: dict = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for question, content, gold in zip(questions, contents, golds):
        for key in (("content", content), ("gold", gold)):
            if key[1]:
                parent[root(key)] = root(("question", question))
    names: dict = {}
    return np.array([names.setdefault(root(("question", q)), q) for q in questions], dtype=object)


def near_duplicates(answers: pd.DataFrame) -> int:
    """Answers whose group holds another question than their own (near-duplicates joined by `content_groups`)."""
    return int((answers.groupby("group").question.transform("nunique") > 1).sum())


def hidden_of(run) -> dict:
    """A run's stored hidden states (Answers' hidden fields; rows aligned with `run.samples` / `run.tokens`)."""
    spec = run.config.get("capture", {}).get("hidden") or {}
    out = {}
    if spec.get("layers"):
        out.update(hidden={k: run.hidden(k) for k in ("last_prompt", "answer_mean")}, hidden_layers=spec["layers"])
    if spec.get("token_layers"):
        out.update(hidden_tokens=run.hidden_tokens(), hidden_token_layers=spec["token_layers"])
    return out


def _answers_of(samples: pd.DataFrame, tokens: pd.DataFrame, attention, layers, n_heads, run_name: str,
                hidden: dict | None = None, windows: list | None = None, prompt_diagonal: tuple | None = None
                ) -> Answers:
    """Answers of one run (rows in the order of its tokens; `attention`: the stored statistics (name -> [n_tokens,
    L, H]) or the run to read them from, `run_attention`; `hidden`: `hidden_of`'s fields, `prompt_diagonal`:
    `Run.prompt_diagonal`, aligned with `samples` and `tokens`; `windows`: the layers' sliding windows,
    `windows.run_windows`)."""
    benchmark = samples.benchmark.iloc[0] if len(samples) else ""
    order = pd.Index(tokens.question_id.unique())
    sample_rows = pd.Index(samples.question_id).get_indexer(order)
    s = samples.set_index("question_id").loc[order].reset_index()
    labels = s["label"] if "label" in s else pd.Series(["ungraded"] * len(s))
    n_tokens = tokens.groupby("question_id", sort=False).size().loc[order].to_numpy()
    answers = pd.DataFrame({
        "run": run_name, "benchmark": s.benchmark.to_numpy(), "task": [_task(b) for b in s.benchmark],
        "question_id": s.question_id.to_numpy(), "question": (s.benchmark + "\n" + s.question).to_numpy(),
        "group": (s.benchmark + "\n" + s.question).to_numpy(),
        "kind": [question_kind(b, m) for b, m in zip(s.benchmark, s.metadata)], "label": labels.to_numpy(),
        "source": [str(m.get("source", b)) for b, m in zip(s.benchmark, s.metadata)],
        "content": [_content(b, r) for b, r in zip(s.benchmark, s.get("reference", [""] * len(s)))],
        "gold": [f"{b}\n{question_kind(b, m)}\n{_normal(t)}" if b not in MATH else ""
                 for b, m, t in zip(s.benchmark, s.metadata, s.get("target", [""] * len(s)))],
        "y": np.select([labels == "correct", labels == "incorrect"], [1, 0], -1), "n_tokens": n_tokens,
        "start": np.r_[0, np.cumsum(n_tokens)[:-1]].astype(int)})
    tok = pd.DataFrame({"answer": np.repeat(np.arange(len(answers)), n_tokens), "pos": tokens.pos.to_numpy(),
                        "token": tokens.token.to_numpy(),
                        **{k: tokens[k].to_numpy(np.float32) for k in TOKEN_LOGIT},
                        "n_keys": tokens.n_keys.to_numpy()})
    target = np.zeros(len(tok), int)
    if "in_error" in tokens:
        located = s.set_index("question_id").get("error_token_start", pd.Series(dtype=float)).reindex(order)
        located = (located.fillna(-1).to_numpy() >= 0)[tok.answer.to_numpy()]
        target = np.where(tokens.in_error.to_numpy(bool), 1, 0)
        wrong = (answers.y.to_numpy() == 0)[tok.answer.to_numpy()]
        target[wrong & ~located] = -1  # an incorrect answer whose wrong moment the critic did not find
    if benchmark not in MATH:
        target[:] = -1
    target[(answers.y.to_numpy() == -1)[tok.answer.to_numpy()]] = -1  # not attempted, unparsed, ungraded
    tok["target"] = target
    hidden = dict(hidden or {})
    if "hidden" in hidden:
        hidden["hidden"] = {k: v[sample_rows] for k, v in hidden["hidden"].items()}
    if prompt_diagonal is not None:
        hidden.update(prompt_log_diag=prompt_diagonal[0][sample_rows], prompt_diag_rows=prompt_diagonal[1][sample_rows])
    windows = list(windows or [None] * len(layers))
    keys = attended_keys(tok.n_keys.to_numpy(), windows)
    attn = (TokenAttention(list(layers), n_heads, normalised_attention(attention, keys)) if isinstance(attention, dict)
            else TokenAttention.read([attention], keys))
    return Answers(answers, tok, attn, list(layers), n_heads, **hidden, windows=windows)


def concat_answers(parts: list[Answers]) -> Answers:
    offsets = np.r_[0, np.cumsum([len(p.answers) for p in parts])[:-1]]
    token_offsets = np.r_[0, np.cumsum([len(p.tokens) for p in parts])[:-1]]
    answers = pd.concat([p.answers.assign(start=p.answers.start + t) for p, t in zip(parts, token_offsets)],
                        ignore_index=True)
    tokens = pd.concat([p.tokens.assign(answer=p.tokens.answer + o) for p, o in zip(parts, offsets)],
                       ignore_index=True)
    out = Answers(answers, tokens, concat_attention([p.attn for p in parts]), parts[0].layers, parts[0].n_heads,
                  windows=parts[0].windows)
    # hidden states only where every run kept the same ones
    if all(p.hidden and p.hidden_layers == parts[0].hidden_layers for p in parts):
        out.hidden = {k: np.concatenate([p.hidden[k] for p in parts]) for k in parts[0].hidden}
        out.hidden_layers = parts[0].hidden_layers
    if all(p.hidden_tokens is not None and p.hidden_token_layers == parts[0].hidden_token_layers for p in parts):
        out.hidden_tokens = np.concatenate([p.hidden_tokens for p in parts])
        out.hidden_token_layers = parts[0].hidden_token_layers
    if all(p.prompt_log_diag is not None for p in parts):  # LLM-Check's prompt part only where every run has it
        out.prompt_log_diag = np.concatenate([p.prompt_log_diag for p in parts])
        out.prompt_diag_rows = np.concatenate([p.prompt_diag_rows for p in parts])
    return out


def answers_from_generations(generations, layers: list[int], n_heads: int, attn_dtype: str = "float32",
                             windows: list | None = None) -> Answers:
    """Unlabelled answers of freshly generated (recorded) generations: what `attentropy run --probe` scores. The
    statistics are rounded to the run's storage type first, so live scores equal scores of the stored run.
    `windows`: the layers' sliding windows (`windows.layer_windows`; None: full attention)."""
    rows = []
    for g in generations:
        c = g.capture
        for t, token_id in enumerate(g.completion_ids):
            rows.append((g.question.id, t, token_id, c.logprob[t], c.logit_entropy[t], c.logit_varentropy[t],
                         c.n_keys[t]))
    tokens = pd.DataFrame(rows, columns=["question_id", "pos", "token", *TOKEN_LOGIT, "n_keys"])
    attn = np.concatenate([g.capture.attn for g in generations]).astype(attn_dtype).astype(np.float32)
    samples = pd.DataFrame({"question_id": [g.question.id for g in generations],
                            "benchmark": [g.question.benchmark for g in generations],
                            "question": [g.question.question for g in generations],
                            "metadata": [g.question.metadata for g in generations]})
    stat_arrays = {s: attn[..., i] for i, s in enumerate(ATTN_STATS)}
    diagonal = None
    if all(g.capture.prompt_log_diag is not None for g in generations):
        diagonal = (np.stack([g.capture.prompt_log_diag for g in generations]),
                    np.array([g.capture.prompt_diag_rows for g in generations]))
    return _answers_of(samples, tokens, stat_arrays, layers, n_heads, "live", windows=windows, prompt_diagonal=diagonal)


def model_identity(config: dict, layers: list[int], n_heads: int) -> dict:
    """What an instrument must match: the model (name, source, revision) and the recorded layer x head layout."""
    model = config.get("model", {})
    return {"name": model.get("name"), "source": model.get("source"), "revision": model.get("revision"),
            "architecture": model.get("architecture"), "layers": list(layers), "n_heads": int(n_heads)}


def run_info(run) -> dict:
    """A run's description; its fingerprint (config.json and the first committed batch's answers) survives copying
    the directory and resuming the run, and tells two runs of the same settings apart."""
    digest = hashlib.sha256((Path(run.path) / "config.json").read_bytes())
    if run.parts:
        digest.update((Path(run.path) / "samples" / f"{run.parts[0]}.parquet").read_bytes())
    labels = run.samples["label"].value_counts().to_dict() if "label" in run.samples else {}
    return {"path": str(Path(run.path).resolve()), "fingerprint": digest.hexdigest()[:16],
            "benchmark": run.config["benchmark"], "answers": len(run.samples),
            "labels": {k: int(v) for k, v in labels.items()}}
