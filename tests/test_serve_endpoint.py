"""`attentropy serve` as a client sees it: the real command (uvicorn on loopback) with a tiny random Llama and a
random instrument, driven through the official `openai` SDK; confidences checked against `score_answer`'s,
concurrency, disconnects, a malformed-request battery, recorded traffic and the page in headless Chromium."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from attentropy import load_run
from attentropy.cli import main
from attentropy.data import Question
from attentropy.serve import REFUSAL
from test_instrument import random_instrument
from driver_events import Ends

MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


def post_raw(url: str, data: bytes, headers=None, method="POST") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    """(model, tokenizer, info, instrument, probe dir) of the tiny model."""
    from attentropy.model import load_model

    model, tokenizer, info = load_model(tiny_model_dir)
    instrument = random_instrument(model, info)
    probe = tmp_path_factory.mktemp("probe") / "probe"
    instrument.save(probe)
    return model, tokenizer, info, instrument, probe


@pytest.fixture(scope="module")
def server(tiny, tiny_model_dir, tmp_path_factory):
    """(base URL, model id, record dir, log file) of `attentropy serve` in its own process: 4 rows, abstention
    threshold 1 (every answer is below it, so the policies always act)."""
    port = free_port()
    record = tmp_path_factory.mktemp("served") / "traffic"
    log = tmp_path_factory.mktemp("log") / "serve.log"
    command = [sys.executable, "-m", "attentropy.cli", "serve", "--model", tiny_model_dir, "--probe", str(tiny[4]),
               "--port", str(port), "--rows", "4", "--max-tokens", "64", "--max-batch-tokens", "4000",
               "--max-body-bytes", "20000", "--threshold", "1.0", "--record", str(record), "--threads", "1"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        try:
            get(f"{url}/health")
            break
        except OSError:
            assert process.poll() is None, f"attentropy serve exited:\n{log.read_text()}"
            assert time.time() < deadline, f"attentropy serve did not come up:\n{log.read_text()}"
            time.sleep(0.5)
    yield url, tiny_model_dir, record, log
    process.terminate()
    process.wait(60)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="not-needed", max_retries=0, timeout=120)


def reference(tiny, question: str, max_tokens: int = MAX_TOKENS):
    """`attentropy score`'s scores of the greedy answer to a one-turn chat, routed as the server routes a typed
    question (its kind unknown): (scores, token texts, answer)."""
    from attentropy.detectors.instrument import UNKNOWN_KIND
    from attentropy.scoring import score_answer

    model, tokenizer, info, instrument, _ = tiny
    return score_answer(instrument, model, tokenizer, info, Question("q", "facts", question, ""),
                        max_new_tokens=max_tokens, kind=UNKNOWN_KIND)


def test_chat_carries_the_scores_of_attentropy_score(server, client, tiny):
    question = "What is the capital of Peru?"
    reply = client.chat.completions.create(model=server[1], messages=[{"role": "user", "content": question}],
                                           max_tokens=MAX_TOKENS, logprobs=True, temperature=0)
    choice = reply.choices[0]
    scores, texts, answer = reference(tiny, question)
    assert choice.message.content == answer
    entries = choice.logprobs.content
    assert [e.token for e in entries] == texts[:len(entries)]
    np.testing.assert_allclose([e.model_extra["confidence"] for e in entries], scores.confidence[:len(entries)],
                               atol=1e-4)
    np.testing.assert_allclose([e.model_extra["prefix_confidence"] for e in entries],
                               scores.prefix_confidence[:len(entries)], atol=1e-4)
    assert all(e.logprob <= 0 for e in entries)
    ext = choice.model_extra["attentropy"]
    assert ext["applies"] and ext["task"] == "factual" and ext["threshold"] == 1.0
    assert ext["in_kind"] is False and not scores.in_kind.any()  # a typed question: the anchored model
    assert ext["answer_confidence"] == pytest.approx(scores.prefix_confidence.iloc[-1], abs=1e-4)
    assert ext["flagged"] and not ext["abstained"]  # policy flag: the answer stays, marked
    assert reply.usage.completion_tokens == len(texts)
    assert choice.finish_reason == ("stop" if len(texts) < MAX_TOKENS else "length")


def test_streamed_chat_equals_the_whole_reply_and_abstention_replaces_the_answer(server, client):
    messages = [{"role": "user", "content": "Who wrote Hamlet?"}]
    whole = client.chat.completions.create(model=server[1], messages=messages, max_tokens=MAX_TOKENS)
    chunks = list(client.chat.completions.create(model=server[1], messages=messages, max_tokens=MAX_TOKENS,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    streamed = [e.model_extra["confidence"] for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    # (the same within float32 rounding: the two ran beside other columns of the cache)
    np.testing.assert_allclose(streamed, [e.model_extra["confidence"] for e in whole.choices[0].logprobs.content],
                               atol=1e-6)
    last = [c for c in chunks if c.choices][-1].choices[0]
    assert last.finish_reason == whole.choices[0].finish_reason
    ext, whole_ext = last.model_extra["attentropy"], whole.choices[0].model_extra["attentropy"]
    assert ext["answer_confidence"] == pytest.approx(whole_ext["answer_confidence"], abs=1e-6)
    assert {**ext, "answer_confidence": None} == {**whole_ext, "answer_confidence": None}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # abstain: the refusal is served, the answer kept in the extension (streamed: held until the end)
    for stream in (False, True):
        reply = client.chat.completions.create(model=server[1], messages=messages, max_tokens=MAX_TOKENS,
                                               stream=stream, extra_body={"attentropy": {"policy": "abstain"}})
        if stream:
            parts = [c for c in reply if c.choices]
            content = "".join(c.choices[0].delta.content or "" for c in parts)
            ext = parts[-1].choices[0].model_extra["attentropy"]
        else:
            content, ext = reply.choices[0].message.content, reply.choices[0].model_extra["attentropy"]
        assert content == REFUSAL and ext["abstained"] and ext["original_content"] == text


def test_completions_sampling_stop_and_the_instrument_not_applying(server, client):
    raw = client.completions.create(model=server[1], prompt="Once upon a time", max_tokens=6, logprobs=2)
    choice = raw.choices[0]
    assert choice.model_extra["attentropy"]["applies"] is False
    assert choice.finish_reason == "length" and len(choice.logprobs.tokens) == 6 == raw.usage.completion_tokens
    assert all(1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server[1], prompt="Once upon a time", max_tokens=6, stream=True))
    assert streamed == choice.text
    one = client.completions.create(model=server[1], prompt="Once upon a time", max_tokens=1).choices[0]
    assert len(one.logprobs.tokens) == 1 and one.finish_reason == "length"
    # a system turn: the instrument was not fitted on such chats
    reply = client.chat.completions.create(model=server[1], max_tokens=4, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    ext = reply.choices[0].model_extra["attentropy"]
    assert not ext["applies"] and "system" in ext["reason"] and ext["answer_confidence"] is None
    assert ext["in_kind"] is None
    assert all(e.model_extra["prefix_confidence"] is None and e.model_extra["confidence"] is None
               for e in reply.choices[0].logprobs.content)
    assert choice.logprobs.model_extra["confidences"] == [None] * 6

    def sample(seed):
        return client.chat.completions.create(model=server[1], messages=[{"role": "user", "content": "Tell me"}],
                                              max_tokens=8, temperature=1.0, top_p=0.9, seed=seed
                                              ).choices[0].message.content
    assert sample(1) == sample(1)
    assert len({sample(1), sample(2), sample(3)}) > 1
    # stop strings: the answer ends before the first one
    full = client.completions.create(model=server[1], prompt="Once upon a time", max_tokens=10).choices[0]
    stop = full.text[3:5]
    cut = client.completions.create(model=server[1], prompt="Once upon a time", max_tokens=10, stop=[stop]).choices[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"


def test_concurrent_requests_join_one_batch_and_keep_their_answers(server, client):
    questions = [f"What is {i} plus {i}?" for i in range(8)]
    alone = {q: client.chat.completions.create(model=server[1], messages=[{"role": "user", "content": q}],
                                               max_tokens=MAX_TOKENS).choices[0].message.content for q in questions}
    before = get(f"{server[0]}/health")["steps"]
    together, errors = {}, []

    def ask(q):
        try:
            reply = client.chat.completions.create(model=server[1], messages=[{"role": "user", "content": q}],
                                                   max_tokens=MAX_TOKENS)
            together[q] = (reply.choices[0].message.content, reply.usage.completion_tokens)
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert {q: together[q][0] for q in questions} == alone  # greedy: the neighbours change nothing
    steps = get(f"{server[0]}/health")["steps"] - before
    tokens = sum(n for _, n in together.values())
    assert steps < tokens / 2  # rows decoded together (4 rows): far fewer steps than tokens


def test_a_client_that_goes_away_frees_its_row(server, client):
    stream = client.chat.completions.create(model=server[1], messages=[{"role": "user", "content": "Go on"}],
                                            max_tokens=64, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.time() + 30
    while get(f"{server[0]}/health")["busy"]:
        assert time.time() < deadline, "the row of a client that went away was not freed"
        time.sleep(0.2)
    assert "client gone" in server[3].read_text()
    assert client.chat.completions.create(model=server[1], messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3).choices[0].message.content is not None


def test_malformed_requests_get_4xx_and_the_server_stays_up(server):
    url, model = server[0], server[1]
    chat = f"{url}/v1/chat/completions"

    def body(**fields):
        return json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], **fields}).encode()
    cases = {
        "malformed JSON": (chat, b'{"model": "x", "messages": [', 400, "invalid_json"),
        "not an object": (chat, b"[1, 2]", 400, "invalid_json"),
        "no messages": (chat, json.dumps({"model": model}).encode(), 400, "missing_required_parameter"),
        "max_tokens a string": (chat, body(max_tokens="5"), 400, "invalid_value"),
        "temperature out of range": (chat, body(temperature=5), 400, "invalid_value"),
        "n > 1": (chat, body(n=2), 400, "unsupported_value"),
        "unknown model": (chat, json.dumps({"model": "gpt-17", "messages": [{"role": "user", "content": "Hi"}]}
                                           ).encode(), 404, "model_not_found"),
        "prompt longer than the context": (chat, body(messages=[{"role": "user", "content": "word " * 400}]), 400,
                                           "context_length_exceeded"),
        "max_tokens over the bound": (chat, body(max_tokens=10_000), 400, "context_length_exceeded"),
        "body too large": (chat, body(messages=[{"role": "user", "content": "x" * 30_000}]), 413,
                           "request_too_large"),
        "top_logprobs over 20": (chat, body(logprobs=True, top_logprobs=50), 400, "invalid_value"),
        "five stop strings": (chat, body(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
        "a tool message": (chat, body(messages=[{"role": "tool", "content": "x"}]), 400, "invalid_value"),
        "an image part": (chat, body(messages=[{"role": "user", "content": [{"type": "image_url",
                                                                             "image_url": {"url": "x"}}]}]), 400,
                          None),
        "unknown policy": (chat, body(attentropy={"policy": "pray"}), 400, "invalid_value"),
        "completions: echo": (f"{url}/v1/completions", json.dumps({"model": model, "prompt": "a", "echo": True}
                                                                   ).encode(), 400, "unsupported_value"),
    }
    for name, (where, data, status, code) in cases.items():
        got, reply = post_raw(where, data)
        assert got == status, (name, got, reply)
        assert set(reply["error"]) >= {"message", "type", "param", "code"} and reply["error"]["message"], name
        assert reply["error"]["code"] == code, (name, reply)
    got, reply = post_raw(f"{url}/v1/models", None, method="DELETE")
    assert got == 405 and "error" in reply
    assert get(f"{url}/health")["status"] == "ok"
    assert get(f"{url}/v1/models")["data"][0]["id"] == model
    got, reply = post_raw(chat, body(max_tokens=3))
    assert got == 200 and reply["choices"][0]["message"]["content"] is not None


def test_served_answers_are_recorded_in_a_run_directory(server, client):
    reply = client.chat.completions.create(model=server[1], messages=[{"role": "user", "content": "Record me"}],
                                           max_tokens=5)
    deadline = time.time() + 60
    while True:
        run = load_run(server[2]) if (server[2] / "samples").exists() else None
        if run is not None and reply.id in set(run.samples.question_id):
            break
        assert time.time() < deadline, "the answer was not recorded"
        time.sleep(0.5)
    sample = run.samples.set_index("question_id").loc[reply.id]
    assert sample.completion == reply.choices[0].message.content
    assert sample.metadata["messages"] == [{"role": "user", "content": "Record me"}]
    tokens = run.tokens[run.tokens.question_id == reply.id]
    assert len(tokens) == reply.usage.completion_tokens
    served = [e.model_extra["confidence"] for e in reply.choices[0].logprobs.content]
    np.testing.assert_allclose(tokens.confidence.to_numpy()[:len(served)], served, rtol=1e-6)
    assert run.config["benchmark"] == "prompts"


def test_a_probe_of_another_model_is_refused_at_start(tiny, capsys):
    assert main(["serve", "--model", "smollm2-135m", "--probe", str(tiny[4]), "--port", str(free_port())]) == 2
    assert "belongs to another model" in capsys.readouterr().err


def start_serve(model_dir: str, probe, port: int, log, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "attentropy.cli", "serve", "--model", model_dir, "--probe", str(probe),
               "--port", str(port), "--rows", "2", "--max-tokens", "64", "--threads", "1", *extra]
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ)


def test_sigterm_lets_the_answer_in_flight_finish_then_exits(tiny, tiny_model_dir, tmp_path):
    """The batch loop runs on the main thread and uvicorn on another: a SIGTERM still ends the server as uvicorn
    does, the stream under way completing (and recorded) before the process exits 0."""
    import signal

    port, log, record = free_port(), tmp_path / "serve.log", tmp_path / "traffic"
    process = start_serve(tiny_model_dir, tiny[4], port, log, "--record", str(record))
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 240
    while True:
        try:
            assert get(f"{url}/health")["status"] == "ok"
            break
        except OSError:
            assert process.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.5)
    request = urllib.request.Request(f"{url}/v1/chat/completions", method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps({
            "model": tiny_model_dir, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 64,
            "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as reply:
        first = reply.readline().decode()
        process.send_signal(signal.SIGTERM)
        lines = [first.strip()] + [line for line in reply.read().decode().splitlines() if line]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert lines[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] in ("stop", "length"), lines
    assert process.wait(60) == 0, log.read_text()
    assert "Shutting down" in log.read_text()
    assert events[-1]["id"] in set(load_run(record).samples.question_id)


def test_a_port_in_use_ends_serve_with_an_error(tiny, tiny_model_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        log = tmp_path / "serve.log"
        process = start_serve(tiny_model_dir, tiny[4], taken.getsockname()[1], log)
        assert process.wait(240) != 0
    assert "the server did not start on 127.0.0.1" in log.read_text()


def test_the_page_streams_an_answer_coloured_by_confidence(server, client, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    question = "What is the capital of Peru?"
    expected = client.chat.completions.create(model=server[1], messages=[{"role": "user", "content": question}],
                                              max_tokens=64)  # the server's bound: the page's default
    browser.get(server[0] + "/")
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 120).until(lambda b: b.execute_script("return document.getElementById('summary')"
                                                                 ".dataset.done === '1'"))
    text = browser.execute_script("return [...document.querySelectorAll('#answer .tok')].map(s => s.textContent)"
                                  ".join('')")
    assert text == expected.choices[0].message.content
    colours = browser.execute_script("return [...document.querySelectorAll('#answer .tok')]"
                                     ".map(s => s.style.backgroundColor)")
    assert colours and all(c.startswith("rgb(") for c in colours) and len(set(colours)) > 1
    summary = browser.find_element(By.ID, "summary").text
    assert "answer confidence 0." in summary and "flagged" in summary
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_the_abstention_threshold_is_the_one_fitted_with_the_probe(tmp_path):
    import pandas as pd

    from attentropy.selective import choose_threshold
    from attentropy.serve import abstention_thresholds

    rng = np.random.default_rng(0)
    labels = rng.choice(["correct", "incorrect", "not_attempted"], 60)
    confidence = np.clip(rng.normal(0.5, 0.2, 60) + 0.3 * (labels == "correct"), 0, 1)
    pd.DataFrame({"task": ["factual"] * 40 + ["math"] * 20, "label": labels,
                  "confidence:instrument": confidence}).to_parquet(tmp_path / "predictions.parquet")
    thresholds = abstention_thresholds(tmp_path)
    assert thresholds == {"factual": choose_threshold(confidence[:40], labels[:40]),
                          "math": choose_threshold(confidence[40:], labels[40:])}
    assert 0 < thresholds["factual"] < 1
    assert abstention_thresholds(tmp_path / "nothing") == {}


def test_live_confidences_are_the_instrument_s_scores_of_the_finished_answer(tiny):
    """The batch driver alone: tokens scored as they are drawn equal `Instrument.score` of the answer's capture;
    the very first request may end at its first token."""
    from attentropy.answers import answers_from_generations
    from attentropy.prompts import prompt_ids
    from attentropy.sampling import Sampling
    from attentropy.serving_batch import BatchDriver, Request

    model, tokenizer, _, instrument, _ = tiny
    driver = BatchDriver(model, tokenizer, instrument, rows=2, max_tokens=16, max_batch_tokens=2000)
    driver.start()
    collected = Ends()
    ends = collected.events
    # the second of a kind the instrument was fitted on (the dense probe scores it), the others of none
    kinds = ["", "country_capital", ""]
    try:
        for i, (text, max_tokens) in enumerate([("Hi", 1), ("What is the capital of Peru?", 9), ("Name a river.", 12)]):
            question = Question(f"r{i}", "facts", text, "", metadata={"kind": kinds[i]})
            driver.submit(Request(question, prompt_ids(tokenizer, question), max_tokens, Sampling(), None, [], 0,
                                  "factual", collected.emit_for(i), kinds[i]))
        collected.wait(3)
    finally:
        driver.stop()
    assert [len(ends[i]["generation"].completion_ids) for i in range(3)] == [1, 9, 12]
    assert [ends[i]["in_kind"] for i in range(3)] == [False, True, False]
    for i in range(3):
        generation = ends[i]["generation"]
        a = answers_from_generations([generation], instrument.identity["layers"], instrument.identity["n_heads"])
        a.answers["kind"] = kinds[i]
        scores = instrument.score(a)
        assert scores.in_kind.iloc[-1] == ends[i]["in_kind"]
        live = np.array(ends[i]["confidences"])
        np.testing.assert_allclose(live[:, 0], scores.confidence, rtol=1e-12)
        np.testing.assert_allclose(live[:, 1], scores.prefix_confidence, rtol=1e-12)


@pytest.mark.parametrize("anchor", ["mean_logprob", "logit_entropy", "rauq"])
def test_live_prefix_confidence_is_the_routed_model_s_with_each_anchor(tiny, anchor):
    """`LiveConfidence` fed the answers' recorded tokens one step at a time, interleaved as the batch feeds them:
    its prefix confidence equals `Instrument.score`'s at every token, routed by kind (the dense probe for a kind
    seen in fitting, else the anchored model on the anchor chosen here: its running state is what is tested)."""
    import dataclasses

    from attentropy.answers import answers_from_generations
    from attentropy.detectors.anchored import ANCHORS
    from attentropy.generate import generate
    from attentropy.live_confidence import AnswerSoFar, LiveConfidence

    model, tokenizer, _, fitted, _ = tiny
    instrument = dataclasses.replace(fitted, answer_models={
        task: dataclasses.replace(m, anchored=dataclasses.replace(m.anchored, anchor=ANCHORS.index(anchor)))
        for task, m in fitted.answer_models.items()})
    texts = ["What is the capital of Peru?", "Name a river.", "Which element has the symbol H?"]
    kinds = ["country_capital", "", "airport_city"]  # seen in fitting, typed, not seen
    lengths = [14, 5, 9]  # tokens fed of each answer (a prefix's scores do not depend on the tokens after it)
    questions = [Question(f"q{i}", "facts", text, "") for i, text in enumerate(texts)]
    generations = generate(model, tokenizer, questions, max_new_tokens=14, min_new_tokens=14, record=True)[0]
    layers, heads = instrument.identity["layers"], instrument.identity["n_heads"]
    live, answers = LiveConfidence(instrument), [AnswerSoFar("factual", kind) for kind in kinds]
    for t in range(max(lengths)):
        step = [i for i, n in enumerate(lengths) if t < n]
        captures = [generations[i].capture for i in step]
        stats = np.array([[c.logprob[t], c.logit_entropy[t], c.logit_varentropy[t]] for c in captures])
        live.add([answers[i] for i in step], np.stack([c.attn[t] for c in captures]), stats,
                 np.array([c.n_keys[t] for c in captures]))
    for g, kind, n, answer in zip(generations, kinds, lengths, answers):
        a = answers_from_generations([g], layers, heads)
        a.answers["kind"] = kind
        scores = instrument.score(a)[:n]
        assert answer.in_kind == bool(scores.in_kind.iloc[-1]) == (kind == "country_capital")
        np.testing.assert_allclose(np.array(answer.confidences)[:, 1], scores.prefix_confidence, rtol=1e-12)
        np.testing.assert_allclose(np.array(answer.confidences)[:, 0], scores.confidence, rtol=1e-12)


def test_live_confidence_normalises_by_each_layer_s_window(tiny):
    """With sliding windows (keys attended by a local layer: at most its window), the live confidences are those of
    `Instrument.score` on answers normalised by the same windows, and differ from full attention's."""
    from attentropy.answers import answers_from_generations
    from attentropy.generate import generate
    from attentropy.live_confidence import AnswerSoFar, LiveConfidence

    model, tokenizer, _, instrument, _ = tiny
    g = generate(model, tokenizer, [Question("q0", "facts", "What is the capital of Peru?", "")], max_new_tokens=8,
                 min_new_tokens=8, record=True)[0][0]
    layers, heads = instrument.identity["layers"], instrument.identity["n_heads"]
    windows = [4 if i % 2 else None for i in range(len(layers))]
    c = g.capture
    confidences = {}
    for name, w in (("windowed", windows), ("full", None)):
        live, answer = LiveConfidence(instrument, w), AnswerSoFar("factual", "")
        for t in range(len(g.completion_ids)):
            live.add([answer], c.attn[t][None], np.array([[c.logprob[t], c.logit_entropy[t], c.logit_varentropy[t]]]),
                     c.n_keys[t:t + 1])
        confidences[name] = np.array(answer.confidences)
    a = answers_from_generations([g], layers, heads, windows=windows)
    a.answers["kind"] = ""
    scores = instrument.score(a)
    np.testing.assert_allclose(confidences["windowed"][:, 1], scores.prefix_confidence, rtol=1e-12)
    np.testing.assert_allclose(confidences["windowed"][:, 0], scores.confidence, rtol=1e-12)
    assert not np.allclose(confidences["windowed"], confidences["full"])


def test_which_requests_the_instrument_applies_to(tiny):
    from attentropy.arith import make_arith
    from attentropy.detectors.instrument import UNKNOWN_KIND
    from attentropy.prompts import chat_messages
    from attentropy.serve import Served, protocol_of

    served = Served(None, None, "m", tiny[3], "probe", {})
    gsm8k = chat_messages(Question("q", "gsm8k", "Tom has 3 apples and buys 4. How many has he?", ""))
    arith = chat_messages(Question("q", "arith", "Ann has 2 pens.", "", metadata={"steps": 2, "seed": 0}))
    dated = make_arith(1, kinds=["date"])[0]  # an arith problem as `attentropy run` asks it: its kind's exemplars
    assert dated.metadata["kind"] == "date"
    # a typed question's kind is not known (the anchored model scores it); a math chat's is its exemplars'
    assert protocol_of(served, [{"role": "user", "content": "What is the capital of Peru?"}]) == (
        "factual", UNKNOWN_KIND, None)
    assert protocol_of(served, gsm8k) == ("math", "gsm8k", None)
    assert protocol_of(served, arith) == ("math", "2 steps", None)
    assert protocol_of(served, chat_messages(dated)) == ("math", "date", None)
    for other in (gsm8k[1:], gsm8k[:-2] + gsm8k[-1:], [{"role": "system", "content": "Be brief."}, gsm8k[-1]],
                  gsm8k[:-1] + [{"role": "user", "content": gsm8k[-1]["content"] + " Please."}]):
        task, _, reason = protocol_of(served, other)
        assert task is None and "protocol" in reason
    served.instrument = None
    assert protocol_of(served, gsm8k) == (None, UNKNOWN_KIND, "no instrument loaded")


def test_the_cache_shrinks_under_an_idle_row_whose_long_prompt_ended(tiny):
    """A long prompt grows the rows' columns; when its answer ends and the cache is compacted below where its first
    token was, the idle row must not point there (an index error once, found under load)."""
    from attentropy.prompts import prompt_ids
    from attentropy.sampling import Sampling
    from attentropy.serving_batch import BatchDriver, Request

    model, tokenizer, _, instrument, _ = tiny
    driver = BatchDriver(model, tokenizer, instrument, rows=2, max_tokens=40, max_batch_tokens=2000)
    collected = Ends()
    events = collected.events
    long_question = Question("long", "facts", "word " * 180, "")
    short_question = Question("short", "facts", "Hi", "")
    assert len(prompt_ids(tokenizer, long_question)) > 150
    driver.submit(Request(long_question, prompt_ids(tokenizer, long_question), 2, Sampling(), None, [], 0, None,
                          collected.emit_for(0)))
    driver.submit(Request(short_question, prompt_ids(tokenizer, short_question), 40, Sampling(), None, [], 0, None,
                          collected.emit_for(1)))
    driver.start()
    try:
        collected.wait(2)
    finally:
        driver.stop()
    assert [events[i]["type"] for i in range(2)] == ["end", "end"], events
    assert len(events[1]["generation"].completion_ids) == 40


@pytest.mark.parametrize("argument", [["--rows", "0"], ["--prefill-wait", "-1"], ["--max-tokens", "many"]])
def test_serve_s_bounds_are_checked_before_anything_loads(argument, capsys):
    with pytest.raises(SystemExit) as ended:
        main(["serve", *argument])
    assert ended.value.code == 2 and f"argument {argument[0]}: expected an integer" in capsys.readouterr().err
