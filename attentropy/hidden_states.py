"""Hidden states: which of the residual stream's states a run keeps (`HiddenSpec`, `hidden_spec`), the forward
hooks that read them (`hook_hidden_states`), and the `HiddenRecorder` that keeps them at the recorded rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class HiddenSpec:
    """Which hidden states to keep, by transformers' `output_hidden_states` index: 0 the token embeddings, i the
    residual stream after block i, the last (= the number of layers) after the final norm."""

    layers: tuple[int, ...] = ()  # per answer: the last prompt token's row and the mean over the answer's rows
    token_layers: tuple[int, ...] = ()  # every row of the answer, float16 (for token-level probes)

    def __bool__(self) -> bool:
        return bool(self.layers or self.token_layers)


HIDDEN_AUTO = 9  # hidden-state indices kept per answer by default, evenly spaced from the embeddings to the last


def hidden_spec(n_layers: int, layers: str = "auto", token_layers: str = "none") -> HiddenSpec:
    """The hidden states a run keeps, by `output_hidden_states` index 0 .. n_layers: `auto` (per answer: 9 evenly
    spaced indices, the embeddings, the middle and the last included; per token: the three at 1/3, 1/2 and 2/3 of
    the depth), `all`, `none` or a comma-separated list. Per answer, SmolLM2-135M (576 wide) at `auto` stores
    9 x 576 x 2 float32 = 41 kB; per token, `auto` adds 3 x 576 float16 = 3.5 kB."""
    def parse(value: str, auto: list[int]) -> tuple[int, ...]:
        if value == "auto":
            return tuple(auto)
        if value == "all":
            return tuple(range(n_layers + 1))
        if value in ("none", ""):
            return ()
        try:
            chosen = tuple(sorted({int(x) for x in value.split(",")}))
        except ValueError:
            raise ValueError(f"hidden-state layers must be auto, all, none or indices like 0,8,15; got {value!r}")
        if chosen[0] < 0 or chosen[-1] > n_layers:
            raise ValueError(f"hidden-state indices run from 0 (embeddings) to {n_layers}; got {value!r}")
        return chosen

    spread = sorted({int(round(x)) for x in np.linspace(0, n_layers, HIDDEN_AUTO)})
    return HiddenSpec(parse(layers, spread), parse(token_layers, [n_layers // 3, n_layers // 2, 2 * n_layers // 3]))


def hidden_modules(model) -> list[torch.nn.Module]:
    """Module whose output is hidden state i (`output_hidden_states[i]`): the embeddings, blocks 0 .. L-2, the final
    norm (transformers reports the last block's output after the norm)."""
    decoder = model.get_decoder()
    return [decoder.embed_tokens, *decoder.layers[:-1], decoder.norm]


def hook_hidden_states(model, spec: HiddenSpec, make_hook) -> list:
    """Forward hooks `make_hook(i)` on the modules whose outputs are the hidden states `spec` keeps."""
    modules = hidden_modules(model)
    for i in (*spec.layers, *spec.token_layers):
        if not 0 <= i < len(modules):
            raise ValueError(f"hidden-state index {i} out of range 0..{len(modules) - 1}")
    return [modules[i].register_forward_hook(make_hook(i)) for i in sorted(set(spec.layers) | set(spec.token_layers))]


class HiddenRecorder:
    """The residual stream at the recorded rows (the rows that predict the completion tokens, as for attention):
    per sequence, the first such row (its input is the last prompt token) and the sum over the rows that belong to
    its completion, for `spec.layers`; every row for `spec.token_layers`. Forward hooks on the modules of
    `hidden_modules`; in generation, `step(input_ids)` before each forward tells which rows are still in their
    answer (a row whose input is a stop token, or follows one, is not)."""

    def __init__(self, model, spec: HiddenSpec, batch: int, all_rows: bool, stops=(), valid: torch.Tensor = None):
        self.spec, self.all_rows = spec, all_rows
        self.stops = torch.tensor(list(stops), dtype=torch.long)
        self.first: dict[int, torch.Tensor] = {}  # layer -> [B, d]
        self.sums: dict[int, torch.Tensor] = {}  # layer -> [B, d] float64
        self.rows: dict[int, list[torch.Tensor]] = {}  # token layer -> [[B, r, d] float16]
        self.valid = valid  # teacher forcing: [B, Q] rows of the completion; generation: [B] rows still in it
        self.finished = torch.zeros(batch, dtype=torch.bool)
        self.counts = torch.zeros(batch, dtype=torch.long)
        self.hooks = hook_hidden_states(model, spec, self._hook)

    def step(self, input_ids: torch.Tensor) -> None:
        """Generation, before each forward: the prefill's row is the last prompt token's; a decode step's input is
        the token drawn last, and its row belongs to the answer unless a stop token has been drawn."""
        if self.valid is not None:  # a decode step (the first call, the prefill, only sets `valid`)
            self.finished |= torch.isin(input_ids[:, -1].cpu(), self.stops)
        self.valid = ~self.finished
        self.counts += self.valid

    def _hook(self, index: int):
        def on_output(module, args, output):
            hidden = (output[0] if isinstance(output, tuple) else output).detach()  # [B, q, d]
            rows = hidden if self.all_rows else hidden[:, -1:]
            if index in self.spec.layers:
                valid = (self.valid if self.all_rows else self.valid[:, None]).to(rows.device)  # [B, r]
                if index not in self.first:
                    self.first[index] = rows[:, 0].float().cpu()
                total = (rows.double() * valid[..., None]).sum(1).cpu()
                self.sums[index] = total if index not in self.sums else self.sums[index] + total
            if index in self.spec.token_layers:
                self.rows.setdefault(index, []).append(rows.half().cpu())
        return on_output

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def results(self, b: int, n: int) -> dict:
        """Capture fields of sequence b, whose completion has n tokens."""
        counts = self.valid.sum(1) if self.all_rows else self.counts
        if int(counts[b]) != n:
            raise RuntimeError(f"hidden states of {int(counts[b])} rows recorded for a completion of {n} tokens")
        out = {}
        if self.spec.layers:
            out["hidden_last_prompt"] = torch.stack([self.first[i][b] for i in self.spec.layers]).numpy()
            out["hidden_mean"] = torch.stack([self.sums[i][b] / n for i in self.spec.layers]).float().numpy()
        if self.spec.token_layers:
            out["hidden_tokens"] = torch.stack([torch.cat(self.rows[i], dim=1)[b, :n] for i in self.spec.token_layers],
                                               dim=1).numpy()
        return out
