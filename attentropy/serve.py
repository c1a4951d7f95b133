"""`attentropy serve`: an OpenAI-compatible endpoint (FastAPI on uvicorn) whose every token carries the
instrument's confidence: /v1/chat/completions and /v1/completions (whole or streamed as server-sent events),
/v1/models, /health and a page at / (`serve_page`). Requests join one running continuous batch
(`serving_batch.BatchDriver`); with `record`, the answers are appended to a run directory (`served_runs`)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request as HttpRequest  # (at module level: FastAPI reads the handlers' annotations)

from .data import Question, question_kind
from .detectors.instrument import UNKNOWN_KIND
from .openai_schema import (POLICIES, ApiError, ChatRequest, CompletionRequest, chat_logprob, completion_logprobs,
                            message_text, number, parse)
from .sampling import Sampling
from .serving_batch import BatchDriver, Request

log = logging.getLogger("attentropy.serve")

REFUSAL = "I am not confident enough to answer that."


@dataclass
class Limits:
    """What one request may ask for, and how much the batch holds."""

    rows: int = 16  # answers decoded at once
    max_tokens: int = 512  # new tokens of one answer (the default where a request gives none)
    max_prompt_tokens: int = 4096
    max_batch_tokens: int = 65536  # prompt + max_tokens, summed over the admitted requests
    max_waiting: int = 256  # requests waiting for a row; more are refused (429)
    max_body_bytes: int = 1 << 20
    prefill_wait: int = 4  # decode steps a request with a free row may be held to prefill prompts together


@dataclass
class Served:
    """The model and instrument behind the endpoint."""

    model: object
    tokenizer: object
    name: str  # the model id clients ask for
    instrument: object | None
    probe: str | None
    thresholds: dict  # task -> abstention threshold (answer confidence below it: flagged / abstained)
    policy: str = "flag"


def math_question(messages: list[dict]) -> Question | None:
    """The question whose math-protocol chat a chat is exactly (`prompts.chat_messages`: 8 worked exemplars as
    earlier turns, then the problem in the template), or None: a GSM8K question, an arith problem of one kind at
    one of its numbers of steps (the kind's own exemplars, as `attentropy run` asks arith), or of 1-4 steps without
    a kind (the exemplars of every kind, as `attentropy score` asks a typed problem); seed 0."""
    from .arith import KINDS
    from .prompts import MATH_USER_TEMPLATE, chat_messages

    before, _, after = MATH_USER_TEMPLATE.partition("{question}")
    last = messages[-1]["content"]
    if len(messages) < 3 or not (last.startswith(before) and last.endswith(after)):
        return None
    problem = last[len(before):len(last) - len(after)]
    arith = ([{"kind": kind.name, "steps": steps} for kind in KINDS.values() for steps in kind.steps]
             + [{"steps": steps} for steps in range(1, 5)])
    candidates = [Question("q", "gsm8k", problem, "")] + [
        Question("q", "arith", problem, "", metadata={**meta, "seed": 0}) for meta in arith]
    return next((q for q in candidates if chat_messages(q) == messages), None)


def protocol_of(served: Served, messages: list[dict]) -> tuple[str | None, str, str | None]:
    """(task, kind, reason): which of the instrument's answer models applies to a chat, the question kind that
    routes it, or why none applies. The instrument was fitted on answers to prompts built one way
    (`prompts.chat_messages`): a factual question is a chat of one user turn (its kind not known: UNKNOWN_KIND, so
    the anchored model scores it), a math problem the 8-shot chat of `math_question` (its kind that of the question
    whose exemplars it holds); anything else (a system turn, other turns) is not what it was fitted on."""
    if served.instrument is None:
        return None, UNKNOWN_KIND, "no instrument loaded"
    task, kind = None, UNKNOWN_KIND
    if len(messages) == 1 and messages[0]["role"] == "user":
        task = "factual"
    elif (math := math_question(messages)) is not None:
        task, kind = "math", question_kind(math.benchmark, math.metadata)
    if task is None:
        return None, kind, ("the instrument was fitted on chats of one user turn (factual questions) or the 8-shot "
                            f"math protocol; this chat has {len(messages)} messages"
                            + (" with a system turn" if messages[0]["role"] == "system" else ""))
    if task not in served.instrument.answer_models:
        return None, kind, f"the instrument has no answer model for {task} questions"
    return task, kind, None


def create_app(served: Served, limits: Limits = Limits(), record=None, driver_thread: bool = True):
    """The FastAPI application and its batch driver (`app.state.driver`). The driver stops with the application
    (lifespan); it starts with it on a thread of its own, or, with `driver_thread=False`, the caller runs it
    (`serve` runs it on the main thread, where torch decodes faster)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    from .serve_page import page

    context = getattr(served.model.config.get_text_config(), "max_position_embeddings", None) or 1 << 30
    driver = BatchDriver(served.model, served.tokenizer, served.instrument, rows=limits.rows,
                         max_tokens=limits.max_tokens, max_batch_tokens=limits.max_batch_tokens,
                         on_answer=record.add if record is not None else None, prefill_wait=limits.prefill_wait)

    @asynccontextmanager
    async def lifespan(app):
        if driver_thread:
            driver.start()
        log.info("serving %s (probe %s) with %d rows", served.name, served.probe or "none", limits.rows)
        yield
        driver.stop()
        if record is not None:
            record.close()

    app = FastAPI(title="attentropy serve", lifespan=lifespan)
    app.state.driver = driver

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        log.info("%s %s -> %d %s", request.method, request.url.path, e.status, e.message)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(404)
    async def not_found(request, e):
        return JSONResponse(ApiError(404, f"no route {request.url.path}", code="not_found").body(), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request, e):
        return JSONResponse(ApiError(405, f"{request.method} not allowed on {request.url.path}").body(),
                            status_code=405)

    async def body_of(request: HttpRequest) -> dict:
        """The JSON object of a request, read up to the body bound."""
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > limits.max_body_bytes:
            raise ApiError(413, f"request body of {size} bytes, more than the {limits.max_body_bytes} allowed",
                           code="request_too_large")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limits.max_body_bytes:
                raise ApiError(413, f"request body over the {limits.max_body_bytes} bytes allowed",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
        return body

    def check_common(r) -> tuple[str, list[str]]:
        if r.model != served.name:
            raise ApiError(404, f"the model {r.model!r} does not exist; this server serves {served.name!r}",
                           param="model", code="model_not_found")
        if r.n != 1:
            raise ApiError(400, "n > 1 is not supported: ask once per answer", param="n", code="unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(r, name):
                raise ApiError(400, f"{name} is not supported (only 0)", param=name, code="unsupported_value")
        policy = (r.attentropy or {}).get("policy", served.policy)
        if policy not in POLICIES:
            raise ApiError(400, f"attentropy.policy must be one of {', '.join(POLICIES)}, got {policy!r}",
                           param="attentropy.policy", code="invalid_value")
        return policy, r.stop or []

    def make_request(rid: str, question: Question, prompt: list[int], r, max_tokens: int | None, stops,
                     top_logprobs: int, task: str | None, emit, kind: str = UNKNOWN_KIND) -> Request:
        if len(prompt) > limits.max_prompt_tokens or len(prompt) >= context:
            bound = min(limits.max_prompt_tokens, context - 1)
            raise ApiError(400, f"the prompt has {len(prompt)} tokens, more than the {bound} this server takes "
                           f"(context {context})", param="messages", code="context_length_exceeded")
        if max_tokens is not None and (max_tokens > limits.max_tokens or len(prompt) + max_tokens > context):
            raise ApiError(400, f"max_tokens {max_tokens}: at most {min(limits.max_tokens, context - len(prompt))} "
                           f"for this prompt of {len(prompt)} tokens", param="max_tokens",
                           code="context_length_exceeded")
        max_tokens = max_tokens or min(limits.max_tokens, context - len(prompt))
        if len(prompt) + max_tokens > limits.max_batch_tokens:
            raise ApiError(400, f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) tokens exceed the batch's "
                           f"{limits.max_batch_tokens}", param="max_tokens", code="context_length_exceeded")
        if driver.load()["waiting"] >= limits.max_waiting:  # (checked before a stream's 200 is sent)
            raise ApiError(429, f"{limits.max_waiting} requests are already waiting; retry later",
                           kind="rate_limit_error", code="too_many_requests")
        temperature = 0.0 if r.temperature is None else r.temperature
        top_p = 1.0 if r.top_p is None else r.top_p
        sampled = temperature > 0 and top_p > 0
        sampling = Sampling(True, temperature, top_p) if sampled else Sampling()
        return Request(question, prompt, max_tokens, sampling, r.seed, stops, top_logprobs, task, emit, kind)

    async def events_of(request: Request, http: HttpRequest):
        """The driver's events for one request, as they come; the request is cancelled when its client goes."""
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()
        request.emit = lambda event: loop.call_soon_threadsafe(inbox.put_nowait, event)
        driver.submit(request)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(inbox.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                yield event
                if event["type"] in ("end", "error"):
                    return
        finally:  # the client went away (or the answer ended): its row is freed at the next step
            request.cancelled.set()

    def extension(task, reason, policy, answer_confidence, abstained, original, in_kind=None) -> dict:
        """The `attentropy` field of a choice (README: "attentropy serve"); `in_kind`: the end event's."""
        threshold = served.thresholds.get(task) if task else None
        below = None if threshold is None or answer_confidence is None else answer_confidence < threshold
        return {"applies": task is not None, "task": task, "reason": reason, "probe": served.probe and
                served.instrument.fingerprint, "answer_confidence": answer_confidence, "threshold": threshold,
                "policy": policy, "flagged": bool(below), "abstained": abstained, "original_content": original,
                "in_kind": in_kind if task else None}

    def final_answer(end: dict, task, policy) -> tuple[str, float | None, bool, str | None]:
        """(content, answer confidence, abstained, original content) of an answer that ended."""
        answer_confidence = number(end["confidences"][-1][1]) if end["confidences"] and task else None
        threshold = served.thresholds.get(task) if task else None
        abstain = (policy == "abstain" and threshold is not None and answer_confidence is not None
                   and answer_confidence < threshold)
        return (REFUSAL if abstain else end["text"]), answer_confidence, abstain, (end["text"] if abstain else None)

    def usage(prompt: list[int], end: dict) -> dict:
        n = len(end["generation"].completion_ids)
        return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

    def log_end(rid, prompt, end, answer_confidence, started):
        log.info("%s: %d prompt + %d completion tokens, %s, answer confidence %s, %.2f s", rid, len(prompt),
                 len(end["generation"].completion_ids), end["finish_reason"],
                 "n/a" if answer_confidence is None else f"{answer_confidence:.3f}", time.perf_counter() - started)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        r = parse(ChatRequest, await body_of(http))
        policy, stops = check_common(r)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
                    for i, m in enumerate(r.messages)]
        if messages[-1]["role"] == "assistant":
            raise ApiError(400, "the last message must not be the assistant's (continuing an answer is not "
                           "supported)", param="messages")
        task, kind, reason = protocol_of(served, messages)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        user = messages[-1]["content"]
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        question = Question(rid, "prompts", user, "", metadata={"messages": messages, "endpoint": "chat",
                                                                **({"system": system} if system else {})})
        prompt = list(served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        request = make_request(rid, question, prompt, r, r.max_completion_tokens or r.max_tokens, stops,
                               r.top_logprobs or 0, task, None, kind)
        created, started = int(time.time()), time.perf_counter()
        head = {"id": rid, "created": created, "model": served.name, "system_fingerprint": served.probe and
                served.instrument.fingerprint}
        if not r.stream:
            entries, end = [], None
            async for event in events_of(request, http):
                if event["type"] == "token":
                    entries.append(chat_logprob(event))
                elif event["type"] == "error":
                    raise ApiError(500, event["message"], kind="server_error")
                else:
                    end = event
            if end is None:
                return JSONResponse({}, status_code=499)  # the client went away
            content, answer_confidence, abstained, original = final_answer(end, task, policy)
            log_end(rid, prompt, end, answer_confidence, started)
            return {**head, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": content}, "logprobs": {"content": entries},
                "finish_reason": end["finish_reason"],
                "attentropy": extension(task, reason, policy, answer_confidence, abstained, original, end["in_kind"])}],
                "usage": usage(prompt, end)}

        include_usage = bool((r.stream_options or {}).get("include_usage"))
        hold = policy == "abstain" and bool(served.thresholds.get(task))  # the answer is known only at its end

        def chunk(delta: dict, entries=None, finish=None, ext=None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None if entries is None else {"content": entries},
                      "finish_reason": finish}
            if ext is not None:
                choice["attentropy"] = ext
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

        async def stream():
            yield chunk({"role": "assistant", "content": ""})
            held, text = [], []
            async for event in events_of(request, http):
                if event["type"] == "token":
                    entry = chat_logprob(event)
                    if hold:
                        held.append(entry)
                        text.append(event["delta"])
                    else:
                        yield chunk({"content": event["delta"]}, [entry])
                elif event["type"] == "error":
                    yield sse(ApiError(500, event["message"], kind="server_error").body())
                    return
                else:
                    content, answer_confidence, abstained, original = final_answer(event, task, policy)
                    log_end(rid, prompt, event, answer_confidence, started)
                    ext = extension(task, reason, policy, answer_confidence, abstained, original, event["in_kind"])
                    if hold:
                        yield chunk({"content": content}, held)
                    elif event["delta"]:
                        yield chunk({"content": event["delta"]}, [])
                    yield chunk({}, None, event["finish_reason"], ext)
                    if include_usage:
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                                   "usage": usage(prompt, event)})
                    yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        r = parse(CompletionRequest, await body_of(http))
        policy, stops = check_common(r)
        if r.echo or r.suffix:
            raise ApiError(400, "echo and suffix are not supported", param="echo" if r.echo else "suffix",
                           code="unsupported_value")
        prompts = [r.prompt] if isinstance(r.prompt, str) else r.prompt
        if len(prompts) != 1:
            raise ApiError(400, "give one prompt (a string): several prompts in one request are not supported",
                           param="prompt", code="unsupported_value")
        rid = f"cmpl-{uuid.uuid4().hex}"
        question = Question(rid, "prompts", prompts[0], "", metadata={"raw": True, "endpoint": "completions"})
        prompt = list(served.tokenizer(prompts[0], add_special_tokens=True)["input_ids"])
        task, reason = None, "raw text completion: the instrument was fitted on answers to chat prompts"
        request = make_request(rid, question, prompt, r, r.max_tokens or 16, stops, r.logprobs or 0, task, None)
        created, started = int(time.time()), time.perf_counter()
        head = {"id": rid, "object": "text_completion", "created": created, "model": served.name}
        if not r.stream:
            events, end = [], None
            async for event in events_of(request, http):
                if event["type"] == "token":
                    events.append(event)
                elif event["type"] == "error":
                    raise ApiError(500, event["message"], kind="server_error")
                else:
                    end = event
            if end is None:
                return JSONResponse({}, status_code=499)
            log_end(rid, prompt, end, None, started)
            return {**head, "choices": [{"index": 0, "text": end["text"], "finish_reason": end["finish_reason"],
                                         "logprobs": completion_logprobs(events, 0),
                                         "attentropy": extension(task, reason, policy, None, False, None)}],
                    "usage": usage(prompt, end)}

        async def stream():
            offset = 0
            async for event in events_of(request, http):
                if event["type"] == "token":
                    yield sse({**head, "choices": [{"index": 0, "text": event["delta"], "finish_reason": None,
                                                    "logprobs": completion_logprobs([event], offset)}]})
                    offset += len(event["text"])
                elif event["type"] == "error":
                    yield sse(ApiError(500, event["message"], kind="server_error").body())
                    return
                else:
                    log_end(rid, prompt, event, None, started)
                    yield sse({**head, "choices": [{"index": 0, "text": event["delta"], "logprobs": None,
                                                    "finish_reason": event["finish_reason"],
                                                    "attentropy": extension(task, reason, policy, None, False,
                                                                            None)}]})
                    yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "attentropy"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok" if driver.running else "stopped", "model": served.name,
                "probe": served.probe, **driver.load()}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page(served.name, served.probe is not None)

    return app


def abstention_thresholds(probe: str | Path) -> dict[str, float]:
    """Per task, the selective-answering threshold fitted with the probe: the one with the best F-score on the
    instrument's out-of-fold answer confidences of its training answers (`selective.choose_threshold`, the rule
    its evaluation applies inside each training fold). Empty when the probe has no predictions."""
    import pandas as pd

    from .detectors import PRIMARY
    from .selective import choose_threshold

    path = Path(probe) / "predictions.parquet"
    if not path.exists():
        return {}
    predictions = pd.read_parquet(path)
    out = {}
    column = f"confidence:{PRIMARY}"  # the instrument's out-of-fold answer confidence (`evaluation.evaluate`)
    for task, rows in predictions.groupby("task"):
        if column in rows and rows[column].notna().any():
            usable = rows[rows[column].notna()]
            out[task] = choose_threshold(usable[column].to_numpy(float), usable.label.astype(str).to_numpy())
    return out


def serve(model_name: str, probe: str | None, *, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          policy: str = "flag", threshold: float | None = None, record: str | None = None, dtype: str = "auto",
          device: str = "auto") -> None:
    """`attentropy serve`: load the model and the instrument (refused if fitted on another model), then serve."""
    import uvicorn

    from .attention import recorded_layers
    from .instrument import load_instrument
    from .model import load_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    instrument = load_instrument(probe) if probe else None  # a damaged probe fails before the model loads
    model, tokenizer, info = load_model(model_name, dtype=dtype, device=device)
    thresholds = {}
    if instrument is not None:
        instrument.check({"name": info.name, "revision": info.revision, "layers": recorded_layers(model),
                          "n_heads": model.config.get_text_config().num_attention_heads}, f"the model {model_name!r}")
        thresholds = abstention_thresholds(probe)
        if threshold is not None:
            thresholds = {task: threshold for task in instrument.answer_models}
        log.info("instrument %s: answer models %s, token model %s, abstention thresholds %s", probe,
                 sorted(instrument.answer_models), instrument.token_model is not None,
                 {k: round(v, 4) for k, v in thresholds.items()} or "none")
    served = Served(model, tokenizer, model_name, instrument, str(probe) if probe else None, thresholds, policy)
    recorder = None
    if record:
        from .served_runs import ServedRun

        recorder = ServedRun(record, model, tokenizer, info, instrument, rows=limits.rows)
    app = create_app(served, limits, recorder, driver_thread=False)
    run_server(uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info")), app.state.driver)


def run_server(server, driver) -> None:
    """The batch loop on the main thread and uvicorn on a thread of its own: torch decodes about 1.5x faster on the
    main thread (bench/serving_batch.py ... main). uvicorn listens for signals only on the main thread, so its own
    handler is installed here: SIGINT / SIGTERM stop accepting, let the requests in flight finish (the driver still
    decoding them), and uvicorn's shutdown stops the driver; a second SIGINT cuts the requests in flight short."""
    import signal

    def http() -> None:
        try:
            server.run()
        finally:  # however uvicorn ended (a port in use, say), the batch loop ends with it
            driver.stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, server.handle_exit)
    thread = threading.Thread(target=http, name="attentropy-http")
    thread.start()
    driver.run()
    thread.join()
    if not server.started:
        raise SystemExit(f"the server did not start on {server.config.host}:{server.config.port} (see the log)")

