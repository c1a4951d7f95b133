"""The key/value cache of generation: transformers' DynamicCache with layers that append in place
(`growing_cache`), and the helpers that hold a shared prompt prefix's keys/values once (`prefixed_cache` for a
prefill after it, `shared_keys_values` for the recording attention's decode steps)."""

from __future__ import annotations

import functools

import torch

from .windows import UnsupportedAttention


def growing_cache(model):
    """A transformers DynamicCache whose attention layers append in place (`GrowingLayer`). A sliding-window layer
    keeps every key too (transformers' keeps only its window): all layers share one key axis, on which the
    recorder's key indices are defined, and the attention masks the keys outside the window
    (`attention.window_mask`). Any other cache layer is refused, naming its type."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    growing_layer = growing_layer_class()
    cache = DynamicCache(config=model.config.get_text_config())
    for i, layer in enumerate(cache.layers):
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise UnsupportedAttention(f"cache layer {i} of {type(model).__name__} is a {type(layer).__name__}: "
                                       "attentropy handles full-attention and sliding-window key/value caches only")
    cache.layers = [growing_layer() for _ in cache.layers]
    return cache


@functools.cache
def growing_layer_class():  # defined on first use: importing transformers' cache module takes seconds
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """transformers' DynamicLayer appends a step's keys/values with torch.cat, copying the whole layer cache
        at every decode step: at batch 16 and 1,000 keys that is ~0.7 GB moved per step on SmolLM2 (what this layer
        gains in plain generation is measured by `bench/capture.py --modes a_generate a_dynamic_cache`). This layer
        writes into a buffer with room for `spare` more tokens and hands out the filled part as a view, so it
        copies only when the buffer is full (or was replaced by crop/reorder/repeat).

        `keys_by_dim` (set by `generate` when it records): the key buffer is stored as [B, H, D, capacity] and
        handed out as the usual [B, H, K, D] shape, a transposed view. The recording attention computes q @ k^T
        from it as a product with contiguous [D, K] rows, faster than reading [K, D] rows transposed, with identical
        outputs (measured by a throwaway micro-benchmark, not kept in bench/). sdpa's CPU kernel wants [K, D] rows
        (it is many times slower on this layout), so plain generation keeps the default."""

        spare = 256
        keys_by_dim = False
        shared = 0  # keys before this layer's own, held once for all rows elsewhere (continuous batching's prefix)

        def get_seq_length(self) -> int:  # the length attention sees: the shared keys and the layer's own
            return self.shared + super().get_seq_length()

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, new = super().get_seq_length(), key_states.shape[-2]
            buffers = getattr(self, "buffers", None)
            in_place = (buffers is not None and n > 0 and self.keys.data_ptr() == buffers[0].data_ptr()
                        and self.keys.stride() == buffers[0].stride() and self.keys.shape[:2] == buffers[0].shape[:2]
                        and n + new <= buffers[0].shape[-2] and (buffers[0].stride(-1) != 1) == self.keys_by_dim)
            if not in_place:  # first call, full, self.keys replaced by a method of DynamicLayer, or a new layout
                size = n + new + self.spare
                key_buffer = (key_states.new_empty(*key_states.shape[:2], key_states.shape[-1], size).transpose(2, 3)
                              if self.keys_by_dim else
                              key_states.new_empty(*key_states.shape[:2], size, key_states.shape[-1]))
                buffers = (key_buffer, value_states.new_empty(*value_states.shape[:2], size, value_states.shape[-1]))
                if n:
                    buffers[0][..., :n, :] = self.keys
                    buffers[1][..., :n, :] = self.values
                self.buffers = buffers
            buffers[0][..., n:n + new, :] = key_states
            buffers[1][..., n:n + new, :] = value_states
            self.keys, self.values = buffers[0][..., :n + new, :], buffers[1][..., :n + new, :]
            return self.keys, self.values

    return GrowingLayer



def shared_keys_values(prefix_cache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer index, a prefix cache's keys [Hkv, D, P] and values [Hkv, P, D] in float32 (the recording
    attention's product layouts), for `Recorder.shared_prefix`."""
    return {i: (layer.keys[0].transpose(1, 2).float().contiguous(), layer.values[0].float().contiguous())
            for i, layer in enumerate(prefix_cache.layers) if holds_keys(layer)}


def prefixed_cache(model, prefix_cache):
    """A cache for prefilling several prompts after one shared prefix without a copy of the prefix per prompt:
    each layer hands attention the prefix broadcast over the batch joined to the new keys/values (one layer's
    worth at a time) and keeps only the new ones (`new_keys_values`)."""
    from transformers.cache_utils import DynamicLayer

    class PrefixedLayer(DynamicLayer):
        def __init__(self, keys, values):
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values  # [1, H, P, D]: the length the model sees as cached
            self.new = None

        def update(self, key_states, value_states, *args, **kwargs):
            self.new = (key_states, value_states)
            batch = key_states.shape[0]
            return (torch.cat([self.keys.expand(batch, -1, -1, -1), key_states], dim=-2),
                    torch.cat([self.values.expand(batch, -1, -1, -1), value_states], dim=-2))

    cache = growing_cache(model)
    cache.layers = [PrefixedLayer(layer.keys, layer.values) if holds_keys(layer) else DynamicLayer()
                    for layer in prefix_cache.layers]  # (a cross-attention layer holds none and stays empty)
    return cache


def holds_keys(layer) -> bool:
    return layer.is_initialized and layer.keys.numel() > 0


def new_keys_values(cache) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per layer, the keys/values a prefill added: those a `prefixed_cache` kept, or a plain cache's (no prefix);
    None for a layer that did not run (a cross-attention layer without an image)."""
    return [layer.new if hasattr(layer, "new") else (layer.keys, layer.values) if holds_keys(layer) else None
            for layer in cache.layers]


def append_masked_columns(cache, model, batch: int, columns: int, layers: list[int]) -> None:
    """Append `columns` zero key/value columns to the given layers of `cache` (the attention mask hides them)."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    zeros = torch.zeros(batch, heads, columns, head_dim, dtype=model.dtype, device=model.device)
    for i in layers:
        cache.layers[i].update(zeros, zeros)
