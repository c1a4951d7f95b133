"""The run directory: Parquet parts appended one batch at a time, crash-safe, resumable; `load_run` reads it.

Layout of DIR:
    config.json                  model, protocol, capture settings, versions (written once, checked on resume)
    grades.parquet               labels and the critic's wrong moment, one row per question (`attentropy grade`)
    metrics.json                 the benchmark's metrics (`attentropy grade`)
    llm_replies.jsonl            every judge / critic reply, keyed by (model, prompt)
    samples/part-NNNNN.parquet   one row per question (written last: its presence commits the batch)
    tokens/part-NNNNN.parquet    one row per completion token
    attn/part-NNNNN.parquet      one column per attention statistic, each row a (layer x head) vector
    attention_maps/<id>.npz      full attention rows of chosen questions (--save-attention)
    hidden/part-NNNNN.parquet    per answer: hidden states (config capture.hidden.layers) of the last prompt token
                                 (`last_prompt`) and their mean over the answer's rows (`answer_mean`), float32
    hidden_tokens/part-NNNNN.parquet  per token: hidden states of capture.hidden.token_layers, float16 (optional)
    confidence/part-NNNNN.parquet  per token: confidence and prefix_confidence from an instrument (`attentropy score`,
                                 or `attentropy run --probe`, which writes it before the batch's samples part);
                                 confidence/probe.json names the instrument
A part is written to a temporary name and renamed, so a file either is complete or does not exist; a batch
whose samples part is missing was not committed and is redone on resume.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .capture import ATTN_STATS
from .generate import Generation


def _replace_atomically(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    _replace_atomically(tmp, path)


def _write_parquet(table: pa.Table, path: Path, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd", **options)
    _replace_atomically(tmp, path)


def committed_parts(run_dir: Path) -> list[str]:
    return sorted(p.stem for p in (Path(run_dir) / "samples").glob("part-*.parquet"))


def done_question_ids(run_dir: Path) -> set[str]:
    ids: set[str] = set()
    for part in committed_parts(run_dir):
        ids.update(pq.read_table(Path(run_dir) / "samples" / f"{part}.parquet", columns=["question_id"])
                   ["question_id"].to_pylist())
    return ids


def append_batch(run_dir: Path, generations: list[Generation], tokenizer, attn_dtype: str = "float32",
                 confidence: pd.DataFrame | None = None) -> str:
    """Write one batch of captured generations as a new part (attn, tokens, confidence when given, then samples
    last); return its name."""
    captures = [g.capture for g in generations]
    if any(c is None for c in captures):
        raise ValueError("append_batch needs generations with their capture (generate(..., record=True))")
    run_dir = Path(run_dir)
    existing = committed_parts(run_dir)
    part = f"part-{int(existing[-1].split('-')[1]) + 1 if existing else 0:05d}"
    token_rows = {k: [] for k in ("question_id", "pos", "token_id", "token", "logprob", "logit_entropy",
                                  "logit_varentropy", "n_keys")}
    for g, c in zip(generations, captures):
        n = len(g.completion_ids)
        token_rows["question_id"] += [g.question.id] * n
        token_rows["pos"] += list(range(n))
        token_rows["token_id"] += g.completion_ids
        token_rows["token"] += [tokenizer.decode([t]) for t in g.completion_ids]
        token_rows["logprob"] += c.logprob.tolist()
        token_rows["logit_entropy"] += c.logit_entropy.tolist()
        token_rows["logit_varentropy"] += c.logit_varentropy.tolist()
        token_rows["n_keys"] += c.n_keys.tolist()
    tokens = pa.table({
        "question_id": pa.array(token_rows["question_id"], pa.string()),
        "pos": pa.array(token_rows["pos"], pa.int32()),
        "token_id": pa.array(token_rows["token_id"], pa.int32()),
        "token": pa.array(token_rows["token"], pa.string()),
        "logprob": pa.array(token_rows["logprob"], pa.float32()),
        "logit_entropy": pa.array(token_rows["logit_entropy"], pa.float32()),
        "logit_varentropy": pa.array(token_rows["logit_varentropy"], pa.float32()),
        "n_keys": pa.array(token_rows["n_keys"], pa.int32()),
    })
    attn = np.concatenate([c.attn for c in captures])  # [n_tokens, L, H, S]
    n_tokens, n_layers, n_heads, _ = attn.shape
    attn_table = pa.table({
        stat: pa.FixedSizeListArray.from_arrays(
            pa.array(attn[..., s].astype(attn_dtype).reshape(-1)), n_layers * n_heads)
        for s, stat in enumerate(ATTN_STATS)
    })
    samples = pa.table({
        "question_id": [g.question.id for g in generations],
        "benchmark": [g.question.benchmark for g in generations],
        "question": [g.question.question for g in generations],
        "target": [g.question.target for g in generations],
        "reference": [g.question.reference for g in generations],
        "aliases": pa.array([g.question.aliases for g in generations], pa.list_(pa.string())),
        "metadata": [json.dumps(g.question.metadata) for g in generations],
        "prompt_ids": pa.array([g.prompt_ids for g in generations], pa.list_(pa.int32())),
        "completion_ids": pa.array([g.completion_ids for g in generations], pa.list_(pa.int32())),
        "completion": [g.completion for g in generations],
        "finish_reason": [g.finish_reason for g in generations],
    })
    for g, c in zip(generations, captures):
        if c.attention_map is not None:
            path = run_dir / "attention_maps" / f"{g.question.id}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez_compressed(tmp, **{f"layer_{layer}": m for layer, m in c.attention_map.items()},
                                prompt_len=len(g.prompt_ids), completion_ids=np.array(g.completion_ids))
            _replace_atomically(tmp, path)
    # Statistics are floats with few repeated values: dictionary encoding (Parquet's default) fails and leaves
    # parts larger than the raw floats; byte-stream split (each byte of the floats stored together) lets zstd
    # compress them (the main job's parts: 0.81x the raw floats, `du -sh runs/smollm2-135m/*/attn`).
    _write_parquet(attn_table, run_dir / "attn" / f"{part}.parquet", use_dictionary=False,
                   use_byte_stream_split=attn_dtype == "float32")  # float16 split needs pyarrow >= 16
    _write_parquet(tokens, run_dir / "tokens" / f"{part}.parquet")
    if captures[0].hidden_mean is not None:  # every answer of a run has the same hidden-state layout
        _write_parquet(pa.table({
            "question_id": [g.question.id for g in generations],
            "last_prompt": _vectors(np.stack([c.hidden_last_prompt for c in captures]), np.float32),
            "answer_mean": _vectors(np.stack([c.hidden_mean for c in captures]), np.float32)}),
            run_dir / "hidden" / f"{part}.parquet", use_dictionary=False,
            use_byte_stream_split=["last_prompt.list.element", "answer_mean.list.element"])
    if captures[0].hidden_tokens is not None:
        _write_parquet(pa.table({
            "question_id": token_rows["question_id"], "pos": pa.array(token_rows["pos"], pa.int32()),
            "hidden": _vectors(np.concatenate([c.hidden_tokens for c in captures]), np.float16)}),
            run_dir / "hidden_tokens" / f"{part}.parquet", use_dictionary=False)
    if confidence is not None:
        write_confidence(run_dir, part, confidence)
    _write_parquet(samples, run_dir / "samples" / f"{part}.parquet")  # commits the batch
    return part


@dataclass
class Run:
    """A run directory, read. `tokens` rows are aligned with the first axis of every `attn(stat)` array."""

    path: Path
    config: dict
    samples: pd.DataFrame
    tokens: pd.DataFrame
    layers: list[int]
    n_heads: int
    parts: list[str] = field(repr=False, default_factory=list)

    def attn(self, stat: str) -> np.ndarray:
        """float32 array (n_tokens, n_layers, n_heads) of one attention statistic; reads only that column."""
        if stat not in ATTN_STATS:
            raise KeyError(f"unknown attention statistic {stat!r}; expected one of {', '.join(ATTN_STATS)}")
        chunks = []
        for part in self.parts:
            column = pq.read_table(self.path / "attn" / f"{part}.parquet", columns=[stat])[stat]
            values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
            chunks.append(values.reshape(-1, len(self.layers), self.n_heads))
        if not chunks:
            return np.zeros((0, len(self.layers), self.n_heads), np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def hidden(self, kind: str = "answer_mean", layers: list[int] | None = None) -> np.ndarray:
        """float32 (n_answers, len(layers), hidden size), rows aligned with `samples`: the residual stream at the
        last prompt token (`last_prompt`) or its mean over the answer's rows (`answer_mean`), at the given
        hidden-state indices (0: the embeddings; default: all kept, `config['capture']['hidden']['layers']`)."""
        kept, size = self._hidden_layout("layers")
        if kind not in ("last_prompt", "answer_mean"):
            raise KeyError(f"unknown hidden-state summary {kind!r}; expected last_prompt or answer_mean")
        return self._read_vectors("hidden", kind, kept, size, layers)

    def hidden_tokens(self, layers: list[int] | None = None) -> np.ndarray:
        """float16 (n_tokens, len(layers), hidden size), rows aligned with `tokens`: every answer row's hidden
        states (`attentropy run --hidden-token-layers`)."""
        kept, size = self._hidden_layout("token_layers")
        return self._read_vectors("hidden_tokens", "hidden", kept, size, layers)

    def _hidden_layout(self, key: str) -> tuple[list[int], int]:
        spec = self.config.get("capture", {}).get("hidden") or {}
        if not spec.get(key):
            raise KeyError(f"{self.path} holds no hidden states ({key}); record them with `attentropy run "
                           f"--hidden-{key.replace('_', '-')} ...`")
        return list(spec[key]), int(spec["size"])

    def _read_vectors(self, kind: str, column: str, kept: list[int], size: int, layers) -> np.ndarray:
        wanted = kept if layers is None else list(layers)
        missing = [i for i in wanted if i not in kept]
        if missing:
            raise KeyError(f"hidden states {missing} were not kept in {self.path} (kept: {kept})")
        chunks = []
        for part in self.parts:
            values = pq.read_table(self.path / kind / f"{part}.parquet", columns=[column])[column]
            values = values.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, len(kept), size)
            chunks.append(values[:, [kept.index(i) for i in wanted]])
        return np.concatenate(chunks) if chunks else np.zeros((0, len(wanted), size), np.float32)

    def attention_map(self, question_id: str) -> dict[int, np.ndarray]:
        """Saved full attention rows of one question: layer -> [n_heads, n_completion_tokens, n_keys]."""
        path = self.path / "attention_maps" / f"{question_id}.npz"
        if not path.exists():
            raise KeyError(f"no attention map saved for {question_id!r} (run with --save-attention {question_id})")
        with np.load(path) as z:
            return {int(k.split("_")[1]): z[k] for k in z.files if k.startswith("layer_")}


def _vectors(values: np.ndarray, dtype) -> pa.FixedSizeListArray:
    """Rows of `values` [n, ...] as fixed-size lists of their flattened values."""
    flat = np.ascontiguousarray(values, dtype=dtype).reshape(len(values), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])




def write_confidence(run_dir: Path, part: str, scores: pd.DataFrame) -> None:
    """One part's token confidences (rows: the part's tokens, in order)."""
    table = pa.table({"question_id": pa.array(scores["question_id"], pa.string()),
                      "pos": pa.array(scores["pos"], pa.int32()),
                      "confidence": pa.array(scores["confidence"], pa.float32()),
                      "prefix_confidence": pa.array(scores["prefix_confidence"], pa.float32())})
    _write_parquet(table, Path(run_dir) / "confidence" / f"{part}.parquet")


def _read_parts(run_dir: Path, kind: str, parts: list[str]) -> pd.DataFrame:
    tables = [pq.read_table(run_dir / kind / f"{part}.parquet") for part in parts]
    return pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame()


def load_run(path: str | Path) -> Run:
    run_dir = Path(path)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not an attentropy run directory (no config.json)")
    config = json.loads(config_path.read_text())
    parts = committed_parts(run_dir)
    samples = _read_parts(run_dir, "samples", parts)
    if len(samples):
        samples["metadata"] = samples["metadata"].map(json.loads)
    tokens = _read_parts(run_dir, "tokens", parts)
    grades_path = run_dir / "grades.parquet"
    if grades_path.exists() and len(samples):  # labels from `attentropy grade`
        grades = pq.read_table(grades_path).to_pandas()
        samples = samples.merge(grades, on="question_id", how="left")
        if "error_token_start" in samples:
            span = samples.set_index("question_id")[["error_token_start", "error_token_end"]]
            start = tokens.question_id.map(span.error_token_start).fillna(-1).to_numpy()
            end = tokens.question_id.map(span.error_token_end).fillna(-1).to_numpy()
            located = start >= 0
            tokens["in_error"] = located & (tokens.pos.to_numpy() >= start) & (tokens.pos.to_numpy() < end)
            tokens["after_error"] = located & (tokens.pos.to_numpy() >= end)
    scored = [part for part in parts if (run_dir / "confidence" / f"{part}.parquet").exists()]
    if scored and len(tokens):  # instrument scores (`attentropy score`, `run --probe`); NaN where a part has none
        scores = _read_parts(run_dir, "confidence", scored)
        tokens = tokens.merge(scores, on=["question_id", "pos"], how="left")
        last = tokens.groupby("question_id", sort=False).prefix_confidence.last()  # the whole answer's prefix
        samples["answer_confidence"] = samples.question_id.map(last).astype(float)
    return Run(path=run_dir, config=config, samples=samples, tokens=tokens, layers=config["capture"]["layers"],
               n_heads=config["capture"]["n_heads"], parts=parts)
