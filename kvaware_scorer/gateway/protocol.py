"""The OpenAI wire protocol as the gateway needs it: request parsing and the error shape.

Only the fields that routing reads are decoded (typed, in C, by msgspec); the request body is
forwarded to the pod byte for byte, so every field the gateway does not know (sampling
parameters, vLLM extensions, future fields) reaches the pod unchanged.

Routing reads: ``model``; ``prompt`` (completions: text, token ids, or a batch of either; a
batch is routed by its first prompt, since the whole batch goes to one pod); ``messages``
(chat); ``stream``; ``cache_salt``; and the chat rendering options ``chat_template``,
``chat_template_kwargs``, ``tools``, ``add_generation_prompt``, ``continue_final_message``,
``add_special_tokens``. A wrong type for any of them is a 400 naming the field, in the OpenAI
error shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

__all__ = [
    "CHAT_OPTIONS",
    "APIError",
    "ParsedRequest",
    "RequestParser",
    "error_body",
]

#: Chat rendering options handed to the scheduler (`SchedulingRequest.chat`) when present.
CHAT_OPTIONS = (
    "chat_template",
    "chat_template_kwargs",
    "tools",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
)

_TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
_PATH = re.compile(r"`\$((?:\.\w+|\[\d+\])+)`")


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """A request the gateway answers itself with an OpenAI-shaped error.

    Args:
        status: HTTP status.
        message: Human-readable explanation.
        type: OpenAI error type (``invalid_request_error`` for 4xx, ``server_error`` for 5xx).
        param: The request field at fault, if any.
        code: Short machine-readable code (e.g. ``model_not_found``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON error object."""
        return error_body(self.message, self.type, self.param, self.code)


@dataclass(slots=True)
class ParsedRequest:
    """What routing needs from a completions or chat request.

    Attributes:
        model: Requested model (a base model or a LoRA adapter name).
        stream: Whether the client asked for SSE streaming.
        token_ids: The prompt as token ids (completions).
        prompt: The prompt text (completions).
        messages: Chat messages.
        cache_salt: vLLM ``cache_salt``.
        chat: Rendering options present in the request (see `CHAT_OPTIONS`).
        batch: Prompts in a batched completions request (1 when not batched).
    """

    model: str
    stream: bool = False
    token_ids: list[int] | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    cache_salt: str | None = None
    chat: dict[str, Any] = field(default_factory=dict)
    batch: int = 1


class _Completion(msgspec.Struct):
    model: str | None = None
    prompt: msgspec.Raw = msgspec.Raw()
    prompt_embeds: msgspec.Raw = msgspec.Raw()
    stream: bool | None = None
    cache_salt: str | None = None
    add_special_tokens: bool | None = None


class _Chat(msgspec.Struct):
    model: str | None = None
    messages: list[dict[str, Any]] | None = None
    stream: bool | None = None
    cache_salt: str | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    add_special_tokens: bool | None = None


class _Probe(msgspec.Struct):
    messages: msgspec.Raw = msgspec.Raw()


def _invalid(exc: msgspec.ValidationError, prefix: str = "") -> APIError:
    """A 400 from a msgspec validation error; `prefix` is the JSON path of the decoded value."""
    text = str(exc)
    m = _PATH.search(text)
    if m is not None:
        path = (prefix + m.group(1)).lstrip(".")
        text = text[: m.start()] + f"`{path}`" + text[m.end() :]
    elif prefix:
        path = prefix.lstrip(".")
        text = f"{text} - at `{path}`"
    else:
        path = ""
    param = re.split(r"[.\[]", path, maxsplit=1)[0] or None
    return APIError(400, f"Invalid request: {text}", param=param, code="invalid_type")


#: Everything msgspec documents (or is seen) to raise on bytes that are not the JSON a pod could
#: read: `msgspec.DecodeError` (malformed JSON; from msgspec 0.23 also strings that are not
#: UTF-8), `UnicodeError` (such strings before 0.23, checked only when a string is decoded) and
#: `RecursionError` (nesting deeper than it recurses, even inside fields the gateway skips).
#: `msgspec.ValidationError` is a `msgspec.DecodeError` too: catch it first where it means "the
#: wrong type" rather than "unreadable".
_UNREADABLE: tuple[type[Exception], ...] = (msgspec.DecodeError, UnicodeError, RecursionError)


def _json_error(exc: Exception) -> APIError:
    if isinstance(exc, RecursionError):
        detail = "it is nested too deeply"
    elif isinstance(exc, UnicodeDecodeError):
        detail = f"it is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    elif isinstance(exc, UnicodeError) or "UTF-8" in str(exc):
        detail = "it is not valid UTF-8"
    else:
        detail = str(exc)
    return APIError(
        400,
        f"We could not parse the JSON body of your request: {detail}",
        code="invalid_json",
    )


class RequestParser:
    """Decodes request bodies (one instance per gateway; its decoders are reused)."""

    def __init__(self) -> None:
        self._completion = msgspec.json.Decoder(_Completion)
        self._chat = msgspec.json.Decoder(_Chat)
        self._probe = msgspec.json.Decoder(_Probe)
        self._text = msgspec.json.Decoder(str)
        self._ids = msgspec.json.Decoder(list[_TokenId])
        self._texts = msgspec.json.Decoder(list[str])
        self._id_batch = msgspec.json.Decoder(list[list[_TokenId]])

    @staticmethod
    def _model(model: str | None) -> str:
        if model is None:
            raise APIError(
                400,
                "You must provide a model parameter.",
                param="model",
                code="missing_required_parameter",
            )
        if not model:
            raise APIError(400, "The model parameter must not be empty.", param="model")
        return model

    def completion(self, body: bytes) -> ParsedRequest:
        """Parse a ``POST /v1/completions`` body.

        Raises:
            APIError: Invalid JSON, a missing ``model`` or ``prompt``, or a wrong type.
        """
        try:
            req = self._completion.decode(body)
        except msgspec.ValidationError as exc:
            raise _invalid(exc) from None
        except _UNREADABLE as exc:
            raise _json_error(exc) from None
        out = ParsedRequest(
            self._model(req.model), stream=bool(req.stream), cache_salt=req.cache_salt
        )
        if req.add_special_tokens is not None:
            out.chat["add_special_tokens"] = req.add_special_tokens
        raw = req.prompt
        if len(raw) == 0:
            if len(req.prompt_embeds) > 0:
                return out  # embeddings only: nothing to match against the index
            raise APIError(
                400,
                "You must provide a prompt parameter.",
                param="prompt",
                code="missing_required_parameter",
            )
        try:
            self._prompt(raw, out)
        except _UNREADABLE as exc:
            raise _json_error(exc) from None
        return out

    def _prompt(self, raw: msgspec.Raw, out: ParsedRequest) -> None:
        """Decode the prompt's shape into `out`.

        Raises:
            APIError: A wrong type (400 ``invalid_type``).
            msgspec.DecodeError: Unreadable JSON (any of `_UNREADABLE`; the caller maps them).
        """
        # NOTE: msgspec allows one array type per union, so the four prompt shapes are tried in
        # turn; each wrong guess fails on its first byte or element.
        try:
            out.prompt = self._text.decode(raw)
            return
        except msgspec.ValidationError:
            pass
        first_error: msgspec.ValidationError | None = None
        try:
            out.token_ids = self._ids.decode(raw)
            return
        except msgspec.ValidationError as exc:
            first_error = exc
        try:
            texts = self._texts.decode(raw)
        except msgspec.ValidationError:
            pass
        else:
            if not texts:
                out.token_ids = []
            else:
                out.prompt, out.batch = texts[0], len(texts)
            return
        try:
            batch = self._id_batch.decode(raw)
        except msgspec.ValidationError as exc:
            # Report the error of the closest shape: a list of ints with a bad element reads
            # better than "expected array" from the batch decoder.
            nested = bool(bytes(raw).lstrip()[1:].lstrip().startswith(b"["))
            raise _invalid(exc if nested else first_error, ".prompt") from None
        out.token_ids, out.batch = batch[0], len(batch)

    def chat(self, body: bytes) -> ParsedRequest:
        """Parse a ``POST /v1/chat/completions`` body.

        Raises:
            APIError: Invalid JSON, a missing ``model`` or ``messages``, or a wrong type.
        """
        try:
            req = self._chat.decode(body)
        except msgspec.ValidationError as exc:
            raise _invalid(exc) from None
        except _UNREADABLE as exc:
            raise _json_error(exc) from None
        model = self._model(req.model)
        if req.messages is None:
            raise APIError(
                400,
                "You must provide a messages parameter.",
                param="messages",
                code="missing_required_parameter",
            )
        if not req.messages:
            raise APIError(400, "The messages parameter must not be empty.", param="messages")
        chat: dict[str, Any] = {}
        for name in CHAT_OPTIONS:
            value = getattr(req, name)
            if value is not None:
                chat[name] = value
        return ParsedRequest(
            model,
            stream=bool(req.stream),
            messages=req.messages,
            cache_salt=req.cache_salt,
            chat=chat,
        )

    def is_chat(self, body: bytes) -> bool:
        """Whether a body has ``messages`` (a chat request) rather than ``prompt``.

        Raises:
            APIError: Invalid JSON or not an object.
        """
        try:
            raw = self._probe.decode(body).messages
            return len(raw) > 0 and bytes(raw) != b"null"
        except msgspec.ValidationError as exc:
            raise _invalid(exc) from None
        except _UNREADABLE as exc:
            raise _json_error(exc) from None
