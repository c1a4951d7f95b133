"""The serving batch: requests that arrive while others generate join the running continuous batch
(`ServingBatch`, a `ContinuousBatch` to which requests are admitted at every step, each with its own sampling,
token bound and stop strings), driven by one thread (`BatchDriver`) that reports every token as it is drawn."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .attention import recorded_layers, recording
from .continuous import PREFILL_GROUP, ContinuousBatch, _compact, _live_columns
from .data import Question
from .detectors.instrument import UNKNOWN_KIND
from .generate import Generation, PrefixStore
from .hidden_states import HiddenSpec
from .kv_cache import append_masked_columns
from .live_confidence import AnswerSoFar, LiveConfidence
from .packed_linears import packed_linears
from .prompts import template_prefix
from .sampling import Sampling
from .windows import layer_windows

log = logging.getLogger("attentropy.serve")

FIRST_COLUMNS = 64  # the rows' own columns the cache starts with; it grows for a longer prompt
TOP_LOGPROBS = 20  # the most alternatives a token can report (OpenAI's bound)


@dataclass
class Request:
    """One request in the batch: its prompt, bounds and sampling, where its events go, and whether its client is
    gone (`cancelled`, set from another thread: its row is freed at the next step)."""

    question: Question  # id: the response id
    prompt: list[int]
    max_tokens: int
    sampling: Sampling  # temperature 0 or top_p 0: greedy
    seed: int | None
    stop: list[str]
    top_logprobs: int
    task: str | None  # the instrument's answer model for this request (None: it does not apply)
    emit: object  # callable(event dict), called from the driver's thread
    kind: str = UNKNOWN_KIND  # the question kind that routes the answer model (known for the math protocol)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class _Row:
    """What `ServingBatch.generator` gives a row: its request, random generator and the last draw's alternatives."""

    request: Request
    generator: torch.Generator | None
    top: tuple | None = None  # (log-probs [k], token ids [k]) of the last draw
    answer: AnswerSoFar | None = None
    text: str = ""  # the answer's text so far (stop strings are looked for in it)
    sent: int = 0  # characters of `text` already reported
    stopped: bool = False  # a stop string came: the text ends before it
    admitted_step: int = 0  # the batch's decode step when the request was admitted


class ServingBatch(ContinuousBatch):
    """A continuous batch that starts empty and takes requests (`admit`) between decode steps: a request waits
    while every row is busy or while its prompt plus its `max_tokens` would take the columns reserved by the rows
    over `max_batch_tokens`. `prefix` (the chat template's start, `prompts.template_prefix`) is held once as in
    `generate_continuous`: prefilled once, its keys read once per decode step for all rows; a prompt that does not
    start with it (a raw completion, a chat with its own system turn) is held whole in its row, the prefix's columns
    masked for it. The cache grows when a longer prompt comes and is compacted as in `generate_continuous`."""

    @torch.no_grad()
    def __init__(self, model, tokenizer, *, rows: int, max_tokens: int, max_batch_tokens: int,
                 prefix: list[int] = ()):
        super().__init__(model, tokenizer, [], batch_size=rows, shots=0, max_new_tokens=max_tokens,
                         prefix_store=PrefixStore(), hidden=HiddenSpec(), max_batch_tokens=None, sampling=Sampling(),
                         prefix=prefix)
        self.max_batch_tokens = max_batch_tokens
        append_masked_columns(self.cache, model, rows, FIRST_COLUMNS, self.layers)
        self.width = self.prefix_len + FIRST_COLUMNS
        self.mask = torch.zeros(rows, self.width, dtype=torch.long)
        self.mask[:, -1] = 1  # an idle row attends to one column (its output is not used)
        self.rows: dict[str, _Row] = {}  # question id -> its row's state, from its prefill on

    def reserved(self) -> int:
        """Columns the admitted requests may take: prompt plus max_tokens of each."""
        return sum(len(r.request.prompt) + r.request.max_tokens for r in self.rows.values())

    def admit(self, request: Request) -> bool:
        """Put a request into the batch's queue if a row and the column budget allow it now."""
        busy = sum(slot is not None for slot in self.slots) + len(self.ready) + len(self.todo)
        over_budget = self.rows and self.reserved() + len(request.prompt) + request.max_tokens > self.max_batch_tokens
        if busy >= self.batch_size or over_budget:  # (alone in the batch, a request is never over the budget)
            return False
        self.todo.insert(0, (request.question, request.prompt))  # `start` takes them from the end
        self.rows[request.question.id] = _Row(request, None, answer=AnswerSoFar(request.task, request.kind),
                                              admitted_step=self.step_index)
        return True

    def generator(self, question: Question, device) -> _Row:
        row = self.rows[question.id]
        request = row.request
        if request.sampling.do_sample:
            row.generator = torch.Generator(device=device)
            row.generator.manual_seed(request.seed if request.seed is not None
                                      else int.from_bytes(np.random.bytes(7), "little"))
        return row

    def draw(self, logp: torch.Tensor, rows: list) -> torch.Tensor:
        """Each row's token with its request's sampling (greedy where it asks none); remembers the alternatives of
        the rows that asked for them."""
        tokens = logp.argmax(-1)
        for i, row in enumerate(rows):
            if row is None:
                continue
            if row.request.sampling.do_sample:
                tokens[i] = row.request.sampling.draw(logp[i:i + 1], [row.generator])[0]
            if row.request.top_logprobs:
                values, ids = logp[i].topk(row.request.top_logprobs)
                row.top = (values.tolist(), ids.tolist())
        return tokens

    def make_room(self) -> None:
        """Grow the rows' own columns when a prompt waiting for a row would not fit (its keys go right-aligned at
        the end of the cache), moving every live row's columns with `continuous._compact`."""
        waiting = [len(p) - self.shares(p) for _, p in self.todo] + [len(s.prompt) - s.shared for s, _ in self.ready]
        self.room = max(waiting, default=1)
        if self.width - self.prefix_len >= self.room:
            return
        lives = {b: _live_columns(self.recorder, b, slot, self.width)
                 for b, slot in enumerate(self.slots) if slot is not None}
        new_width = self.prefix_len + max([self.room, *lives.values()]) + FIRST_COLUMNS
        self.mask = _compact(self.cache, self.mask, self.recorder, self.slots, self.prefix_len, self.width, new_width,
                             lives)
        self.width = new_width


class BatchDriver:
    """The loop that runs the model (on a thread of its own, `start`, or the caller's, `run`): it admits waiting
    requests at every step, decodes, and reports each request's tokens, its end or its error through the request's
    `emit`. Events (dicts): `token` (index, id, text, delta, logprob, top, confidence, prefix_confidence), `end`
    (finish_reason, delta, text, generation, confidences: (token, prefix) per token, the end of turn's included;
    in_kind: whether the dense probe scored the answer, None where the instrument did not), `error` (message).
    `delta`: the text that the token (or the end) makes certain, stop strings held back.
    `prefill_wait`: decode steps an admitted request may wait for others to be prefilled with it (`_prefill_now`)."""

    def __init__(self, model, tokenizer, instrument, *, rows: int, max_tokens: int, max_batch_tokens: int,
                 on_answer=None, prefill_wait: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.prefix = template_prefix(tokenizer)
        self.batch = ServingBatch(model, tokenizer, rows=rows, max_tokens=max_tokens,
                                  max_batch_tokens=max_batch_tokens, prefix=self.prefix)
        windows = layer_windows(model.config, recorded_layers(model))
        self.scorer = LiveConfidence(instrument, windows) if instrument is not None else None
        self.on_answer = on_answer  # callable(request, generation, confidences, finish_reason): --record
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.pending: list[Request] = []  # taken from `waiting`, not yet admitted
        self.stopping = threading.Event()
        self.steps = 0
        self.prefill_wait = prefill_wait
        self.running = False  # the batch loop is running (on its own thread or the caller's): /health
        self.thread = threading.Thread(target=self._loop, name="attentropy-batch", daemon=True)

    def start(self) -> None:
        """The batch loop on a thread of its own."""
        self.thread.start()

    def run(self) -> None:
        """The batch loop on the calling thread, until `stopping` is set (torch decodes faster on the main thread
        than on another: bench/serving_batch.py ... main); `stop` ends it."""
        self._loop()

    def stop(self) -> None:
        self.stopping.set()
        self.waiting.put(None)
        if self.thread.is_alive():  # (`run` on the caller's thread: it returns at its next turn)
            self.thread.join(60)

    def submit(self, request: Request) -> None:
        self.waiting.put(request)

    def load(self) -> dict:
        """What /health reports: rows busy, requests waiting, decode steps so far."""
        return {"rows": self.batch.batch_size, "busy": sum(s is not None for s in self.batch.slots),
                "waiting": self.waiting.qsize() + len(self.pending), "steps": self.steps}

    def _loop(self) -> None:
        self.running = True
        try:
            self._loop_until_stopped()
        finally:
            self.running = False

    def _loop_until_stopped(self) -> None:
        while not self.stopping.is_set():
            batch = self.batch
            try:
                with torch.no_grad(), packed_linears(self.model, batch.batch_size), recording(self.model,
                                                                                               batch.recorder):
                    while not self.stopping.is_set():
                        self._turn()
            except Exception as e:  # a fault in the batch ends its requests with an error, not the server
                log.exception("decode step failed; its requests end with an error, the batch starts afresh")
                for row in list(batch.rows.values()):
                    row.request.emit({"type": "error", "message": f"generation failed: {type(e).__name__}: {e}"})
                self.batch = ServingBatch(self.model, self.tokenizer, rows=batch.batch_size,
                                          max_tokens=batch.max_new_tokens, max_batch_tokens=batch.max_batch_tokens,
                                          prefix=self.prefix)

    def _turn(self) -> None:
        batch = self.batch
        try:  # block while there is nothing to do
            item = self.waiting.get(timeout=0.5) if not batch.rows and not self.pending else self.waiting.get_nowait()
            while item is not None:
                self.pending.append(item)
                item = self.waiting.get_nowait()
        except queue.Empty:
            pass
        self.pending = [r for r in self.pending if not r.cancelled.is_set()]
        while self.pending and batch.admit(self.pending[0]):
            self.pending.pop(0)
        for b in range(batch.batch_size if self._prefill_now() else 0):  # fill free rows
            while batch.slots[b] is None and (batch.todo or batch.ready):
                batch.make_room()
                done = batch.start(b)
                if done is not None:  # its first token ended it
                    c = done.capture
                    stats = np.stack([c.logprob[:1], c.logit_entropy[:1], c.logit_varentropy[:1]], axis=1)
                    self._tokens([(done.question.id, done.completion_ids, len(done.prompt_ids))], c.attn[:1], stats)
                    self._end(done.question.id, done)
                    continue
                slot = batch.slots[b]
                attn, stats = slot.first_row
                self._tokens([(slot.question.id, slot.completion, len(slot.prompt))], attn.numpy()[None],
                             stats.numpy()[None])
                if self._should_end(batch.rows[slot.question.id], slot):
                    self._end(slot.question.id, batch.end_row(b))
        active = {b: slot for b, slot in enumerate(batch.slots) if slot is not None}
        if not active:
            return
        ended = {g.question.id: g for g in batch.step()}
        self.steps += 1
        ring = (batch.step_index - 1) % batch.max_new_tokens  # the step just run: the new tokens' statistics
        order = list(active)
        attn = batch.recorder.attn_buffer[:, order, :, ring].cpu().numpy().transpose(1, 0, 2, 3)  # [k, L, H, S]
        stats = batch.recorder.token_stats[:, order, ring].cpu().numpy().T  # [k, 3]
        self._tokens([(s.question.id, s.completion, len(s.prompt)) for s in active.values()], attn, stats)
        for b, slot in active.items():
            qid = slot.question.id
            if qid in ended:
                self._end(qid, ended[qid])
            elif self._should_end(batch.rows[qid], slot):
                self._end(qid, batch.end_row(b))
        batch.make_room()
        batch.compact()

    def _prefill_now(self) -> bool:
        """Whether this turn prefills the admitted requests into free rows. At once with `prefill_wait` 0; else once
        a group's worth (`PREFILL_GROUP`) waits, or the oldest has waited `prefill_wait` decode steps, or no row is
        decoding. A prompt prefilled alone costs about a decode step of 16 rows (the linear layers' work at ~20
        rows), 8 together about 3 (`bench/serve.py --prefill-wait 0,8`): waiting trades rows left idle and a later
        first token for fewer prefills."""
        batch = self.batch
        if batch.ready or not batch.todo or self.prefill_wait <= 0:
            return True
        if all(slot is None for slot in batch.slots) or len(batch.todo) >= PREFILL_GROUP:
            return True
        oldest = min(batch.rows[q.id].admitted_step for q, _ in batch.todo)
        return batch.step_index - oldest >= self.prefill_wait

    def _tokens(self, items: list[tuple[str, list[int], int]], attn: np.ndarray, token_stats: np.ndarray) -> None:
        """Score and report the newest token of each answer of `items` (question id, completion so far, prompt
        length): `attn` [k, L, H, n_stats], `token_stats` [k, 3] its recorded statistics."""
        batch = self.batch
        rows = [batch.rows[qid] for qid, _, _ in items]
        n_keys = np.array([prompt + len(completion) - 1 for _, completion, prompt in items])
        scores = (self.scorer.add([r.answer for r in rows], attn, token_stats, n_keys) if self.scorer is not None
                  else [(float("nan"), float("nan"))] * len(rows))
        for row, (_, completion, _), stats, (token_conf, prefix_conf) in zip(rows, items, token_stats, scores):
            token = completion[-1]
            if token in batch.stop_set or row.stopped:
                continue  # the end of turn (scored: the answer confidence) or past a stop string: not shown
            text = self.tokenizer.decode(completion, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # not inside a character that takes several tokens
                row.text = text
            top = None
            if row.request.top_logprobs and row.top is not None:
                top = [(self.tokenizer.decode([i]), v) for v, i in zip(*row.top)]
            row.request.emit({"type": "token", "index": len(completion) - 1, "id": token,
                              "text": self.tokenizer.decode([token]), "logprob": float(stats[0]), "top": top,
                              "confidence": token_conf, "prefix_confidence": prefix_conf,
                              "delta": self._new_text(row, final=False)})

    @staticmethod
    def _new_text(row: _Row, final: bool) -> str:
        """The text not yet reported, holding back what could be the start of a stop string."""
        text = row.text
        hit = min((i for i in (text.find(s, max(0, row.sent - len(s))) for s in row.request.stop) if i >= 0),
                  default=None)
        if hit is not None:
            text = row.text = text[:hit]
            row.stopped = True
        end = len(text)
        if not final and hit is None:
            for s in row.request.stop:  # the longest end of the text that begins a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if s.startswith(text[-k:]):
                        end = min(end, len(text) - k)
                        break
        delta = text[row.sent:end] if end > row.sent else ""
        row.sent = max(row.sent, end)
        return delta

    def _should_end(self, row: _Row, slot) -> bool:
        if row.request.cancelled.is_set():
            return True
        if len(slot.completion) >= row.request.max_tokens:
            return True
        return row.stopped

    def _end(self, qid: str, generation: Generation) -> None:
        row = self.batch.rows.pop(qid)
        request = row.request
        if request.cancelled.is_set():
            log.info("%s: client gone, row freed after %d tokens", qid, len(generation.completion_ids))
            return
        finish_reason = "stop" if generation.finish_reason == "stop" or row.stopped else "length"
        request.emit({"type": "end", "finish_reason": finish_reason, "delta": self._new_text(row, final=True),
                      "text": row.text, "generation": generation, "confidences": row.answer.confidences,
                      "in_kind": row.answer.in_kind})
        if self.on_answer is not None:
            self.on_answer(request, generation, row.answer.confidences, finish_reason, row.text)
