"""Benchmark: `attentropy serve` under load against `attentropy run`'s continuous batching, same prompts, same
invocation.

1. `attentropy run --benchmark facts --limit N --probe P` (continuous batching, --rows rows, greedy, recorded,
   scored while generating, stored) in its own process: its tokens/s of generation + capture + store.
2. `attentropy serve --probe P --record DIR --prefill-wait W` in its own process (once per W given), and --clients
   threads that send the same N
   questions (one user turn each, greedy, streamed) through the official `openai` SDK, each client sending its
   next request when its answer ends: failures, tokens/s over the whole load, latency and time to first token (p50,
   p95). Then a malformed-request battery (each must get a 4xx with an OpenAI error body) and /health.
3. With the server stopped, `attentropy score`'s confidences (`scoring.score_answer` with the served answer as
   text: tokenized again and teacher-forced) for every served answer: the served token and prefix confidences
   and answer confidence must equal them within float32 rounding of the statistics (1e-4); how many served answers
   equal the run's answers to the same question.

    .venv/bin/python bench/serve.py [--requests 200] [--clients 16] [--rows 16] [--max-tokens 64] [--threads 2]
                                    [--prefill-wait 0,4] [--rounds 1] [--probe DIR]

Without --probe an instrument with random weights is made for the embedded model (what is compared is the
confidences' arithmetic, not their quality).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

TOLERANCE = 1e-4  # decode-step statistics against teacher-forced ones: float32 rounding


def random_probe(out: Path) -> Path:
    """An instrument with random weights for the embedded model (no fitted one given)."""
    from attentropy.attention import recorded_layers
    from attentropy.detectors.anchored import ANCHORS, AnchoredModel
    from attentropy.detectors.instrument import RoutedModel
    from attentropy.features import feature_names
    from attentropy.instrument import Instrument
    from attentropy.model import load_model
    from attentropy.probe import LinearProbe

    model, _, info = load_model("smollm2-135m")
    layers, heads = recorded_layers(model), model.config.num_attention_heads
    rng = np.random.default_rng(0)

    def probe(n):
        return LinearProbe(np.zeros(n), np.ones(n), rng.normal(0, 1, n) / np.sqrt(n), 0.1, (1.0, 0.0), 1.0)

    def answer_model(n):  # a typed question's kind is never seen in fitting: the anchored model (on RAUQ) scores it
        anchored = AnchoredModel(ANCHORS.index("rauq"), np.array([0, 5]), np.zeros(3), np.ones(3),
                                 rng.normal(0, 1, 3), 0.1, (-0.5, 0.5), (1.0, 0.0))
        return RoutedModel(probe(n), anchored, ["country_capital"])
    identity = {"name": info.name, "source": info.source, "revision": info.revision,
                "architecture": info.architecture, "layers": layers, "n_heads": heads}
    n = len(feature_names(layers, heads))
    token_model = probe(len(feature_names(layers, heads, "token")))
    Instrument(identity, {"factual": answer_model(n), "math": answer_model(n)}, token_model,
               {"created": "bench/serve.py: random weights"}).save(out)
    return out


def run_child(args) -> None:
    """`attentropy run` in this process; prints its figures as a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from attentropy.run import run_benchmark

    summary = run_benchmark("facts", args.out, limit=args.requests, batch_size=args.rows,
                            max_new_tokens=args.max_tokens, probe=args.probe, progress=False)
    print(json.dumps({"tokens": summary["new_tokens"], "tokens_per_s": summary["tokens_per_s"]}))


def percentile(values, q) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def malformed_battery(url: str, model: str) -> list[tuple[str, int]]:
    """(kind, status) of ten kinds of bad request."""
    def body(**fields):
        return json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], **fields}).encode()
    cases = {"malformed JSON": b'{"model": ', "not an object": b"[]",
             "no messages": json.dumps({"model": model}).encode(),
             "max_tokens a string": body(max_tokens="5"), "temperature 9": body(temperature=9), "n 3": body(n=3),
             "unknown model": body(model="nope"), "prompt over the context": body(messages=[
                 {"role": "user", "content": "word " * 9000}]), "max_tokens 10^6": body(max_tokens=10 ** 6),
             "tool role": body(messages=[{"role": "tool", "content": "x"}])}
    out = [("body over the bound", over_bound_status(url))]
    for kind, data in cases.items():
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                out.append((kind, reply.status))
        except urllib.error.HTTPError as e:
            out.append((kind, with_error_body(e.code, e.read())))
    return out


def with_error_body(status: int, body: bytes) -> int:
    """The status, negated where the body is not an OpenAI error with a message."""
    return status if json.loads(body).get("error", {}).get("message") else -status


def over_bound_status(url: str) -> int:
    """The status of a request that announces a 2 MB body (the bound is 1 MB): the server answers from the header,
    so the body is not sent (sending it races the server's early reply and close: a broken pipe, not an answer)."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        connection.putrequest("POST", "/v1/chat/completions")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(2 << 20))
        connection.endheaders()
        reply = connection.getresponse()
        return with_error_body(reply.status, reply.read())
    finally:
        connection.close()


def load(url: str, model: str, questions, clients: int, max_tokens: int) -> tuple[list[dict], float]:
    """Every question asked once by `clients` threads; per request its figures and answer."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    todo = list(enumerate(questions))
    lock, results = threading.Lock(), []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, q = todo.pop(0)
            started, first, entries, content, ext, finish, usage = time.perf_counter(), None, [], [], None, None, None
            try:
                for chunk in client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": q.question}], max_tokens=max_tokens,
                        temperature=0, logprobs=True, stream=True, stream_options={"include_usage": True}):
                    if chunk.usage is not None:
                        usage = chunk.usage.completion_tokens
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    if choice.delta.content and first is None:
                        first = time.perf_counter() - started
                    content.append(choice.delta.content or "")
                    if choice.logprobs is not None:
                        entries += [(e.token, e.model_extra["confidence"], e.model_extra["prefix_confidence"])
                                    for e in choice.logprobs.content]
                    if choice.finish_reason:
                        ext, finish = choice.model_extra["attentropy"], choice.finish_reason
                result = {"i": i, "ok": ext is not None, "latency": time.perf_counter() - started, "ttft": first,
                          "content": "".join(content), "entries": entries, "ext": ext, "finish": finish,
                          "tokens": usage or 0}
            except Exception as e:  # counted as a failure
                result = {"i": i, "ok": False, "error": f"{type(e).__name__}: {e}"}
            with lock:
                results.append(result)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda r: r["i"]), time.perf_counter() - started


def serve_load(args, probe: Path, questions, out: Path, wait: int) -> dict:
    """`attentropy serve --prefill-wait WAIT` in its own process under the clients' load, then the malformed battery
    and /health; the server stopped after."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(out.with_suffix(".log"), "w")
    server = subprocess.Popen([sys.executable, "-m", "attentropy.cli", "serve", "--probe", str(probe), "--port",
                               str(port), "--rows", str(args.rows), "--max-tokens", str(args.max_tokens),
                               "--threads", str(args.threads), "--record", str(out), "--prefill-wait", str(wait)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    sys.exit(f"attentropy serve did not come up; see {log.name}")
                time.sleep(0.5)
        results, seconds = load(url, "smollm2-135m", questions, args.clients, args.max_tokens)
        battery = malformed_battery(url, "smollm2-135m")
        health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=10).read())
    finally:
        server.terminate()
        server.wait(120)
    ok = [r for r in results if r["ok"]]
    return {"results": results, "ok": ok, "seconds": seconds, "rate": sum(r["tokens"] for r in ok) / seconds,
            "battery": battery, "health": health, "log": log.name}


def check_confidences(ok: list[dict], questions, probe: Path, run_dir: Path) -> None:
    """The served confidences against `attentropy score`'s of the same answers, and the served answers against
    `attentropy run`'s."""
    import pandas as pd

    from attentropy import load_run
    from attentropy.detectors.instrument import UNKNOWN_KIND
    from attentropy.instrument import load_instrument
    from attentropy.model import load_model
    from attentropy.scoring import score_answer

    instrument = load_instrument(probe)
    model, tokenizer, info = load_model("smollm2-135m")
    answers = load_run(run_dir).samples.set_index("question_id").completion
    worst = {"confidence": 0.0, "prefix_confidence": 0.0, "answer_confidence": 0.0}
    retokenized, same_answer, compared = 0, 0, 0
    for r in ok:
        q = questions[r["i"]]
        same_answer += answers.get(q.id) == r["content"]
        # routed as the server routes a typed question (its kind unknown), not by the facts question's own kind
        scores, texts, _ = score_answer(instrument, model, tokenizer, info, q, answer=r["content"], kind=UNKNOWN_KIND)
        served = pd.DataFrame(r["entries"], columns=["token", "confidence", "prefix_confidence"])
        if list(served.token) != texts[:len(served)]:
            retokenized += 1  # the answer's text tokenizes to other ids than were generated: not comparable
            continue
        compared += 1
        for column in ("confidence", "prefix_confidence"):
            worst[column] = max(worst[column], float(np.abs(served[column].to_numpy(float)
                                                            - scores[column].to_numpy()[:len(served)]).max()))
        if r["finish"] == "stop":  # the reference's last token is the end of turn, as the served answer's
            worst["answer_confidence"] = max(worst["answer_confidence"], abs(
                r["ext"]["answer_confidence"] - float(scores.prefix_confidence.iloc[-1])))
    within = all(v <= TOLERANCE for v in worst.values())
    print(f"  confidences against attentropy score's (teacher-forced) on {compared} answers "
          f"({retokenized} left out: their text tokenizes to other ids): largest differences "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
          + f" -> {'identical within' if within else 'NOT within'} {TOLERANCE:g}")
    print(f"  served answers equal to attentropy run's: {same_answer} of {len(ok)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-wait", default="0,4", help="serve's --prefill-wait values, comma-separated: each is "
                                                            "loaded in every round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of run, then serve at each --prefill-wait")
    parser.add_argument("--probe")
    parser.add_argument("--child-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_run:
        return run_child(args)

    from attentropy.data import load_questions

    waits = [int(w) for w in args.prefill_wait.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    probe = Path(args.probe) if args.probe else random_probe(tmp / "probe")
    questions = load_questions("facts", limit=args.requests)
    print(f"{len(questions)} facts questions, {args.clients} clients, {args.rows} rows, max {args.max_tokens} new "
          f"tokens, greedy, {args.threads} torch threads, probe {probe}; serve's --prefill-wait {waits}, "
          f"{args.rounds} round(s)", flush=True)
    ratios = {w: [] for w in waits}
    for round_ in range(args.rounds):
        # 1. attentropy run, continuous batching
        run_dir = tmp / f"run-{round_}"
        out = subprocess.run([sys.executable, __file__, "--child-run", "--out", str(run_dir), "--probe", str(probe),
                              "--requests", str(args.requests), "--rows", str(args.rows), "--max-tokens",
                              str(args.max_tokens), "--threads", str(args.threads)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"attentropy run failed:\n{out.stderr[-3000:]}")
        run = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"round {round_ + 1}: attentropy run: {run['tokens']} tokens, {run['tokens_per_s']:.1f} tokens/s "
              "(generation + capture + store)", flush=True)
        # 2. attentropy serve under load, at each --prefill-wait
        for wait in waits:
            served = serve_load(args, probe, questions, tmp / f"served-{round_}-wait{wait}", wait)
            results, ok, rate = served["results"], served["ok"], served["rate"]
            ratios[wait].append(rate / run["tokens_per_s"])
            print(f"  attentropy serve --prefill-wait {wait}: {len(results)} requests from {args.clients} clients, "
                  f"{len(results) - len(ok)} failed; {sum(r['tokens'] for r in ok)} tokens in {served['seconds']:.1f}"
                  f" s = {rate:.1f} tokens/s = {ratios[wait][-1]:.2f}x attentropy run's")
            for r in results:
                if not r["ok"]:
                    print(f"    failed: request {r['i']}: {r.get('error')}")
            latency, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok if r["ttft"] is not None]
            print(f"    latency p50 {percentile(latency, 50):.2f} s, p95 {percentile(latency, 95):.2f} s; time to "
                  f"first token p50 {percentile(ttft, 50):.2f} s, p95 {percentile(ttft, 95):.2f} s")
            battery = served["battery"]
            refused = [(k, s) for k, s in battery if not 400 <= s < 500]
            print(f"    malformed battery: {len(battery)} kinds, {len(battery) - len(refused)} answered 4xx with an "
                  f"error body{'; not: ' + str(refused) if refused else ''}; /health afterwards: "
                  f"{served['health']['status']} (server log: {served['log']})", flush=True)
            if round_ == 0:  # 3. the served confidences and answers (the same in every round: greedy)
                check_confidences(ok, questions, probe, run_dir)
    for wait, values in ratios.items():
        print(f"--prefill-wait {wait}: throughput against attentropy run's, median of {len(values)} round(s) "
              f"{statistics.median(values):.2f}x ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
