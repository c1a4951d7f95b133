"""Recorded traffic: `attentropy serve --record DIR` appends every served answer, with its recorded statistics and
the confidences it was served with, to a run directory of free prompts (`ServedRun`): the store of
`attentropy run` (a part is committed when its samples file is written; a crash loses at most the answers not yet
committed), read by `report`, `trace` and `load_run`."""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .run import IDENTITY_KEYS
from .store import RunDirectoryError, append_batch, read_config, scan_parts, set_aside, write_json
from .writer_lock import writer_lock
from .worker import model_config

log = logging.getLogger("attentropy.serve")

FLUSH_S = 2.0  # an answer waits at most this long (or for a full part) before it is committed


class ServedRun:
    """The run directory served answers go to, written by one thread: a part of up to `rows` answers at a time."""

    def __init__(self, out: str | Path, model, tokenizer, info, instrument, *, rows: int = 16):
        self.out, self.tokenizer, self.rows, self.instrument = Path(out), tokenizer, rows, instrument
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = writer_lock(self.out, "attentropy serve --record")
        self._lock.__enter__()  # held while the server runs
        try:
            self._prepare(model, info)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        self.inbox: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._write, name="attentropy-record", daemon=True)
        self.thread.start()

    def _prepare(self, model, info) -> None:
        config_path = self.out / "config.json"
        previous = read_config(self.out) if config_path.exists() else None
        protocol = {"kind": "free", "chat_template": True, "max_new_tokens": None, "user_template": "{prompt}",
                    "served": "attentropy serve: each answer's chat is samples.metadata.messages (or a raw prompt, "
                              "metadata.raw); sampling, bounds and the served confidences per answer in metadata",
                    "sampling": {"do_sample": "per request", "seeded": "per request"}}
        config = model_config(model, info, benchmark="prompts", data_info={"path": None, "served": True},
                              protocol=protocol, previous=previous, batching="continuous", batch_size=self.rows,
                              attn_dtype="float32", hidden_layers="none", hidden_token_layers="none")
        if previous is None:
            write_json(config_path, config)
        else:
            for key in IDENTITY_KEYS:
                if previous.get(key) != config.get(key):
                    raise RunDirectoryError(f"{self.out} holds a run with a different {key!r}; record into another "
                                     "directory")
            for damage in scan_parts(self.out, previous)[1]:
                log.warning("%s is damaged (%s): set aside into %s", damage.part, damage.reason,
                            set_aside(self.out, damage))
        if self.instrument is not None:
            from .scoring import probe_stamp

            stamp = self.out / "confidence" / "probe.json"
            if stamp.exists():
                import json

                if json.loads(stamp.read_text()).get("fingerprint") != self.instrument.fingerprint:
                    raise RunDirectoryError(f"{self.out} holds answers served with another instrument; record "
                                            "into another directory")
            else:
                stamp.parent.mkdir(parents=True, exist_ok=True)
                write_json(stamp, probe_stamp(self.instrument))

    def add(self, request, generation, confidences, finish_reason: str, text: str) -> None:
        """Queue one served answer (called from the batch's thread)."""
        meta = generation.question.metadata
        sampling = request.sampling
        meta.update(served_content=text, finish_reason=finish_reason, task=request.task, kind=request.kind,
                    max_tokens=request.max_tokens, stop=request.stop,
                    sampling={"temperature": sampling.temperature if sampling.do_sample else 0.0,
                              "top_p": sampling.top_p, "seed": request.seed})
        if request.task and confidences:
            meta["answer_confidence"] = confidences[-1][1]
        self.inbox.put((generation, confidences))

    def _write(self) -> None:
        done = False
        while not done:
            batch, deadline = [], None
            # a part holds the answers that end within FLUSH_S of its first (under load answers end a fraction of a
            # second apart: a part each would cost a parquet write each, CPU that decode steps then lack)
            try:
                while len(batch) < self.rows:
                    item = self.inbox.get() if deadline is None else self.inbox.get(
                        timeout=max(0.0, deadline - time.monotonic()))
                    if item is None:
                        done = True
                        break
                    batch.append(item)
                    deadline = deadline or time.monotonic() + FLUSH_S
            except queue.Empty:
                pass
            if batch:
                try:
                    self._commit(batch)
                except Exception:
                    log.exception("recording %d answers into %s failed", len(batch), self.out)

    def _commit(self, batch) -> None:
        generations = [g for g, _ in batch]
        scores = None
        if self.instrument is not None:
            rows = [(g.question.id, t, c[0], c[1]) for g, cs in batch for t, c in enumerate(cs)]
            scores = pd.DataFrame(rows, columns=["question_id", "pos", "confidence", "prefix_confidence"])
            if len(scores) != sum(len(g.completion_ids) for g in generations):
                raise RuntimeError("served confidences do not cover every recorded token")
            scores[["confidence", "prefix_confidence"]] = scores[["confidence", "prefix_confidence"]].astype(
                np.float64)
        part = append_batch(self.out, generations, self.tokenizer, confidence=scores)
        log.info("recorded %d answers into %s/%s", len(generations), self.out, part)

    def close(self) -> None:
        """Commit what is queued and release the directory."""
        self.inbox.put(None)
        self.thread.join(120)
        self._lock.__exit__(None, None, None)
