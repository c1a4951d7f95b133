"""Lookback Lens: per head, the ratio of attention on the prompt to attention on the answer so far, averaged over
the answer, with a logistic probe over all heads."""

from __future__ import annotations

import numpy as np

from ..features import segment_means
from .detector import Detector
from .fitting import probe_fitter


def lookback_ratios(a) -> np.ndarray:
    """[n_answers, L * H]: Lookback Lens' ratio per head, averaged over the answer: mean attention per prompt key /
    (that + mean attention per generated key). Completion token t sees K - t prompt keys and t generated ones (its
    first token sees only the prompt: ratio 1)."""
    prompt = a.attn["prompt_mass"].reshape(len(a.tokens), -1).astype(np.float64)
    n_keys, pos = a.tokens.n_keys.to_numpy(np.float64), a.tokens.pos.to_numpy(np.float64)
    per_prompt_key = prompt / (n_keys - pos)[:, None]
    per_generated_key = np.where(pos[:, None] > 0, (1 - prompt) / np.maximum(pos, 1)[:, None], 0.0)
    ratio = per_prompt_key / np.maximum(per_prompt_key + per_generated_key, 1e-12)
    return segment_means(ratio, a.answers.start.to_numpy(), a.answers.n_tokens.to_numpy())


LOOKBACK_LENS = Detector("lookback_lens", "answer", "baseline", "lookback_lens",
                         "Lookback Lens: prompt / generated attention ratio per layer x head, logistic probe",
                         lookback_ratios, probe_fitter())
