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
    at most K of them, the generated ones first."""
    prompt = a.attn["prompt_mass"].reshape(len(a.tokens), -1).astype(np.float64)
    keys = np.repeat(a.keys, a.n_heads, axis=1).astype(np.float64)  # [n, L * H]
    generated = np.minimum(a.tokens.pos.to_numpy(np.float64)[:, None], keys)
    per_prompt_key = np.where(keys > generated, prompt / np.maximum(keys - generated, 1), 0.0)
    per_generated_key = np.where(generated > 0, (1 - prompt) / np.maximum(generated, 1), 0.0)
    ratio = per_prompt_key / np.maximum(per_prompt_key + per_generated_key, 1e-12)
    return segment_means(ratio, a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy())


LOOKBACK_LENS = Detector("lookback_lens", "answer", "baseline", "lookback_lens",
                         "Lookback Lens: prompt / generated attention ratio per layer x head, logistic probe",
                         lookback_ratios, probe_fitter())
