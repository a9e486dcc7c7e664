"""A small OpenAI-like model server used as a backend pod by the gateway tests.

It speaks the subset of vLLM's HTTP API the gateway relies on: ``POST /v1/completions`` and
``POST /v1/chat/completions`` (JSON or SSE with vLLM's chunk shapes, ``stream_options.
include_usage``, ``usage.prompt_tokens_details.cached_tokens``), ``GET /v1/models`` (with LoRA
adapters listed with ``parent``), ``GET /metrics`` (vLLM load metric names) and ``GET /health``.

A request can steer its own answer through an extra body field, which also proves that the
gateway forwards fields it does not know::

    "test_pod": {"chunks": 5, "delay": 0.1, "die_after": 2, "status": 500, "hold": true,
                 "sleep": 0.05, "split": true, "no_done": true, "text": "generated text"}

Run as a script it serves several ports in one process (for tests that kill a pod process)::

    python tests/gateway/pods.py --model m --ports 8001,8002
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


class FakePod:
    """One OpenAI-like server on 127.0.0.1.

    Args:
        name: Pod name (echoed in every answer as ``system_fingerprint``).
        model: Served model.
        loras: LoRA adapter names listed by ``/v1/models`` with ``parent = model``.
        cached_tokens: Reported ``prompt_tokens_details.cached_tokens`` (None = not reported).
        chunks: Default number of streamed tokens.
        delay: Default seconds between streamed chunks.
    """

    def __init__(
        self,
        name: str,
        model: str = "test-model",
        *,
        loras: tuple[str, ...] = (),
        cached_tokens: int | None = 0,
        chunks: int = 3,
        delay: float = 0.0,
    ) -> None:
        self.name = name
        self.model = model
        self.loras = loras
        self.cached_tokens = cached_tokens
        self.chunks = chunks
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.release = asyncio.Event()  # held requests ("hold": true) wait for it
        self.aborted = 0  # streams whose client went away
        self.models_available = True
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        return app

    async def start(self, port: int = 0) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening and drop every connection (as a pod that went away)."""
        self.release.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- routes ---------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _models(self, request: web.Request) -> web.Response:
        if not self.models_available:
            return web.json_response({"error": "unavailable"}, status=503)
        data = [{"id": self.model, "object": "model", "owned_by": "vllm", "parent": None}]
        data += [
            {"id": lora, "object": "model", "owned_by": "vllm", "parent": self.model}
            for lora in self.loras
        ]
        return web.json_response({"object": "list", "data": data})

    async def _metrics(self, request: web.Request) -> web.Response:
        labels = f'model_name="{self.model}",engine="0"'
        text = (
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{labels}}} 0.0\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{labels}}} 0.0\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc{{{labels}}} 0.1\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(
            {"path": request.path, "body": body, "headers": CIMultiDict(request.headers)}
        )
        opts = body.get("test_pod") or {}
        if opts.get("hold"):
            await self.release.wait()
        if opts.get("sleep"):
            await asyncio.sleep(float(opts["sleep"]))
        if "status" in opts:
            return web.json_response(
                {
                    "error": {
                        "message": "pod error",
                        "type": "BadRequestError",
                        "code": opts["status"],
                    }
                },
                status=int(opts["status"]),
            )
        prompt = body.get("messages") if chat else body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            prompt_tokens = len(prompt)
        else:
            prompt_tokens = len(json.dumps(prompt).split())
        n = int(opts.get("chunks", self.chunks))
        delay = float(opts.get("delay", self.delay))
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n,
            "total_tokens": prompt_tokens + n,
        }
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        base = {
            "id": f"cmpl-{len(self.requests)}",
            "created": int(time.time()),
            "model": body["model"],
        }
        base["system_fingerprint"] = self.name
        if opts.get("nested"):
            # An answer nested deeper than any JSON decoder follows (with a "usage" in it).
            depth = int(opts["nested"])
            raw = '{"usage": {"prompt_tokens": 1}, "x": ' + "[" * depth + "]" * depth + "}"
            return web.Response(text=raw, content_type="application/json")
        if not body.get("stream"):
            text = "".join(f"t{i} " for i in range(n))
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}}
                out = {**base, "object": "chat.completion"}
            else:
                choice = {"index": 0, "text": text, "logprobs": None}
                out = {**base, "object": "text_completion"}
            choice["finish_reason"] = "length"
            out["choices"] = [choice]
            out["usage"] = usage
            return web.json_response(out, headers=opts.get("headers"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        die_after = opts.get("die_after")
        try:
            for i in range(n):
                if die_after is not None and i == die_after:
                    # A torn event, then the connection drops: the pod died mid-stream.
                    await resp.write(b'data: {"id": "cmpl-torn", "choi')
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                last = i == n - 1
                token = str(opts.get("text", f"t{i} "))
                if chat:
                    delta = (
                        {"role": "assistant", "content": token} if i == 0 else {"content": token}
                    )
                    choice: dict[str, Any] = {"index": 0, "delta": delta}
                    obj = "chat.completion.chunk"
                else:
                    choice = {"index": 0, "text": token, "logprobs": None}
                    obj = "text_completion"
                choice["finish_reason"] = "length" if last else None
                event = {**base, "object": obj, "choices": [choice]}
                data = f"data: {json.dumps(event)}\n\n".encode()
                if opts.get("split"):
                    # One event in two TCP writes, as a busy server or the network may cut it.
                    await resp.write(data[:20])
                    await asyncio.sleep(0.05)
                    await resp.write(data[20:])
                else:
                    await resp.write(data)
                if delay and not last:
                    await asyncio.sleep(delay)
            if (body.get("stream_options") or {}).get("include_usage"):
                obj = "chat.completion.chunk" if chat else "text_completion"
                event = {**base, "object": obj, "choices": [], "usage": usage}
                await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            if not opts.get("no_done"):
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            self.aborted += 1
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        return resp


async def _main(model: str, ports: list[int], delay: float) -> None:
    pods = [FakePod(f"pod-{p}", model, delay=delay) for p in ports]
    for pod, port in zip(pods, ports, strict=True):
        await pod.start(port)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="OpenAI-like test pods")
    parser.add_argument("--model", default="test-model")
    parser.add_argument("--ports", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(_main(args.model, [int(p) for p in args.ports.split(",")], args.delay))
