"""Request parsers (role ``parser``): ``anthropic-parser`` turns an Anthropic ``/v1/messages``
body into a `SchedulingRequest` (system prompt first, content blocks as chat parts), so that a
front door serving that route, or an embedder, schedules it like a chat request.

NOTE: ``kvaware serve`` itself parses its OpenAI routes natively and does not consult configured
parsers; a configured ``anthropic-parser`` says so in a warning.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.scheduler import PluginContext, PluginRegistry, SchedulingRequest

__all__ = ["AnthropicParser", "ParseError", "register"]

#: Paths the Anthropic parser claims (upstream's).
MESSAGES_PATH = "/messages"
COUNT_TOKENS_PATH = "/messages/count_tokens"


class ParseError(KVAwareError, ValueError):
    """A body the parser cannot read (the front door answers 400)."""


def _content(value: Any) -> Any:
    """Anthropic content (a string or blocks) -> OpenAI chat content (a string or parts)."""
    if isinstance(value, str) or value is None:
        return value or ""
    parts: list[dict[str, Any]] = []
    for block in value if isinstance(value, list) else []:
        if not isinstance(block, Mapping):
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            src = block.get("source") or {}
            url = src.get("url") or f"data:{src.get('media_type', '')};base64,{src.get('data', '')}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind in ("tool_use", "tool_result", "thinking", "document"):
            # NOTE: kept as text so their tokens still count towards the prompt's prefix.
            parts.append({"type": "text", "text": json.dumps(block, sort_keys=True)})
    return parts


class AnthropicParser:
    """``anthropic-parser``: parses ``/v1/messages`` (and passes ``/v1/messages/count_tokens``
    through unparsed, as upstream)."""

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.name = ctx.name

    def claims(self, path: str) -> bool:
        """Whether `path` is one of this parser's routes."""
        return path.endswith((MESSAGES_PATH, COUNT_TOKENS_PATH))

    def parse(self, path: str, headers: Mapping[str, str], body: bytes) -> SchedulingRequest | None:
        """The scheduling request of a ``/v1/messages`` body; None for ``count_tokens`` (not an
        inference request).

        Raises:
            ParseError: Another path, invalid JSON, or no messages.
        """
        if path.endswith(COUNT_TOKENS_PATH):
            return None
        if not path.endswith(MESSAGES_PATH):
            raise ParseError(f"unsupported API endpoint: {path}")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ParseError(f"error unmarshaling request body: {exc}") from None
        if not isinstance(data, Mapping):
            raise ParseError("request body must be a JSON object")
        raw = data.get("messages")
        if not isinstance(raw, list) or not raw:
            raise ParseError("invalid messages request: must have at least one message")
        messages: list[dict[str, Any]] = []
        system = data.get("system")
        if system:
            messages.append({"role": "system", "content": _content(system)})
        for m in raw:
            if not isinstance(m, Mapping) or m.get("role") not in ("user", "assistant"):
                raise ParseError("each message needs a role 'user' or 'assistant'")
            messages.append({"role": m["role"], "content": _content(m.get("content"))})
        lower = {k.lower(): v for k, v in headers.items()}
        rid = lower.get("x-request-id") or str(uuid.uuid4())
        model = data.get("model")
        return SchedulingRequest(
            rid,
            model if isinstance(model, str) else "",
            messages=messages,
            headers=lower,
            chat={"tools": data["tools"]} if data.get("tools") else {},
        )


def _front_door_note(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    return params, [
        "anthropic-parser parses /v1/messages for front doors that route it and for embedders; "
        "'kvaware serve' serves the OpenAI routes and does not use configured parsers"
    ]


def register(registry: PluginRegistry) -> None:
    """Register ``anthropic-parser``."""
    registry.register(
        "anthropic-parser",
        AnthropicParser,
        kinds=("parser",),
        description="parses Anthropic /v1/messages bodies into scheduling requests",
        transform=_front_door_note,
    )
