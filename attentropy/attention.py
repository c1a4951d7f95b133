"""The recording attention: an attention function registered with transformers (`attentropy_attention`, with its
mask function) that returns the usual output and hands each recorded query row's probabilities to the active
recorder (`recording`), which reduces them to their statistics; and the layers it records (`recorded_layers`).
The attention matrices are never kept."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "attentropy"

_RECORDER = None  # the active `recorder.Recorder`, set by `recording`
_PROMPT_DIAGONAL = None  # the active `recorder.PromptDiagonal`, set by `recording`


def key_rows(key: torch.Tensor) -> torch.Tensor:
    """Keys [B, H, K, D] with contiguous [K, D] rows, for sdpa: the recording generation stores them as [D, K]
    (`GrowingLayer.keys_by_dim`), a layout on which sdpa's CPU kernel is many times slower."""
    return key if key.stride(-1) == 1 else key.contiguous()


def _float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (batched) in float32, b being keys or values. On CUDA, with keys/values in the model's half precision,
    the operands are multiplied in it, the products accumulated and returned in float32 (cuBLAS, `out_dtype`):
    for queries @ keys the same sums as on float32 copies (a product of two half-precision numbers is exact in
    float32), without converting the cache every layer and step; probabilities @ values rounds the probabilities
    to half precision for that product only, as flash attention does (the statistics are computed before). Elsewhere
    both are converted to float32 (the CPU has no such product)."""
    if _half_on_cuda(b):
        return torch.bmm(a.to(b.dtype), b, out_dtype=torch.float32)
    return torch.bmm(_float32(a), _float32(b))


def _half_on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def attentropy_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Drop-in attention implementation (same signature and output as transformers' eager attention).

    query [B, Hq, Q, D]; key, value [B, Hkv, K, D] (cache included, the Q new tokens last); attention_mask
    [B, 1, Q, K] additive float. Without an active Recorder, or for non-causal (cross) attention, it is plain
    sdpa. Recorded rows are computed explicitly, scores, softmax and statistics in float32 (`_product`: on CUDA
    from half-precision operands with float32 accumulation); other rows use sdpa."""
    rec = _RECORDER
    if _PROMPT_DIAGONAL is not None and getattr(module, "is_causal", False) and not module.training:
        _PROMPT_DIAGONAL.record(module.layer_idx, query, key, attention_mask, scaling)  # reads q, k; changes nothing
    if rec is None or not getattr(module, "is_causal", False) or module.training:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key_rows(key), value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if attention_mask is None:  # only when the mask function was not registered: fail loudly, never attend ahead
        raise RuntimeError("attentropy attention got no mask; register the mask function with the implementation")
    batch, n_heads, n_q, head_dim = query.shape
    n_kv, n_own = key.shape[1], key.shape[2]
    groups = n_heads // n_kv  # GQA: query head h reads key/value head h // groups; statistics per query head
    first = 0 if rec.all_rows else n_q - 1  # first recorded row
    shared = rec.shared_prefix.get(module.layer_idx) if rec.shared_prefix else None
    n_shared = 0 if shared is None else shared[0].shape[-1]
    if shared is not None and first > 0:
        raise RuntimeError("a shared prefix is supported for recorded rows only (decode steps)")
    n_k = n_shared + n_own  # keys: the shared prefix's, then the cache's
    if attention_mask.shape[-1] != n_k:
        attention_mask = attention_mask[..., :n_k]
    outputs = []
    if first > 0:
        outputs.append(F.scaled_dot_product_attention(query[:, :, :first], key_rows(key), value,
                                                      attn_mask=attention_mask[:, :, :first], scale=scaling,
                                                      enable_gqa=groups > 1))
    # A decode step calls this once per layer with one row: every tensor operation saved here counts (each has a
    # fixed cost about as large as the arithmetic at batch 1; recorded generation's speed: measured by
    # `bench/capture.py`), hence no calls that would return their input.
    # 3-D views for bmm (matmul's broadcasting costs more than the product itself at batch 1): [B * Hkv, D, K] keys
    # (contiguous rows in the recording generation's layout) and [B * Hkv, K, D] values, no copy
    if not _half_on_cuda(key):  # float32 copies (where needed), once for every chunk
        key, value = _float32(key), _float32(value)
    key_t = key.transpose(2, 3).reshape(batch * n_kv, head_dim, n_own)
    value_rows = value.reshape(batch * n_kv, n_own, head_dim)
    chunk_rows = max(1, rec.chunk_bytes // (4 * batch * n_heads * n_k))
    for start in range(first, n_q, chunk_rows):
        stop = min(start + chunk_rows, n_q)
        r = stop - start
        q, mask = (query, attention_mask) if r == n_q else (query[:, :, start:stop], attention_mask[:, :, start:stop])
        # [B * Hkv, groups * r, D] @ [B * Hkv, D, K]: grouped heads read their shared keys without copying them
        q = q.reshape(batch * n_kv, groups * r, head_dim)
        scores = _product(q, key_t)
        if shared is not None:  # the prefix's keys once for all rows: [Hkv, B * groups * r, D] @ [Hkv, D, P]
            q_by_head = q.view(batch, n_kv, groups * r, head_dim).transpose(0, 1).reshape(n_kv, -1, head_dim)
            prefix_scores = _product(q_by_head, shared[0]).view(n_kv, batch, groups * r, n_shared).transpose(0, 1)
            scores = torch.cat([prefix_scores, scores.view(batch, n_kv, groups * r, n_own)], dim=-1)
        scores = scores.view(batch, n_heads, r, n_k)
        # mask + scaling * scores in one pass, as eager attention orders it (scaled scores, then the mask); masked
        # keys: ~ -3.4e38 (finite), so p = 0 exactly
        torch.add(mask, scores, alpha=scaling, out=scores)
        # own token of the chunk's first row: key n_k - n_q + start
        p = rec.rows(module.layer_idx, (batch, n_heads, r, n_k), own=n_k - n_q + start, device=scores.device)
        torch.softmax(scores, dim=-1, out=p)
        del scores
        p_rows = p.view(batch * n_kv, groups * r, n_k)
        output = _product(p_rows if shared is None else p_rows[..., n_shared:], value_rows)
        if shared is not None:  # + the prefix's values, once for all rows: [Hkv, B * groups * r, P] @ [Hkv, P, D]
            p_by_head = p_rows[..., :n_shared].view(batch, n_kv, groups * r, n_shared).transpose(0, 1)
            prefix_output = _product(p_by_head.reshape(n_kv, -1, n_shared), shared[1])
            output += prefix_output.view(n_kv, batch, groups * r, head_dim).transpose(0, 1).reshape(output.shape)
        outputs.append(output.view(batch, n_heads, r, head_dim))
        rec.rows_done(p)
        del p
    output = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    if output.dtype != query.dtype:
        output = output.to(query.dtype)
    output = output.transpose(1, 2)  # [B, Q, Hq, D], like eager attention: contiguous already when Q == 1
    return (output if n_q == 1 else output.contiguous()), None


def register() -> None:
    """Register the attention function and its mask function under one name. Without a mask function of the
    same name transformers would build no causal mask for it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, attentropy_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


@contextmanager
def recording(model, recorder, prompt_diagonal=None):
    """Run `model` with the attentropy attention implementation, feeding `recorder` (None: no statistics) and
    `prompt_diagonal` (a `recorder.PromptDiagonal`: the prompt rows' log own-token attention, LLM-Check's)."""
    global _RECORDER, _PROMPT_DIAGONAL
    register()
    # (nested: a prefill inside a decode loop)
    previous, outer, outer_diagonal = model.config._attn_implementation, _RECORDER, _PROMPT_DIAGONAL
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    _RECORDER, _PROMPT_DIAGONAL = recorder, prompt_diagonal
    try:
        yield recorder
    finally:
        _RECORDER, _PROMPT_DIAGONAL = outer, outer_diagonal
        model.set_attn_implementation(previous)


def log_own_attention(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor, scaling: float,
                      own: int, chunk_bytes: int = 16 << 20) -> torch.Tensor:
    """[B, Hq, Q] float32: ln of each query row's attention on its own token (key own + i for row i), the log-softmax
    at the diagonal, s_ii - logsumexp_j s_ij, exact where the attention itself underflows to 0. query [B, Hq, Q, D];
    key [B, Hkv, K, D]; attention_mask [B, 1, Q, >=K] additive. Scores in float32, `chunk_bytes` of them at a time;
    the keys of the query heads that share them (GQA) are read once."""
    batch, n_heads, n_q, head_dim = query.shape
    n_kv, n_k = key.shape[1], key.shape[2]
    groups = n_heads // n_kv
    key_t = _float32(key).transpose(2, 3)  # [B, Hkv, D, K]
    out, chunk_rows = [], max(1, chunk_bytes // (4 * batch * n_heads * n_k))
    for start in range(0, n_q, chunk_rows):
        stop = min(start + chunk_rows, n_q)
        q = _float32(query[:, :, start:stop]).reshape(batch, n_kv, groups * (stop - start), head_dim)
        scores = torch.matmul(q, key_t).view(batch, n_heads, stop - start, n_k)
        scores = torch.add(attention_mask[:, :, start:stop, :n_k], scores, alpha=scaling)
        rows = torch.arange(stop - start, device=scores.device)
        out.append(scores[:, :, rows, own + start + rows] - torch.logsumexp(scores, dim=-1))
    return torch.cat(out, dim=-1)


def recorded_layers(model) -> list[int]:
    """True indices of the self-attention layers (Mllama's cross-attention layers do not run without an image)."""
    config = model.config.get_text_config()
    cross = set(getattr(config, "cross_attention_layers", None) or [])
    return [i for i in range(config.num_hidden_layers) if i not in cross]
