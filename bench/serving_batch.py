"""The serving batch alone, without HTTP: `serving_batch.BatchDriver` in this process, REQUESTS facts questions
(one user turn, greedy, 64 new tokens at most, 16 rows, the instrument scoring every token) from CLIENTS closed-loop
clients (each submits its next request when its answer ends; CLIENTS = REQUESTS: all at once). Prints tokens/s
(tokens shown to clients: an answer's end of turn not counted) and the process's CPU use. With `main` after PROBE,
the driver's loop runs on the main thread (`BatchDriver.run`) instead of its own (`BatchDriver.start`).

    PYTHONPATH=. .venv/bin/python bench/serving_batch.py REQUESTS CLIENTS THREADS PROBE [main]
"""
import sys
import threading
import time

import torch

from attentropy.data import Question, load_questions
from attentropy.detectors.instrument import UNKNOWN_KIND
from attentropy.instrument import load_instrument
from attentropy.model import load_model
from attentropy.sampling import Sampling
from attentropy.serving_batch import BatchDriver, Request

n, clients, threads, probe = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
on_main_thread = sys.argv[5:] == ["main"]
torch.set_num_threads(threads)
model, tokenizer, _ = load_model("smollm2-135m")
driver = BatchDriver(model, tokenizer, load_instrument(probe), rows=16, max_tokens=64, max_batch_tokens=65536)
todo, lock, done, tokens = list(load_questions("facts", limit=n)), threading.Lock(), threading.Semaphore(0), [0]


def submit():
    with lock:
        if not todo:
            return
        q = todo.pop(0)
    prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": q.question}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False))

    def emit(event):
        tokens[0] += event["type"] == "token"
        if event["type"] in ("end", "error"):
            done.release()
            submit()
    driver.submit(Request(Question(q.id, "prompts", q.question, ""), prompt, 64, Sampling(), None, [], 0, "factual",
                          emit, UNKNOWN_KIND))


def wait_for_answers():
    for _ in range(n):
        done.acquire()


def stop_after_answers():  # on another thread, while the main one runs the driver's loop
    wait_for_answers()
    driver.stop()


started, cpu = time.perf_counter(), time.process_time()
for _ in range(clients):
    submit()
if on_main_thread:
    threading.Thread(target=stop_after_answers, daemon=True).start()
    driver.run()
else:
    driver.start()
    wait_for_answers()
seconds = time.perf_counter() - started
print(f"{n} requests, {clients} clients, {threads} threads: {tokens[0]} tokens in {seconds:.1f} s = "
      f"{tokens[0] / seconds:.1f} tokens/s, {driver.steps} steps, {(time.process_time() - cpu) / seconds:.2f} cores, "
      f"driver on {'the main thread' if on_main_thread else 'a thread of its own'}")
driver.stop()
