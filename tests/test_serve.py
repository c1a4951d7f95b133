"""The judge and the critic against a real OpenAI-compatible server: Hugging Face's `transformers serve` on
loopback with the embedded model (a poor judge: these tests check the protocol — requests, replies, parsing, the
cache, resuming after a kill — not the verdicts)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from attentropy import load_run
from attentropy.cli import main
from attentropy.data import Question
from attentropy.grade import GSM8K_LABELS, SIMPLEQA_LABELS
from test_grade import FACT_ANSWERS, FACTS, QUESTION, REFERENCE, make_run


@pytest.fixture(scope="module")
def served(embedded):
    """(base URL, model name) of `transformers serve` with the embedded model's directory, on a free port."""
    from attentropy.model import embedded_model_dir

    model = str(embedded_model_dir()[0])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).with_name("transformers")), "serve", model, "--host", "127.0.0.1", "--port",
               str(port), "--device", "cpu"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None, "transformers serve exited"
            assert time.time() < deadline, "transformers serve did not come up in 3 minutes"
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/v1", model
    server.terminate()
    server.wait(30)


def cached(run) -> list[dict]:
    return [json.loads(line) for line in (run / "llm_replies.jsonl").read_text().splitlines()]


def test_judge_and_critic_through_transformers_serve(tmp_path, tokenizer, served):
    url, model = served
    facts = make_run(tmp_path / "facts", tokenizer, "facts", FACTS, FACT_ANSWERS)
    assert main(["grade", str(facts), "--judge", model, "--base-url", url, "--max-tokens", "8", "--quiet"]) == 0
    samples = load_run(facts).samples
    assert set(samples.judge_label) <= set(SIMPLEQA_LABELS) and samples.grader.eq(f"judge:{model}").all()
    rows = cached(facts)
    assert len(rows) == 4 and all(isinstance(r["reply"], str) for r in rows)
    # the raw replies are kept with the labels (the cache holds them in the order the concurrent calls ended)
    assert sorted(samples.judge_reply) == sorted(r["reply"] for r in rows)
    assert main(["grade", str(facts), "--judge", model, "--base-url", url, "--quiet"]) == 0
    assert len(cached(facts)) == 4  # the second time everything came from the cache

    wrong = "In May she sold 48 / 2 = 24 clips.\nAltogether 48 + 24 = 82 clips.\nThe final answer is 82"
    arith = make_run(tmp_path / "arith", tokenizer, "arith",
                     [Question("arith-00000", "arith", QUESTION, "72", reference=REFERENCE)], [wrong])
    from attentropy.grade import grade_run

    metrics = grade_run(arith, critic=model, base_url=url, max_tokens=48, tokenizer=tokenizer, progress=False)
    assert metrics["critic"]["incorrect_answers"] == 1 and metrics["critic"]["no_reply"] == 0
    sample = load_run(arith).samples.iloc[0]
    assert sample.label in GSM8K_LABELS and sample.critic_status in ("located", "step_only", "unparsed")
    rows = cached(arith)
    assert len(rows) == 1 and isinstance(rows[0]["reply"], str) and rows[0]["model"] == model


def test_a_killed_grade_resumes_without_asking_twice(tmp_path, tokenizer, served):
    url, model = served
    questions = [Question(f"facts-{i:05d}", "facts", f"What is {i} plus {i}?", str(2 * i)) for i in range(12)]
    run = make_run(tmp_path / "facts", tokenizer, "facts", questions, [f"It is {2 * i + i % 2}." for i in range(12)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "attentropy.cli", "grade", str(run), "--judge", model, "--base-url", url,
               "--concurrency", "1", "--max-tokens", "8", "--quiet"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    replies = run / "llm_replies.jsonl"
    deadline = time.time() + 120
    while not (replies.exists() and len(replies.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(cached(run))
    assert before < 12
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    rows = cached(run)
    keys = [r["key"] for r in rows if r["reply"] is not None]
    assert len(keys) == len(set(keys)) == 12  # every answer asked once, none twice
    assert load_run(run).samples.judge_label.notna().all()
