"""capture() against recomputation from eager attention weights, on a tiny random Llama and a tiny Mllama; the CUDA
half-precision branch of the recording attention, for shapes and dtypes, on meta tensors."""

import numpy as np
import pytest
import torch

from conftest import assert_matches_eager, assert_matches_eager_mllama

from attentropy.attention import recorded_layers, recording
from attentropy.capture import capture
from attentropy.entropy import entropy_varentropy
from attentropy.recorder import Recorder


SEQS = [([1, 5, 9, 11, 3], [7, 8, 20, 21, 2]), ([1, 4], [30, 31, 32]), ([1, 6, 6, 6, 6, 6, 6, 6], [40])]


def test_every_statistic_equals_eager_recomputation(tiny_llama):
    prompts, completions = zip(*SEQS)
    results = capture(tiny_llama, list(prompts), list(completions))
    assert_matches_eager(tiny_llama, prompts, completions, results)
    for r in results:
        assert np.isfinite(r.attn).all() and np.isfinite(r.logprob).all()
        assert np.isfinite(r.logit_entropy).all() and np.isfinite(r.logit_varentropy).all()


def test_padded_batch_equals_each_sequence_alone(tiny_llama):
    prompts, completions = zip(*SEQS)
    batched = capture(tiny_llama, list(prompts), list(completions))
    for b, (p, c) in enumerate(SEQS):
        alone = capture(tiny_llama, [p], [c])[0]
        np.testing.assert_allclose(batched[b].attn, alone.attn, atol=1e-5)
        np.testing.assert_allclose(batched[b].logprob, alone.logprob, atol=1e-5)


def test_chunked_rows_give_the_same_numbers(tiny_llama):
    prompts, completions = zip(*SEQS)
    whole = capture(tiny_llama, list(prompts), list(completions))
    one_row_at_a_time = capture(tiny_llama, list(prompts), list(completions), chunk_bytes=1)
    for a, b in zip(whole, one_row_at_a_time):
        np.testing.assert_allclose(a.attn, b.attn, atol=1e-6)


def test_statistics_are_per_query_head_under_gqa(tiny_llama):
    assert tiny_llama.config.num_key_value_heads < tiny_llama.config.num_attention_heads
    r = capture(tiny_llama, [SEQS[0][0]], [SEQS[0][1]])[0]
    assert r.attn.shape[2] == tiny_llama.config.num_attention_heads
    # heads sharing one key/value head still have their own distributions
    assert not np.allclose(r.attn[:, :, 0, 0], r.attn[:, :, 1, 0])


def test_mass_statistics_are_probabilities(tiny_llama):
    prompts, completions = zip(*SEQS)
    for r in capture(tiny_llama, list(prompts), list(completions)):
        masses = r.attn[..., 2:]
        assert (masses >= -1e-6).all() and (masses <= 1 + 1e-5).all()
        assert (r.attn[..., 0] <= np.log(r.n_keys)[:, None, None] + 1e-4).all()  # entropy <= ln K


def test_logits_are_unchanged_by_the_capture_path(tiny_llama):
    ids = torch.tensor([SEQS[0][0] + SEQS[0][1]])
    with torch.no_grad():
        reference = tiny_llama(ids).logits
        recorder = Recorder(torch.ones(1, 5, dtype=torch.long), all_rows=True, max_rows=ids.shape[1],
                            chunk_bytes=1 << 10)
        with recording(tiny_llama, recorder):
            captured = tiny_llama(ids).logits
    assert tiny_llama.config._attn_implementation == "sdpa"  # restored
    assert sum(chunk.shape[2] for chunk in recorder.attn[0]) == ids.shape[1]  # every row through the explicit path
    torch.testing.assert_close(captured, reference, atol=1e-5, rtol=1e-5)


def test_save_maps_returns_the_full_attention_rows(tiny_llama):
    p, c = SEQS[0]
    r = capture(tiny_llama, [p, SEQS[1][0]], [c, SEQS[1][1]], save_maps={0})
    assert set(r[0].attention_map) == set(recorded_layers(tiny_llama)) and r[1].attention_map is None
    m = r[0].attention_map[1]  # [H, n, K]
    assert m.shape == (4, len(c), len(p) + len(c) - 1)
    np.testing.assert_allclose(m.astype(np.float32).sum(-1), 1.0, atol=2e-3)
    h, _ = entropy_varentropy(torch.tensor(m, dtype=torch.float32).log())
    np.testing.assert_allclose(h.numpy().T, r[0].attn[:, 1, :, 0], atol=5e-3)


def test_mllama_records_true_layer_indices_and_skips_cross_attention(tiny_mllama):
    assert recorded_layers(tiny_mllama) == [0, 2, 4]
    prompts, completions = [[1, 5, 9], [1, 4, 6, 7]], [[7, 8, 2], [30, 2]]
    results = capture(tiny_mllama, prompts, completions)
    assert_matches_eager_mllama(tiny_mllama, prompts, completions, results)


def test_capture_rejects_empty_completion(tiny_llama):
    with pytest.raises(ValueError, match="non-empty"):
        capture(tiny_llama, [[1, 2]], [[]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefix", [0, 3])
def test_the_cuda_half_precision_path_keeps_shapes_and_dtypes(monkeypatch, dtype, prefix):
    """The CUDA branch (half-precision queries, keys and values multiplied with float32 accumulation and output,
    `torch.bmm(..., out_dtype=torch.float32)`) cannot run without a GPU; on meta tensors, which carry shapes and
    dtypes but no data, every operation of a decode step's recording attention (and of a shared prefix's products)
    is checked for shape and dtype: statistics in float32, the output in the model's dtype. Its numbers are
    `bench/gpu_check.py`'s to measure."""
    from types import SimpleNamespace

    import attentropy.attention as attention_module

    monkeypatch.setattr(attention_module, "_half_on_cuda", lambda x: x.dtype in (torch.bfloat16, torch.float16))
    batch, heads, kv_heads, dim, own = 2, 4, 2, 8, 5
    meta = dict(device="meta", dtype=dtype)
    recorder = Recorder(torch.ones(batch, 2, dtype=torch.long), all_rows=False, max_rows=4, layers=[0], ring=True)
    recorder.prompt_end = torch.zeros(batch, dtype=torch.long)
    if prefix:  # the shared prefix as continuous batching holds it, float32 (`kv_cache.shared_keys_values`)
        recorder.shared_prefix = {0: (torch.empty(kv_heads, dim, prefix, device="meta"),
                                      torch.empty(kv_heads, prefix, dim, device="meta"))}
    module = SimpleNamespace(is_causal=True, training=False, layer_idx=0)
    keys = torch.empty(batch, kv_heads, dim, own + 3, **meta).transpose(2, 3)[:, :, :own]  # `keys_by_dim` layout
    products, product = [], attention_module._product
    monkeypatch.setattr(attention_module, "_product", lambda a, b: products.append(product(a, b)) or products[-1])
    monkeypatch.setattr(attention_module, "_RECORDER", recorder)
    output, _ = attention_module.attentropy_attention(
        module, torch.empty(batch, heads, 1, dim, **meta), keys, torch.empty(batch, kv_heads, own, dim, **meta),
        torch.empty(batch, 1, 1, prefix + own, **meta), scaling=dim ** -0.5)
    recorder.end_step()
    assert output.shape == (batch, 1, heads, dim) and output.dtype == dtype
    assert recorder.attn_buffer.dtype == torch.float32 and recorder.attn_buffer.shape[:4] == (1, batch, heads, 4)
    # scores and output against the rows' own keys (and the prefix's), all accumulated and returned in float32
    assert len(products) == (4 if prefix else 2) and {p.dtype for p in products} == {torch.float32}
