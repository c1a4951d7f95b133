"""The base-model protocol: plain-text few-shot Q/A prompts for a model without a chat template (or with
`--protocol base`), answers that end at a blank line or the next "Q:" (cut there in the answer's text, the tokens up
to the one that completed it kept and recorded), in static and continuous batching alike, and the protocol written
into the run's config."""

import copy
import json

import numpy as np
import pytest

import attentropy.prompts as prompts_module
from attentropy.continuous import generate_continuous
from attentropy.data import load_questions
from attentropy.generate import generate
from attentropy.prompts import (BASE_FACT_SHOTS, answer_end, answer_text, base_prompt, prompt_ids, run_protocol,
                                stop_strings)


@pytest.fixture(scope="module")
def base_tokenizer(tokenizer):
    """The embedded model's tokenizer without its chat template: what a base model's tokenizer looks like."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def test_base_prompts_are_plain_few_shot_text(base_tokenizer):
    fact = load_questions("facts", limit=1)[0]
    text = base_prompt(fact)
    assert text.startswith(f"Q: {BASE_FACT_SHOTS[0][0]}\nA: {BASE_FACT_SHOTS[0][1]}\n\nQ: ")
    assert text.endswith(f"\n\nQ: {fact.question}\nA:") and text.count("\n\n") == len(BASE_FACT_SHOTS)
    math = load_questions("arith", limit=1)[0]
    text = base_prompt(math, shots=8)
    pairs = text.split("\n\n")
    assert len(pairs) == 9 and pairs[-1] == f"Q: {math.question}\nA:"
    assert all(p.startswith("Q: ") and "\nA: " in p and p.split("\n")[-1].startswith("The final answer is ")
               for p in pairs[:-1])
    ids = prompt_ids(base_tokenizer, math)  # no chat template: the base protocol, encoded as text
    assert base_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert stop_strings(base_tokenizer, math) == ("\n\n", "\nQ:")


def test_a_chat_model_keeps_its_template_unless_base_is_asked(tokenizer, base_tokenizer):
    fact = load_questions("facts", limit=1)[0]
    assert prompt_ids(tokenizer, fact) != prompt_ids(base_tokenizer, fact) and stop_strings(tokenizer, fact) == ()
    fact.metadata["protocol"] = "base"
    assert prompt_ids(tokenizer, fact) == prompt_ids(base_tokenizer, fact)
    assert run_protocol("auto", True, "factual") == {}
    assert run_protocol("auto", False, "factual")["format"] == "base"
    with pytest.raises(ValueError, match="needs a chat template"):
        run_protocol("chat", False, "math")


def test_stop_strings_end_and_cut_the_answer(base_tokenizer):
    ids = base_tokenizer.encode(" Paris\n\nQ: What", add_special_tokens=False)
    ends = [answer_end(base_tokenizer, ids[:i + 1], ("\n\n", "\nQ:")) for i in range(len(ids))]
    first = ends.index(True)
    assert base_tokenizer.decode(ids[:first]).count("\n") < 2 <= base_tokenizer.decode(ids[:first + 1]).count("\n")
    assert answer_text(base_tokenizer, ids[:first + 1], ("\n\n", "\nQ:")) == " Paris"


def test_static_and_continuous_batching_stop_at_the_same_text(tiny_model_dir, base_tokenizer, monkeypatch):
    """A random model rarely writes a blank line: the stop string is made a single letter, which it writes soon, so
    every answer ends at a stop string, at the token that completes it, in both batching modes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    monkeypatch.setattr(prompts_module, "BASE_STOP_STRINGS", ("e",))
    questions = load_questions("facts", limit=6)
    continuous = {g.question.id: g for g in generate_continuous(model, base_tokenizer, questions, batch_size=2,
                                                                max_new_tokens=40)}
    static = generate(model, base_tokenizer, questions, max_new_tokens=40, record=True)[0]
    for s in static:
        c = continuous[s.question.id]
        assert c.completion_ids == s.completion_ids and c.completion == s.completion
        np.testing.assert_allclose(c.capture.attn, s.capture.attn, atol=1e-4, rtol=1e-5)
        assert s.finish_reason == "stop" and "e" not in s.completion
        assert "e" in base_tokenizer.decode(s.completion_ids) and "e" not in base_tokenizer.decode(
            s.completion_ids[:-1])
        assert len(s.capture.logprob) == len(s.completion_ids)


def test_a_run_of_a_model_without_chat_template_records_the_base_protocol(tmp_path, tiny_model_dir, base_tokenizer):
    from attentropy.run import run_benchmark
    from attentropy.store import load_run

    model_dir = tmp_path / "base-model"
    model_dir.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (p := __import__("pathlib").Path(tiny_model_dir) / f).exists():
            (model_dir / f).write_bytes(p.read_bytes())
    base_tokenizer.save_pretrained(model_dir)
    run_benchmark("facts", tmp_path / "run", model=str(model_dir), limit=2, batch_size=2, max_new_tokens=5,
                  progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["protocol"]["format"] == "base" and config["protocol"]["stop_strings"] == ["\n\n", "\nQ:"]
    assert config["protocol"]["exemplars"][0] == f"Q: {BASE_FACT_SHOTS[0][0]}\nA: {BASE_FACT_SHOTS[0][1]}"
    run = load_run(tmp_path / "run")
    first = run.samples.iloc[0]
    assert base_tokenizer.decode(list(first.prompt_ids)).endswith(f"Q: {first.question}\nA:")
    with pytest.raises(ValueError, match="needs a chat template"):
        run_benchmark("facts", tmp_path / "chat", model=str(model_dir), limit=1, protocol="chat", progress=False)
