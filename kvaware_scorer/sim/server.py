"""The HTTP side of a live emulated pod: vLLM's OpenAI server routes over a `LivePod`.

Routes (shapes as vLLM's OpenAI server answers them):

* ``POST /v1/completions``: ``prompt`` as text, token ids, or a batch of either (one choice
  per prompt); ``max_tokens`` (default `LivePodsConfig.default_max_tokens`), ``stream`` with
  ``stream_options.include_usage``, ``cache_salt``, ``add_special_tokens``,
  ``return_token_ids``.
* ``POST /v1/chat/completions``: ``messages`` rendered with the tokenizer's chat template and
  encoded exactly as the scorer's tokenization does (same code, so the pod's tokens are the
  router's), with vLLM's chat fields (``chat_template``, ``chat_template_kwargs``, ``tools``,
  ``add_generation_prompt``, ``continue_final_message``, ...); ``max_completion_tokens`` or
  ``max_tokens``.
* Usage: ``prompt_tokens``, ``completion_tokens`` and
  ``prompt_tokens_details.cached_tokens`` (the emulated prefix-cache hit at admission).
  Generation ignores EOS: every choice ends with ``finish_reason: "length"``.
* ``POST /tokenize`` / ``POST /detokenize``: vLLM's tokenizer routes (text or chat messages
  to ``{count, max_model_len, tokens, token_strs}``; ids to ``{prompt}``).
* ``POST /v1/completions/render`` / ``POST /v1/chat/completions/render``: vLLM's render routes
  (the prompt ids a completion would run on, as vLLM's ``GenerateRequest``: a list of them, one
  per prompt, for completions; one object for chat). Routers tokenize with them.
* ``GET /v1/models``, ``GET /health``, ``GET /version``, ``GET /metrics`` (vLLM's metric names
  and labels), ``GET /kv_event_sources`` (``{dp_rank: KVEventsConfig}``) and
  ``POST /reset_prefix_cache`` (vLLM's dev route; ``AllBlocksCleared`` on success).

A client that goes away aborts its requests (their blocks are freed at the next step
boundary, as vLLM does). Errors use vLLM's shape ``{"error": {"message", "type", "param",
"code"}}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kvaware_scorer.errors import TokenizerNotFoundError
from kvaware_scorer.sim.openai_wire import (
    DONE,
    SAMPLING_FIELDS,
    SSE_HEADERS,
    Answer,
    HTTPError,
    cache_salt,
    encode,
    error_response,
    int_field,
    json_response,
    token_list,
    too_long,
)
from kvaware_scorer.sim.pod_metrics import PodCollector
from kvaware_scorer.tokenization.chat import CHAT_OPTIONS

if TYPE_CHECKING:
    from kvaware_scorer.sim.live_pod import LivePod
    from kvaware_scorer.sim.live_state import Job, LiveRequest

__all__ = ["PodCollector", "make_app"]

logger = logging.getLogger(__name__)


def make_app(pod: LivePod) -> web.Application:
    """The aiohttp application of `pod`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PodCollector(pod))
    api = _PodAPI(pod, registry)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    r = app.router
    r.add_post("/v1/completions", api.completions)
    r.add_post("/v1/chat/completions", api.chat)
    r.add_post("/v1/completions/render", api.render_completions)
    r.add_post("/v1/chat/completions/render", api.render_chat)
    r.add_post("/tokenize", api.tokenize)
    r.add_post("/detokenize", api.detokenize)
    r.add_get("/v1/models", api.models)
    r.add_get("/health", api.health)
    r.add_get("/version", api.version)
    r.add_get("/metrics", api.metrics)
    r.add_get("/kv_event_sources", api.event_sources)
    r.add_post("/reset_prefix_cache", api.reset_prefix_cache)
    return app


# Above this many ids, decoding runs in a worker thread (the event loop drives every pod).
_DECODE_OFF_LOOP_TOKENS = 2048


class _PodAPI:
    """Route handlers of one pod."""

    def __init__(self, pod: LivePod, registry: CollectorRegistry) -> None:
        self.pod = pod
        self.registry = registry
        self.created = int(time.time())

    # -- small routes -----------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.pod.failed is not None:
            return error_response(503, self.pod.failed, "EngineDeadError")
        return web.Response()

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": "kvaware-sim"})

    async def models(self, request: web.Request) -> web.Response:
        pod = self.pod
        max_len = pod.engine.max_model_len if pod.engine is not None else None
        card = {
            "id": pod.model,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": pod.model,
            "parent": None,
            "max_model_len": max_len,
            "permission": [],
        }
        return json_response({"object": "list", "data": [card]})

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def event_sources(self, request: web.Request) -> web.Response:
        return json_response(self.pod.event_sources())

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        try:
            ok = await self.pod.reset_prefix_cache()
        except ConnectionError as exc:
            return error_response(503, str(exc), "ServiceUnavailableError")
        if not ok:
            # NOTE: vLLM only logs this failure; a status tells a caller (tests) it did nothing.
            return error_response(
                409, "Failed to reset prefix cache: some blocks are still in use", "ConflictError"
            )
        return json_response({"success": True})

    # -- tokenizer routes (vLLM's /tokenize, /detokenize and the render routes) -----------------

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._read(request)
            self._check_model(body)
            chat = body.get("messages") is not None
            if not chat and not isinstance(body.get("prompt"), str):
                raise HTTPError(400, "prompt must be a string (or give messages)")
            if chat and body.get("add_generation_prompt") is None:
                # NOTE: vLLM's TokenizeChatRequest defaults add_generation_prompt to true.
                body = {**body, "add_generation_prompt": True}
            ids = (await self._prompts(body, chat))[0]
            strs = body.get("return_token_strs")
            if strs is not None and not isinstance(strs, bool):
                raise HTTPError(400, "return_token_strs must be a boolean")
        except HTTPError as exc:
            return error_response(exc.status, exc.message, exc.kind)
        return json_response(
            {
                "count": len(ids),
                "max_model_len": self._max_model_len(),
                "tokens": ids,
                "token_strs": self.pod.text.token_strs(ids) if strs else None,
            }
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._read(request)
            self._check_model(body)
            tokens = body.get("tokens")
            if tokens == []:
                return json_response({"prompt": ""})
            ids = token_list(tokens, self.pod.text.vocab_size, "tokens")
            if ids is None:
                raise HTTPError(400, "tokens must be a list of token ids")
        except HTTPError as exc:
            return error_response(exc.status, exc.message, exc.kind)
        text = self.pod.text
        if len(ids) >= _DECODE_OFF_LOOP_TOKENS:
            prompt = await asyncio.to_thread(text.decode, ids)
        else:
            prompt = text.decode(ids)
        return json_response({"prompt": prompt})

    async def render_completions(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=False)

    async def render_chat(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=True)

    async def _render(self, request: web.Request, chat: bool) -> web.Response:
        """vLLM's render routes: the request's prompt ids as ``GenerateRequest`` objects, with
        the same checks as the completion itself, and nothing generated."""
        try:
            body = await self._read(request)
            self._check_model(body)
            max_tokens = self._max_tokens(body, chat)
            salt = cache_salt(body)
            prompts = await self._prompts(body, chat)
            if max_tokens is not None:
                self._check_context(prompts, max_tokens)
            else:
                self._check_context(prompts, 0)
        except HTTPError as exc:
            return error_response(exc.status, exc.message, exc.kind)
        sampling = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
        sampling["max_tokens"] = max_tokens
        stream = body.get("stream") is True
        prefix = "chatcmpl-" if chat else "cmpl-"
        rendered = [
            {
                "request_id": f"{prefix}{uuid.uuid4().hex}",
                "token_ids": ids,
                "features": None,
                "sampling_params": sampling,
                "model": self.pod.model,
                "stream": stream,
                "stream_options": body.get("stream_options") if stream else None,
                "cache_salt": salt,
                "priority": 0,
                "kv_transfer_params": None,
            }
            for ids in prompts
        ]
        return json_response(rendered[0] if chat else rendered)

    # -- inference ----------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _read(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise HTTPError(413, str(exc)) from None
        try:
            body = msgspec.json.decode(raw)
        except (msgspec.DecodeError, UnicodeError, RecursionError) as exc:
            # NOTE: strings that are not UTF-8 are a DecodeError from msgspec 0.23, a
            # UnicodeDecodeError before; nesting deeper than it recurses a RecursionError.
            raise HTTPError(400, f"Invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "The request body must be a JSON object")
        return body

    async def _prompts(self, body: dict[str, Any], chat: bool) -> list[list[int]]:
        """Token ids of each choice's prompt."""
        pod = self.pod
        vocab = pod.text.vocab_size
        add_special = body.get("add_special_tokens")
        if add_special is not None and not isinstance(add_special, bool):
            raise HTTPError(400, "add_special_tokens must be a boolean")
        try:
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise HTTPError(400, "messages must be a non-empty list")
                options = {k: body[k] for k in CHAT_OPTIONS if body.get(k) is not None}
                return [await pod.tokenize(messages=messages, **options)]
            if body.get("prompt_embeds") is not None:
                raise HTTPError(400, "prompt_embeds are not supported by the emulated pod")
            prompt = body.get("prompt")
            if prompt is None:
                raise HTTPError(400, "prompt is required")
            opts: dict[str, Any] = (
                {} if add_special is None else {"add_special_tokens": add_special}
            )
            ids = token_list(prompt, vocab, "prompt")
            if ids is not None:
                return [ids]
            if isinstance(prompt, str):
                return [await pod.tokenize(prompt=prompt, **opts)]
            if isinstance(prompt, list) and prompt:
                out: list[list[int]] = []
                for i, p in enumerate(prompt):
                    one = token_list(p, vocab, f"prompt[{i}]")
                    if one is not None:
                        out.append(one)
                    elif isinstance(p, str):
                        out.append(await pod.tokenize(prompt=p, **opts))
                    else:
                        raise HTTPError(400, f"prompt[{i}] must be text or token ids")
                return out
            raise HTTPError(400, "prompt must be text, token ids, or a list of either")
        except LookupError as exc:
            if isinstance(exc, TokenizerNotFoundError):
                raise HTTPError(500, str(exc), "InternalServerError") from None
            raise HTTPError(400, str(exc)) from None
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None

    def _check_model(self, body: Mapping[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.pod.model:
            raise HTTPError(404, f"The model `{model}` does not exist.", "NotFoundError")

    def _max_model_len(self) -> int | None:
        engine = self.pod.engine
        return engine.max_model_len if engine is not None else None

    def _max_tokens(self, body: Mapping[str, Any], chat: bool) -> int | None:
        """The request's ``max_completion_tokens`` / ``max_tokens``, checked against the
        context length before anything is sized by it (None = not given)."""
        max_tokens = int_field(body, "max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = int_field(body, "max_tokens")
        if max_tokens is None:
            return None
        if max_tokens < 1:
            raise HTTPError(400, f"max_tokens must be at least 1, got {max_tokens}.")
        limit = self._max_model_len()
        # NOTE: a prompt has at least one token, so this bound holds before tokenizing; the
        # output buffer is sized by max_tokens, which must never reach the allocator unchecked.
        if limit is not None and max_tokens >= limit:
            raise HTTPError(400, too_long(limit, max_tokens, None))
        return max_tokens

    def _check_context(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> None:
        """vLLM's context-length check of each prompt plus its output (a 400)."""
        limit = self._max_model_len()
        if limit is None:
            return
        for ids in prompts:
            if len(ids) + max_tokens > limit:
                raise HTTPError(400, too_long(limit, max_tokens, len(ids)))

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        pod = self.pod
        try:
            body = await self._read(request)
            self._check_model(body)
            n = int_field(body, "n")
            if n is not None and n != 1:
                raise HTTPError(400, "the emulated pod supports n=1 only")
            max_tokens = self._max_tokens(body, chat)
            if max_tokens is None:
                max_tokens = pod.config.default_max_tokens
            stream = body.get("stream") or False
            if not isinstance(stream, bool):
                raise HTTPError(400, "stream must be a boolean")
            options = body.get("stream_options")
            if options is not None and not stream:
                raise HTTPError(400, "Stream options can only be defined when `stream=True`.")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            salt = cache_salt(body)
            prompts = await self._prompts(body, chat)
            self._check_context(prompts, max_tokens)
            sims = [pod.new_request(ids, max_tokens, salt) for ids in prompts]
            reasons = [r for r in map(pod.validate, sims) if r is not None]
            if reasons:
                raise HTTPError(400, reasons[0])
            await pod.hash_prompts(sims)
            try:
                job = pod.submit(sims)
            except ValueError as exc:
                raise HTTPError(400, str(exc)) from None
            except ConnectionError as exc:
                raise HTTPError(503, str(exc), "ServiceUnavailableError") from None
        except HTTPError as exc:
            return error_response(exc.status, exc.message, exc.kind)
        prefix = "chatcmpl-" if chat else "cmpl-"
        ctx = Answer(f"{prefix}{uuid.uuid4().hex}", pod.model, int(time.time()), chat)
        try:
            if stream:
                return await self._stream(request, job, ctx, include_usage)
            return await self._complete(job, ctx, bool(body.get("return_token_ids")), prompts)
        finally:
            # NOTE: a client that went away (the handler is cancelled) or a failed write
            # leaves unfinished requests: abort them like vLLM does.
            if not job.done:
                pod.abort(job)

    async def _complete(
        self, job: Job, ctx: Answer, token_ids: bool, prompts: list[list[int]]
    ) -> web.Response:
        while not job.done:
            update = await job.queue.get()
            if not isinstance(update, tuple):
                return error_response(500, update.message, "InternalServerError")
        text = self.pod.text
        choices: list[dict[str, Any]] = []
        for lr in job.requests:
            out = lr.output_tokens
            content = text.text(out)
            choice: dict[str, Any]
            if ctx.chat:
                choice = {
                    "index": lr.index,
                    "message": {"role": "assistant", "content": content, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
            else:
                choice = {
                    "index": lr.index,
                    "text": content,
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
            if token_ids:
                choice["token_ids"] = out.tolist()
                if not ctx.chat:
                    choice["prompt_token_ids"] = prompts[lr.index]
            choices.append(choice)
        answer: dict[str, Any] = {
            "id": ctx.id,
            "object": "chat.completion" if ctx.chat else "text_completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": choices,
            "usage": self._usage(job),
        }
        if ctx.chat and token_ids:
            answer["prompt_token_ids"] = prompts[0]
        return json_response(answer)

    def _usage(self, job: Job) -> dict[str, Any]:
        prompt = sum(lr.prompt_tokens for lr in job.requests)
        completion = sum(lr.sent for lr in job.requests)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
        }
        if self.pod.config.prompt_tokens_details:
            usage["prompt_tokens_details"] = {
                "cached_tokens": sum(lr.cached_tokens for lr in job.requests)
            }
        return usage

    async def _stream(
        self, request: web.Request, job: Job, ctx: Answer, include_usage: bool
    ) -> web.StreamResponse:
        # NOTE: long: one SSE loop with vLLM's role, text, error and usage chunks in order.
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        text = self.pod.text
        # NOTE: like vLLM, the chat role chunk goes out with the first token, not before (a
        # client measuring TTFT from the first event must see the first token's time).
        role = ctx.chat
        emitted = [0] * len(job.requests)
        while True:
            update = await job.queue.get()
            parts: list[bytes] = []
            if role:
                role = False
                parts.extend(
                    ctx.chunk(
                        {
                            "index": lr.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    )
                    for lr in job.requests
                )
            while True:
                if not isinstance(update, tuple):
                    error = {
                        "error": {
                            "message": update.message,
                            "type": "InternalServerError",
                            "param": None,
                            "code": 500,
                        }
                    }
                    await resp.write(b"data: " + encode(error) + b"\n\n" + DONE)
                    return resp
                index, n, done = update
                lr: LiveRequest = job.requests[index]
                piece = text.text(lr.output_tokens[emitted[index] : n])
                emitted[index] = n
                reason = "length" if done else None
                if ctx.chat:
                    choice = {"index": index, "delta": {"content": piece}}
                else:
                    choice = {"index": index, "text": piece}
                choice["logprobs"] = None
                choice["finish_reason"] = reason
                choice["stop_reason"] = None
                parts.append(ctx.chunk(choice))
                if job.queue.empty():
                    break
                update = job.queue.get_nowait()
            await resp.write(b"".join(parts))
            if job.done and job.queue.empty():
                break
        tail = b""
        if include_usage:
            tail = ctx.chunk(None, usage=self._usage(job))
        await resp.write(tail + DONE)
        return resp
