"""Request parsing and the OpenAI error shape (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.gateway import (
    APIError,
    GatewayConfig,
    RequestParser,
    error_body,
    load_gateway_config,
)


def dumps(data: Any) -> bytes:
    return json.dumps(data).encode()


@pytest.fixture
def parser() -> RequestParser:
    return RequestParser()


@pytest.mark.parametrize(
    ("prompt", "text", "ids", "batch"),
    [
        ("hello world", "hello world", None, 1),
        ([1, 2, 3], None, [1, 2, 3], 1),
        (["first", "second"], "first", None, 2),
        ([[5, 6], [7]], None, [5, 6], 2),
        ([], None, [], 1),
    ],
)
def test_completion_prompt_shapes(
    parser: RequestParser, prompt: Any, text: str | None, ids: list[int] | None, batch: int
) -> None:
    """Every completions prompt shape (text, token ids, batches of either) is understood;
    a batch is routed by its first prompt."""
    parsed = parser.completion(dumps({"model": "m", "prompt": prompt, "temperature": 0}))
    assert parsed.model == "m"
    assert parsed.prompt == text
    assert parsed.token_ids == ids
    assert parsed.batch == batch
    assert parsed.stream is False


def test_completion_fields(parser: RequestParser) -> None:
    """stream, cache_salt and add_special_tokens are read; unknown fields are ignored."""
    parsed = parser.completion(
        dumps(
            {
                "model": "m",
                "prompt": "x",
                "stream": True,
                "cache_salt": "tenant-a",
                "add_special_tokens": False,
                "vllm_xargs": {"a": 1},
            }
        )
    )
    assert parsed.stream is True
    assert parsed.cache_salt == "tenant-a"
    assert parsed.chat == {"add_special_tokens": False}


def test_chat_fields(parser: RequestParser) -> None:
    """Chat messages and every rendering option present are handed to the scheduler."""
    body = {
        "model": "m",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        "chat_template": "{{ messages }}",
        "chat_template_kwargs": {"enable_thinking": False},
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "add_generation_prompt": True,
        "continue_final_message": False,
        "add_special_tokens": False,
        "max_tokens": 5,
    }
    parsed = parser.chat(dumps(body))
    assert parsed.messages == body["messages"]
    assert parsed.chat == {
        "chat_template": "{{ messages }}",
        "chat_template_kwargs": {"enable_thinking": False},
        "tools": body["tools"],
        "add_generation_prompt": True,
        "continue_final_message": False,
        "add_special_tokens": False,
    }
    assert parsed.prompt is None and parsed.token_ids is None


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{", None, "invalid_json"),
        (b"", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_type"),
        (b'{"prompt": "x"}', "model", "missing_required_parameter"),
        (b'{"model": 7, "prompt": "x"}', "model", "invalid_type"),
        (b'{"model": "", "prompt": "x"}', "model", None),
        (b'{"model": "m"}', "prompt", "missing_required_parameter"),
        (b'{"model": "m", "prompt": 5}', "prompt", "invalid_type"),
        (b'{"model": "m", "prompt": [1, -2]}', "prompt", "invalid_type"),
        (b'{"model": "m", "prompt": [1, 4294967296]}', "prompt", "invalid_type"),
        (b'{"model": "m", "prompt": [1, true]}', "prompt", "invalid_type"),
        (b'{"model": "m", "prompt": [[1], [2, "x"]]}', "prompt", "invalid_type"),
        (b'{"model": "m", "prompt": "x", "stream": "yes"}', "stream", "invalid_type"),
        (b'{"model": "m", "prompt": "x", "cache_salt": 1}', "cache_salt", "invalid_type"),
    ],
)
def test_completion_errors(
    parser: RequestParser, body: bytes, param: str | None, code: str | None
) -> None:
    """Bad completions bodies raise a 400 naming the field at fault."""
    with pytest.raises(APIError) as info:
        parser.completion(body)
    err = info.value
    assert err.status == 400
    assert err.param == param
    assert err.code == code
    shape = err.body()["error"]
    assert set(shape) == {"message", "type", "param", "code"}
    assert shape["type"] == "invalid_request_error"
    assert shape["message"]


def test_nested_error_path(parser: RequestParser) -> None:
    """The error message names the exact element at fault."""
    with pytest.raises(APIError) as info:
        parser.completion(b'{"model": "m", "prompt": [[1], [2, "x"]]}')
    assert "`prompt[1][1]`" in info.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "m"}', "messages"),
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"model": "m", "messages": "hi"}', "messages"),
        (b'{"model": "m", "messages": ["hi"]}', "messages"),
        (b'{"model": "m", "messages": [{"role": "user"}], "tools": {}}', "tools"),
        (
            b'{"model": "m", "messages": [{"role": "user"}], "chat_template_kwargs": []}',
            "chat_template_kwargs",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user"}], "add_generation_prompt": 1}',
            "add_generation_prompt",
        ),
    ],
)
def test_chat_errors(parser: RequestParser, body: bytes, param: str) -> None:
    """Bad chat bodies raise a 400 naming the field at fault."""
    with pytest.raises(APIError) as info:
        parser.chat(body)
    assert info.value.status == 400
    assert info.value.param == param


def test_is_chat(parser: RequestParser) -> None:
    """/v1/score tells chat bodies from completions bodies."""
    assert parser.is_chat(b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}')
    assert not parser.is_chat(b'{"model": "m", "prompt": "x"}')
    with pytest.raises(APIError):
        parser.is_chat(b"nope")


_BAD = b"\xff\xfe"
_DEEP = b"[" * 5_000 + b"]" * 5_000

# Every string position each decoder of RequestParser reads, plus nesting beyond msgspec's
# recursion limit: whichever of DecodeError (msgspec >= 0.23), UnicodeDecodeError (before) or
# RecursionError the installed msgspec raises, the answer is the same 400.
_UNREADABLE_BODIES = {
    "completion": [
        b'{"model": "m", "prompt": "' + _BAD + b'"}',
        b'{"model": "' + _BAD + b'", "prompt": "x"}',
        b'{"model": "m", "prompt": ["' + _BAD + b'"]}',
        b'{"model": "m", "prompt": ["ok", "' + _BAD + b'"]}',
        b'{"model": "m", "prompt": "x", "cache_salt": "' + _BAD + b'"}',
        b'{"model": "m", "prompt": ' + _DEEP + b"}",
        b'{"model": "m", "prompt": [' + _DEEP + b"]}",
        b'{"model": "m", "skipped": ' + _DEEP + b', "prompt": "x"}',
        b'{"model": "m", "prompt": "x"',
        b"\xff",
    ],
    "chat": [
        b'{"model": "m", "messages": [{"role": "user", "content": "' + _BAD + b'"}]}',
        b'{"model": "m", "messages": [{"' + _BAD + b'": "x"}]}',
        b'{"model": "m", "messages": [{"role": "user"}], "chat_template": "' + _BAD + b'"}',
        b'{"model": "m", "messages": [{"role": "user"}], "tools": [{"x": "' + _BAD + b'"}]}',
        b'{"model": "m", "messages": [{"role": "user", "content": ' + _DEEP + b"}]}",
        b'{"model": "m", "messages": [{"role": "user"}], "skipped": ' + _DEEP + b"}",
    ],
    "is_chat": [
        b'{"model": "m", "messages": [{"content": "x"}], "\xff',
        b'{"model": "m", "messages": ' + _DEEP + b"}",
        b'{"model": "m", "prompt": ' + _DEEP + b"}",
    ],
}


@pytest.mark.parametrize(
    ("method", "body"),
    [(m, b) for m, bodies in _UNREADABLE_BODIES.items() for b in bodies],
    ids=[f"{m}-{i}" for m, bodies in _UNREADABLE_BODIES.items() for i in range(len(bodies))],
)
def test_unreadable_bodies_are_400_invalid_json(
    parser: RequestParser, method: str, body: bytes
) -> None:
    """Bytes that are not readable JSON (not UTF-8, too deep, malformed) are a 400
    invalid_json from every decoder, whatever error type the installed msgspec raises."""
    with pytest.raises(APIError) as info:
        getattr(parser, method)(body)
    err = info.value
    assert err.status == 400
    assert err.code == "invalid_json"
    assert err.message.startswith("We could not parse the JSON body of your request: ")
    if _BAD in body:
        assert err.message.endswith(("it is not valid UTF-8", ")"))
        assert "UTF-8" in err.message


def test_error_body_shape() -> None:
    """Errors use the OpenAI shape; 5xx errors are server errors."""
    assert error_body("m", param="p", code="c") == {
        "error": {"message": "m", "type": "invalid_request_error", "param": "p", "code": "c"}
    }
    assert APIError(502, "x").body()["error"]["type"] == "server_error"


def test_gateway_config(tmp_path: Any) -> None:
    """GatewayConfig loads camelCase YAML with durations, applies overrides and refuses
    unknown keys with their path."""
    path = tmp_path / "gw.yaml"
    path.write_text("maxBodyBytes: 2048\nconnectTimeout: 500ms\ndrainTimeout: 1m\n")
    cfg = load_gateway_config(path, port=9000, host=None)
    assert cfg.max_body_bytes == 2048
    assert cfg.connect_timeout == 0.5
    assert cfg.drain_timeout == 60.0
    assert cfg.port == 9000
    assert cfg.host == GatewayConfig().host
    path.write_text("maxBodyByte: 1\n")
    with pytest.raises(ConfigError, match="maxBodyByte"):
        load_gateway_config(path)
    with pytest.raises(ConfigError):
        load_gateway_config(None, max_attempts=0)
