"""A statistic's per-token values as the analysis reads them: the logit statistics [n_tokens], the attention
statistics [n_tokens, layers, heads], and entropy / ln K, derived from entropy's values (`token_values`); which
statistics one read gives (`reads`), and reusable arrays to read a group of layers into (`Scratch`)."""

from __future__ import annotations

import math
import queue
from contextlib import contextmanager

import numpy as np

from .windows import attended_keys, run_windows

LOGIT_STATS = ("logit_entropy", "logit_varentropy", "logprob")

DERIVED = {"entropy_norm": "entropy"}  # a statistic computed from another's values: one read gives both


def log_keys(run, layers: list[int] | None = None) -> np.ndarray:
    """[n_tokens, len(layers)] float32: ln K (at least ln 2), K the keys the layer's row attends to (the visible
    keys, at most a sliding window: `windows.attended_keys`); entropy / ln K is `entropy_norm`, the fraction of the
    maximal entropy, which removes the growth with position."""
    layers = list(run.layers) if layers is None else [int(layer) for layer in layers]
    windows = dict(zip(run.layers, run_windows(run.config)))
    keys = attended_keys(run.tokens["n_keys"].to_numpy(), [windows.get(layer) for layer in layers])
    return np.log(np.maximum(keys, 2.0)).astype(np.float32)


def token_values(run, stat: str, layers: list[int] | None = None) -> np.ndarray:
    """Per-token values of a statistic: attention stats [n_tokens, len(layers), H] (default: all recorded layers);
    `entropy_norm` = entropy / ln K (`log_keys`); logit stats [n_tokens]."""
    if stat in LOGIT_STATS:
        return run.tokens[stat].to_numpy(np.float64)
    if stat in DERIVED:
        return run.attn(DERIVED[stat], layers) / log_keys(run, layers)[:, :, None]
    return run.attn(stat, layers)


def reads(stats: tuple[str, ...]) -> dict[str, list[str]]:
    """Statistic read -> the statistics of `stats` computed from its values, itself first (entropy -> entropy,
    entropy_norm): each statistic is read once."""
    out: dict[str, list[str]] = {}
    for stat in sorted(stats, key=lambda s: s in DERIVED):
        out.setdefault(DERIVED.get(stat, stat), []).append(stat)
    return out


class Scratch:
    """Float32 arrays for the values of a group of layers, one per task running at once, each passed on to the next
    task: a new array of a few hundred MB for every group had the kernel zero its pages every time (a tenth of a
    report's CPU time at the quarter size of bench/scale.py)."""

    def __init__(self, n: int, size: int):
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(n):
            self.free.put(np.empty(size, np.float32))

    @contextmanager
    def array(self, shape: tuple[int, ...]):
        flat = self.free.get()
        try:
            yield flat[:math.prod(shape)].reshape(shape)
        finally:
            self.free.put(flat)
