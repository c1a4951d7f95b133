"""Sampling: how continuous batching draws each token (greedy, or warped and drawn with a random generator of
the question's own)."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How continuous batching draws each token: greedy (the argmax) unless `do_sample`. Sampling warps the
    next-token distribution as transformers' `generate` does (its temperature and top-p warpers, in that order),
    then draws with a random generator of the question's own, seeded by (seed, question id): an answer depends on
    its question and the seed only, not on its neighbours, the batch size, a resume or the worker it ran on."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def generator(self, question_id: str, device) -> torch.Generator | None:
        if not self.do_sample:
            return None
        digest = hashlib.sha256(f"{self.seed}\0{question_id}".encode()).digest()
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    @functools.cached_property
    def warpers(self):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        return LogitsProcessorList(([TemperatureLogitsWarper(self.temperature)] if self.temperature != 1.0 else [])
                                   + ([TopPLogitsWarper(self.top_p)] if self.top_p < 1.0 else []))

    def draw(self, logp: torch.Tensor, generators: list) -> torch.Tensor:
        """Tokens [k] from log-probabilities [k, V], row i with `generators[i]` (None: an idle row, whose token is
        not used). Sampling is the Gumbel-max draw: each row's V uniform variables U from its own generator,
        token = argmax(warped score - ln(-ln U)), which is token i with probability p_i (the warped distribution's).
        A difference in the scores' float32 rounding (another batch size multiplies in another order) changes the
        token only at a near-tie of that maximum, where an inverse CDF would move every boundary after the first
        difference. `torch.multinomial` takes one generator per call: a call per row costs a step several times
        what this draw does (sampled runs' speed: `bench/run_throughput.py --sample`). Idle rows get 0 when
        sampling."""
        if not self.do_sample:
            return logp.argmax(-1)
        tokens = torch.zeros(logp.shape[0], dtype=torch.long, device=logp.device)
        rows = [i for i, generator in enumerate(generators) if generator is not None]
        if rows:
            scores = self.warpers(None, logp[rows])
            uniform = torch.empty_like(scores)
            for row, i in zip(uniform, rows):
                row.uniform_(generator=generators[i])
            tokens[rows] = (scores - uniform.log_().neg_().log_()).argmax(-1)
        return tokens
