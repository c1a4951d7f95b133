"""Graders, parsers, the offline critic, span mapping, and the judge/critic through the real `openai` client
against an OpenAI-compatible server on loopback that serves scripted replies and faults."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest

from attentropy import load_run
from attentropy.capture import Capture
from attentropy.cli import main
from attentropy.stats import Intervals
from attentropy.critic import locate_text, parse_critic_reply
from attentropy.arith import make_arith
from attentropy.data import Question
from attentropy.generate import Generation
from attentropy.grade import grade_run
from attentropy.gsm8k import extract_final_number, normalize_number
from attentropy.judge import parse_judge_verdict
from attentropy.offline_critic import find_error_offline, locate_error_offline, split_steps
from attentropy.report import _config_rows
from attentropy.store import append_batch, write_json
from attentropy.token_spans import char_to_token_spans, tokens_of_span


@pytest.mark.parametrize("text, strict, flexible", [
    ("So 3 + 4 = 7.\nThe final answer is 7", "7", "7"),
    ("The final answer is $1,234.00.", "1234", "1234"),
    ("The final answer is -3 degrees", "-3", "-3"),
    ("The final answer is 5. Wait, the final answer is 6.", "6", "6"),
    ("The final answer is **18**", "18", "18"),
    ("The final answer is: 2.50 dollars", "2.5", "2.5"),
    ("She pays $18 in total.", None, "18"),
    ("He has 1,000 marbles and gives 250 away", None, "250"),
    ("I cannot solve this.", None, None),
    ("The final answer is twelve", None, None),
])
def test_extract_final_number(text, strict, flexible):
    assert extract_final_number(text, "strict") == strict
    assert extract_final_number(text, "flexible") == flexible


@pytest.mark.parametrize("raw, expected", [("7.0", "7"), ("+3", "3"), ("-0", "0"), ("$1,000", "1000"),
                                           ("0.50", "0.5"), ("12.", "12"), ("abc", None)])
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


@pytest.mark.parametrize("reply, label", [
    ("A", "correct"), ("B.", "incorrect"), (" C ", "not_attempted"), ("a", "correct"),
    ("The answer names the right city, so the grade is A", "correct"),
    ("Reasoning: it contradicts the gold target.\nGrade: B (INCORRECT)", "incorrect"),
    ("At first glance A, but on reflection the answer is NOT_ATTEMPTED", "not_attempted"),
    ("The predicted answer is not attempted.", "not_attempted"),
    ("I cannot decide.", "unparsed"), ("", "unparsed"), (None, "unparsed"),
])
def test_parse_judge_verdict(reply, label):
    assert parse_judge_verdict(reply) == label


def test_split_steps_lines_and_sentences():
    solution = "  First she buys 3 apples. Then 2 more.\n\nSo 3 + 2 = 5.\nThe final answer is 5"
    steps = [solution[s:e] for s, e in split_steps(solution)]
    assert steps == ["First she buys 3 apples.", "Then 2 more.", "So 3 + 2 = 5.", "The final answer is 5"]
    assert split_steps("") == []


REFERENCE = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
             "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")


@pytest.mark.parametrize("solution, step", [
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48 + 24 = 72 clips.\nThe final answer is 72", -1),
    ("In May she sold 48 / 2 = 24 clips.\nAltogether 48 + 24 = 82 clips.\nThe final answer is 82", 1),
    ("In May she sold 48 / 2 = 25 clips.\nAltogether 48 + 25 = 73 clips.\nThe final answer is 73", 0),
    ("In May she sold 48 * 2 = 96 clips.\nAltogether 48 + 96 = 144 clips.\nThe final answer is 144", 0),
    ("In May she sold 48 / 2 = 24 clips.\nAltogether 48 + 26 = 74 clips.\nThe final answer is 74", 1),
    ("In May she sold half, 24 clips. Altogether 48 + 24 = 72.\nThe final answer is 72", -1),
])
def test_offline_critic_on_hand_written_solutions(solution, step):
    assert locate_error_offline(QUESTION, solution, REFERENCE) == step


@pytest.mark.parametrize("solution, marked", [
    ("In May she sold 48 * 2 = 96 clips.", "*"),  # a wrong operation: the operator, not its correct result
    ("In May she sold 48 / 2 = 25 clips.", "25"),  # a miscomputed result
    ("In May she sold 48 / 2 = 24 clips.\nAltogether 48 + 26 = 74 clips.", "26"),  # an unsupported operand
])
def test_the_offline_critic_marks_where_the_step_went_wrong(solution, marked):
    _, (start, end), _ = find_error_offline(QUESTION, solution, REFERENCE)
    assert solution[start:end] == marked


@pytest.mark.parametrize("reply, parsed", [
    ('{"step": 2, "error_text": "48 + 24 = 82", "reason": "wrong sum"}', (2, "48 + 24 = 82")),
    ('```json\n{"step": "3", "error_text": "x", "reason": "r"}\n```', (3, "x")),
    ('First guess {"step": 1, "error_text": "a"} but actually {"step": 2, "error_text": "b"}', (2, "b")),
    ("The mistake is in Step 4, where the total is wrong.", (4, "")),
    ("Everything looks fine to me.", None),
    ('{"error_text": "no index"}', None),
    (None, None),
])
def test_parse_critic_reply(reply, parsed):
    result = parse_critic_reply(reply)
    assert (None if result is None else (result["step"], result["error_text"])) == parsed


@pytest.mark.parametrize("text, wrong", [
    ("She pays 3 + 4 = 8 dollars.", "8"),
    ("  Leading spaces: 12 * 2 = 25.", "25"),
    ("Le café coûte 5€ et 3€, donc 5 + 3 = 9€ 🎉.", "9€"),
    ("Ça fait 7 œufs 🥚🥚 au total", "🥚🥚"),
])
def test_character_spans_map_to_the_generated_tokens(tokenizer, text, wrong):
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]  # as a generation would end
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    spans = char_to_token_spans(tokenizer, ids)
    assert len(spans) == len(ids) and spans[-1][1] == len(decoded)
    start = decoded.index(wrong)
    first, last = tokens_of_span(spans, start, start + len(wrong))
    covered = tokenizer.decode(ids[first:last], skip_special_tokens=True)
    assert wrong in covered and len(covered) <= len(wrong) + 2  # the span, at most a neighbouring space/char


def test_locate_text_prefers_the_critics_step_when_the_text_occurs_twice():
    solution = "He has 5 + 3 = 8 eggs.\nThen 8 - 2 = 6 eggs.\nAgain 8 - 2 = 6 eggs."
    steps = split_steps(solution)
    assert locate_text(solution, "8 - 2 = 6", steps[2]) == (solution.rindex("8 - 2"), solution.rindex("6") + 1)
    assert locate_text(solution, "8 - 2 = 6", steps[1]) == (solution.index("8 - 2"), solution.index("= 6") + 3)
    assert locate_text(solution, "7 * 7", steps[1]) is None


# ---------------------------------------------------------------- run directories with hand-written answers


def make_run(path, tokenizer, benchmark, questions, completions):
    """A run directory as `attentropy run` writes it, with given answers and zero statistics."""
    gens = []
    for q, text in zip(questions, completions):
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        n = len(ids)
        cap = Capture(attn=np.zeros((n, 2, 3, 6), np.float32), logprob=np.zeros(n, np.float32),
                      logit_entropy=np.zeros(n, np.float32), logit_varentropy=np.zeros(n, np.float32),
                      n_keys=np.arange(5, 5 + n))
        gens.append(Generation(q, [1, 2, 3, 4, 5], ids, tokenizer.decode(ids, skip_special_tokens=True), "stop",
                               cap))
    path.mkdir()
    write_json(path / "config.json", {"benchmark": benchmark, "model": {"name": "smollm2-135m"},
                                      "capture": {"layers": [0, 1], "n_heads": 3}})
    append_batch(path, gens, tokenizer)
    return path


FACTS = [Question(f"facts-{i:05d}", "facts", q, a) for i, (q, a) in enumerate(
    [("What is the capital of France?", "Paris"), ("What is the capital of Peru?", "Lima"),
     ("What is the capital of Chad?", "N'Djamena"), ("What is the capital of Laos?", "Vientiane")])]
FACT_ANSWERS = ["It is Paris.", "It is Cusco.", "I don't know.", "Vientiane, I believe."]


def test_math_grading_and_offline_critic_mark_token_spans(tmp_path, tokenizer):
    questions = make_arith(3, difficulty=2, seed=4)
    good = "\n".join(line for line in questions[0].reference.split("\n") if not line.startswith("####"))
    good = re.sub(r"<<[^>]*>>", "", good) + f"\nThe final answer is {questions[0].target}"
    lines = re.sub(r"<<[^>]*>>", "", questions[1].reference).split("\n")[:-1]
    expression, _, shown = lines[0].rpartition(" = ")
    value = int(re.match(r"\d+", shown).group())
    lines[0] = f"{expression} = {value + 1}{shown[len(str(value)):]}"  # a wrong calculation in step 1
    bad = "\n".join(lines) + "\nThe final answer is 9999"
    run = make_run(tmp_path / "arith", tokenizer, "arith", questions,
                   [good, bad, "I think it is about twelve."])
    metrics = grade_run(run, tokenizer=tokenizer, progress=False)
    assert metrics["accuracy_strict"] == pytest.approx(1 / 3)
    r = load_run(run)
    assert list(r.samples.label) == ["correct", "incorrect", "unparsed"]
    wrong = r.samples.iloc[1]
    assert wrong.critic_status == "located" and wrong.error_step == 0
    assert wrong.error_text == str(value + 1)
    steps = [list(x) for x in wrong.step_token_ranges]
    assert len(steps) == len(split_steps(wrong.completion)) == 3 and steps[0][0] == 0
    assert steps[0][0] <= wrong.error_token_start < wrong.error_token_end <= steps[0][1] <= steps[1][0]
    tokens = r.tokens[r.tokens.question_id == wrong.question_id]
    marked = tokens[tokens.in_error]
    assert "".join(marked.token).strip() == str(value + 1)
    assert tokens.after_error.sum() == (tokens.pos >= wrong.error_token_end).sum() > 0
    assert not r.tokens[r.tokens.question_id != wrong.question_id].in_error.any()
    assert json.loads((run / "metrics.json").read_text())["critic"]["located"] == 1


# ---------------------------------------------------------------- an OpenAI-compatible server on loopback


class ScriptedServer:
    """/v1/chat/completions answering from `script(n, prompt)` -> ('ok', text) | ('status', code) | ('hang', s)
    | ('garbage', body) | ('empty', None); n counts requests."""

    def __init__(self, script):
        self.script, self.requests, self.bodies, self.lock = script, [], [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with server.lock:
                    server.requests.append((self.headers.get("Authorization"), prompt))
                    server.bodies.append(body)
                    n = len(server.requests)
                kind, arg = server.script(n, prompt)
                if kind == "hang":
                    time.sleep(arg)
                    kind, arg = "ok", "A"
                if kind == "status":
                    self.send_response(arg)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "scripted failure"}}')
                    return
                if kind == "garbage":
                    payload = arg.encode()
                else:
                    choices = [] if kind == "empty" else [
                        {"index": 0, "message": {"role": "assistant", "content": arg}, "finish_reason": "stop"}]
                    payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                          "model": body["model"], "choices": choices}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def verdict_for(prompt):
    """A judge that knows the answers: A when the gold is in the predicted answer, C for I don't know, else B."""
    gold = prompt.split("Gold target: ")[1].split("\n")[0]
    predicted = prompt.split("Predicted answer: ")[1].split("\n")[0]
    return "C" if "know" in predicted else ("A" if gold in predicted else "B")


JUDGE = dict(judge="judge-model", timeout=0.5, max_retries=2, concurrency=2, progress=False)


def test_judge_through_openai_sdk_with_faults_retries_and_cache(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("ATTENTROPY_TEST_KEY", "sk-secret-do-not-store")
    faults = {1: ("status", 429), 2: ("status", 500), 3: ("hang", 2.0)}
    server = ScriptedServer(lambda n, p: faults.get(n, ("ok", f"Reasoning first. Grade: {verdict_for(p)}")))
    try:
        run = make_run(tmp_path / "facts", tokenizer, "facts", FACTS, FACT_ANSWERS)
        metrics = grade_run(run, base_url=server.url, api_key_env="ATTENTROPY_TEST_KEY", **JUDGE)
        r = load_run(run)
        assert list(r.samples.judge_label) == ["correct", "incorrect", "not_attempted", "correct"]
        assert list(r.samples.label) == list(r.samples.judge_label) and r.samples.grader[0] == "judge:judge-model"
        assert metrics["correct"] == 0.5 and metrics["f_score"] == pytest.approx(2 / 3 * 0.5 * 2 / (0.5 + 2 / 3))
        # the report's run table: the judge, and how often the offline grader says the same
        agree = int((r.samples.offline_label == r.samples.judge_label).sum())
        shown = dict(_config_rows(SimpleNamespace(config={}, answers=r.samples, samples=r.samples, benchmark="facts",
                                                  excluded={}, layers=[], n_heads=0,
                                                  intervals=Intervals("clustered", 0, 0))))["grader"]
        assert shown == f"judge:judge-model; the offline grader agrees with the judge on {agree} of 4 ({agree / 4:.0%})"
        assert all(auth == "Bearer sk-secret-do-not-store" for auth, _ in server.requests)
        calls = len(server.requests)
        assert calls >= 4 + 3  # three faults were retried
        grade_run(run, base_url=server.url, api_key_env="ATTENTROPY_TEST_KEY", **JUDGE)
        assert len(server.requests) == calls  # everything came from the cache
        for path in run.rglob("*"):
            if path.is_file():
                assert b"sk-secret-do-not-store" not in path.read_bytes()
    finally:
        server.close()


def test_a_reply_without_a_verdict_is_unparsed_and_no_reply_is_no_label(tmp_path, tokenizer):
    replies = {"France": ("ok", "A"), "Peru": ("garbage", "<html>not json"), "Chad": ("ok", "Hmm, hard to say."),
               "Laos": ("empty", None)}
    server = ScriptedServer(lambda n, p: next(v for k, v in replies.items() if k in p.split("Gold")[0]))
    try:
        run = make_run(tmp_path / "facts", tokenizer, "facts", FACTS, FACT_ANSWERS)
        metrics = grade_run(run, base_url=server.url, **JUDGE)
        r = load_run(run)
        assert list(r.samples.judge_label.fillna("-")) == ["correct", "-", "unparsed", "-"]
        assert list(r.samples.label.fillna("-")) == ["correct", "-", "unparsed", "-"]  # no earlier label to keep
        assert r.samples.judge_reply[2] == "Hmm, hard to say."
        assert r.samples.judge_reply[1].startswith("[no reply]") and r.samples.judge_reply[3].startswith("[no reply]")
        assert metrics["not_graded"] == 2 and sum(metrics["failed_calls"]["judge"].values()) == 2
        assert all(body["max_tokens"] == 512 for body in server.bodies)  # every reply is bounded
        failures = [json.loads(line) for line in (run / "llm_replies.jsonl").read_text().splitlines()]
        assert sum(row["reply"] is None for row in failures) >= 2  # kept, and asked again next time
    finally:
        server.close()


def test_interrupted_grade_resumes_asking_only_what_is_missing(tmp_path, tokenizer):
    broken = ScriptedServer(lambda n, p: ("ok", verdict_for(p)) if "France" in p or "Peru" in p
                            else ("status", 503))
    run = make_run(tmp_path / "facts", tokenizer, "facts", FACTS, FACT_ANSWERS)
    grade_run(run, progress=False)  # the offline grader first
    offline = list(load_run(run).samples.label)
    try:
        grade_run(run, base_url=broken.url, **JUDGE)
    finally:
        broken.close()
    graded = load_run(run).samples
    assert list(graded.judge_label.fillna("-")) == ["correct", "incorrect", "-", "-"]
    # the two answers the judge could not grade keep their earlier (offline) labels
    assert list(graded.label) == ["correct", "incorrect", *offline[2:]]
    assert list(graded.grader) == ["judge:judge-model", "judge:judge-model", "offline", "offline"]
    healthy = ScriptedServer(lambda n, p: ("ok", verdict_for(p)))
    try:
        grade_run(run, base_url=healthy.url, **JUDGE)
        assert sorted(p.split("Gold target: ")[1].split("\n")[0] for _, p in healthy.requests) == [
            "N'Djamena", "Vientiane"]
    finally:
        healthy.close()
    assert list(load_run(run).samples.label) == ["correct", "incorrect", "not_attempted", "correct"]


def test_llm_critic_locates_the_quoted_text_in_tokens(tmp_path, tokenizer):
    question = Question("arith-00000", "arith", QUESTION, "72", reference=REFERENCE)
    solution = "In May she sold 48 / 2 = 24 clips.\nAltogether 48 + 24 = 82 clips.\nThe final answer is 82"
    server = ScriptedServer(lambda n, p: ("ok", 'Looking at it: {"step": 2, "error_text": "48 + 24 = 82", '
                                                '"reason": "the sum is 72"}'))
    try:
        run = make_run(tmp_path / "arith", tokenizer, "arith", [question], [solution])
        grade_run(run, critic="critic-model", base_url=server.url, tokenizer=tokenizer, **{
            k: v for k, v in JUDGE.items() if k != "judge"})
        assert "Step 2: Altogether 48 + 24 = 82 clips." in server.requests[0][1]
        s = load_run(run).samples.iloc[0]
        assert (s.critic, s.critic_status, s.error_step) == ("llm:critic-model", "located", 1)
        ids = list(s.completion_ids)
        assert tokenizer.decode(ids[s.error_token_start:s.error_token_end]).strip() == "48 + 24 = 82"
    finally:
        server.close()


@pytest.mark.parametrize("fault, cause", [(("status", 401), "key was refused"), (("status", 404), "not found"),
                                          (("garbage", "<html>a web page"), "not an OpenAI-compatible reply")])
def test_an_unusable_endpoint_stops_grading_at_its_first_call(tmp_path, tokenizer, capsys, fault, cause):
    server = ScriptedServer(lambda n, p: fault)
    run = make_run(tmp_path / "facts", tokenizer, "facts", FACTS, FACT_ANSWERS)
    grade_run(run, progress=False)
    before = (run / "grades.parquet").read_bytes()
    try:
        assert main(["grade", str(run), "--judge", "judge-model", "--base-url", server.url, "--quiet"]) == 2
        assert len(server.requests) == 1  # no retries over the other answers
    finally:
        server.close()
    err = capsys.readouterr().err
    assert server.url in err and cause in err
    assert (run / "grades.parquet").read_bytes() == before  # nothing overwritten


def test_an_unreachable_endpoint_is_named_at_once(tmp_path, tokenizer, capsys):
    import socket

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    run = make_run(tmp_path / "facts", tokenizer, "facts", FACTS, FACT_ANSWERS)
    started = time.perf_counter()
    assert main(["grade", str(run), "--judge", "judge-model", "--base-url", url, "--quiet"]) == 2
    assert time.perf_counter() - started < 10
    err = capsys.readouterr().err
    assert url in err and "cannot connect" in err


def test_failed_calls_make_grade_exit_non_zero(tmp_path, tokenizer, capsys):
    server = ScriptedServer(lambda n, p: ("ok", verdict_for(p)) if "France" in p else ("status", 503))
    run = make_run(tmp_path / "facts", tokenizer, "facts", FACTS, FACT_ANSWERS)
    try:
        assert main(["grade", str(run), "--judge", "judge-model", "--base-url", server.url, "--timeout", "0.5",
                     "--max-retries", "1", "--quiet"]) == 1
    finally:
        server.close()
    captured = capsys.readouterr()
    assert "3 calls got no reply (3 InternalServerError)" in captured.out and "rerun the same command" in captured.err
