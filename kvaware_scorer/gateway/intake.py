"""Request intake: what the gateway checks before a request is scheduled.

The credential its route needs (401/403), the body (``maxBodyBytes`` then 413, ``bodyTimeout``
then 408, compressed bodies inflated only up to the cap), a request's own chat template (400
unless trusted), the prompt's size before and after tokenization (413), and the
`SchedulingRequest` built from what passed. Every refusal is an `APIError` in the OpenAI shape.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid

import aiohttp
import msgspec
from aiohttp import web

from kvaware_scorer.gateway.auth import Access, Credentials
from kvaware_scorer.gateway.body import decode_body
from kvaware_scorer.gateway.catalog import Resolution
from kvaware_scorer.gateway.config import GatewayConfig
from kvaware_scorer.gateway.protocol import APIError, ParsedRequest
from kvaware_scorer.scheduler import SchedulingRequest

__all__ = ["RequestIntake", "message_chars"]

#: Compressed bodies up to this size are inflated on the event loop, larger ones in a thread.
_INLINE_INFLATE = 1 << 16


def message_chars(parsed: ParsedRequest) -> int:
    """Characters of a chat request's text: message contents, tools and template kwargs."""
    n = 0
    for message in parsed.messages or ():
        content = message.get("content")
        if isinstance(content, str):
            n += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    n += len(part["text"])
                elif isinstance(part, str):
                    n += len(part)
    for key in ("tools", "chat_template_kwargs"):
        value = parsed.chat.get(key)
        if value:
            n += len(msgspec.json.encode(value))
    return n


class RequestIntake:
    """Admits a request: credentials, body, chat template and prompt bounds.

    Args:
        config: Gateway settings (the limits).
        credentials: API and admin keys.
    """

    def __init__(self, config: GatewayConfig, credentials: Credentials) -> None:
        self.config = config
        self.credentials = credentials
        self._prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)

    def deny(self, request: web.Request, admin: bool) -> APIError | None:
        """The 401/403 for a request without the credential its route needs, else None."""
        creds = self.credentials
        if not admin and not creds.api:
            return None  # the common case: no API keys, nothing to read
        auth = request.headers.get("Authorization")
        access = creds.check_admin(auth, request.remote) if admin else creds.check_inference(auth)
        if access is Access.OK:
            return None
        if access is Access.MISSING:
            return APIError(
                401,
                "Incorrect or missing API key: send it as Authorization: Bearer <key>."
                if not admin
                else "This route needs the admin key: send it as Authorization: Bearer <key>.",
                code="invalid_api_key",
            )
        return APIError(
            403,
            "This route needs the admin key."
            if creds.admin
            else "This route is served to loopback clients only (no admin key is configured).",
            code="forbidden",
        )

    async def read_body(self, request: web.Request) -> bytes:
        """The request body, decoded.

        Raises:
            APIError: 413 over ``maxBodyBytes`` (also once inflated), 408 when it does not
                arrive within ``bodyTimeout``, 400 when it cannot be read.
        """
        limit = self.config.max_body_bytes
        length = request.content_length
        too_large = APIError(
            413,
            f"The request body exceeds the limit of {limit} bytes.",
            code="request_too_large",
        )
        if length is not None and length > limit:
            raise too_large
        try:
            data = await asyncio.wait_for(request.read(), self.config.body_timeout)
        except TimeoutError:
            raise APIError(
                408,
                f"The request body did not arrive within {self.config.body_timeout:g} s.",
                code="request_timeout",
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        except (aiohttp.ClientPayloadError, ValueError) as exc:
            raise APIError(400, f"Could not read the request body: {exc}") from None
        encoding = request.headers.get("Content-Encoding")
        if encoding is None:
            return data
        if len(data) <= _INLINE_INFLATE:
            return decode_body(data, encoding, limit)
        return await asyncio.to_thread(decode_body, data, encoding, limit)

    def check_request(self, parsed: ParsedRequest) -> None:
        """Refuse what must not reach tokenization: an untrusted chat template (400) and a
        prompt over ``maxPromptChars`` / ``maxPromptTokens`` (413).

        Raises:
            APIError: As above.
        """
        cfg = self.config
        chat = parsed.chat
        if not cfg.trust_request_chat_template and (
            "chat_template" in chat or "chat_template" in (chat.get("chat_template_kwargs") or {})
        ):
            raise APIError(
                400,
                "Chat template is passed with the request, but the gateway does not trust "
                "request chat templates (trustRequestChatTemplate, "
                "--trust-request-chat-template). Refused request with untrusted chat template.",
                param="chat_template",
                code="untrusted_chat_template",
            )
        if parsed.prompt is not None:
            chars = len(parsed.prompt)
        elif parsed.messages is not None:
            chars = message_chars(parsed)
        else:
            chars = 0
        if chars > cfg.max_prompt_chars:
            raise APIError(
                413,
                f"The prompt has {chars} characters, more than the limit of "
                f"{cfg.max_prompt_chars}.",
                param="messages" if parsed.messages is not None else "prompt",
                code="prompt_too_large",
            )
        if parsed.token_ids is not None:
            self.check_tokens(len(parsed.token_ids))

    def check_tokens(self, n: int) -> None:
        """Refuse a prompt of `n` tokens over ``maxPromptTokens``.

        Raises:
            APIError: 413.
        """
        if n > self.config.max_prompt_tokens:
            raise APIError(
                413,
                f"The prompt has {n} tokens, more than the limit of "
                f"{self.config.max_prompt_tokens}.",
                param="prompt",
                code="prompt_too_large",
            )

    def check_scheduled(self, sreq: SchedulingRequest) -> None:
        """Refuse a prompt whose tokenization (done by scheduling) came out over
        ``maxPromptTokens``.

        Raises:
            APIError: 413.
        """
        self.check_tokens(len(sreq.tokens(list)) if sreq.has_tokens else 0)

    def scheduling_request(
        self, request: web.Request, parsed: ParsedRequest, res: Resolution
    ) -> SchedulingRequest:
        """What the scheduler is given: a fresh request id, the resolved model and adapter,
        the prompt and the client's headers (lower-cased)."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        return SchedulingRequest(
            request_id=f"{self._prefix}-{next(self._ids)}",
            model=res.model,
            token_ids=parsed.token_ids,
            prompt=parsed.prompt,
            messages=parsed.messages,
            lora_name=res.lora_name,
            cache_salt=parsed.cache_salt,
            headers=headers,
            chat=parsed.chat,
            streaming=parsed.stream,
        )
