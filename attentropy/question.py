"""A question: the record every benchmark's loader and offline suite produces, and the error for question data
that does not have the expected format."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """A benchmark file that does not have the published format."""


@dataclass
class Question:
    id: str  # stable: "<benchmark>-<row index, 5 digits>"
    benchmark: str
    question: str
    target: str  # the short gold answer (GSM8K: the number after ####)
    reference: str = ""  # GSM8K-style full reference solution; empty for factual benchmarks
    aliases: list[str] = field(default_factory=list)  # other accepted spellings of `target`
    metadata: dict = field(default_factory=dict)
