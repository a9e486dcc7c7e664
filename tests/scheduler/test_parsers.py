"""anthropic-parser parses /v1/messages bodies (ported in spirit from upstream's parser tests);
the gRPC parsers and the models data source load as documented no-ops with warnings."""

from __future__ import annotations

import json

import pytest

from kvaware_scorer.scheduler import PluginRegistry, load_config

from .conftest import build, config


def parser() -> object:
    s = build(config([{"type": "anthropic-parser"}, {"type": "queue-scorer"}]), seed=0)
    return s.plugin("anthropic-parser")


def test_messages_body_becomes_a_chat_request() -> None:
    """System prompt first, text and image blocks as chat parts, model and headers kept."""
    body = {
        "model": "claude-like",
        "max_tokens": 64,
        "system": "be brief",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image", "source": {"type": "url", "url": "http://x/i.png"}},
                ],
            },
            {"role": "assistant", "content": "hello"},
        ],
    }
    req = parser().parse("/v1/messages", {"X-Request-Id": "r1"}, json.dumps(body).encode())  # type: ignore[attr-defined]
    assert req.request_id == "r1" and req.model == "claude-like"
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "http://x/i.png"}},
            ],
        },
        {"role": "assistant", "content": "hello"},
    ]


@pytest.mark.parametrize(
    ("path", "body", "match"),
    [
        ("/v1/chat/completions", b"{}", "unsupported"),
        ("/v1/messages", b"{", "unmarshaling"),
        ("/v1/messages", b'{"model": "m", "messages": []}', "at least one message"),
    ],
)
def test_bad_messages_requests(path: str, body: bytes, match: str) -> None:
    """Other paths, invalid JSON and empty messages are parse errors."""
    from kvaware_scorer.plugins.parsers import ParseError

    with pytest.raises(ParseError, match=match):
        parser().parse(path, {}, body)  # type: ignore[attr-defined]


def test_count_tokens_is_passed_through() -> None:
    """/v1/messages/count_tokens is no inference request: nothing to schedule."""
    assert parser().parse("/v1/messages/count_tokens", {}, b"{}") is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "type_name",
    ["vllmgrpc-parser", "vertexai-parser", "models-data-source", "models-data-extractor"],
)
def test_no_op_types_warn_by_name(type_name: str, registry: PluginRegistry) -> None:
    """Types accepted as no-ops load with a warning naming them."""
    cfg = load_config(config([{"type": type_name}, {"type": "queue-scorer"}]), registry)
    assert any(type_name in w and "does nothing" in w for w in cfg.warnings)


def test_anthropic_parser_says_what_serves_it(registry: PluginRegistry) -> None:
    """Configuring anthropic-parser warns that 'kvaware serve' does not use parsers."""
    data = {
        **config([{"type": "anthropic-parser"}, {"type": "queue-scorer"}]),
        "requestHandler": {"parsers": [{"pluginRef": "anthropic-parser"}]},
    }
    cfg = load_config(data, registry)
    assert any("does not use configured parsers" in w for w in cfg.warnings)
