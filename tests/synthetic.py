"""Synthetic graded run directories written through the real store (append_batch, config.json, grades.parquet),
with a signal planted where the test wants it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from attentropy.capture import Capture
from attentropy.schema import ATTN_STATS
from attentropy.data import Question
from attentropy.generate import Generation
from attentropy.store import _write_parquet, append_batch, write_json

ENTROPY = ATTN_STATS.index("entropy")


class CharTokenizer:
    def decode(self, ids):
        return "".join(f" {i}" if i % 3 == 0 else " " + chr(97 + i % 26) * 3 for i in ids)  # words, numbers


def write_synthetic_run(path, *, benchmark="arith", labels=None, n_questions=60, n_layers=4, n_heads=3,
                        n_tokens=(12, 30), planted=None, shift=0.8, wrong_moment_shift=0.0, seed=0,
                        prompt_len=40, kinds=None, model="synthetic", hidden=None, hidden_shift=0.0, kind_shift=None,
                        n_tokens_by_label=None, late_moment=False, entropy_of_position=None, sources=None,
                        prompt_diagonal=True) -> Path:
    """A graded run. `labels`: one per question (default: alternating correct / incorrect). `planted`: (layer
    index, head) whose attention entropy is raised by `shift` in every token of incorrect answers. Math runs get a
    3-token wrong-moment span in each incorrect answer, its entropy at every cell raised by `wrong_moment_shift`.
    Each question has its own offset (tokens of one answer are correlated, as in real runs). `kinds`: one question
    kind per question (facts' metadata), `sources`: one data source per question (the same), `model`: the model
    name in config.json. `hidden`: (kept hidden-state indices, width): random hidden states per answer, those of incorrect answers moved by `hidden_shift` along one
    direction at the second kept index. Confounds: `kind_shift` {kind: entropy offset of every cell},
    `n_tokens_by_label` {label: (min, max) tokens}, `late_moment`: the wrong moment in the last third of the answer
    (entropy grows with position, as ln K). `entropy_of_position`: a function of the token positions of an
    answer (0, 1, ...) that replaces 0.5 ln K in every cell's entropy (noise added as always). `prompt_diagonal`:
    the prompt rows' log own-token attention recorded (random sums); False: a run written before it was."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    labels = list(labels) if labels is not None else ["incorrect" if i % 2 else "correct"
                                                      for i in range(n_questions)]
    gens, grades = [], []
    for i, label in enumerate(labels):
        n = int(rng.integers(*(n_tokens_by_label or {}).get(label, n_tokens)))
        attn = rng.uniform(0.05, 0.3, size=(n, n_layers, n_heads, len(ATTN_STATS))).astype(np.float32)
        n_keys = prompt_len + np.arange(n)
        trend = 0.5 * np.log(n_keys) if entropy_of_position is None else entropy_of_position(np.arange(n))
        attn[..., ENTROPY] = (np.asarray(trend, float)[:, None, None] + rng.normal(0, 0.3) +
                              rng.normal(0, 0.3, size=(n, n_layers, n_heads)))
        if planted is not None and label == "incorrect":
            attn[:, planted[0], planted[1], ENTROPY] += shift
        if kind_shift and kinds is not None:
            attn[..., ENTROPY] += kind_shift.get(kinds[i], 0.0)
        start = end = -1
        if benchmark == "arith" and label == "incorrect":
            start = int(rng.integers(2 * n // 3, n - 4) if late_moment else rng.integers(2, n - 5))
            end = start + 3
            attn[start:end, :, :, ENTROPY] += wrong_moment_shift
        q = Question(id=f"{benchmark}-{i:05d}", benchmark=benchmark, question=f"question {i}?", target=str(i),
                     metadata=({"kind": kinds[i]} if kinds is not None else {})
                     | ({"source": sources[i]} if sources is not None else {}))
        completion_ids = rng.integers(0, 26, size=n).tolist()
        capture = Capture(attn=attn, logprob=-rng.exponential(1.0, n).astype(np.float32),
                          logit_entropy=rng.exponential(1.0, n).astype(np.float32),
                          logit_varentropy=rng.exponential(1.0, n).astype(np.float32), n_keys=n_keys)
        if prompt_diagonal:
            # its own random stream: the runs' other data stay those the tests were written against
            capture.prompt_log_diag = -np.random.default_rng([seed, i, 7]).exponential(2.0, (n_layers, n_heads)) * (
                prompt_len - 1)
            capture.prompt_diag_rows = prompt_len - 1
        if hidden is not None:
            layers, width = hidden
            capture.hidden_last_prompt = rng.normal(0, 1, (len(layers), width)).astype(np.float32)
            capture.hidden_mean = rng.normal(0, 1, (len(layers), width)).astype(np.float32)
            if label == "incorrect":
                capture.hidden_mean[1] += hidden_shift * np.ones(width, np.float32) / np.sqrt(width)
        gens.append(Generation(q, list(range(prompt_len)), completion_ids, CharTokenizer().decode(completion_ids),
                               "stop", capture))
        grades.append({"question_id": q.id, "label": label, "grader": "synthetic",
                       "critic": "synthetic" if benchmark == "arith" else None,
                       "critic_status": "located" if start >= 0 else "not_critiqued",
                       "error_token_start": start, "error_token_end": end})
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "config.json", {
        "attentropy_version": "test", "git_commit": None, "benchmark": benchmark,
        "model": {"name": model, "architecture": "none", "dtype": "float32", "revision": "0"},
        "protocol": {"kind": "math" if benchmark == "arith" else "factual", "max_new_tokens": n_tokens[1]},
        "capture": {"layers": list(range(n_layers)), "n_heads": n_heads,
                    **({"prompt_log_diag": "synthetic"} if prompt_diagonal else {}),
                    **({"hidden": {"layers": list(hidden[0]), "token_layers": [], "size": hidden[1]}}
                       if hidden is not None else {})}})
    for lo in range(0, len(gens), 16):
        append_batch(path, gens[lo:lo + 16], CharTokenizer())
    _write_parquet(pa.Table.from_pandas(pd.DataFrame(grades), preserve_index=False), path / "grades.parquet")
    return path
