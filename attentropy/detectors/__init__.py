"""The detectors compared with the instrument on the same folds, one file per family; this list is the registry
(adding a detector is one file and one line here). The order is the order of every table."""

from __future__ import annotations

from . import (anchored, bag_of_tokens, controls, head_entropy, hidden_state, instrument, llm_check, logit,
               lookback_lens, mean_difference, rauq)
from .detector import Detector
from .fitting import Fitted

PRIMARY = "instrument"  # the detector the others are measured against (paired differences, the fitted instrument)
# "the logit, kind and length baselines": the cheap scores a result over attention has to beat first
CHEAP_FAMILIES = ("logit", "length", "kind")

ANSWER_DETECTORS: dict[str, Detector] = {d.name: d for d in (
    instrument.INSTRUMENT, instrument.INSTRUMENT_DENSE, anchored.ANCHORED, anchored.ANCHORED_ATTENTION,
    mean_difference.ATTENTION_DIRECTION, mean_difference.ANCHORED_DIRECTION, instrument.ATTENTION,
    logit.LOGIT_PROBE, anchored.ANCHOR_CHOSEN, logit.MEAN_LOGPROB, logit.MIN_LOGPROB, logit.LOGIT_ENTROPY,
    logit.LOGIT_VARENTROPY,
    lookback_lens.LOOKBACK_LENS, llm_check.LLM_CHECK, llm_check.LLM_CHECK_POLYGRAPH,
    llm_check.LLM_CHECK_ANSWER_ROWS, rauq.RAUQ, rauq.RAUQ_FIXED_HEADS, head_entropy.HEAD_ENTROPY,
    head_entropy.HEAD_ENTROPY_PRE_ANSWER,
    controls.LENGTH, controls.KIND, controls.KIND_LOGIT, controls.SHUFFLED,
    hidden_state.HIDDEN, hidden_state.HIDDEN_PROMPT, instrument.ATTENTION_HIDDEN, bag_of_tokens.BAG_OF_TOKENS,
)}
TOKEN_DETECTORS: dict[str, Detector] = {d.name: d for d in (
    instrument.TOKEN_INSTRUMENT, logit.TOKEN_LOGIT_PROBE, logit.TOKEN_LOGPROB, logit.TOKEN_ENTROPY,
    logit.TOKEN_VARENTROPY, controls.POSITION, controls.TOKEN_TYPE, hidden_state.TOKEN_HIDDEN,
)}


def available(detectors: dict[str, Detector], answers) -> dict[str, Detector]:
    """The detectors whose inputs the runs behind `answers` stored."""
    return {name: d for name, d in detectors.items() if d.available(answers)}


def family_of(name: str, level: str = "answer") -> str:
    registry = ANSWER_DETECTORS if level == "answer" else TOKEN_DETECTORS
    return registry[name].family if name in registry else ""


def is_competitor(name: str) -> bool:
    """A baseline or control the instrument is measured against (not the instrument, its variants or the sanity
    check)."""
    d = ANSWER_DETECTORS.get(name)
    return d is not None and d.role != "instrument" and d.family != "sanity"


def instrument_variants(names) -> list[str]:
    """Those of `names` that are variants of the instrument (its other designs), in order."""
    return [n for n in names if n != PRIMARY and n in ANSWER_DETECTORS and ANSWER_DETECTORS[n].role == "instrument"]


def training_free(names) -> list[str]:
    """Those of `names` that are published scores used as defined (only calibrated), in order."""
    return [n for n in names if n in ANSWER_DETECTORS and ANSWER_DETECTORS[n].training_free]


def cheap(names) -> list[str]:
    """Those of `names` that are logit, kind or length baselines, in order."""
    return [n for n in names if family_of(n) in CHEAP_FAMILIES]


def of_family(family: str, names=None) -> list[str]:
    return [n for n in (ANSWER_DETECTORS if names is None else names) if family_of(n) == family]


__all__ = ["ANSWER_DETECTORS", "CHEAP_FAMILIES", "PRIMARY", "TOKEN_DETECTORS", "Detector", "Fitted", "available",
           "cheap", "family_of", "instrument_variants", "is_competitor", "of_family", "training_free"]
