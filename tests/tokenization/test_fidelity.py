"""Tokens are the ones vLLM computes: completion defaults, chat rendering rules, given ids."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from kvaware_scorer.tokenization import (
    TokenizationService,
    build_template_kwargs,
    detect_content_format,
    normalize_tools,
    parse_messages,
    request_tokenization_args,
)
from kvaware_scorer.tokenization.local import BOS_TOKEN
from tests.tokenization.conftest import CHATML_MODEL, LLAMA_MODEL, MODELS

PROMPTS = (
    "Hello world",
    "The scheduler scores 12345 pods; café, naïve, 日本語 and 😀 too.\n\n  indented\tline",
    "literal special text <|im_start|>user in a prompt",
    "   leading spaces and trailing spaces   ",
)
CHAT = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is a KV cache?"},
    {"role": "assistant", "content": "A store of attention keys and values."},
    {"role": "user", "content": "And a prefix cache hit?"},
]


def _oracle_chat(hf: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    ids: list[int] = hf.apply_chat_template(
        messages, tokenize=True, return_dict=False, **{"add_generation_prompt": True, **kwargs}
    )
    return ids


@pytest.mark.parametrize("model", MODELS)
def test_completion_prompt_matches_transformers_encode(
    make_service: Callable[..., TokenizationService], hf_tokenizers: dict[str, Any], model: str
) -> None:
    """A completion prompt gets encode(prompt) with the tokenizer's default special tokens."""
    svc = make_service()
    hf = hf_tokenizers[model]
    for prompt in PROMPTS:
        assert svc.tokenize(model, prompt=prompt) == hf.encode(prompt)
        assert svc.tokenize(model, prompt=prompt, add_special_tokens=False) == hf.encode(
            prompt, add_special_tokens=False
        )
    bos = hf.convert_tokens_to_ids(BOS_TOKEN)
    assert (svc.tokenize(model, prompt="hi")[0] == bos) == (model == LLAMA_MODEL)


def test_prompt_token_ids_are_used_as_given(
    make_service: Callable[..., TokenizationService],
) -> None:
    """A prompt given as token ids is returned unchanged, even for an unknown model."""
    svc = make_service()
    assert svc.tokenize("no/such-model", prompt=[5, 1, 999_999]) == [5, 1, 999_999]
    result = svc.tokenize_request("no/such-model", prompt=(3, 4))
    assert result.source == "given" and result.complete and result.token_ids == [3, 4]
    for bad in ([1, -2], [1, "2"], [True]):
        with pytest.raises(ValueError, match="non-negative integers"):
            svc.tokenize("m", prompt=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("model", MODELS)
def test_chat_matches_apply_chat_template(
    make_service: Callable[..., TokenizationService], hf_tokenizers: dict[str, Any], model: str
) -> None:
    """Chat tokens are the template rendered with a generation prompt, encoded without specials."""
    svc = make_service()
    hf = hf_tokenizers[model]
    ids = svc.tokenize(model, messages=CHAT)
    assert ids == _oracle_chat(hf, CHAT)
    bos = hf.convert_tokens_to_ids(BOS_TOKEN)
    assert ids.count(bos) == (1 if model == LLAMA_MODEL else 0)
    text = svc.render_chat(model, CHAT)
    assert text.endswith("<|im_start|>assistant\n")
    assert hf.encode(text, add_special_tokens=False) == ids


def test_chat_add_special_tokens_true_adds_them_again(
    make_service: Callable[..., TokenizationService], hf_tokenizers: dict[str, Any]
) -> None:
    """add_special_tokens=True on a chat request adds the bos on top of the template's, as vLLM."""
    svc = make_service(cache_size=0)  # whole tokenizations only
    hf = hf_tokenizers[LLAMA_MODEL]
    ids = svc.tokenize(LLAMA_MODEL, messages=CHAT, add_special_tokens=True)
    bos = hf.convert_tokens_to_ids(BOS_TOKEN)
    assert ids[:2] == [bos, bos]
    assert ids[1:] == svc.tokenize(LLAMA_MODEL, messages=CHAT)


def test_chat_template_kwargs_and_reasoning_effort(
    make_service: Callable[..., TokenizationService],
) -> None:
    """chat_template_kwargs reach the template; reasoning_effort sets enable_thinking unless given."""
    svc = make_service()
    think = "<think>\n\n</think>\n\n"
    plain = svc.render_chat(CHATML_MODEL, CHAT)
    off = svc.render_chat(CHATML_MODEL, CHAT, chat_template_kwargs={"enable_thinking": False})
    assert off == plain + think
    assert svc.render_chat(CHATML_MODEL, CHAT, reasoning_effort="none") == plain + think
    assert svc.render_chat(CHATML_MODEL, CHAT, reasoning_effort="high") == plain
    kept = svc.render_chat(
        CHATML_MODEL, CHAT, reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}
    )
    assert kept == plain
    # Request fields win over the same keys in chat_template_kwargs (vLLM merges them so).
    agp = svc.render_chat(CHATML_MODEL, CHAT, chat_template_kwargs={"add_generation_prompt": False})
    assert agp == plain


def test_request_template_and_declared_variables(
    make_service: Callable[..., TokenizationService], hf_tokenizers: dict[str, Any]
) -> None:
    """A request-level chat_template replaces the tokenizer's and sees declared kwargs."""
    svc = make_service()
    template = (
        "{{ greeting }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    text = svc.render_chat(
        CHATML_MODEL, CHAT[:2], chat_template=template, chat_template_kwargs={"greeting": "Hi! "}
    )
    assert text == "Hi! [system] You are a careful assistant.\n[user] What is a KV cache?\n"
    ids = svc.tokenize(CHATML_MODEL, messages=CHAT[:2], chat_template=template)
    hf = hf_tokenizers[CHATML_MODEL]
    assert ids == hf.encode(text.removeprefix("Hi! "), add_special_tokens=False)


def test_continue_final_message(
    make_service: Callable[..., TokenizationService], hf_tokenizers: dict[str, Any]
) -> None:
    """continue_final_message leaves the last assistant message open; with a generation prompt it fails."""
    svc = make_service()
    msgs = [*CHAT[:2], {"role": "assistant", "content": "Sure, the cache"}]
    text = svc.render_chat(
        CHATML_MODEL, msgs, add_generation_prompt=False, continue_final_message=True
    )
    assert text.endswith("<|im_start|>assistant\nSure, the cache")
    hf = hf_tokenizers[CHATML_MODEL]
    ids = svc.tokenize(
        CHATML_MODEL, messages=msgs, add_generation_prompt=False, continue_final_message=True
    )
    assert ids == hf.apply_chat_template(
        msgs, tokenize=True, return_dict=False, continue_final_message=True
    )
    with pytest.raises(ValueError, match="cannot both be true"):
        svc.tokenize(CHATML_MODEL, messages=msgs, continue_final_message=True)


def test_tools_are_dumped_like_vllm(make_service: Callable[..., TokenizationService]) -> None:
    """Tools reach the template as vLLM dumps them: description/parameters present, None if unset."""
    svc = make_service()
    tools = [{"type": "function", "function": {"name": "get_weather", "strict": True}}]
    text = svc.render_chat(CHATML_MODEL, CHAT[:2], tools=tools)
    expected = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": None,
            "parameters": None,
            "strict": True,
        },
    }
    assert json.dumps(expected) in text
    assert normalize_tools(tools) == [expected]
    assert text.startswith("<|im_start|>system\nYou are a careful assistant.\n\n# Tools")
    for bad in ([{"type": "function"}], [{"function": {"description": "x"}}], "tools"):
        with pytest.raises(ValueError):
            normalize_tools(bad)  # type: ignore[arg-type]


def test_tool_call_arguments_are_decoded(make_service: Callable[..., TokenizationService]) -> None:
    """Assistant tool-call arguments given as JSON text reach the template as objects."""
    svc = make_service()

    def call(arguments: Any) -> dict[str, Any]:
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
            ],
        }

    text = svc.render_chat(CHATML_MODEL, [CHAT[1], call('{"city": "Paris"}')])
    assert '{"name": "f", "arguments": {"city": "Paris"}}' in text
    assert '"arguments": {}' in svc.render_chat(CHATML_MODEL, [CHAT[1], call("")])
    with pytest.raises(ValueError, match="not valid JSON"):
        svc.render_chat(CHATML_MODEL, [CHAT[1], call("{oops")])
    with pytest.raises(ValueError, match="not valid JSON"):  # json.loads: RecursionError
        svc.render_chat(CHATML_MODEL, [CHAT[1], call("[" * 100_000 + "]" * 100_000)])
    empty = {"role": "assistant", "content": "done", "tool_calls": []}
    assert parse_messages([empty], "string") == [{"role": "assistant", "content": "done"}]


def test_message_fields_kept_like_vllm() -> None:
    """Only vLLM's message fields survive parsing (name, tool ids, reasoning, tool calls)."""
    msgs = [
        {"role": "user", "content": "a", "name": "bob", "foo": 1},
        {
            "role": "assistant",
            "content": "b",
            "reasoning_content": "thought",
            "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}],
        },
        {
            "role": "tool",
            "content": [{"type": "text", "text": "r1"}, {"type": "text", "text": "r2"}],
            "tool_call_id": "c1",
        },
        {"role": "developer", "content": "d", "tools": [{"x": 1}]},
    ]
    for fmt in ("string", "openai"):
        parsed = parse_messages(msgs, fmt)  # type: ignore[arg-type]
        assert [sorted(m) for m in parsed] == [
            ["content", "name", "role"],
            ["content", "reasoning", "reasoning_content", "role", "tool_calls"],
            ["content", "role", "tool_call_id"],
            ["content", "role", "tools"],
        ]
        assert parsed[2]["content"] == "r1\nr2"  # tool results become text in both formats
        assert parsed[1]["reasoning"] == "thought"


def test_content_parts_for_string_and_openai_templates(
    make_service: Callable[..., TokenizationService],
) -> None:
    """Text parts are joined with newlines for string templates and kept as parts otherwise."""
    svc = make_service()
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                "b",
                {"type": "image_url", "image_url": {"url": "u"}},
            ],
        }
    ]
    joined = [{"role": "user", "content": "a\nb"}]
    assert svc.tokenize(CHATML_MODEL, messages=parts) == svc.tokenize(CHATML_MODEL, messages=joined)
    openai_template = (
        "{% for m in messages %}{% for p in m['content'] %}[{{ p['type'] }}"
        "{% if p['text'] is defined %}:{{ p['text'] }}{% endif %}]{% endfor %}{% endfor %}"
    )
    text = svc.render_chat(CHATML_MODEL, parts, chat_template=openai_template)
    assert text == "[text:a][text:b][image]"
    text = svc.render_chat(
        CHATML_MODEL, [{"role": "user", "content": "hi"}], chat_template=openai_template
    )
    assert text == "[text:hi]"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "string"),
        (
            "{% for m in messages %}{% for c in m['content'] %}{{ c }}{% endfor %}{% endfor %}",
            "openai",
        ),
        (
            "{% for m in messages %}{% for c in m.content %}{{ c }}{% endfor %}{% endfor %}",
            "openai",
        ),
        (
            "{% set rest = messages[1:] %}{% for m in rest %}{% for c in m['content'] | list %}"
            "{{ c }}{% endfor %}{% endfor %}",
            "openai",
        ),
        (
            "{% set first = messages[0] %}{% for c in first['content'] %}{{ c }}{% endfor %}",
            "openai",
        ),
        (
            "{% for m in messages %}{% set parts = m['content'] %}{% for c in parts %}{{ c }}"
            "{% endfor %}{% endfor %}",
            "openai",
        ),
        (
            "{% for x in other %}{% for c in x['content'] %}{{ c }}{% endfor %}{% endfor %}",
            "string",
        ),
        ("{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}", "string"),
        ("{% generation %}{{ x }}{% endgeneration %}", "string"),
        ("{% for m in messages %", "string"),
    ],
)
def test_content_format_detection(template: str, expected: str) -> None:
    """Templates looping over a message's content are detected as the openai content format."""
    assert detect_content_format(template) == expected


def test_template_kwargs_merge_rules() -> None:
    """Request fields override chat_template_kwargs; None leaves them; forbidden keys fail."""
    merged = build_template_kwargs({"add_generation_prompt": False, "x": 1}, documents=None)
    assert merged == {"add_generation_prompt": True, "continue_final_message": False, "x": 1}
    assert build_template_kwargs(reasoning_effort="low")["enable_thinking"] is True
    for bad in ("tokenize", "chat_template", "tools", "conversation"):
        with pytest.raises(ValueError, match="must not contain"):
            build_template_kwargs({bad: 1})


def test_bad_requests_are_clear_errors(make_service: Callable[..., TokenizationService]) -> None:
    """Malformed arguments, messages and templates raise ValueError naming the problem."""
    svc = make_service()
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "exactly one of prompt or messages"),
        ({"prompt": "a", "messages": CHAT}, "exactly one of prompt or messages"),
        ({"prompt": "a", "tools": []}, "apply to chat messages"),
        ({"prompt": "a", "bogus": 1}, "unknown tokenization option"),
        ({"prompt": "a", "add_special_tokens": "yes"}, "must be a boolean"),
        ({"prompt": b"a"}, "not bytes"),
        ({"messages": "hello"}, "list of message objects"),
        ({"messages": [{"content": "x"}]}, "string 'role'"),
        ({"messages": [{"role": "user", "content": 5}]}, "string or a list of parts"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "needs a string 'text'"),
        ({"messages": [{"role": "user", "content": [{"foo": 1}]}]}, "has no 'type'"),
        (
            {"messages": CHAT, "chat_template": "{{ raise_exception('roles must alternate') }}"},
            "roles must alternate",
        ),
        ({"messages": CHAT, "chat_template": "{% for %}"}, "rendering failed"),
        ({"messages": [], "chat_template": "x"}, "rendering failed"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            svc.tokenize(CHATML_MODEL, **kwargs)


def test_request_bodies_map_to_tokenization_args() -> None:
    """OpenAI request bodies give the fields vLLM tokenizes from, and nothing else."""
    chat = {
        "model": "m",
        "messages": CHAT,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "chat_template_kwargs": {"enable_thinking": False},
        "add_generation_prompt": None,
        "temperature": 0.2,
    }
    assert request_tokenization_args(chat) == {
        "messages": CHAT,
        "chat_template_kwargs": {"enable_thinking": False},
        "tools": chat["tools"],
    }
    assert request_tokenization_args({"prompt": "hi", "add_special_tokens": False}) == {
        "prompt": "hi",
        "add_special_tokens": False,
    }
    assert request_tokenization_args({"prompt": [1, 2, 3]}) == {"token_ids": [1, 2, 3]}
    assert request_tokenization_args({"prompt": ["a", "b"]}) == {"prompt": "a"}
    assert request_tokenization_args({"prompt": [[4, 5], [6]]}) == {"token_ids": [4, 5]}
    assert request_tokenization_args({"prompt_token_ids": [7]}) == {"token_ids": [7]}
    for bad in ({}, {"prompt": None}, {"prompt": [1, "x"]}, {"prompt": [-1]}):
        with pytest.raises(ValueError):
            request_tokenization_args(bad)
