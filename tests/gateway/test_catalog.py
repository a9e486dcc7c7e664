"""The model catalog reads each pod's /v1/models defensively: an unreadable answer is a failed
poll, never an exception out of the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from kvaware_scorer.gateway.catalog import ModelCatalog
from kvaware_scorer.scheduler.types import Endpoint
from tests.conftest import free_port

ANSWERS = {
    "ok": b'{"object": "list", "data": [{"id": "m", "object": "model"}]}',
    "too-deep": b"[" * 100_000 + b"]" * 100_000,
    "not-utf8": b'{"object": "list", "data": [{"id": "\xff\xfe"}]}',
    "not-json": b"{oops",
}


@pytest.fixture
async def pod() -> AsyncIterator[Endpoint]:
    """A pod whose /v1/models answers the body named by the ``?answer`` it was last given."""
    state = {"answer": "ok"}

    async def models(_: web.Request) -> web.Response:
        return web.Response(body=ANSWERS[state["answer"]], content_type="application/json")

    async def choose(request: web.Request) -> web.Response:
        state["answer"] = request.query["answer"]
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/choose", choose)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield Endpoint("pod", "127.0.0.1", port)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("answer", ["too-deep", "not-utf8", "not-json"])
async def test_unreadable_model_list_is_a_failed_poll(pod: Endpoint, answer: str) -> None:
    """Nesting deeper than the JSON decoder recurses, bytes that are not UTF-8 and malformed
    JSON make the poll fail (counted, logged at debug), not raise."""
    async with aiohttp.ClientSession() as session:
        catalog = ModelCatalog(session)
        assert await catalog.poll(pod)
        async with session.post(f"http://127.0.0.1:{pod.port}/choose?answer={answer}"):
            pass
        assert not await catalog.poll(pod)
        assert catalog.known(pod.id)
