"""The OpenAI-compatible wire format of `attentropy serve`: the requests it accepts (pydantic models, strict types,
bounds checked), the error body, and the response and stream chunk objects with attentropy's confidences in them."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

POLICIES = ("flag", "abstain")


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # strict: a string where a number is expected is an error, as OpenAI's API answers; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    attentropy: dict | None = None  # {"policy": "flag" | "abstain"}: this request's abstention policy

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return stops


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict]


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None


def parse(model: type[BaseModel], body: dict) -> BaseModel:
    """A request body as `model`, or a 400 naming the first wrong field and what was expected."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or None
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where,
                       code="invalid_value" if first["type"] != "missing" else "missing_required_parameter") from None


def message_text(message: ChatMessage, i: int) -> str:
    """A message's text: a string, or a list of text parts (other parts, e.g. images, are refused)."""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages.{i}.content.{j}: only text parts are supported", f"messages.{i}.content")
        texts.append(part["text"])
    return "".join(texts)


def number(x: float) -> float | None:
    """A float for JSON: NaN (no such score) is null."""
    return None if x is None or math.isnan(x) else float(x)


def chat_logprob(event: dict) -> dict:
    """A token's entry of `logprobs.content`: OpenAI's fields (logprob: the model's own) plus attentropy's
    `confidence` (token confidence) and `prefix_confidence`."""
    entry = {"token": event["text"], "logprob": event["logprob"], "bytes": list(event["text"].encode()),
             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in event["top"] or []],
             "confidence": number(event["confidence"]), "prefix_confidence": number(event["prefix_confidence"])}
    return entry


def completion_logprobs(events: list[dict], offset: int) -> dict:
    """`logprobs` of a text completion (parallel lists), with attentropy's `confidences` and
    `prefix_confidences` beside them."""
    offsets, at = [], offset
    for e in events:
        offsets.append(at)
        at += len(e["text"])
    return {"tokens": [e["text"] for e in events], "token_logprobs": [e["logprob"] for e in events],
            "top_logprobs": [dict(e["top"] or []) for e in events], "text_offset": offsets,
            "confidences": [number(e["confidence"]) for e in events],
            "prefix_confidences": [number(e["prefix_confidence"]) for e in events]}
