"""Lookback Lens: per head, the ratio of attention on the prompt to attention on the answer so far, averaged over
the answer, with a logistic probe over all heads."""

from __future__ import annotations

import numpy as np

from ..features import segment_means
from .detector import Detector
from .fitting import probe_fitter


def lookback_ratios(a) -> np.ndarray:
    """[n_answers, L * H]: Lookback Lens' ratio per head, averaged over the answer: mean attention per prompt key /
    (that + mean attention per generated key). Completion token t's row in a layer attending to K keys sees the t
    generated ones and K - t prompt keys (its first token sees only the prompt: ratio 1); a sliding window holds
    at most K of them, the generated ones first. Computed once per answers."""
    return a.memo("lookback_ratios", _lookback_ratios)


def _lookback_ratios(a) -> np.ndarray:
    keys, n_heads = a.keys.astype(np.float64), a.n_heads
    starts, counts = a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy()
    generated_so_far = a.tokens.pos.to_numpy(np.float64)[:, None]
    out = np.empty((len(starts), len(a.layers), n_heads))
    for positions, values in a.attn.groups("prompt_mass", expansion=12):  # six float64 arrays of a group
        prompt = values.reshape(len(values), -1).astype(np.float64)  # [n, l * H]
        group_keys = np.repeat(keys[:, positions], n_heads, axis=1)
        generated = np.minimum(generated_so_far, group_keys)
        per_prompt_key = np.where(group_keys > generated, prompt / np.maximum(group_keys - generated, 1), 0.0)
        per_generated_key = np.where(generated > 0, (1 - prompt) / np.maximum(generated, 1), 0.0)
        ratio = per_prompt_key / np.maximum(per_prompt_key + per_generated_key, 1e-12)
        out[:, positions] = segment_means(ratio, starts, counts).reshape(len(starts), len(positions), n_heads)
    return out.reshape(len(starts), -1)


LOOKBACK_LENS = Detector("lookback_lens", "answer", "baseline", "lookback_lens",
                         "Lookback Lens: prompt / generated attention ratio per layer x head, logistic probe",
                         lookback_ratios, probe_fitter())
