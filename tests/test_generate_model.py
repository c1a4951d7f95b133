"""Prompts, generation on the embedded model, model loading and its errors."""

import numpy as np
import pytest
import torch

from conftest import assert_matches_eager

from attentropy.capture import capture
from attentropy.arith import make_arith
from attentropy.data import Question, make_facts
from attentropy.entropy import entropy_varentropy
from attentropy.generate import generate
from attentropy.model import ModelLoadError, load_model
from attentropy.prompts import chat_messages, exemplar_answer, stop_token_ids
from attentropy.recorder import Recorder


def test_factual_prompt_is_the_bare_question():
    q = make_facts(1)[0]
    assert chat_messages(q) == [{"role": "user", "content": q.question}]


def test_math_prompt_is_eight_shot_chat_ending_in_the_protocol_sentence():
    gsm8k = Question("gsm8k-00000", "gsm8k", "How many?", "3", reference="1+2=<<1+2=3>>3\n#### 3")
    arith = make_arith(1, difficulty=2)[0]
    for q in (gsm8k, arith):
        messages = chat_messages(q)
        assert len(messages) == 17 and [m["role"] for m in messages[:2]] == ["user", "assistant"]
        assert messages[-1]["content"].startswith("Given the following problem, reason and give a final answer")
        assert q.question in messages[-1]["content"]
        assert all(m["content"].split("\n")[-1].startswith("The final answer is ") for m in messages[1::2])
        assert not any("<<" in m["content"] for m in messages)
        assert len(chat_messages(q, shots=0)) == 1
    assert chat_messages(gsm8k)[1]["content"].endswith("The final answer is 72")  # GSM8K train, first row
    exemplars = [m["content"] for m in chat_messages(arith)[0:16:2]]
    tests = {q.question for q in make_arith(200, difficulty=2)}
    assert all(e.split("Problem: ")[1].split("\n")[0] not in tests for e in exemplars)  # the train split
    own = make_arith(8, split="train", kinds=[arith.metadata["kind"]], difficulty=arith.metadata["steps"])
    assert [e.split("Problem: ")[1].split("\n")[0] for e in exemplars] == [x.question for x in own]  # its kind's


def test_exemplar_answer_strips_calculator_annotations():
    assert exemplar_answer("She has 2*3 = <<2*3=6>>6 eggs.\n#### 6") == "She has 2*3 = 6 eggs.\nThe final answer is 6"


@pytest.mark.parametrize("group_bytes", [Recorder.group_bytes, 40_000, 1])
def test_generation_stops_at_end_of_turn_and_records_exact_statistics(embedded, group_bytes, monkeypatch):
    """Statistics read during generation (shared prefix + left padding + decode steps) equal a teacher-forced
    capture and an eager recomputation over each unpadded sequence, for every stored quantity; whether a decode
    step's layers are reduced all at once (the default at this size), in several groups (the last one partial),
    or one at a time."""
    monkeypatch.setattr(Recorder, "group_bytes", group_bytes)
    group_sizes, flush = [], Recorder.flush
    monkeypatch.setattr(Recorder, "flush", lambda self: (group_sizes.append(len(self._group_layers)), flush(self)))
    model, tokenizer, _ = embedded
    questions = [Question("facts-x", "facts", "What is the capital of France?", "Paris"),
                 Question("facts-y", "facts", "Say the single word: yes.", "yes"),
                 Question("facts-z", "facts", "Name three colours of the rainbow, briefly.", "red")]
    gens, prompt_cache = generate(model, tokenizer, questions, max_new_tokens=40, record=True, save_maps={1})
    group_sizes = [n for n in group_sizes if n]
    n_layers = model.config.num_hidden_layers
    if group_bytes == 40_000:  # several groups per step, the last one partial
        assert 1 < max(group_sizes) < n_layers and min(group_sizes) < max(group_sizes), sorted(set(group_sizes))
    else:
        assert set(group_sizes) == {1 if group_bytes == 1 else n_layers}
    stops = stop_token_ids(model, tokenizer)
    assert len({len(g.prompt_ids) for g in gens}) > 1  # padding is exercised
    for g in gens:
        assert all(t not in stops for t in g.completion_ids[:-1])
        if g.finish_reason == "stop":
            assert g.completion_ids[-1] in stops
        else:
            assert len(g.completion_ids) == 40 and g.completion_ids[-1] not in stops
        assert g.completion == tokenizer.decode(g.completion_ids, skip_special_tokens=True)
    assert "Paris" in gens[0].completion and gens[0].finish_reason == "stop"
    prompts, completions = [g.prompt_ids for g in gens], [g.completion_ids for g in gens]
    recorded = [g.capture for g in gens]
    assert_matches_eager(model, prompts, completions, recorded, atol=2e-4)
    forced = capture(model, prompts, completions, prompt_cache=prompt_cache, save_maps={1})
    for a, b in zip(recorded, forced):
        np.testing.assert_allclose(a.attn, b.attn, atol=2e-4)
        np.testing.assert_allclose(a.logprob, b.logprob, atol=2e-4)
    # the saved attention map of question 1: rows over visible keys, same in both paths, consistent with entropy
    m = recorded[1].attention_map[5]
    n, k = len(completions[1]), len(prompts[1]) + len(completions[1]) - 1
    assert m.shape == (model.config.num_attention_heads, n, k) and forced[1].attention_map[5].shape == m.shape
    np.testing.assert_allclose(m.astype(np.float32), forced[1].attention_map[5].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(m.astype(np.float32).sum(-1), 1.0, atol=3e-3)
    h, _ = entropy_varentropy(torch.tensor(m, dtype=torch.float32).log())
    np.testing.assert_allclose(h.numpy().T, recorded[1].attn[:, 5, :, 0], atol=2e-2)


def test_sampling_records_the_raw_distribution(embedded):
    model, tokenizer, _ = embedded
    questions = make_facts(2)
    gens, _ = generate(model, tokenizer, questions, max_new_tokens=12, do_sample=True, temperature=1.7,
                       top_p=0.9, seed=3, record=True)
    again, _ = generate(model, tokenizer, questions, max_new_tokens=12, do_sample=True, temperature=1.7,
                        top_p=0.9, seed=3)
    assert [g.completion_ids for g in gens] == [g.completion_ids for g in again]  # seeded
    assert_matches_eager(model, [g.prompt_ids for g in gens], [g.completion_ids for g in gens],
                         [g.capture for g in gens], atol=2e-4)  # temperature/top-p do not touch the statistics


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


@pytest.mark.parametrize("keys_by_dim", [False, True])
def test_growing_cache_layer_holds_what_transformers_dynamic_layer_holds(monkeypatch, keys_by_dim):
    """Appends past the buffer's room, crop, deepcopy, batch repeat and select: after each, the same keys/values
    as transformers' own DynamicLayer (which copies on every append); in either key layout."""
    import copy

    from transformers.cache_utils import DynamicLayer

    from attentropy.kv_cache import growing_layer_class

    monkeypatch.setattr(growing_layer_class(), "spare", 3)
    gen = torch.Generator().manual_seed(0)
    growing, plain = growing_layer_class()(), DynamicLayer()
    growing.keys_by_dim = keys_by_dim

    def step(op, *args):
        for layer in (growing, plain):
            if op == "update":
                out = layer.update(*args)
            else:
                getattr(layer, op)(*args)
        if op == "update":
            assert torch.equal(out[0], plain.keys) and torch.equal(out[1], plain.values)
        assert torch.equal(growing.keys, plain.keys) and torch.equal(growing.values, plain.values)

    def kv(batch, n):
        return torch.randn(batch, 2, n, 4, generator=gen), torch.randn(batch, 2, n, 4, generator=gen)

    step("update", *kv(1, 5))
    for n in (1, 1, 1, 1, 2, 4, 1):
        step("update", *kv(1, n))
    step("crop", -4)
    step("update", *kv(1, 2))
    growing, plain = copy.deepcopy(growing), copy.deepcopy(plain)
    step("update", *kv(1, 1))
    step("batch_repeat_interleave", 3)
    for _ in range(5):
        step("update", *kv(3, 1))
    step("batch_select_indices", torch.tensor([2, 0]))
    step("update", *kv(2, 1))  # a new buffer (select replaced the keys), with room for `spare` = 3 more
    start = growing.keys.data_ptr()
    for _ in range(3):
        step("update", *kv(2, 1))
        assert growing.keys.data_ptr() == start  # appended in place, no copy
        assert (growing.keys.stride(-1) == 1) != keys_by_dim  # [D, K] rows when keys_by_dim


def test_shared_prefix_batching_generates_what_each_prompt_generates_alone(embedded, monkeypatch):
    from attentropy.generate import PrefixStore
    from attentropy.kv_cache import growing_layer_class
    from attentropy.layout import common_prefix_len
    from attentropy.prompts import prompt_ids

    monkeypatch.setattr(growing_layer_class(), "spare", 5)  # the cache's buffers grow several times
    model, tokenizer, _ = embedded
    questions = make_arith(3, kinds=["add"])  # one kind: its exemplars are the shared prefix
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


def test_min_new_tokens_generates_what_transformers_min_new_tokens_generates(embedded):
    """attentropy's in-place stop suppression (`min_new_tokens`) against transformers' own processor, greedy, on
    each unpadded prompt: the same tokens, and no stop token before the minimum."""
    from attentropy.prompts import prompt_ids

    model, tokenizer, _ = embedded
    stops = stop_token_ids(model, tokenizer)
    questions = [Question("facts-y", "facts", "Say the single word: yes.", "yes"),
                 Question("facts-x", "facts", "What is the capital of France?", "Paris")]
    plain, _ = generate(model, tokenizer, questions, max_new_tokens=20)
    assert all(g.finish_reason == "stop" and len(g.completion_ids) < 12 for g in plain)  # they would stop early
    gens, _ = generate(model, tokenizer, questions, max_new_tokens=20, min_new_tokens=12)
    for q, g in zip(questions, gens):
        p = prompt_ids(tokenizer, q)
        alone = model.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=12, do_sample=False,
                               top_k=None, eos_token_id=stops)[0, len(p):].tolist()
        assert g.completion_ids == alone
        assert len(g.completion_ids) >= 12 and all(t not in stops for t in g.completion_ids[:11])


def test_packed_linears_generate_what_plain_linears_generate(embedded, monkeypatch):
    """From PACKED_MIN_BATCH rows on, decode steps multiply by MKL-packed weights: the same tokens and statistics
    (up to float32 rounding) as `F.linear`, every linear that ran packed once, the model's forwards restored after,
    also when generation raises."""
    import attentropy.packed_linears as packing

    model, tokenizer, _ = embedded
    assert packing._mkl_linear_available()  # the CPU torch this project installs has the op: no silent fallback
    questions = make_facts(5, seed=2)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for m in linears:  # packs left by earlier tests on the shared model (other batch sizes)
        m.__dict__.pop("_mkl_packed", None)
    try:
        monkeypatch.setattr(packing, "PACKED_MIN_BATCH", 10**9)
        plain, _ = generate(model, tokenizer, questions, max_new_tokens=24, record=True)
        assert not any("_mkl_packed" in m.__dict__ for m in linears)
        monkeypatch.setattr(packing, "PACKED_MIN_BATCH", 4)
        packed, _ = generate(model, tokenizer, questions, max_new_tokens=24, record=True)
        assert all(m.__dict__["_mkl_packed"][0] == 5 for m in linears)  # every linear of the text model ran packed
        weights = [m._mkl_packed[1] for m in linears]
        generate(model, tokenizer, questions[:3], max_new_tokens=4)  # below the threshold: plain, packs kept
        again, _ = generate(model, tokenizer, questions, max_new_tokens=24, record=True)
        assert all(m._mkl_packed[1] is w for m, w in zip(linears, weights))  # packed once, reused
        for a, b, c in zip(plain, packed, again):
            assert a.completion_ids == b.completion_ids == c.completion_ids
            np.testing.assert_allclose(b.capture.attn, a.capture.attn, atol=1e-4)
            np.testing.assert_allclose(b.capture.logprob, a.capture.logprob, atol=1e-4)
            np.testing.assert_array_equal(b.capture.attn, c.capture.attn)
        assert not any("forward" in m.__dict__ for m in model.modules())
        with pytest.raises(KeyboardInterrupt), packing.packed_linears(model, 8):
            assert all("forward" in m.__dict__ for m in linears)
            raise KeyboardInterrupt
        assert not any("forward" in m.__dict__ for m in model.modules())
    finally:
        for m in linears:
            m.__dict__.pop("_mkl_packed", None)
