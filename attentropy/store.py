"""The run directory: Parquet parts appended one batch at a time, crash-safe, resumable; `load_run` reads it.

Layout of DIR:
    config.json                  model, protocol, capture settings, versions (written once, checked on resume)
    grades.parquet               labels and the critic's wrong moment, one row per question (`attentropy grade`)
    metrics.json                 the benchmark's metrics (`attentropy grade`)
    llm_replies.jsonl            every judge / critic reply, keyed by (model, prompt)
    samples/part-NNNNN.parquet   one row per question (written last: its presence commits the batch); where
                                 config.json's capture records `prompt_log_diag` (older runs lack it), LLM-Check's
                                 prompt part: `prompt_log_diag`, per (layer x head) the sum over the prompt's rows
                                 but its last of ln(attention on the row's own token), float64, and
                                 `prompt_diag_rows`, their number (`Run.prompt_diagonal`)
    tokens/part-NNNNN.parquet    one row per completion token
    attn/part-NNNNN.parquet      one column per attention statistic and recorded layer, `<stat>_layer<i>` (i: the
                                 model's layer index), each row the heads' values, so that reading one layer
                                 reads 1/n_layers of the part (runs written before 0.2: one column per
                                 statistic, each row a (layer x head) vector; still read)
    attention_maps/<id>.npz      full attention rows of chosen questions (--save-attention)
    hidden/part-NNNNN.parquet    per answer: hidden states (config capture.hidden.layers) of the last prompt token
                                 (`last_prompt`) and their mean over the answer's rows (`answer_mean`), float32
    hidden_tokens/part-NNNNN.parquet  per token: hidden states of capture.hidden.token_layers, float16 (optional)
    confidence/part-NNNNN.parquet  per token: confidence and prefix_confidence from an instrument (`attentropy score`,
                                 or `attentropy run --probe`, which writes it before the batch's samples part);
                                 confidence/probe.json names the instrument
    writer.lock                  while a process writes the directory: who (`writer_lock`)
    damaged/<part>-<time>/       batches set aside by a resuming run because a part was unreadable or inconsistent
A part is written to a temporary name and renamed, so a file either is complete or does not exist; a batch
whose samples part is missing was not committed and is redone on resume. One writer at a time (`writer_lock`);
the workers of a data-parallel run (`attentropy.parallel`) write under their driver's lock, each its own parts
(`part-<worker>-NNNNN`). `load_run` reads each question once and names damaged batches (`scan_parts`).
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import ATTN_STATS

if TYPE_CHECKING:  # a type only: reading a run imports no torch
    from .generate import Generation

PROMPT_DIAGONAL = "prompt_log_diag"  # the key in config.json's capture of runs that record LLM-Check's prompt part
READ_BYTES = 256 * 2 ** 20  # `Run.layer_groups`: an attention statistic read in groups of layers of about this size
ATTN_FILES_OPEN = 256  # attn parts a `Run` keeps open (`Run._attn_file`; each holds its footer, ~3 MB for 80 layers)


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


def next_part(run_dir: Path, writer: str = "") -> str:
    """The name of a writer's next part: `part-NNNNN` for a run's single process, `part-<writer>-NNNNN` for a
    worker of a data-parallel run, so that writers sharing a directory never pick the same name."""
    prefix = f"part-{writer}-" if writer else "part-"
    numbers = [int(p[len(prefix):]) for p in committed_parts(run_dir)
               if p.startswith(prefix) and p[len(prefix):].isdigit()]
    return f"{prefix}{max(numbers) + 1 if numbers else 0:05d}"


def attn_column(stat: str, layer: int) -> str:
    """The column of one attention statistic of one layer (the model's layer index) in an attn part."""
    return f"{stat}_layer{layer}"


def done_question_ids(run_dir: Path) -> set[str]:
    ids: set[str] = set()
    for part in committed_parts(run_dir):
        ids.update(pq.read_table(Path(run_dir) / "samples" / f"{part}.parquet", columns=["question_id"])
                   ["question_id"].to_pylist())
    return ids


def append_batch(run_dir: Path, generations: list[Generation], tokenizer, attn_dtype: str = "float32",
                 confidence: pd.DataFrame | None = None, writer: str = "") -> str:
    """Write one batch of captured generations as a new part (attn, tokens, confidence when given, then samples
    last); return its name. `writer`: a data-parallel worker's name (`next_part`)."""
    captures = [g.capture for g in generations]
    if any(c is None for c in captures):
        raise ValueError("append_batch needs generations with their capture (generate(..., record=True))")
    run_dir = Path(run_dir)
    part = next_part(run_dir, writer)
    capture_config = read_config(run_dir)["capture"]
    layers = capture_config["layers"]
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
    if attn.shape[1] != len(layers):
        raise ValueError(f"captures hold {attn.shape[1]} layers, {run_dir}/config.json records {len(layers)}")
    attn_table = pa.table({attn_column(stat, layer): _vectors(attn[:, i, :, s], attn_dtype)
                           for s, stat in enumerate(ATTN_STATS) for i, layer in enumerate(layers)})
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
    if PROMPT_DIAGONAL in capture_config:  # LLM-Check's prompt part, one row per answer (its samples row)
        if any(c.prompt_log_diag is None for c in captures):
            raise ValueError(f"{run_dir}/config.json records {PROMPT_DIAGONAL}, but the captures hold none")
        samples = samples.append_column("prompt_log_diag", _vectors(np.stack([c.prompt_log_diag for c in captures]),
                                                                    np.float64))
        samples = samples.append_column("prompt_diag_rows", pa.array([c.prompt_diag_rows for c in captures],
                                                                     pa.int32()))
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
    # compress them (sizes: bench/RESULTS.md).
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
    parts: list[str] = field(repr=False, default_factory=list)  # the batches read (intact, committed)
    # part -> (answers kept, tokens kept) where a part holds duplicates of earlier answers (see `load_run`)
    kept_rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False, default_factory=dict)
    # LLM-Check's prompt part, rows aligned with `samples`: (sums [n_answers, n_layers, n_heads] float64, rows
    # [n_answers]); None where the run did not record it (runs written before it was)
    prompt_diagonal: tuple[np.ndarray, np.ndarray] | None = field(repr=False, default=None)

    # attn parts kept open (`_attn_file`): path -> (ParquetFile, old layout, lock)
    _attn_files: dict = field(repr=False, compare=False, default_factory=dict)
    _attn_files_lock: threading.Lock = field(repr=False, compare=False, default_factory=threading.Lock)

    def __getstate__(self) -> dict:  # sent to Ray tasks without open files, which each process opens again
        return {**self.__dict__, "_attn_files": {}, "_attn_files_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _attn_files_lock=threading.Lock())

    def _read(self, kind: str, part: str, read):
        """`read(path)` of one part of `kind`, a damaged file named."""
        path = self.path / kind / f"{part}.parquet"
        try:
            return read(path)
        except (OSError, pa.ArrowException) as e:
            raise RunDirectoryError(f"{path} is damaged ({e}); {REPAIR}") from None

    def _kept(self, part: str, per: str) -> np.ndarray | None:
        """Which rows of a part are kept (None: all), leaving out the rows of duplicate answers (`per`: answer or
        token rows)."""
        return self.kept_rows[part][0 if per == "answer" else 1] if part in self.kept_rows else None

    def _part_rows(self, kind: str, part: str, per: str, read) -> np.ndarray:
        """`read(path)`'s rows of one part of `kind` (a damaged file named), the rows of duplicate answers left
        out (`per`: answer or token rows)."""
        rows = self._read(kind, part, read)
        keep = self._kept(part, per)
        return rows if keep is None else rows[keep]

    def _column(self, kind: str, column: str, per: str) -> list[np.ndarray]:
        """One vector column of every part of `kind` (hidden, hidden_tokens), rows [n, vector] per part."""
        def read(path: Path) -> np.ndarray:
            return _fixed_rows(pq.read_table(path, columns=[column])[column])

        return [self._part_rows(kind, part, per, read) for part in self.parts]

    @contextmanager
    def _attn_file(self, path: Path):
        """(An attn part open, whether it has the layout written before 0.2: one column per statistic), for one
        reader at a time. The first ATTN_FILES_OPEN parts stay open, their footers parsed once: a report reads every
        part once per statistic and group of layers, and parsing a footer of 480 columns cost about as much as
        reading a group's values from it."""
        with self._attn_files_lock:
            entry = self._attn_files.get(path)
        kept = entry is not None
        if not kept:
            f = pq.ParquetFile(path)
            entry = (f, ATTN_STATS[0] in f.schema_arrow.names, threading.Lock())
            with self._attn_files_lock:
                if len(self._attn_files) < ATTN_FILES_OPEN:
                    entry, kept = self._attn_files.setdefault(path, entry), True
        f, whole, lock = entry
        with lock:
            yield f, whole
        if not kept:
            f.close()

    def attn(self, stat: str, layers: list[int] | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """float32 array (n_tokens, len(layers), n_heads) of one attention statistic at the given layers (the
        model's layer indices; default: all recorded); reads only those columns, each part's straight into the
        array, or into `out` (of that shape, e.g. a buffer reused from one read to the next)."""
        if stat not in ATTN_STATS:
            raise KeyError(f"unknown attention statistic {stat!r}; expected one of {', '.join(ATTN_STATS)}")
        wanted = list(self.layers) if layers is None else [int(layer) for layer in layers]
        missing = [layer for layer in wanted if layer not in self.layers]
        if missing:
            raise KeyError(f"layers {missing} were not recorded in {self.path} (recorded: {self.layers})")

        def read(path: Path) -> list[np.ndarray]:  # per wanted layer, its rows [n, n_heads] as stored
            with self._attn_file(path) as (f, whole):
                if whole:  # written before 0.2: one (layer x head) vector per row
                    rows = _fixed_rows(f.read(columns=[stat])[stat]).reshape(-1, len(self.layers), self.n_heads)
                    return [rows[:, self.layers.index(layer)] for layer in wanted]
                columns = [attn_column(stat, layer) for layer in wanted]
                table = f.read(columns=columns)
            return [_fixed_rows(table[c]) for c in columns]

        out = np.empty((len(self.tokens), len(wanted), self.n_heads), np.float32) if out is None else out
        at = 0
        for part in self.parts if wanted else ():
            by_layer, keep = self._read("attn", part, read), self._kept(part, "token")
            n = len(by_layer[0]) if keep is None else int(keep.sum())
            for i, rows in enumerate(by_layer):
                out[at:at + n, i] = rows if keep is None else rows[keep]
            at += n
        return out

    def layer_groups(self, read_bytes: int = READ_BYTES) -> list[list[int]]:
        """The recorded layers in consecutive groups whose float32 values of one attention statistic fit in
        `read_bytes` (at least one layer a group): reading a statistic group by group holds one group at a time,
        so memory does not grow with the number of layers, and by one layer's values with the number of tokens."""
        per = max(1, read_bytes // max(1, len(self.tokens) * self.n_heads * 4))
        return [self.layers[i:i + per] for i in range(0, len(self.layers), per)]

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
        chunks = [c.reshape(len(c), len(kept), size)[:, [kept.index(i) for i in wanted]]
                  for c in self._column(kind, column, "answer" if kind == "hidden" else "token")]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(wanted), size), np.float32)

    def attention_map(self, question_id: str) -> dict[int, np.ndarray]:
        """Saved full attention rows of one question: layer -> [n_heads, n_completion_tokens, n_keys]."""
        path = self.path / "attention_maps" / f"{question_id}.npz"
        if not path.exists():
            raise KeyError(f"no attention map saved for {question_id!r} (run with --save-attention {question_id})")
        with np.load(path) as z:
            return {int(k.split("_")[1]): z[k] for k in z.files if k.startswith("layer_")}


def _fixed_rows(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column as a [rows, size] array; a column of one chunk (a part's) without a copy, read-only."""
    values = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), -1)


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


REPAIR = ("rerun `attentropy run` with the same settings (it sets damaged batches aside into DIR/damaged/ and "
          "generates them again), or read the intact batches with --skip-damaged")


class RunDirectoryError(ValueError):
    """A run directory that cannot be read as it is: a damaged part, config.json or grades file."""


def read_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not an attentropy run directory (no config.json)")
    try:
        config = json.loads(path.read_text())
        config["capture"]["layers"], config["capture"]["n_heads"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise RunDirectoryError(
            f"{path} is damaged ({type(e).__name__}: {e}); it records the model, protocol and capture of the run and "
            "cannot be rebuilt from the parts: restore it from a copy, or start the run again in a new directory"
        ) from None
    return config


@dataclass
class Damage:
    """A committed batch that cannot be read as it is."""

    part: str
    reason: str
    question_ids: list[str]  # its questions (empty when its samples part itself is unreadable)


def _rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def scan_parts(run_dir: Path, config: dict) -> tuple[dict[str, pd.DataFrame], list[Damage]]:
    """Every committed batch checked: its samples part read, and each other part of the batch present, readable
    (its Parquet footer) and of the row count the samples imply (tokens, attn, hidden_tokens, confidence: one row
    per completion token; hidden: one per answer). Returns the intact batches' samples and the damaged batches."""
    run_dir = Path(run_dir)
    hidden = config.get("capture", {}).get("hidden") or {}
    intact, damaged = {}, []
    for part in committed_parts(run_dir):
        try:
            samples = pq.read_table(run_dir / "samples" / f"{part}.parquet").to_pandas()
        except (OSError, pa.ArrowException) as e:
            damaged.append(Damage(part, f"samples part unreadable ({e})", []))
            continue
        n_tokens = int(samples.completion_ids.map(len).sum())
        expected = {"tokens": n_tokens, "attn": n_tokens}
        if hidden.get("layers"):
            expected["hidden"] = len(samples)
        if hidden.get("token_layers"):
            expected["hidden_tokens"] = n_tokens
        if (run_dir / "confidence" / f"{part}.parquet").exists():
            expected["confidence"] = None  # merged by (question_id, pos): readable is enough
        problems = []
        for kind, n in expected.items():
            path = run_dir / kind / f"{part}.parquet"
            try:
                found = _rows(path)
            except FileNotFoundError:
                problems.append(f"{kind} part missing")
                continue
            except (OSError, pa.ArrowException) as e:
                problems.append(f"{kind} part unreadable ({e})")
                continue
            if n is not None and found != n:
                problems.append(f"{kind} part has {found} rows, its samples imply {n}")
        if problems:
            damaged.append(Damage(part, "; ".join(problems), samples.question_id.tolist()))
        else:
            intact[part] = samples
    return intact, damaged


def set_aside(run_dir: Path, damage: Damage) -> Path:
    """Move every file of a damaged batch into DIR/damaged/<part>-<time>/ (nothing is deleted); its questions are
    then not done, and a resumed run generates them again."""
    run_dir = Path(run_dir)
    target = run_dir / "damaged" / f"{damage.part}-{time.strftime('%Y%m%dT%H%M%S')}"
    target.mkdir(parents=True, exist_ok=True)
    (target / "reason.txt").write_text(damage.reason + "\n")
    for kind in PART_KINDS[::-1]:  # samples last: the batch stays committed until its other parts are gone
        path = run_dir / kind / f"{damage.part}.parquet"
        if path.exists():
            os.replace(path, target / f"{kind}.parquet")
    return target


PART_KINDS = ("samples", "tokens", "attn", "hidden", "hidden_tokens", "confidence")


def _read_parts(run_dir: Path, kind: str, parts: list[str]) -> pd.DataFrame:
    tables = []
    for part in parts:
        path = run_dir / kind / f"{part}.parquet"
        try:
            tables.append(pq.read_table(path))
        except (OSError, pa.ArrowException) as e:
            raise RunDirectoryError(f"{path} is damaged ({e}); {REPAIR}") from None
    return pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame()


def load_run(path: str | Path, *, skip_damaged: bool = False, with_grades: bool = True) -> Run:
    """Read a run directory. A damaged batch (a part unreadable, missing, or of the wrong row count) is an error
    naming it and the repair, unless `skip_damaged`: then the intact batches are read and a warning names the
    questions left out. An answer committed more than once (two writers before there was a lock, directories
    merged by hand) is kept once, its first committed copy (the earliest part), with a warning. `with_grades`:
    merge grades.parquet (`attentropy grade` reads the run without its old grades)."""
    run_dir = Path(path)
    config = read_config(run_dir)
    intact, damaged = scan_parts(run_dir, config)
    if damaged:
        listing = "; ".join(f"{d.part}: {d.reason}" for d in damaged)
        if not skip_damaged:
            raise RunDirectoryError(f"{run_dir} has {len(damaged)} damaged batch(es) — {listing}. {REPAIR}")
        missing = sorted(q for d in damaged for q in d.question_ids)
        warnings.warn(f"{run_dir}: {len(damaged)} damaged batch(es) left out — {listing}; questions missing: "
                      f"{', '.join(missing) if missing else 'unknown (samples part unreadable)'}", stacklevel=2)
    parts = list(intact)
    samples = pd.concat([intact[p].assign(_part=p) for p in parts], ignore_index=True) if parts else pd.DataFrame()
    tokens = _read_parts(run_dir, "tokens", parts)
    kept_rows = {}
    if len(samples) and samples.question_id.duplicated().any():
        duplicated = samples.question_id.duplicated(keep="first")
        n_tokens = samples.completion_ids.map(len).to_numpy()
        token_keep = np.repeat(~duplicated.to_numpy(), n_tokens)
        for part, rows in samples.groupby("_part", sort=False).indices.items():
            if duplicated.iloc[rows].any():
                token_rows = np.arange(n_tokens[:rows[0]].sum(), n_tokens[:rows[-1] + 1].sum())
                kept_rows[part] = (~duplicated.to_numpy()[rows], token_keep[token_rows])
        warnings.warn(f"{run_dir}: {int(duplicated.sum())} answers are duplicates of questions committed earlier "
                      f"(e.g. {', '.join(samples.question_id[duplicated].unique()[:5])}, in "
                      f"{', '.join(sorted(kept_rows))}); keeping each question's first committed copy", stacklevel=2)
        samples, tokens = samples[~duplicated].reset_index(drop=True), tokens[token_keep].reset_index(drop=True)
    samples = samples.drop(columns="_part", errors="ignore")
    prompt_diagonal = _prompt_diagonal(samples, config)
    samples = samples.drop(columns=["prompt_log_diag", "prompt_diag_rows"], errors="ignore")
    if len(samples):
        samples["metadata"] = samples["metadata"].map(json.loads)
    grades_path = run_dir / "grades.parquet"
    if with_grades and grades_path.exists() and len(samples):  # labels from `attentropy grade`
        try:
            grades = pq.read_table(grades_path).to_pandas()
        except (OSError, pa.ArrowException) as e:
            raise RunDirectoryError(f"{grades_path} is damaged ({e}); rerun `attentropy grade {run_dir}`: the labels "
                                    "are rebuilt from the answers and the cached judge/critic replies") from None
        samples = samples.merge(grades.drop_duplicates("question_id"), on="question_id", how="left")
        if "error_token_start" in samples:
            span = samples.set_index("question_id")[["error_token_start", "error_token_end"]]
            start = tokens.question_id.map(span.error_token_start).fillna(-1).to_numpy()
            end = tokens.question_id.map(span.error_token_end).fillna(-1).to_numpy()
            located = start >= 0
            tokens["in_error"] = located & (tokens.pos.to_numpy() >= start) & (tokens.pos.to_numpy() < end)
            tokens["after_error"] = located & (tokens.pos.to_numpy() >= end)
    scored = [part for part in parts if (run_dir / "confidence" / f"{part}.parquet").exists()]
    if scored and len(tokens):  # instrument scores (`attentropy score`, `run --probe`); NaN where a part has none
        scores = _read_parts(run_dir, "confidence", scored).drop_duplicates(["question_id", "pos"])
        tokens = tokens.merge(scores, on=["question_id", "pos"], how="left")
        last = tokens.groupby("question_id", sort=False).prefix_confidence.last()  # the whole answer's prefix
        samples["answer_confidence"] = samples.question_id.map(last).astype(float)
    return Run(path=run_dir, config=config, samples=samples, tokens=tokens, layers=config["capture"]["layers"],
               n_heads=config["capture"]["n_heads"], parts=parts, kept_rows=kept_rows, prompt_diagonal=prompt_diagonal)


def _prompt_diagonal(samples: pd.DataFrame, config: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """`Run.prompt_diagonal` from the samples' columns; None where the run did not record it."""
    if PROMPT_DIAGONAL not in config["capture"] or "prompt_log_diag" not in samples or not len(samples):
        return None
    shape = (len(config["capture"]["layers"]), config["capture"]["n_heads"])
    sums = np.stack([np.asarray(v, np.float64).reshape(shape) for v in samples["prompt_log_diag"]])
    return sums, samples["prompt_diag_rows"].to_numpy(np.int64)
