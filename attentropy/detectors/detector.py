"""The declared record of a detector: what it is called, what it scores, what it reads and how it is fitted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Detector:
    """One method compared on the same question-grouped folds.

    `features(answers)` -> its input, one row per answer (level `answer`) or per token (level `token`): an array,
    or a tuple of arrays for a method that combines two inputs; `features(answers, kinds)` for a detector that
    `reads_kind` (kinds: the question kinds that get a one-hot column, those of the training answers).
    `fit(X, y, groups, seed)` -> a `Fitted` on training rows (y: 1 correct answer / ordinary token, 0 incorrect /
    wrong moment; groups: the questions, for inner folds)."""

    name: str
    level: str  # "answer" or "token"
    role: str  # "instrument" (the instrument and its variants), "baseline" (published detectors), "control"
    family: str  # what it is built from: "attention", "logit", "hidden_state", "length", "kind", "sanity", ...
    description: str
    features: Callable
    fit: Callable
    # stored inputs beyond the statistics: "hidden", "embeddings", "hidden_tokens", "prompt_diagonal" (the prompt
    # rows' log own-token attention, LLM-Check's; runs written before it was recorded lack it)
    needs: tuple[str, ...] = ()
    reads_kind: bool = False  # its features include the question kind
    out_of_kind: bool = True  # evaluated on kinds left out of fitting (not for kind readers and sanity checks)
    prefix_features: Callable | None = None  # the same model on the tokens so far: [n_tokens, F] (answer level)
    training_free: bool = False  # a score used as defined: only its calibration (a monotone map) is fitted

    def inputs(self, answers, kinds: list[str]):
        """Its features of `answers`."""
        return self.features(answers, kinds) if self.reads_kind else self.features(answers)

    def available(self, answers) -> bool:
        """Whether the runs behind `answers` stored what this detector reads."""
        have = {"hidden": bool(answers.hidden), "embeddings": 0 in answers.hidden_layers,
                "hidden_tokens": answers.hidden_tokens is not None,
                "prompt_diagonal": answers.prompt_log_diag is not None}
        return all(have[need] for need in self.needs)
