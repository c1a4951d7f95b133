"""The normalised attention statistics of answers' tokens (`ATTN_FEATURES`, [n_tokens, L, H] each): held in memory,
or read from the runs one group of layers at a time (`TokenAttention.groups`), so that the instrument's features of
runs too large to hold are computed in bounded memory (Llama 3.2 90B on GSM8K: 80 layers x 64 heads x 266k tokens,
33 GB of them; every feature reduces them over tokens or heads, group by group)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .store import READ_BYTES

# the normalised attention statistics every feature is made of
ATTN_FEATURES = ("entropy_norm", "varentropy_norm", "sink_mass", "prompt_mass", "diag_mass", "prev_mass")
STORED = {"entropy_norm": "entropy", "varentropy_norm": "varentropy"}  # a feature's stored statistic (else its own)
IN_MEMORY_BYTES = 2 * 2 ** 30  # `load_answers` holds the answers' attention statistics when they take at most this


def normalised(name: str, values: np.ndarray, keys: np.ndarray, in_place: bool = False) -> np.ndarray:
    """A feature from its stored statistic's values [n, l, H]: entropy / ln K and varentropy / (ln K)^2, K the keys
    each layer's row attends to (`keys` [n, l]: the visible keys, at most a sliding window; the maximal entropy of
    K keys is ln K and the maximal varentropy grows like (ln K)^2, so raw values rise with position), masses as
    they are. `in_place`: divided in `values` (float32, the caller's own)."""
    if name in STORED:
        log_k = np.log(np.maximum(np.asarray(keys, np.float32), 2.0))[:, :, None]
        values = np.divide(values, log_k if name == "entropy_norm" else log_k ** 2, out=values if in_place else None)
    return np.ascontiguousarray(values, dtype=np.float32)


def every_row(rows: np.ndarray | None, n: int) -> bool:
    """Whether `rows` (None: all) are all n rows, in order: taking them needs no copy."""
    return rows is None or (len(rows) == n and bool((rows == np.arange(n)).all()))


def normalised_attention(stat_arrays: dict[str, np.ndarray], keys: np.ndarray) -> dict[str, np.ndarray]:
    """Every feature from the stored statistics (`stat_arrays`: name -> [n, L, H]; `keys` [n, L])."""
    return {k: normalised(k, stat_arrays[STORED.get(k, k)], keys) for k in ATTN_FEATURES}


@dataclass
class TokenAttention:
    """ATTN_FEATURES of some tokens: held (`arrays`), or read from `runs` (their tokens in order, then `rows` of
    them) a group of layers at a time. Either way `groups` gives them group by group and `[name]` whole."""

    layers: list[int]
    n_heads: int
    arrays: dict[str, np.ndarray] | None = None  # held: feature -> [n_tokens, L, H] float32
    runs: list = field(default_factory=list)  # read mode: `store.Run`s
    keys: np.ndarray | None = None  # read mode: [n_run_tokens, L] float32, the keys each row attends to
    rows: np.ndarray | None = None  # read mode: these of the runs' tokens (None: all, in order)
    read_bytes: int = READ_BYTES
    # read mode: the flat float32 buffers groups are read into, kept from one `groups` to the next (a new array per
    # group, or per call, would leave two alive while the next is read: the caller's loop still holds the last)
    _buffers: dict = field(default_factory=dict, repr=False, compare=False)
    _reading: bool = field(default=False, repr=False, compare=False)  # a `groups` is being read (into the buffers)

    @classmethod
    def read(cls, runs: list, keys: np.ndarray, read_bytes: int = READ_BYTES) -> "TokenAttention":
        return cls(list(runs[0].layers), int(runs[0].n_heads), None, list(runs), np.asarray(keys, np.float32),
                   None, read_bytes)

    @property
    def held(self) -> bool:
        return self.arrays is not None

    def __len__(self) -> int:
        if self.held:
            return len(next(iter(self.arrays.values())))
        return len(self.keys) if self.rows is None else len(self.rows)

    def groups(self, name: str, layers=None, expansion: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions [l] in `self.layers`, values [n_tokens, l, H] float32) of one feature at `layers` (positions;
        default all), consecutive groups in layer order: one group when held. `expansion`: what the caller's
        working arrays of a group take, as a multiple of its values (float64 copies and intermediates): groups are
        that many times smaller, so a group's work takes about `read_bytes`. Read groups share one buffer: a
        group's values are valid until the next group is read (reduce them, or copy them, before asking for it),
        and one `groups` of these tokens is read at a time."""
        if name not in ATTN_FEATURES:
            raise KeyError(f"unknown attention feature {name!r}; expected one of {', '.join(ATTN_FEATURES)}")
        positions = np.arange(len(self.layers)) if layers is None else np.asarray(layers, int)
        if self.held:
            values = self.arrays[name]
            yield positions, values if layers is None else values[:, positions]
            return
        if self._reading:
            raise RuntimeError("one `groups` of these tokens at a time: their groups share one buffer")
        self._reading = True
        try:
            yield from self._read_groups(name, positions, expansion)
        finally:
            self._reading = False

    def _read_groups(self, name: str, positions: np.ndarray, expansion: int):
        n_run_tokens, all_rows = len(self.keys), every_row(self.rows, len(self.keys))
        per = max(1, self.read_bytes // max(1, n_run_tokens * self.n_heads * 4 * expansion))
        read = self._buffer("read", n_run_tokens * min(per, len(positions)) * self.n_heads)
        taken = None if all_rows else self._buffer("taken", len(self.rows) * min(per, len(positions)) * self.n_heads)
        for i in range(0, len(positions), per):
            group = positions[i:i + per]
            layers_ = [self.layers[p] for p in group]
            values = read[:n_run_tokens * len(group) * self.n_heads].reshape(n_run_tokens, len(group), self.n_heads)
            at = 0
            for run in self.runs:
                run.attn(STORED.get(name, name), layers_, out=values[at:at + len(run.tokens)])
                at += len(run.tokens)
            normalised(name, values, self.keys[:, group], in_place=True)
            if not all_rows:
                values = np.take(values, self.rows, axis=0,
                                 out=taken[:values[0].size * len(self.rows)].reshape(len(self.rows), *values.shape[1:]))
            yield group, values

    def _buffer(self, name: str, size: int) -> np.ndarray:
        """A flat float32 buffer of `size` values, kept for the next `groups` of the same size."""
        if name not in self._buffers or len(self._buffers[name]) != size:
            self._buffers.pop(name, None)  # (freed before the new one is made)
            self._buffers[name] = np.empty(size, np.float32)
        return self._buffers[name]

    def __getitem__(self, name: str) -> np.ndarray:
        """[n_tokens, L, H]: the whole feature (in read mode it is read into one array)."""
        if self.held:
            return self.arrays[name]
        out = np.empty((len(self), len(self.layers), self.n_heads), np.float32)
        for positions, values in self.groups(name):
            out[:, positions] = values
        return out

    def __setitem__(self, name: str, values: np.ndarray) -> None:
        if not self.held:
            raise TypeError("attention statistics read from the runs cannot be replaced")
        self.arrays[name] = values

    def take(self, rows: np.ndarray) -> "TokenAttention":
        """These tokens (indices into this one's), in this order."""
        if self.held:
            return TokenAttention(self.layers, self.n_heads, {k: v[rows] for k, v in self.arrays.items()})
        base = np.arange(len(self.keys)) if self.rows is None else self.rows
        return TokenAttention(self.layers, self.n_heads, None, self.runs, self.keys, base[rows], self.read_bytes)


def concat_attention(parts: list[TokenAttention]) -> TokenAttention:
    """The tokens of `parts`, one after the other: held when every part is."""
    if all(p.held for p in parts):
        return TokenAttention(parts[0].layers, parts[0].n_heads,
                              {k: np.concatenate([p.arrays[k] for p in parts]) for k in ATTN_FEATURES})
    if any(p.held for p in parts):
        raise ValueError("cannot join held and read attention statistics")
    offsets = np.r_[0, np.cumsum([len(p.keys) for p in parts])[:-1]]
    rows = np.concatenate([o + (np.arange(len(p.keys)) if p.rows is None else p.rows) for p, o in zip(parts, offsets)])
    return TokenAttention(parts[0].layers, parts[0].n_heads, None, [r for p in parts for r in p.runs],
                          np.concatenate([p.keys for p in parts]), rows, parts[0].read_bytes)
