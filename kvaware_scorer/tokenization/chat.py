"""Chat rendering as vLLM's OpenAI server does it: message parsing, tools, template kwargs.

vLLM (``vllm/renderers/hf.py``, ``vllm/entrypoints/chat_utils.py`` and the request models in
``vllm/entrypoints/openai/chat_completion/protocol.py``) does not hand the request's messages
to the chat template as they are. The rules mirrored here, in order:

1. Template: the request's ``chat_template`` if given, else the tokenizer's own (for tokenizers
   with several named templates, the ``tool_use`` one when tools are given).
2. Content format: a template that loops over ``message['content']`` gets content as a list of
   parts (``"openai"``); any other gets a string (``"string"``) in which the text parts are
   joined with ``"\\n"``. A ``None`` content is an empty string (or an empty list).
3. Messages: only ``role`` and the parsed ``content`` are kept, plus ``name`` (a string),
   ``tool_calls`` and ``reasoning``/``reasoning_content`` (assistant), ``tool_call_id`` (tool;
   a list content of text parts is joined into a string even in the openai format) and
   ``tools`` (developer). Assistant tool calls: an empty list is dropped, and
   ``function.arguments`` given as a JSON string is decoded into a dict (``{}`` when empty).
4. Tools: dumped like vLLM's ``ChatCompletionToolsParam``: ``{"type", "function": {"name",
   "description", "parameters", ...}}`` with ``description``/``parameters`` present (``None``
   when absent).
5. Template kwargs: ``chat_template_kwargs`` first, then overridden by the request fields that
   are set: ``add_generation_prompt`` (default True), ``continue_final_message`` (default False),
   ``documents`` and ``reasoning_effort`` (which also sets ``enable_thinking`` unless given).
   ``chat_template`` and ``tokenize`` inside ``chat_template_kwargs`` are errors; other keys
   are passed only when ``apply_chat_template`` takes them or the template declares them.
6. ``apply_chat_template(..., tokenize=False)`` renders the text; the caller encodes it with
   ``add_special_tokens=False`` unless the request says otherwise (the template already wrote
   the bos token where the model wants one).
"""

from __future__ import annotations

import inspect
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CHAT_OPTIONS",
    "ChatTemplateCache",
    "ContentFormat",
    "TemplateFacts",
    "build_template_kwargs",
    "detect_content_format",
    "normalize_tools",
    "parse_messages",
    "render_chat",
]

ContentFormat = Literal["string", "openai"]

#: Request fields that shape the rendered chat (and ``add_special_tokens`` for the encoding).
CHAT_OPTIONS = frozenset(
    {
        "chat_template",
        "chat_template_kwargs",
        "tools",
        "add_generation_prompt",
        "continue_final_message",
        "documents",
        "reasoning_effort",
        "add_special_tokens",
    }
)

_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
_MODALITIES = {
    "image_url": "image",
    "input_image": "image",
    "image_pil": "image",
    "image_embeds": "image",
    "input_audio": "audio",
    "audio_url": "audio",
    "audio_embeds": "audio",
    "video_url": "video",
    "video_embeds": "video",
}
_UNSET = (None, "auto")
_FORBIDDEN_KWARGS = ("chat_template", "tokenize")
_RESERVED_KWARGS = ("conversation", "tools")


@dataclass(frozen=True, slots=True)
class TemplateFacts:
    """What rendering needs to know about one template text.

    Attributes:
        content_format: ``"openai"`` when the template loops over a message's content.
        variables: Names the template reads from its context.
    """

    content_format: ContentFormat
    variables: frozenset[str]


def _environment() -> Any:
    import jinja2.ext
    import jinja2.sandbox

    class _GenerationTag(jinja2.ext.Extension):
        # transformers templates may mark assistant spans with {% generation %}; only parsing
        # is needed here, so the block is kept as plain output.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    return jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )


def _unwrap(node: Any) -> Any:
    from jinja2 import nodes

    while isinstance(node, (nodes.Filter, nodes.Test)) and node.node is not None:
        node = node.node
    return node


def _is_list(node: Any, lists: set[str]) -> bool:
    from jinja2 import nodes

    node = _unwrap(node)
    if isinstance(node, nodes.Name):
        return node.name in lists
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        return _is_list(node.node, lists)
    return False


def _is_message(node: Any, lists: set[str], messages: set[str]) -> bool:
    from jinja2 import nodes

    node = _unwrap(node)
    if isinstance(node, nodes.Name):
        return node.name in messages
    if isinstance(node, nodes.Getitem) and not isinstance(node.arg, nodes.Slice):
        return _is_list(node.node, lists)
    return False


def _is_content(node: Any, lists: set[str], messages: set[str], contents: set[str]) -> bool:
    from jinja2 import nodes

    node = _unwrap(node)
    if isinstance(node, nodes.Name):
        return node.name in contents
    if isinstance(node, nodes.Getitem):
        key = node.arg.value if isinstance(node.arg, nodes.Const) else None
        return key == "content" and _is_message(node.node, lists, messages)
    if isinstance(node, nodes.Getattr):
        return node.attr == "content" and _is_message(node.node, lists, messages)
    return False


def detect_content_format(template: str) -> ContentFormat:
    """``"openai"`` when `template` iterates over a message's ``content``, else ``"string"``.

    Follows ``messages`` through ``set`` assignments, slices and filters to the loop variables
    that hold one message, then looks for a ``for`` loop over such a message's content.
    """
    from jinja2 import TemplateSyntaxError, nodes

    try:
        ast = _environment().parse(template)
    except TemplateSyntaxError:
        return "string"
    lists: set[str] = {"messages"}
    messages: set[str] = set()
    contents: set[str] = set()
    assigns = list(ast.find_all(nodes.Assign))
    loops = list(ast.find_all(nodes.For))
    for _ in range(8):  # names chain through a few assignments at most; stop at a fixpoint
        before = (len(lists), len(messages), len(contents))
        for a in assigns:
            if not isinstance(a.target, nodes.Name):
                continue
            if _is_list(a.node, lists):
                lists.add(a.target.name)
            elif _is_message(a.node, lists, messages):
                messages.add(a.target.name)
            elif _is_content(a.node, lists, messages, contents):
                contents.add(a.target.name)
        for loop in loops:
            if isinstance(loop.target, nodes.Name) and _is_list(loop.iter, lists):
                messages.add(loop.target.name)
        if (len(lists), len(messages), len(contents)) == before:
            break
    for loop in loops:
        if _is_content(loop.iter, lists, messages, contents):
            return "openai"
    return "string"


def _template_variables(template: str) -> frozenset[str]:
    from jinja2 import TemplateSyntaxError, meta

    env = _environment()
    try:
        return frozenset(meta.find_undeclared_variables(env.parse(template)))
    except TemplateSyntaxError:
        return frozenset()


class ChatTemplateCache:
    """Per-tokenizer memo of template facts (bounded: request templates can be anything).

    Args:
        hf: The transformers tokenizer.
        size: Templates remembered.
    """

    def __init__(self, hf: Any, size: int = 32) -> None:
        self.hf = hf
        self.size = size
        self._facts: OrderedDict[str, TemplateFacts] = OrderedDict()
        self._lock = threading.Lock()
        sig = inspect.signature(type(hf).apply_chat_template)
        self.hf_params = frozenset(
            p.name
            for p in sig.parameters.values()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
            and p.name != "self"
        )

    def resolve(self, chat_template: str | None, tools: Sequence[Any] | None) -> str:
        """The template to render with: the request's, else the tokenizer's.

        Raises:
            ValueError: Neither the request nor the tokenizer has a chat template.
        """
        if chat_template is not None:
            return chat_template
        try:
            resolved: str = self.hf.get_chat_template(None, tools=tools)
        except ValueError as exc:
            raise ValueError(
                f"no chat template: the tokenizer defines none and the request gave none ({exc})"
            ) from None
        return resolved

    def facts(self, template: str) -> TemplateFacts:
        """Content format and declared variables of `template` (memoized)."""
        with self._lock:
            found = self._facts.get(template)
            if found is not None:
                self._facts.move_to_end(template)
                return found
        facts = TemplateFacts(detect_content_format(template), _template_variables(template))
        with self._lock:
            self._facts[template] = facts
            while len(self._facts) > self.size:
                self._facts.popitem(last=False)
        return facts


def _part_text(part: Any) -> tuple[str, str | None]:
    """``(kind, text)`` of a content part: kind is ``text`` or a modality name."""
    if isinstance(part, str):
        return "text", part
    if not isinstance(part, Mapping):
        raise ValueError(f"a message content part must be a string or an object, got {part!r}")
    kind = part.get("type")
    if kind in _TEXT_PART_TYPES:
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"content part of type {kind!r} needs a string 'text'")
        return "text", text
    if kind == "refusal":
        refusal = part.get("refusal")
        return "text", refusal if isinstance(refusal, str) else ""
    if kind is None:
        kind = next((k for k in _MODALITIES if k in part), None)
        if kind is None:
            raise ValueError("content part has no 'type'")
    return _MODALITIES.get(str(kind), str(kind)), None


def _parse_message(message: Mapping[str, Any], fmt: ContentFormat) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ValueError(f"a chat message must be an object, got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str):
        raise ValueError("every chat message needs a string 'role'")
    content = message.get("content")
    if content is None:
        parts: list[Any] = []
    elif isinstance(content, str):
        parts = [content]
    elif isinstance(content, Sequence):
        parts = list(content)
    else:
        raise ValueError(f"message content must be a string or a list of parts, got {content!r}")
    parsed = [_part_text(p) for p in parts]
    out: dict[str, Any] = {"role": role}
    if fmt == "openai":
        out["content"] = [
            {"type": "text", "text": text} if kind == "text" else {"type": kind}
            for kind, text in parsed
        ]
    else:
        # NOTE: vLLM inserts model-specific placeholders for media parts here; media changes
        # the engine's block hashes anyway, so only the text is reproduced.
        out["content"] = "\n".join(text for kind, text in parsed if text is not None)
    reasoning = message.get("reasoning")
    if reasoning is None:
        reasoning = message.get("reasoning_content")
    if role == "assistant":
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            out["tool_calls"] = list(tool_calls)
        if reasoning is not None:
            out["reasoning"] = reasoning
            out["reasoning_content"] = reasoning
    elif role == "tool":
        if "tool_call_id" in message:
            out["tool_call_id"] = message["tool_call_id"]
        items = out["content"]
        if isinstance(items, list) and all(i.get("type") == "text" for i in items):
            out["content"] = "\n".join(i["text"] for i in items)
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    if isinstance(message.get("task"), str):
        out["task"] = message["task"]
    if role == "developer":
        out["tools"] = message.get("tools")
    return out


def _decode_tool_calls(message: dict[str, Any]) -> None:
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return
    if not calls:
        del message["tool_calls"]
        return
    decoded = []
    for call in calls:
        if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
            raise ValueError("each tool call must be an object with a 'function' object")
        function = dict(call["function"])
        arguments = function.get("arguments")
        if arguments:
            if not isinstance(arguments, (dict, list)):
                try:
                    function["arguments"] = json.loads(arguments)
                except (TypeError, ValueError, RecursionError) as exc:
                    # NOTE: client text: nesting deeper than json recurses is a bad request too
                    raise ValueError(f"tool call arguments are not valid JSON: {exc}") from None
        else:
            function["arguments"] = {}
        decoded.append({**call, "function": function})
    message["tool_calls"] = decoded


def parse_messages(
    messages: Sequence[Mapping[str, Any]], content_format: ContentFormat
) -> list[dict[str, Any]]:
    """The conversation vLLM hands to the chat template (rules 2 and 3 of this module).

    Raises:
        ValueError: A message or content part is malformed.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of message objects")
    conversation = [_parse_message(m, content_format) for m in messages]
    for message in conversation:
        if message["role"] == "assistant":
            _decode_tool_calls(message)
    return conversation


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Tools as vLLM dumps its ``ChatCompletionToolsParam`` models (rule 4).

    Raises:
        ValueError: A tool is not ``{"type": ..., "function": {"name": ...}}``.
    """
    if tools is None:
        return None
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ValueError("tools must be a list of tool objects")
    out: list[dict[str, Any]] = []
    for tool in tools:
        if not isinstance(tool, Mapping) or not isinstance(tool.get("function"), Mapping):
            raise ValueError("each tool must be an object with a 'function' object")
        fn = tool["function"]
        if not isinstance(fn.get("name"), str):
            raise ValueError("each tool function needs a string 'name'")
        function: dict[str, Any] = {
            "name": fn["name"],
            "description": fn.get("description"),
            "parameters": fn.get("parameters"),
        }
        for key, value in fn.items():
            function.setdefault(key, value)
        defer = tool.get("defer_loading")
        if function.get("defer_loading") is None:
            function.pop("defer_loading", None)
            if defer is not None:
                function["defer_loading"] = defer
        dumped: dict[str, Any] = {"type": tool.get("type", "function"), "function": function}
        if defer is not None:
            dumped["defer_loading"] = defer
        out.append(dumped)
    return out


def build_template_kwargs(
    chat_template_kwargs: Mapping[str, Any] | None = None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    documents: Sequence[Mapping[str, Any]] | None = None,
    reasoning_effort: str | None = None,
) -> dict[str, Any]:
    """The template kwargs vLLM builds from a chat request (rule 5, before filtering).

    Raises:
        ValueError: Both `add_generation_prompt` and `continue_final_message`, or a forbidden
            key in `chat_template_kwargs`.
    """
    if add_generation_prompt and continue_final_message:
        raise ValueError(
            "continue_final_message and add_generation_prompt cannot both be true "
            "(give add_generation_prompt=False to continue the final message)"
        )
    user = dict(chat_template_kwargs or {})
    bad = [k for k in _FORBIDDEN_KWARGS + _RESERVED_KWARGS if k in user]
    if bad:
        raise ValueError(f"chat_template_kwargs must not contain {', '.join(sorted(bad))}")
    extra: dict[str, Any] = {
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
        "documents": documents,
        "reasoning_effort": reasoning_effort,
    }
    if reasoning_effort is not None and "enable_thinking" not in user:
        extra["enable_thinking"] = reasoning_effort != "none"
    return user | {k: v for k, v in extra.items() if v not in _UNSET}


def render_chat(
    hf: Any,
    cache: ChatTemplateCache,
    messages: Sequence[Mapping[str, Any]],
    *,
    chat_template: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool | None = True,
    continue_final_message: bool | None = False,
    documents: Sequence[Mapping[str, Any]] | None = None,
    reasoning_effort: str | None = None,
) -> str:
    """Render `messages` to the prompt text vLLM would build for the same chat request.

    Args:
        hf: The transformers tokenizer.
        cache: Its `ChatTemplateCache`.
        messages: OpenAI-style chat messages.
        chat_template: Request-level Jinja template (or template name).
        chat_template_kwargs: Extra template variables.
        tools: OpenAI-style tool definitions.
        add_generation_prompt: Append the assistant header (None = vLLM's default, True).
        continue_final_message: Leave the last message open (None = False).
        documents: RAG documents passed to the template.
        reasoning_effort: Passed to the template (and sets ``enable_thinking``).

    Returns:
        The rendered prompt text.

    Raises:
        ValueError: Malformed messages or options, no chat template, or the template failed.
    """
    agp = True if add_generation_prompt is None else bool(add_generation_prompt)
    cfm = False if continue_final_message is None else bool(continue_final_message)
    merged = build_template_kwargs(
        chat_template_kwargs,
        add_generation_prompt=agp,
        continue_final_message=cfm,
        documents=documents,
        reasoning_effort=reasoning_effort,
    )
    tool_dicts = normalize_tools(tools)
    template = cache.resolve(chat_template, tool_dicts)
    facts = cache.facts(template)
    accepted = (facts.variables | cache.hf_params) - set(_FORBIDDEN_KWARGS + _RESERVED_KWARGS)
    kwargs = {k: v for k, v in merged.items() if k in accepted}
    kwargs["return_dict"] = False
    conversation = parse_messages(messages, facts.content_format)
    try:
        rendered = hf.apply_chat_template(
            conversation, tools=tool_dicts, chat_template=template, tokenize=False, **kwargs
        )
    except Exception as exc:  # jinja errors, raise_exception() in templates, HF validation
        raise ValueError(f"chat template rendering failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(rendered, str):
        raise ValueError(f"chat template rendered {type(rendered).__name__}, expected text")
    return rendered
