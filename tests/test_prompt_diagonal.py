"""LLM-Check's prompt part (`recorder.PromptDiagonal`): per answer, layer and query head, the sum over the prompt's
rows but its last of ln(attention on the row's own token), recorded while prompts are prefilled, equals that sum of an
eager forward's `output_attentions` over the unpadded sequence: in teacher-forced capture (left padding), in static
generation (shared prefix and left padding) and in continuous batching (shared prefix prefilled once, the rest of
each prompt prefilled in groups); the prefix's rows count for every answer that shares it."""

import numpy as np
import torch

from attentropy.capture import capture
from attentropy.continuous import generate_continuous
from attentropy.data import load_questions
from attentropy.generate import PrefixStore, generate
from attentropy.hidden_states import HiddenSpec
from attentropy.layout import common_prefix_len
from attentropy.model import load_model
from attentropy.prompts import prompt_ids
from conftest import eager_forward

SEQS = [([1, 5, 9, 11, 3], [7, 8, 20, 21, 2]), ([1, 4], [30, 31, 32]), ([1, 6, 6, 6, 6, 6, 6, 6], [40])]


def eager_prompt_log_diag(model, prompt, completion):
    """[L, H]: sum over positions 0 .. len(prompt) - 2 of ln(attention on the own position), from eager attention."""
    att = torch.stack(eager_forward(model, prompt + completion[:-1]).attentions, 1)[0].double()  # [L, H, T, T]
    diag = torch.diagonal(att, dim1=-2, dim2=-1)[..., : len(prompt) - 1]  # [L, H, P - 1]
    return diag.log().sum(-1).numpy()


def assert_prompt_diagonal_matches_eager(model, prompts, completions, captures, atol_per_row=2e-5):
    for p, c, r in zip(prompts, completions, captures):
        assert r.prompt_diag_rows == len(p) - 1
        expected = eager_prompt_log_diag(model, p, c)
        assert r.prompt_log_diag.shape == expected.shape and r.prompt_log_diag.dtype == np.float64
        np.testing.assert_allclose(r.prompt_log_diag, expected, atol=atol_per_row * len(p), rtol=1e-5)


def test_capture_records_the_prompt_rows_log_diagonal(tiny_llama):
    prompts, completions = map(list, zip(*SEQS))
    results = capture(tiny_llama, prompts, completions)  # left padded: the padding rows must not count
    assert_prompt_diagonal_matches_eager(tiny_llama, prompts, completions, results)
    # not a constant: the prompts' sums differ, and are far from 0 (the sharpened heads attend elsewhere)
    assert results[0].prompt_log_diag.min() < -1.0
    alone = capture(tiny_llama, [prompts[2]], [completions[2]], chunk_bytes=1)[0]  # one row a chunk
    np.testing.assert_allclose(alone.prompt_log_diag, results[2].prompt_log_diag, atol=1e-4)


def facts_model(tiny_model_dir):
    model, tokenizer, _ = load_model(tiny_model_dir)
    questions = load_questions("facts", limit=5)
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    assert common_prefix_len(prompts) > 0 and len({len(p) for p in prompts}) > 1  # shared prefix and padding
    return model, tokenizer, questions


def test_static_generation_records_the_prompt_rows_log_diagonal(tiny_model_dir):
    model, tokenizer, questions = facts_model(tiny_model_dir)
    store = PrefixStore()
    gens, prompt_cache = generate(model, tokenizer, questions, max_new_tokens=4, record=True, prefix_store=store,
                                  hidden=HiddenSpec(layers=(0, 1)))
    prompts, completions = [g.prompt_ids for g in gens], [g.completion_ids for g in gens]
    assert_prompt_diagonal_matches_eager(model, prompts, completions, [g.capture for g in gens])
    # capture given generation's prompt cache carries generation's prompt part
    forced = capture(model, prompts, completions, prompt_cache=prompt_cache)
    for g, f in zip(gens, forced):
        np.testing.assert_array_equal(f.prompt_log_diag, g.capture.prompt_log_diag)
    # a second batch reuses the stored prefix (computed once) and still counts its rows
    again = generate(model, tokenizer, questions[:2], max_new_tokens=4, record=True, prefix_store=store)[0]
    for a, g in zip(again, gens):
        np.testing.assert_allclose(a.capture.prompt_log_diag, g.capture.prompt_log_diag, atol=1e-4)
    # one question alone: its prompt but the last token is the shared prefix, and the prefill has no other row
    alone = generate(model, tokenizer, questions[2:3], max_new_tokens=4, record=True)[0]
    assert_prompt_diagonal_matches_eager(model, [alone[0].prompt_ids], [alone[0].completion_ids], [alone[0].capture])


def test_continuous_batching_records_the_prompt_rows_log_diagonal(tiny_model_dir):
    model, tokenizer, questions = facts_model(tiny_model_dir)
    # with hidden states kept: their hooks must see only the rows' own forwards
    gens = list(generate_continuous(model, tokenizer, questions, batch_size=2, max_new_tokens=4,
                                    hidden=HiddenSpec(layers=(0, 1))))
    assert len(gens) == len(questions)
    assert_prompt_diagonal_matches_eager(model, [g.prompt_ids for g in gens], [g.completion_ids for g in gens],
                                         [g.capture for g in gens])
