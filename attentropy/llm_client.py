"""The LLM client: a model behind an OpenAI-compatible chat endpoint, its errors, the on-disk cache of its
replies (DIR/llm_replies.jsonl, keyed by model and prompt) and `ask_all`, which asks only what the cache lacks."""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LLMClient:
    """A model behind an OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, llama.cpp server), through the
    official `openai` SDK, which retries 429/5xx/timeouts with exponential backoff. The key comes from the
    environment and is never written anywhere."""

    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 4
    concurrency: int = 8
    max_tokens: int = 512  # every reply is bounded: a rambling model behind a local server cannot run for minutes

    @property
    def where(self) -> str:
        return self.base_url or "https://api.openai.com/v1"

    def client(self, max_retries: int | None = None):
        import os

        from openai import OpenAI

        key = os.environ.get(self.api_key_env) or ("not-needed" if self.base_url else None)
        if key is None:
            raise EndpointError(f"set {self.api_key_env} (or pass --base-url for a local endpoint without a key)")
        return OpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout,
                      max_retries=self.max_retries if max_retries is None else max_retries)

    def complete(self, client, prompt: str) -> str:
        response = client.chat.completions.create(model=self.model, temperature=0, max_tokens=self.max_tokens,
                                                  messages=[{"role": "user", "content": prompt}])
        if not getattr(response, "choices", None):
            raise NoReply("the endpoint returned no choices")
        return response.choices[0].message.content or ""


class EndpointError(RuntimeError):
    """The judge / critic endpoint cannot be used at all (unreachable, key refused, unknown model)."""


class NoReply(RuntimeError):
    """A call that came back without a usable reply (no choices, not an OpenAI-compatible response)."""


def fatal_cause(error: Exception) -> str | None:
    """Why no call to this endpoint can succeed, or None for a failure that may pass (timeout, 429, 5xx)."""
    import openai

    if isinstance(error, openai.APITimeoutError):
        return None
    if isinstance(error, openai.APIConnectionError):
        return f"cannot connect ({error.__cause__ or error})"
    if isinstance(error, openai.AuthenticationError):
        return "the key was refused (401)"
    if isinstance(error, openai.PermissionDeniedError):
        return "permission denied (403)"
    if isinstance(error, openai.NotFoundError):
        return "not found (404): a wrong --base-url path or an unknown model"
    if isinstance(error, openai.BadRequestError):
        return f"the request was refused (400: {error})"
    if isinstance(error, (NoReply, openai.APIResponseValidationError, json.JSONDecodeError)):
        return f"not an OpenAI-compatible reply ({error})"
    return None


class ReplyCache:
    """Append-only JSONL of LLM replies keyed by sha256(model, prompt). An unreadable line (a torn last line, a
    damaged copy) is skipped with a warning: its call is made again when needed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.replies: dict[str, dict] = {}
        self.lock = threading.Lock()
        unreadable = 0
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    row["key"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    unreadable += 1
                    continue
                if row.get("error") is None:  # a failed call is asked again
                    self.replies[row["key"]] = row
        if unreadable:
            import warnings

            warnings.warn(f"{self.path}: {unreadable} unreadable line(s) skipped (their calls are made again when "
                          "needed)", stacklevel=2)

    @staticmethod
    def key(model: str, prompt: str) -> str:
        return hashlib.sha256(json.dumps([model, prompt]).encode()).hexdigest()

    def get(self, model: str, prompt: str) -> dict | None:
        return self.replies.get(self.key(model, prompt))

    def put(self, model: str, prompt: str, reply: str | None, error: str | None = None) -> dict:
        row = {"key": self.key(model, prompt), "model": model, "reply": reply, "error": error}
        with self.lock:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if error is None:  # failures are logged but asked again on the next run
                self.replies[row["key"]] = row
        return row


def ask_all(llm: LLMClient, prompts: list[str], cache: ReplyCache, desc: str, progress: bool = True) -> list[dict]:
    """Replies for all prompts: cached ones at once, the rest with bounded concurrency. The first call made checks
    the endpoint and the key, without retries: when it cannot succeed (unreachable, key refused, unknown model, not
    an OpenAI-compatible reply) EndpointError stops the grading at once, naming the URL and the cause. A later call
    that still fails after the SDK's retries gives {'reply': None, 'error': ...}: kept in the cache file as a failure,
    never a label, asked again on the next run."""
    from tqdm import tqdm

    results: list[dict | None] = [cache.get(llm.model, p) for p in prompts]
    todo = [i for i, r in enumerate(results) if r is None]
    if not todo:
        return results
    first = todo[0]
    try:
        results[first] = cache.put(llm.model, prompts[first], llm.complete(llm.client(max_retries=0), prompts[first]))
        todo = todo[1:]
    except Exception as e:  # noqa: BLE001 - every failure of the first call is classified here
        cause = fatal_cause(e)
        if cause is not None:
            raise EndpointError(f"{desc} model {llm.model!r} at {llm.where}: {cause}") from None
    client = llm.client()

    def one(i: int) -> tuple[int, dict]:
        try:
            return i, cache.put(llm.model, prompts[i], llm.complete(client, prompts[i]))
        except Exception as e:  # openai.APIError family, timeouts, malformed replies: no reply
            return i, cache.put(llm.model, prompts[i], None, f"{type(e).__name__}: {e}")

    with ThreadPoolExecutor(max_workers=llm.concurrency) as pool, \
            tqdm(total=len(todo), desc=desc, disable=not progress) as bar:
        for i, row in pool.map(one, todo):
            results[i] = row
            bar.update()
    return results


def failure_causes(replies: list[dict]) -> dict[str, int]:
    """Calls that got no reply, counted by cause (the exception's type)."""
    counts: dict[str, int] = {}
    for r in replies:
        if r is not None and r.get("reply") is None:
            cause = str(r.get("error") or "unknown").split(":")[0]
            counts[cause] = counts.get(cause, 0) + 1
    return counts
