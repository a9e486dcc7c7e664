"""vLLM's OpenAI wire format for the live pods' HTTP server (``server.py``).

Request-field checks with vLLM's 400 messages (`int_field`, `token_list`, `cache_salt`,
`too_long`), errors in vLLM's ``{"error": {...}}`` shape (`HTTPError`, `error_response`), JSON
answers, and the SSE chunks of a streamed answer (`Answer`). No pod state: pure functions of
the request body and the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from aiohttp import web

__all__ = [
    "DONE",
    "SAMPLING_FIELDS",
    "SSE_HEADERS",
    "Answer",
    "HTTPError",
    "cache_salt",
    "encode",
    "error_response",
    "int_field",
    "json_response",
    "token_list",
    "too_long",
]

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"
encode = msgspec.json.encode


class HTTPError(Exception):
    """An error answered in vLLM's shape."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def error_response(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.Response(body=encode(body), status=status, content_type="application/json")


def json_response(data: Any) -> web.Response:
    return web.Response(body=encode(data), content_type="application/json")


def int_field(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise HTTPError(400, f"{name} must be an integer, got {value!r}")
    return value


def token_list(value: Any, vocab: int | None, name: str) -> list[int] | None:
    if not isinstance(value, list) or not value:
        return None
    for t in value:
        if not isinstance(t, int) or isinstance(t, bool):
            return None
    lo, hi = min(value), max(value)
    if lo < 0:
        raise HTTPError(400, f"{name}: token ids must be non-negative, got {lo}")
    limit = vocab if vocab is not None else 1 << 31
    if hi >= limit:
        raise HTTPError(400, f"Token id {hi} is out of vocabulary")
    return list(value)


def too_long(limit: int, max_tokens: int, prompt: int | None) -> str:
    """vLLM's context-length refusal (prompt None: checked before tokenizing)."""
    if max_tokens == 0:
        return (
            f"This model's maximum context length is {limit} tokens. However, your request "
            f"has {prompt} input tokens. Please reduce the length of the input."
        )
    has = "at least 1 input token" if prompt is None else f"{prompt} input tokens"
    shown = 1 if prompt is None else prompt
    return (
        f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
        f"maximum context length is {limit} tokens and your request has {has} "
        f"({max_tokens} > {limit} - {shown})."
    )


def cache_salt(body: Mapping[str, Any]) -> str | None:
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise HTTPError(400, "cache_salt must be a non-empty string")
    return salt


# Sampling fields a render answer carries over into its ``sampling_params`` (vLLM's names).
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
)


class Answer:
    """Identity of one response and its SSE chunk encoder."""

    __slots__ = ("chat", "created", "id", "model", "object")

    def __init__(self, answer_id: str, model: str, created: int, chat: bool) -> None:
        self.id = answer_id
        self.model = model
        self.created = created
        self.chat = chat
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def chunk(self, choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> bytes:
        """One ``data:`` event (a choice, or the final usage chunk with no choices)."""
        data: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [] if choice is None else [choice],
        }
        if usage is not None:
            data["usage"] = usage
        return b"data: " + encode(data) + b"\n\n"
