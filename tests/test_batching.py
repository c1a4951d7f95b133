"""Continuous batching: an answer's tokens and statistics do not depend on the rows it shared the batch with.
Greedy continuous generation gives the same tokens as static batching and the same statistics within float32
rounding, also across a compaction of the cache, with the 8-shot shared prefix, without any shared prefix, under a
memory bound and on Llama 3.2 Vision's architecture (Mllama: cross-attention layers that must stay empty); and it
equals an eager recomputation of each sequence alone. Sampled, an answer depends on its question and the seed only,
and its tokens follow the warped next-token distribution."""

from dataclasses import replace

import numpy as np
import torch
from scipy import stats

from conftest import assert_matches_eager, assert_matches_eager_mllama

import attentropy.continuous as continuous_module
import attentropy.generate as generate_module
from attentropy.arith import make_arith
from attentropy.continuous import generate_continuous
from attentropy.data import Question, load_questions
from attentropy.generate import PrefixStore, generate
from attentropy.hidden_states import HiddenSpec
from attentropy.layout import common_prefix_len
from attentropy.prompts import prompt_ids
from attentropy.sampling import Sampling

HIDDEN = HiddenSpec(layers=(0, 12, 30), token_layers=(15,))
FIELDS = ("attn", "logprob", "logit_entropy", "logit_varentropy", "hidden_last_prompt", "hidden_mean")


def static_batches(model, tokenizer, questions, batch_size, max_new_tokens):
    store, out = PrefixStore(), []
    for lo in range(0, len(questions), batch_size):
        out += generate(model, tokenizer, questions[lo:lo + batch_size], max_new_tokens=max_new_tokens, record=True,
                        hidden=HIDDEN, prefix_store=store)[0]
    return out


def assert_same(static, continuous):
    by_id = {g.question.id: g for g in continuous}
    assert sorted(by_id) == sorted(g.question.id for g in static)  # every question once
    for s in static:
        c = by_id[s.question.id]
        assert c.completion_ids == s.completion_ids and c.finish_reason == s.finish_reason
        assert c.completion == s.completion and c.prompt_ids == s.prompt_ids
        np.testing.assert_array_equal(c.capture.n_keys, s.capture.n_keys)
        for field in FIELDS:
            np.testing.assert_allclose(getattr(c.capture, field), getattr(s.capture, field), atol=1e-4, rtol=1e-5,
                                       err_msg=f"{s.question.id} {field}")
        # float16 rows: equal up to one float16 step of the float32 values' rounding
        a, b = c.capture.hidden_tokens.astype(np.float32), s.capture.hidden_tokens.astype(np.float32)
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)


def test_continuous_batching_equals_static_across_compactions(embedded, monkeypatch):
    model, tokenizer, _ = embedded
    compactions, compact = [], continuous_module._compact
    monkeypatch.setattr(continuous_module, "_compact",
                        lambda *args, **kwargs: (compactions.append(args[4:6]), compact(*args, **kwargs))[1])
    questions = load_questions("facts", limit=30)
    # 16 new tokens: enough for several answers of the suite's first questions to stop early, at different lengths
    continuous = list(generate_continuous(model, tokenizer, questions, batch_size=3, max_new_tokens=16,
                                          hidden=HIDDEN))
    assert compactions, "the cache was never compacted: the test does not exercise it"
    assert [g.question.id for g in continuous] != [q.id for q in questions]  # answers end out of order
    static = static_batches(model, tokenizer, questions, 3, 16)
    assert {g.finish_reason for g in static} == {"stop", "length"}
    assert_same(static, continuous)


def test_continuous_batching_with_the_8_shot_prefix_equals_static_and_eager(embedded):
    model, tokenizer, _ = embedded
    questions = make_arith(5, kinds=["rate"])  # one kind: one exemplar set, the 8-shot prefix shared
    continuous = list(generate_continuous(model, tokenizer, questions, batch_size=2, max_new_tokens=24,
                                          hidden=HIDDEN))
    assert_same(static_batches(model, tokenizer, questions, 2, 24), continuous)
    some = continuous[:2]
    assert_matches_eager(model, [g.prompt_ids for g in some], [g.completion_ids for g in some],
                         [g.capture for g in some], atol=2e-4)


def test_continuous_batching_without_a_shared_prefix(embedded):
    """Raw prompts that share no first token: each row's first visible key is its own prompt's first token."""
    model, tokenizer, _ = embedded
    texts = ["Once upon a time", "The capital of France is", "1, 2, 3,", "Dogs are", "In 1969,"]
    questions = [Question(f"p{i}", "prompts", t, "", metadata={"raw": True}) for i, t in enumerate(texts)]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    assert len({p[0] for p in prompts}) > 1  # no common prefix
    continuous = list(generate_continuous(model, tokenizer, questions, batch_size=2, max_new_tokens=12,
                                          hidden=HIDDEN))
    assert_same(static_batches(model, tokenizer, questions, 2, 12), continuous)


def test_max_batch_tokens_bounds_the_prefix_and_rows_times_their_columns(embedded):
    model, tokenizer, _ = embedded
    questions = load_questions("facts", limit=8)
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    prefix = common_prefix_len(prompts)
    widest = max(len(p) - prefix for p in prompts) + 8  # a row's own columns with its longest answer
    shapes = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["attention_mask"].shape))
        if kwargs.get("attention_mask") is not None else None, with_kwargs=True)
    try:
        most = int(widest + max(continuous_module.COMPACT_FRACTION * widest, continuous_module.COMPACT_SLACK))
        for bound in (None, prefix + 2 * most):
            shapes.clear()
            out = list(generate_continuous(model, tokenizer, questions, batch_size=4, max_new_tokens=8,
                                           max_batch_tokens=bound))
            assert len(out) == 8
            rows = {r for r, _ in shapes}
            if bound is None:
                assert rows == {4}
            else:  # memory: the shared prefix once and rows x their own columns, at every decode step
                assert rows == {2} and max(prefix + r * (c - prefix) for r, c in shapes) <= bound, shapes
    finally:
        hook.remove()


class IdsTokenizer:
    """Prompts given as ids (`metadata["ids"]`), answers decoded as ids: what generation needs of a tokenizer."""

    pad_token_id, eos_token_id = 0, 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_continuous_batching_on_mllama_leaves_cross_attention_layers_out(tiny_mllama, monkeypatch):
    """Text-only Mllama skips a cross-attention layer only while its cache is empty: continuous batching must not
    give those layers keys (nor a shared prefix), and records the self-attention layers under their true indices."""
    for module in (generate_module, continuous_module):  # static and continuous batching read them
        monkeypatch.setattr(module, "prompt_ids", lambda tokenizer, q, shots=8: list(q.metadata["ids"]))
        monkeypatch.setattr(module, "stop_token_ids", lambda model, tokenizer: [2])
    tails = [[20, 21], [22, 23, 24, 25], [26], [27, 28, 29], [30, 31, 32, 33, 34, 35]]
    questions = [Question(f"m{i}", "prompts", "", "", metadata={"ids": [1, 5, 9, 11, 13] + t})
                 for i, t in enumerate(tails)]
    continuous = {g.question.id: g for g in generate_continuous(tiny_mllama, IdsTokenizer(), questions, batch_size=2,
                                                                max_new_tokens=10)}
    static = []
    for lo in range(0, len(questions), 2):
        static += generate(tiny_mllama, IdsTokenizer(), questions[lo:lo + 2], max_new_tokens=10, record=True)[0]
    for s in static:
        c = continuous[s.question.id]
        assert c.completion_ids == s.completion_ids
        for field in ("attn", "logprob", "logit_entropy", "logit_varentropy"):
            np.testing.assert_allclose(getattr(c.capture, field), getattr(s.capture, field), atol=1e-4, rtol=1e-5,
                                       err_msg=f"{s.question.id} {field}")
    some = [continuous["m1"], continuous["m4"]]
    assert_matches_eager_mllama(tiny_mllama, [g.prompt_ids for g in some], [g.completion_ids for g in some],
                                [g.capture for g in some])


def test_sampled_continuous_batching_depends_on_the_question_and_seed_only(embedded):
    model, tokenizer, _ = embedded
    questions = load_questions("facts", limit=8)
    hot = Sampling(do_sample=True, temperature=1.5, top_p=0.95, seed=3)

    def answers(qs, batch_size, sampling=hot):
        return {g.question.id: g for g in generate_continuous(model, tokenizer, qs, batch_size=batch_size,
                                                              max_new_tokens=12, sampling=sampling)}

    first = answers(questions, 3)
    other_rows = answers(questions[::-1], 4)  # other neighbours, order and batch size
    for qid, g in first.items():
        assert other_rows[qid].completion_ids == g.completion_ids
        np.testing.assert_allclose(other_rows[qid].capture.attn, g.capture.attn, atol=1e-4, rtol=1e-5)
    greedy = answers(questions, 3, Sampling())
    assert sum(first[q].completion_ids != greedy[q].completion_ids for q in first) >= 4  # it samples
    reseeded = answers(questions, 3, replace(hot, seed=4))
    assert sum(reseeded[q].completion_ids != first[q].completion_ids for q in first) >= 4
    top_only = answers(questions, 3, replace(hot, top_p=0.0))  # top-p 0 keeps the most likely token alone
    assert all(top_only[q].completion_ids == greedy[q].completion_ids for q in first)
    some = [first[q.id] for q in questions[:3]]  # the statistics are the raw distribution's, the drawn tokens'
    assert_matches_eager(model, [g.prompt_ids for g in some], [g.completion_ids for g in some],
                         [g.capture for g in some], atol=2e-4)


def test_sampled_first_tokens_follow_the_warped_distribution(embedded):
    """400 copies of one question under different ids (so different seeds) draw their first token from softmax(logp
    / T) restricted to the top-p nucleus: tokens outside it never come, the frequencies fit its probabilities."""
    model, tokenizer, _ = embedded
    question = load_questions("facts", limit=1)[0]
    copies = [replace(question, id=f"copy{i}") for i in range(400)]
    sampling = Sampling(do_sample=True, temperature=2.0, top_p=0.8, seed=0)
    drawn = [g.completion_ids[0] for g in generate_continuous(model, tokenizer, copies, batch_size=16,
                                                              max_new_tokens=1, sampling=sampling)]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids(tokenizer, question)])).logits[0, -1].float()
    p = torch.softmax(logits / 2.0, -1).double()
    order = p.argsort(descending=True)
    nucleus = order[: int((p[order].cumsum(0) < 0.8).sum()) + 1].tolist()  # smallest top set reaching 0.8
    assert set(drawn) <= set(nucleus) and len(set(drawn)) > 1
    expected = p[nucleus] / p[nucleus].sum()
    counts = np.array([drawn.count(t) for t in nucleus])
    big = (expected * len(drawn) >= 5).numpy()  # the chi-square test's bins: the rare tokens pooled into one
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected.numpy()[big], expected.numpy()[~big].sum()) * len(drawn)
    keep = wanted > 0
    assert stats.chisquare(observed[keep], wanted[keep]).pvalue > 1e-3
