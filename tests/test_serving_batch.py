"""The serving batch holds the chat template's start once: prompts that start with it and prompts that do not (a raw
completion, a chat with its own system turn) share rows and decode steps, and each answer keeps the tokens and
statistics it has alone."""


import torch

from conftest import assert_matches_eager
from driver_events import Ends

from attentropy.data import Question
from attentropy.prompts import prompt_ids
from attentropy.sampling import Sampling
from attentropy.serving_batch import BatchDriver, Request

MAX_TOKENS = 10


def test_prompts_with_and_without_the_template_s_start_keep_their_answers(embedded):
    model, tokenizer, _ = embedded
    driver = BatchDriver(model, tokenizer, None, rows=2, max_tokens=MAX_TOKENS, max_batch_tokens=4000)
    prefix = driver.prefix
    assert len(prefix) > 10  # SmolLM2's template: its default system turn and the user turn's opening

    def chat(messages):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))

    prompts = [prompt_ids(tokenizer, Question("q", "facts", "What is the capital of Peru?", "")),
               list(tokenizer("The capital of France is", add_special_tokens=True)["input_ids"]),
               chat([{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": "Who wrote Hamlet?"}]),
               prompt_ids(tokenizer, Question("q", "facts", "Name a river.", "")),
               list(tokenizer("word " * 60, add_special_tokens=True)["input_ids"])]  # grows the rows' columns
    assert [driver.batch.shares(p) for p in prompts] == [len(prefix), 0, 0, len(prefix), 0]
    collected = Ends()
    ends = collected.events
    for i, prompt in enumerate(prompts):  # 5 requests, 2 rows: rows pass from one kind of prompt to the other
        driver.submit(Request(Question(f"r{i}", "prompts", "", ""), prompt, MAX_TOKENS, Sampling(), None, [], 0,
                              None, collected.emit_for(i)))
    driver.start()
    try:
        collected.wait(len(prompts))
    finally:
        driver.stop()
    assert all(ends[i]["type"] == "end" for i in range(len(prompts))), ends
    generations = [ends[i]["generation"] for i in range(len(prompts))]
    for prompt, g in zip(prompts, generations):  # greedy: the tokens each prompt gets alone
        with torch.no_grad():
            alone = model.generate(torch.tensor([prompt]), max_new_tokens=len(g.completion_ids), do_sample=False)
        assert g.completion_ids == alone[0, len(prompt):].tolist()
    assert_matches_eager(model, prompts, [g.completion_ids for g in generations], [g.capture for g in generations],
                         atol=2e-4)


def first_token_steps(model, tokenizer, rows: int, prefill_wait: int, followers: int) -> tuple[int, list, list]:
    """A counting prompt starts alone; when its first token comes, `followers` requests are submitted. Returns the
    driver's decode steps when the first one's first token came, each follower's steps at its first token, and
    every answer's tokens."""
    prompt = list(tokenizer("1, 2, 3, 4, 5, 6,", add_special_tokens=True)["input_ids"])
    driver = BatchDriver(model, tokenizer, None, rows=rows, max_tokens=MAX_TOKENS, max_batch_tokens=4000,
                         prefill_wait=prefill_wait)
    collected, first = Ends(), {}

    def emit_for(i):
        ends = collected.emit_for(i)

        def emit(event):
            if event["type"] == "token" and event["index"] == 0:
                first[i] = driver.steps
                if i == 0:
                    for j in range(1, followers + 1):
                        submit(j)
            ends(event)
        return emit

    def submit(i):
        driver.submit(Request(Question(f"r{i}", "prompts", "", ""), prompt, MAX_TOKENS, Sampling(), None, [], 0,
                              None, emit_for(i)))
    submit(0)
    driver.start()
    try:
        collected.wait(followers + 1)
    finally:
        driver.stop()
    tokens = [collected.events[i]["generation"].completion_ids for i in range(followers + 1)]
    assert all(len(t) == MAX_TOKENS for t in tokens)  # the first answer decodes while the followers wait
    return first[0], [first[j] for j in range(1, followers + 1)], tokens


def test_prefill_wait_holds_a_request_until_its_steps_pass_or_a_group_waits(embedded):
    model, tokenizer, _ = embedded
    at, (now,), answers = first_token_steps(model, tokenizer, rows=2, prefill_wait=0, followers=1)
    assert now == at + 1  # admitted at the next turn, prefilled at once
    at, (held,), held_answers = first_token_steps(model, tokenizer, rows=2, prefill_wait=3, followers=1)
    assert held == at + 1 + 3  # a free row, but held 3 decode steps for others to come
    assert held_answers == answers
    at, group, _ = first_token_steps(model, tokenizer, rows=9, prefill_wait=100, followers=8)
    assert group == [at + 1] * 8  # 8 waiting: a group's worth, prefilled together at once
