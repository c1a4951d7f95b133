"""Sliding-window attention (Gemma 3's local layers) on a tiny random Gemma 3 whose window (6 tokens) is shorter than
every prompt, so that it binds: teacher-forced capture, static and continuous generation record exactly what eager
attention (`output_attentions`) computes on each sequence alone, over the keys each layer attends to (the window
for local layers, whatever the padding or masked columns of a batch); the run's normalisations use those keys.
Attention attentropy cannot record exactly is refused, naming the layer type or setting."""

import numpy as np
import pytest
import torch

from conftest import IdsTokenizer, assert_matches_eager, assert_prompt_diagonal_matches_eager

import attentropy.continuous as continuous_module
import attentropy.generate as generate_module
from attentropy.attention import recorded_layers, recording
from attentropy.capture import capture
from attentropy.continuous import generate_continuous
from attentropy.data import Question
from attentropy.generate import generate
from attentropy.kv_cache import growing_cache
from attentropy.recorder import Recorder
from attentropy.windows import UnsupportedAttention, attended_keys, layer_windows

WINDOW = 6
TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def tiny_gemma3_config(**overrides):
    from transformers import Gemma3TextConfig

    kwargs = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, layer_types=TYPES,
                  max_position_embeddings=256, query_pre_attn_scalar=16, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    kwargs.update(overrides)
    return Gemma3TextConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_gemma3():
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    model = Gemma3ForCausalLM._from_config(tiny_gemma3_config(), attn_implementation="sdpa").eval()
    with torch.no_grad():  # sharper attention than the default init so rows are far from uniform
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    return model


@pytest.fixture
def ids_prompts(monkeypatch):
    """Questions whose prompts are given as ids, and end at token 2."""
    for module in (generate_module, continuous_module):
        monkeypatch.setattr(module, "prompt_ids", lambda tokenizer, q, shots=8: list(q.metadata["ids"]))
        monkeypatch.setattr(module, "stop_token_ids", lambda model, tokenizer: [2])


def random_ids(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def assert_within_the_window(model, results):
    """Each layer's rows attend to at most its attended keys (entropy <= ln of them), and the window binds: some
    rows of the local layers attend to fewer keys than the global layer's."""
    windows = layer_windows(model.config, recorded_layers(model))
    keys = [attended_keys(r.n_keys, windows) for r in results]  # [n, L] each
    for r, k in zip(results, keys):
        assert (r.attn[..., 0] <= np.log(k)[:, :, None] + 1e-5).all()
    keys = np.concatenate(keys)
    assert (keys[:, [0, 2, 3]] < keys[:, [1]]).any()


def test_layer_windows_follow_the_layer_types(tiny_gemma3):
    assert layer_windows(tiny_gemma3.config, recorded_layers(tiny_gemma3)) == [WINDOW, None, WINDOW, WINDOW]
    assert attended_keys(np.array([3, 6, 7, 40]), [WINDOW, None]).tolist() == [[3, 3], [6, 6], [6, 7], [6, 40]]


def test_teacher_forced_capture_of_a_padded_batch_equals_eager(tiny_gemma3):
    prompts = random_ids((9, 14, 5, 20), seed=1)
    completions = random_ids((7, 3, 12, 4), seed=2)
    results = capture(tiny_gemma3, prompts, completions)  # left padded: padding must not shorten any window
    assert_matches_eager(tiny_gemma3, prompts, completions, results)
    assert_within_the_window(tiny_gemma3, results)
    # LLM-Check's prompt rows: a local layer's own-token attention is normalised over its window too
    assert_prompt_diagonal_matches_eager(tiny_gemma3, prompts, completions, results)


def test_static_and_continuous_generation_equal_eager(tiny_gemma3, ids_prompts, monkeypatch):
    compactions, compact = [], continuous_module._compact
    monkeypatch.setattr(continuous_module, "_compact",
                        lambda *args, **kwargs: (compactions.append(args[4:6]), compact(*args, **kwargs))[1])
    monkeypatch.setattr(continuous_module, "COMPACT_SLACK", 8)
    tails = random_ids((2, 4, 1, 3, 9, 7), seed=3)
    questions = [Question(f"g{i}", "prompts", "", "", metadata={"ids": [1, 5, 9, 11, 13, 17, 19] + t})
                 for i, t in enumerate(tails)]  # a shared prefix longer than the window, then each own tail
    continuous = {g.question.id: g for g in generate_continuous(tiny_gemma3, IdsTokenizer(), questions, batch_size=2,
                                                                max_new_tokens=14)}
    assert compactions, "the cache was never compacted: the test does not exercise it"
    static = []
    for lo in range(0, len(questions), 3):  # left padded after the shared prefix
        static += generate(tiny_gemma3, IdsTokenizer(), questions[lo:lo + 3], max_new_tokens=14, record=True)[0]
    for s in static:
        c = continuous[s.question.id]
        assert c.completion_ids == s.completion_ids
        np.testing.assert_array_equal(c.capture.n_keys, s.capture.n_keys)
        for field in ("attn", "logprob", "logit_entropy", "logit_varentropy"):
            np.testing.assert_allclose(getattr(c.capture, field), getattr(s.capture, field), atol=1e-4, rtol=1e-5,
                                       err_msg=f"{s.question.id} {field}")
    assert_matches_eager(tiny_gemma3, [g.prompt_ids for g in static], [g.completion_ids for g in static],
                         [g.capture for g in static])
    assert_within_the_window(tiny_gemma3, [g.capture for g in static])
    for gens in (static, list(continuous.values())):  # the shared prefix's rows (prefilled once) included
        assert_prompt_diagonal_matches_eager(tiny_gemma3, [g.prompt_ids for g in gens],
                                             [g.completion_ids for g in gens], [g.capture for g in gens])


def test_transformers_own_sliding_mask_would_count_padding(tiny_gemma3, ids_prompts, monkeypatch):
    """Why attentropy applies the window itself: transformers' sliding mask counts cache columns, so a row padded
    after the shared prefix sees fewer of its tokens than the model does on the sequence alone (the tests above
    fail with it)."""
    from transformers.masking_utils import eager_mask

    from attentropy import attention

    questions = [Question(f"p{i}", "prompts", "", "", metadata={"ids": [1, 5, 9, 11, 13, 17, 19] + t})
                 for i, t in enumerate(random_ids((1, 9), seed=4))]
    monkeypatch.setattr(attention, "causal_mask", eager_mask)  # transformers' own windows
    monkeypatch.setattr(attention, "window_mask", lambda mask, n_keys, window: mask[..., :n_keys])
    try:
        padded, alone = generate(tiny_gemma3, IdsTokenizer(), questions, max_new_tokens=6, min_new_tokens=6,
                                 record=True)[0]
    finally:
        monkeypatch.undo()
        attention.register()
    with pytest.raises(AssertionError):
        assert_matches_eager(tiny_gemma3, [padded.prompt_ids], [padded.completion_ids], [padded.capture])
    assert_matches_eager(tiny_gemma3, [alone.prompt_ids], [alone.completion_ids], [alone.capture])


@pytest.mark.parametrize("change, named", [
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
    (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention", "full_attention"],
          attention_chunk_size=4), "layer 1 of Gemma3TextConfig is of type 'chunked_attention'"),
])
def test_attention_it_cannot_record_exactly_is_refused(change, named):
    from transformers import Gemma3ForCausalLM

    model = Gemma3ForCausalLM._from_config(tiny_gemma3_config(), attn_implementation="sdpa").eval()
    for key, value in change.items():
        setattr(model.config, key, value)
    recorder = Recorder(torch.ones(1, 3, dtype=torch.long), all_rows=True, max_rows=1)
    with pytest.raises(UnsupportedAttention, match=named):
        with recording(model, recorder):
            pass
    with pytest.raises(UnsupportedAttention, match=named):
        capture(model, [[1, 5, 7]], [[9, 2]])


def test_a_cache_layer_it_does_not_handle_is_refused(tiny_gemma3, monkeypatch):
    from transformers.cache_utils import DynamicLayer

    class OtherLayer(DynamicLayer):
        pass

    import transformers

    original = transformers.DynamicCache.__init__

    def other_layers(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.layers[2] = OtherLayer()

    monkeypatch.setattr(transformers.DynamicCache, "__init__", other_layers)
    with pytest.raises(UnsupportedAttention, match="cache layer 2 of Gemma3ForCausalLM is a OtherLayer"):
        growing_cache(tiny_gemma3)


def test_a_run_records_the_windows_and_normalises_by_the_attended_keys(tmp_path, tokenizer):
    """`attentropy run` on a model directory with sliding-window layers (continuous batching): config.json names
    each layer's window, and entropy / ln K, the instrument's features and the baselines use each layer's K."""
    from transformers import Gemma3ForCausalLM

    from attentropy.answers import load_answers
    from attentropy.statistic_values import token_values
    from attentropy.detectors.head_entropy import shannon_entropy
    from attentropy.run import run_benchmark
    from attentropy.store import load_run

    torch.manual_seed(0)
    model = Gemma3ForCausalLM._from_config(tiny_gemma3_config(vocab_size=len(tokenizer), pad_token_id=2,
                                                              eos_token_id=2))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    run_benchmark("facts", tmp_path / "run", model=str(tmp_path / "model"), limit=3, batch_size=2, max_new_tokens=4,
                  progress=False)
    run = load_run(tmp_path / "run")
    assert run.config["capture"]["windows"] == [WINDOW, None, WINDOW, WINDOW]
    keys = np.minimum(run.tokens.n_keys.to_numpy()[:, None], [WINDOW, 10 ** 9, WINDOW, WINDOW])
    assert (keys[:, 0] == WINDOW).all() and (keys[:, 1] > WINDOW).all()  # every prompt is longer than the window
    entropy = run.attn("entropy")
    np.testing.assert_allclose(token_values(run, "entropy_norm"), entropy / np.log(keys)[:, :, None], rtol=1e-6)
    np.testing.assert_allclose(token_values(run, "entropy_norm", [1, 3]), entropy[:, [1, 3]]
                               / np.log(keys[:, [1, 3]])[:, :, None], rtol=1e-6)
    grade_free = load_answers([tmp_path / "run"], require_labels=False)[0]
    np.testing.assert_array_equal(grade_free.keys, keys)
    np.testing.assert_allclose(grade_free.attn["entropy_norm"], entropy / np.log(keys)[:, :, None], rtol=1e-6)
    np.testing.assert_allclose(shannon_entropy(grade_free), entropy, rtol=1e-5)
    # Lookback Lens' prompt / generated ratio over the keys in the window: K - t prompt keys, t generated ones
    from attentropy.detectors.lookback_lens import lookback_ratios

    first = grade_free.answers.iloc[0]
    rows = slice(first.start, first.start + first.n_tokens)
    prompt = grade_free.attn["prompt_mass"][rows].astype(np.float64)  # [n, L, H]
    k, t = keys[rows][:, :, None].astype(np.float64), grade_free.tokens.pos.to_numpy()[rows][:, None, None]
    ratio = (prompt / (k - t)) / (prompt / (k - t) + np.where(t > 0, (1 - prompt) / np.maximum(t, 1), 0))
    np.testing.assert_allclose(lookback_ratios(grade_free)[0], ratio.mean(0).reshape(-1), rtol=1e-9)


def test_the_local_layers_of_one_forward_share_one_window_mask():
    from attentropy import attention

    mask = torch.zeros(1, 1, 1, 10)
    mask[..., :2] = torch.finfo(mask.dtype).min  # two masked columns (padding) before 8 visible keys
    first = attention.window_mask(mask, 10, 3)
    assert (first[0, 0, 0] == 0).nonzero().squeeze(-1).tolist() == [7, 8, 9]
    assert attention.window_mask(mask, 10, 3) is first  # the same mask again: computed once
    assert attention.window_mask(mask.clone(), 10, 3) is not first
