"""The keys each recorded layer attends to: every visible key (full attention), or the last `window` tokens of the
row's own sequence (a sliding-window layer: Gemma 2/3, Mistral, Qwen 2, ...). `layer_windows` reads them from a
model's config and refuses attention it cannot record exactly; `attended_keys` turns a token's visible keys into
each layer's (the maximal entropy of a row is ln of them)."""

from __future__ import annotations

import numpy as np

FULL, SLIDING = "full_attention", "sliding_attention"


class UnsupportedAttention(ValueError):
    """A model whose attention attentropy cannot record exactly."""


def layer_windows(config, layers: list[int]) -> list[int | None]:
    """Per recorded layer (`layers`: indices into the text config's layers), its sliding window (the number of
    tokens a row attends to, its own included) or None for full attention. Raises `UnsupportedAttention`, naming
    the layer type or setting, for attention the recording attention does not compute: other layer types (chunked,
    linear, indexed...), soft-capped attention logits, bidirectional attention."""
    config = config.get_text_config()
    name = type(config).__name__
    for setting in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, setting, None) is not None:
            raise UnsupportedAttention(f"{name} sets {setting}={getattr(config, setting)}: attentropy computes "
                                       "attention and next-token distributions without soft-capping")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedAttention(f"{name} uses bidirectional attention; attentropy records causal attention only")
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:  # one kind for every layer (Mistral: all sliding, when sliding_window is set)
        types = [FULL if window is None else SLIDING] * config.num_hidden_layers
    out = []
    for i in layers:
        kind = types[i]
        if kind == FULL:
            out.append(None)
        elif kind == SLIDING and isinstance(window, int) and window > 0:
            out.append(window)
        else:
            detail = f" (sliding_window={window!r})" if kind == SLIDING else ""
            raise UnsupportedAttention(
                f"layer {i} of {name} is of type {kind!r}{detail}: attentropy records {FULL!r} and {SLIDING!r} "
                "layers exactly, and refuses others rather than record them wrongly")
    return out


def attended_keys(n_keys: np.ndarray, windows: list[int | None]) -> np.ndarray:
    """[n_tokens, n_layers] keys each layer's row attends to: the row's visible keys (`n_keys` [n_tokens], its
    position + 1), at most the layer's window."""
    n_keys = np.asarray(n_keys, np.int64)
    limits = np.array([np.iinfo(np.int64).max if w is None else w for w in windows], np.int64)
    return np.minimum(n_keys[:, None], limits[None, :])


def run_windows(config: dict) -> list[int | None]:
    """A run's windows per recorded layer (config.json's capture section; runs written before windows were
    recorded are of full-attention models only, which attentropy alone could record then)."""
    capture = config["capture"]
    return list(capture.get("windows") or [None] * len(capture["layers"]))
