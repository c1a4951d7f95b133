"""Prompts, generation on the embedded model, model loading and its errors."""

import numpy as np
import pytest
import torch

from attentropy.capture import capture, entropy_varentropy
from attentropy.data import Question, make_arith, make_facts
from attentropy.generate import chat_messages, exemplar_answer, generate, stop_token_ids
from attentropy.model import ModelLoadError, load_model


def test_factual_prompt_is_the_bare_question():
    q = make_facts(1)[0]
    assert chat_messages(q) == [{"role": "user", "content": q.question}]


def test_math_prompt_is_eight_shot_chat_ending_in_the_protocol_sentence():
    q = make_arith(1)[0]
    messages = chat_messages(q)
    assert len(messages) == 17 and [m["role"] for m in messages[:2]] == ["user", "assistant"]
    assert messages[-1]["content"].startswith("Given the following problem, reason and give a final answer")
    assert q.question in messages[-1]["content"]
    assert messages[1]["content"].endswith("The final answer is 72") and "<<" not in messages[1]["content"]
    assert len(chat_messages(q, shots=0)) == 1


def test_exemplar_answer_strips_calculator_annotations():
    assert exemplar_answer("She has 2*3 = <<2*3=6>>6 eggs.\n#### 6") == "She has 2*3 = 6 eggs.\nThe final answer is 6"


def test_generation_stops_at_end_of_turn_and_capture_matches_eager(embedded):
    model, tokenizer, _ = embedded
    questions = [Question("facts-x", "facts", "What is the capital of France?", "Paris"),
                 Question("facts-y", "facts", "Say the single word: yes.", "yes")]
    gens, prompt_cache = generate(model, tokenizer, questions, max_new_tokens=48)
    stops = stop_token_ids(model, tokenizer)
    for g in gens:
        assert g.finish_reason == "stop" and g.completion_ids[-1] in stops
        assert all(t not in stops for t in g.completion_ids[:-1])
        assert g.completion == tokenizer.decode(g.completion_ids, skip_special_tokens=True)
    assert "Paris" in gens[0].completion
    # the embedded model: statistics captured on generation's own prompt cache (shared prefix + padding) equal
    # an eager recomputation over each unpadded sequence, and a capture that computes its own prompt cache
    results = capture(model, [g.prompt_ids for g in gens], [g.completion_ids for g in gens],
                      prompt_cache=prompt_cache)
    standalone = capture(model, [g.prompt_ids for g in gens], [g.completion_ids for g in gens])
    for a, b in zip(results, standalone):
        np.testing.assert_allclose(a.attn, b.attn, atol=2e-4)
    model.set_attn_implementation("eager")
    try:
        for g, r in zip(gens, results):
            with torch.no_grad():
                out = model(torch.tensor([g.prompt_ids + g.completion_ids[:-1]]), output_attentions=True)
            first = len(g.prompt_ids) - 1
            rows = torch.stack(out.attentions, 1)[0, :, :, first:].permute(2, 0, 1, 3).float()
            h, v = entropy_varentropy(rows.log())
            np.testing.assert_allclose(r.attn[..., 0], h.numpy(), atol=2e-4)
            np.testing.assert_allclose(r.attn[..., 1], v.numpy(), atol=2e-4)
            logp = torch.log_softmax(out.logits[0, first:].float(), -1)
            np.testing.assert_allclose(r.logprob, logp.gather(-1, torch.tensor(g.completion_ids)[:, None])
                                       .squeeze(-1).numpy(), atol=2e-4)
    finally:
        model.set_attn_implementation("sdpa")


def test_embedded_model_is_cached_as_safetensors(embedded):
    from attentropy.model import embedded_model_dir

    path, digest = embedded_model_dir()
    assert (path / "model.safetensors").exists() and (path / "config.json").exists() and len(digest) == 64
    _, _, info = embedded
    assert info.architecture == "LlamaForCausalLM" and info.revision == digest and info.dtype == "float32"


def test_unreachable_hub_id_says_how_to_pass_a_local_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"(?s)meta-llama/Llama-3.2-1B-Instruct.*--model /path/to/model"):
        load_model("llama-3.2-1b")


def test_unknown_dtype_is_an_error():
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("smollm2-135m", dtype="int3")


def test_shared_prefix_batching_generates_what_each_prompt_generates_alone(embedded):
    from attentropy.capture import common_prefix_len
    from attentropy.generate import PrefixStore, prompt_ids

    model, tokenizer, _ = embedded
    questions = make_arith(3, difficulty=1)
    prompts = [prompt_ids(tokenizer, q, shots=2) for q in questions]
    assert common_prefix_len(prompts) > 200  # system prompt + 2 exemplars + the protocol's opening words
    store = PrefixStore()
    batched, _ = generate(model, tokenizer, questions, shots=2, max_new_tokens=24, prefix_store=store)
    again, _ = generate(model, tokenizer, questions[:2], shots=2, max_new_tokens=24, prefix_store=store)
    for p, g in zip(prompts, batched):  # plain transformers generation, one unpadded prompt, no shared cache
        alone = model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, top_k=None,
                               eos_token_id=stop_token_ids(model, tokenizer))[0, len(p):].tolist()
        assert g.completion_ids == alone[: len(g.completion_ids)] and len(alone) == len(g.completion_ids)
    assert [g.completion_ids for g in again] == [g.completion_ids for g in batched[:2]]
