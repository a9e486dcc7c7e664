"""The gateway end to end over real sockets: forwarding, streaming, retries, errors, hooks."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from kvaware_scorer.gateway import Gateway, GatewayConfig
from kvaware_scorer.scheduler import (
    Scheduler,
    SchedulingRequest,
    SchedulingResult,
    hookimpl,
    make_plugin_manager,
)
from tests.conftest import free_port

from .conftest import (
    MODEL,
    FailingStartRecorder,
    Recorder,
    RecorderPlugin,
    endpoints_yaml,
    post,
    scheduler_config,
    start_gateway,
)
from .pods import FakePod

pytestmark = pytest.mark.timeout(60)


def served_by(pods: list[FakePod]) -> dict[str, int]:
    return {p.name: len(p.requests) for p in pods}


async def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_non_stream_passthrough(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """A non-streamed completion reaches one pod with its body unchanged (unknown fields kept)
    and the pod's answer and usage come back; post_response gets the usage once."""
    gw = await start_gateway(tmp_path, pods, recorder=recorder)
    body = {
        "model": MODEL,
        "prompt": list(range(40)),
        "max_tokens": 3,
        "vllm_xargs": {"custom": [1, 2]},
        "cache_salt": "tenant-a",
        "test_pod": {"chunks": 2},
    }
    try:
        async with aiohttp.ClientSession() as s:
            status, data, resp = await post(s, gw.url + "/v1/completions", body)
    finally:
        await gw.stop()
    assert status == 200
    served = [p for p in pods if p.requests]
    assert len(served) == 1
    pod = served[0]
    assert pod.requests[0]["body"] == body
    assert resp.headers["x-kvaware-endpoint"] == f"127.0.0.1:{pod.port}"
    assert data["system_fingerprint"] == pod.name
    assert data["choices"][0]["text"] == "t0 t1 "
    assert data["usage"]["prompt_tokens"] == 40
    ((req, target, info),) = recorder.calls
    assert target == f"127.0.0.1:{pod.port}"
    assert (info.status, info.prompt_tokens, info.completion_tokens) == (200, 40, 2)
    assert info.cached_tokens == pod.cached_tokens
    assert req.token_ids == list(range(40)) and req.model == MODEL
    assert req.cache_salt == "tenant-a" and req.lora_name is None


async def test_forwarded_headers(tmp_path: Path, pods: list[FakePod]) -> None:
    """End-to-end headers reach the pod, hop-by-hop and routing-looking ones do not decide the
    target, and the pod gets a request id and X-Forwarded-For."""
    gw = await start_gateway(tmp_path, pods[:1])
    rogue = FakePod("rogue", MODEL)
    await rogue.start()
    try:
        async with aiohttp.ClientSession() as s:
            status, _, _ = await post(
                s,
                gw.url + "/v1/completions",
                {"model": MODEL, "prompt": "hi"},
                headers={
                    "Authorization": "Bearer sk-test",
                    "X-Custom": "kept",
                    "Host": f"127.0.0.1:{rogue.port}",
                    "x-gateway-destination-endpoint": f"127.0.0.1:{rogue.port}",
                    "Keep-Alive": "timeout=5",
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            )
    finally:
        await gw.stop()
        await rogue.stop()
    assert status == 200
    assert rogue.requests == []
    headers = pods[0].requests[0]["headers"]
    assert headers["Authorization"] == "Bearer sk-test"
    assert headers["X-Custom"] == "kept"
    assert headers["X-Request-Id"]
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert "Keep-Alive" not in headers
    assert headers["Host"] == f"127.0.0.1:{pods[0].port}"
    assert headers["Content-Type"] == "application/json"


async def test_response_headers_named_in_connection_are_not_relayed(
    tmp_path: Path, pods: list[FakePod]
) -> None:
    """A pod's end-to-end headers reach the client; those its Connection header names are
    hop-by-hop (RFC 9110 §7.6.1) and do not."""
    gw = await start_gateway(tmp_path, pods[:1])
    try:
        async with aiohttp.ClientSession() as s:
            status, _, resp = await post(
                s,
                gw.url + "/v1/completions",
                {
                    "model": MODEL,
                    "prompt": "hi",
                    "test_pod": {
                        "headers": {
                            "Connection": "keep-alive, X-Pod-Hop",
                            "X-Pod-Hop": "1",
                            "X-Pod-Kept": "1",
                        }
                    },
                },
            )
    finally:
        await gw.stop()
    assert status == 200
    assert resp.headers["X-Pod-Kept"] == "1"
    assert "X-Pod-Hop" not in resp.headers


async def test_pod_answer_nested_too_deep_is_relayed(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """An answer the gateway cannot decode for its usage figures is still relayed as it is."""
    gw = await start_gateway(tmp_path, pods[:1], recorder=recorder)
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "hi", "test_pod": {"nested": 200_000}}
            async with s.post(gw.url + "/v1/completions", json=body) as resp:
                status, text = resp.status, await resp.text()
    finally:
        await gw.stop()
    assert status == 200
    assert text.startswith('{"usage"') and len(text) > 400_000
    ((_, _, info),) = recorder.calls
    assert info.status == 200


async def test_compressed_request_body_is_forwarded_decoded(
    tmp_path: Path, pods: list[FakePod]
) -> None:
    """A gzip-compressed request body is decoded by the gateway (to route it) and forwarded
    decoded, so the pod must not be told it is still compressed."""
    gw = await start_gateway(tmp_path, pods[:1])
    body = {"model": MODEL, "prompt": "compressed prompt", "max_tokens": 2}
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                gw.url + "/v1/completions",
                data=gzip.compress(json.dumps(body).encode()),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            ) as resp,
        ):
            status = resp.status
            data = await resp.json(content_type=None)
    finally:
        await gw.stop()
    assert status == 200, data
    (req,) = pods[0].requests
    assert req["body"] == body
    assert "content-encoding" not in req["headers"]


async def test_stream_chunks_arrive_incrementally(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """SSE events are relayed as the pod produces them (not buffered until the end), and the
    usage chunk's cached tokens reach post_response."""
    gw = await start_gateway(tmp_path, pods, recorder=recorder)
    arrivals: list[float] = []
    events: list[bytes] = []
    try:
        async with aiohttp.ClientSession() as s:
            t0 = time.perf_counter()
            async with s.post(
                gw.url + "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "hello"}],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "test_pod": {"chunks": 5, "delay": 0.15},
                },
            ) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/event-stream"
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        arrivals.append(time.perf_counter() - t0)
                        events.append(event)
    finally:
        await gw.stop()
    assert events[-1] == b"data: [DONE]"
    tokens = [json.loads(e[6:]) for e in events[:-1]]
    assert [t["choices"][0]["delta"]["content"] for t in tokens[:5]] == [f"t{i} " for i in range(5)]
    assert tokens[5]["usage"]["completion_tokens"] == 5
    # Five token events 150 ms apart: each arrives on its own, about 150 ms after the previous.
    gaps = [b - a for a, b in itertools.pairwise(arrivals[:5])]
    assert all(g > 0.08 for g in gaps), gaps
    assert arrivals[4] - arrivals[0] > 0.45
    ((_, _, info),) = recorder.calls
    assert info.status == 200 and info.completion_tokens == 5
    pod = next(p for p in pods if p.requests)
    assert info.cached_tokens == pod.cached_tokens


async def test_retry_on_connection_refused(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """A pod that refuses connections is replaced by the next best candidate; in-flight
    accounting moves with the request, post_response runs once, and the dead pod then cools
    down (later requests skip it)."""
    gw = await start_gateway(tmp_path, pods, recorder=recorder, config="precise.yaml")
    prompt = list(range(500, 564))
    try:
        async with aiohttp.ClientSession() as s:
            status, _, resp = await post(
                s, gw.url + "/v1/completions", {"model": MODEL, "prompt": prompt}
            )
            assert status == 200
            first = resp.headers["x-kvaware-endpoint"]
            dead = next(p for p in pods if f"127.0.0.1:{p.port}" == first)
            await dead.stop()  # the pod that holds the prefix (speculatively) goes away
            results = []
            for _ in range(4):
                status, _, resp = await post(
                    s, gw.url + "/v1/completions", {"model": MODEL, "prompt": prompt}
                )
                results.append((status, resp.headers["x-kvaware-endpoint"]))
        active = gw.scheduler.plugin("active-request-scorer")
        counts = {f"127.0.0.1:{p.port}": active.count(f"127.0.0.1:{p.port}") for p in pods}
    finally:
        retries = gw.metrics.retries._value.get()
        await gw.stop()
    assert all(status == 200 and target != first for status, target in results), results
    assert retries == 1  # the first request after the death; then the cooldown excludes it
    assert [t for _, t in recorder.scheduled].count(first) == 2
    assert len(recorder.calls) == 5
    assert all(n == 1 for n in recorder.per_request().values())
    assert all(t != first for _, t, _ in recorder.calls[1:])
    assert counts == dict.fromkeys(counts, 0)


async def test_redirects_from_a_pod_are_not_followed(tmp_path: Path) -> None:
    """Only endpoints of the pool are contacted: a pod answering with a redirect elsewhere
    (to its completions or its /v1/models) has its answer relayed, the other host is never
    contacted."""
    elsewhere: list[str] = []

    async def record(request: web.Request) -> web.Response:
        elsewhere.append(f"{request.method} {request.path}")
        return web.json_response({"object": "list", "data": [{"id": "elsewhere-model"}]})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{other_port}{request.path}")

    runners = []
    for handler in (record, redirect):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
    other_port, pod_port = (int(r.addresses[0][1]) for r in runners)
    pod = FakePod("redirecting", MODEL)
    pod.port = pod_port
    gw = await start_gateway(tmp_path, [pod], with_model=True)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                gw.url + "/v1/completions",
                json={"model": MODEL, "prompt": "x"},
                allow_redirects=False,
            ) as resp:
                status, location = resp.status, resp.headers.get("Location")
            async with s.get(gw.url + "/v1/models") as resp:
                models = await resp.json()
    finally:
        await gw.stop()
        for runner in runners:
            await runner.cleanup()
    assert status == 307
    assert location == f"http://127.0.0.1:{other_port}/v1/completions"
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert elsewhere == []


async def test_all_pods_refuse(tmp_path: Path, recorder: Recorder) -> None:
    """When every candidate refuses, the client gets a 502 in the OpenAI shape after at most
    maxAttempts pods, and post_response still runs once."""
    dead = [FakePod(f"dead-{i}", MODEL) for i in range(4)]
    for pod in dead:
        pod.port = free_port()
    gw = await start_gateway(tmp_path, dead, recorder=recorder, with_model=True, max_attempts=3)
    try:
        async with aiohttp.ClientSession() as s:
            status, data, _ = await post(
                s, gw.url + "/v1/completions", {"model": MODEL, "prompt": "x"}
            )
    finally:
        await gw.stop()
    assert status == 502
    assert data["error"]["code"] == "upstream_unavailable"
    assert data["error"]["type"] == "server_error"
    assert len(recorder.scheduled) == 3  # three pods tried
    ((_, _, info),) = recorder.calls
    assert info.status == 502 and info.error


async def test_pod_dies_mid_stream(tmp_path: Path, pods: list[FakePod], recorder: Recorder) -> None:
    """A pod that dies mid-stream leaves the client with the events sent so far, then a clean
    SSE error event and [DONE] (never a torn event)."""
    gw = await start_gateway(tmp_path, pods[:1], recorder=recorder)
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                gw.url + "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": "x",
                    "stream": True,
                    "test_pod": {"chunks": 5, "die_after": 2},
                },
            ) as resp,
        ):
            raw = await resp.read()
    finally:
        await gw.stop()
    events = [e for e in raw.split(b"\n\n") if e]
    assert len(events) == 4, raw
    assert [json.loads(e[6:])["choices"][0]["text"] for e in events[:2]] == ["t0 ", "t1 "]
    err = json.loads(events[2][6:])["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "server_error"
    assert "incomplete" in err["message"]
    assert events[3] == b"data: [DONE]"
    assert b"cmpl-torn" not in raw
    ((_, _, info),) = recorder.calls
    assert info.error


async def test_split_events_are_relayed_whole(tmp_path: Path, pods: list[FakePod]) -> None:
    """An event the pod writes in two parts reaches the client as one complete event (its first
    part is held only until its end arrives)."""
    gw = await start_gateway(tmp_path, pods[:1])
    chunks: list[bytes] = []
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                gw.url + "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": "x",
                    "stream": True,
                    "test_pod": {"chunks": 3, "split": True},
                },
            ) as resp,
        ):
            async for chunk in resp.content.iter_any():
                chunks.append(chunk)
    finally:
        await gw.stop()
    raw = b"".join(chunks)
    assert [e for e in raw.split(b"\n\n") if e][-1] == b"data: [DONE]"
    assert len([e for e in raw.split(b"\n\n") if e]) == 4
    assert all(c.endswith(b"\n\n") for c in chunks), chunks


async def test_stream_without_done_gets_error_event(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """A stream that ends cleanly at the TCP level but without data: [DONE] is reported to the
    client as incomplete."""
    gw = await start_gateway(tmp_path, pods[:1], recorder=recorder)
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                gw.url + "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": "x",
                    "stream": True,
                    "test_pod": {"chunks": 2, "no_done": True},
                },
            ) as resp,
        ):
            raw = await resp.read()
    finally:
        await gw.stop()
    events = [e for e in raw.split(b"\n\n") if e]
    assert len(events) == 4
    assert json.loads(events[2][6:])["error"]["code"] == 502
    assert events[3] == b"data: [DONE]"
    ((_, _, info),) = recorder.calls
    assert info.error and "[DONE]" in info.error


@pytest.mark.parametrize("text", ["[DONE]", "data: [DONE]", "\n\ndata: [DONE]\n\n"])
async def test_done_inside_generated_text_is_not_the_end(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder, text: str
) -> None:
    """Generated text that reads like the [DONE] sentinel does not make a stream that then
    breaks off look complete: the client still gets the error event."""
    gw = await start_gateway(tmp_path, pods[:1], recorder=recorder)
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                gw.url + "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": "x",
                    "stream": True,
                    "test_pod": {"chunks": 2, "no_done": True, "text": text},
                },
            ) as resp,
        ):
            raw = await resp.read()
    finally:
        await gw.stop()
    events = [e for e in raw.split(b"\n\n") if e]
    assert [json.loads(e[6:])["choices"][0]["text"] for e in events[:2]] == [text, text]
    assert json.loads(events[2][6:])["error"]["code"] == 502
    assert events[3] == b"data: [DONE]"
    ((_, _, info),) = recorder.calls
    assert info.error and "[DONE]" in info.error


async def test_pod_error_status_passed_through(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """A pod's own error answer reaches the client unchanged (no retry) and post_response sees
    its status."""
    gw = await start_gateway(tmp_path, pods, recorder=recorder)
    try:
        async with aiohttp.ClientSession() as s:
            status, data, _ = await post(
                s,
                gw.url + "/v1/completions",
                {"model": MODEL, "prompt": "x", "stream": True, "test_pod": {"status": 400}},
            )
    finally:
        await gw.stop()
    assert status == 400
    assert data["error"]["message"] == "pod error"
    assert sum(len(p.requests) for p in pods) == 1
    ((_, _, info),) = recorder.calls
    assert info.status == 400


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/v1/completions", b"{not json", 400, None, "invalid_json"),
        ("/v1/completions", b'{"prompt": "x"}', 400, "model", "missing_required_parameter"),
        ("/v1/completions", b'{"model": "other", "prompt": "x"}', 404, "model", "model_not_found"),
        (
            "/v1/completions",
            b'{"model": "test-model", "prompt": {}}',
            400,
            "prompt",
            "invalid_type",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "test-model"}',
            400,
            "messages",
            "missing_required_parameter",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "test-model", "messages": 3}',
            400,
            "messages",
            "invalid_type",
        ),
        ("/v1/score", b'{"model": "nope", "prompt": "x"}', 404, "model", "model_not_found"),
    ],
)
async def test_bad_requests(
    tmp_path: Path,
    pods: list[FakePod],
    recorder: Recorder,
    path: str,
    body: bytes,
    status: int,
    param: str | None,
    code: str,
) -> None:
    """Bad requests get the right 4xx in the OpenAI error shape and reach no pod."""
    gw = await start_gateway(tmp_path, pods, recorder=recorder)
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(gw.url + path, data=body, headers={"Content-Type": "application/json"}) as resp,
        ):
            got = resp.status
            data = await resp.json()
    finally:
        await gw.stop()
    assert got == status
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["param"] == param
    assert data["error"]["code"] == code
    assert data["error"]["type"] == "invalid_request_error"
    assert all(not p.requests for p in pods)
    assert recorder.calls == [] and recorder.scheduled == []


_DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", b'{"model": "test-model", "prompt": "\xff\xfe"}'),
        ("/v1/completions", b'{"model": "test-model", "prompt": ["ok", "\xff"]}'),
        ("/v1/completions", b'{"model": "\xc3(", "prompt": "x"}'),
        ("/v1/chat/completions", b'{"model": "test-model", "messages": [{"content": "\xff"}]}'),
        ("/v1/completions", b'{"model": "test-model", "prompt": ' + _DEEP + b"}"),
        ("/v1/completions", b'{"model": "test-model", "extra": ' + _DEEP + b', "prompt": "x"}'),
        ("/v1/chat/completions", b'{"model": "test-model", "messages": [{"c": ' + _DEEP + b"}]}"),
        ("/v1/score", b'{"model": "test-model", "messages": ' + _DEEP + b"}"),
        ("/v1/score", b'{"model": "test-model", "prompt": "\xff"}'),
    ],
    ids=[
        "prompt-not-utf8",
        "batch-not-utf8",
        "model-not-utf8",
        "messages-not-utf8",
        "prompt-deep",
        "unknown-field-deep",
        "messages-deep",
        "score-deep",
        "score-not-utf8",
    ],
)
async def test_unreadable_json_is_a_400(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder, path: str, body: bytes
) -> None:
    """Bodies that are not JSON a pod could read (strings that are not UTF-8, nesting deeper
    than the decoder recurses) get 400 invalid_json in the OpenAI shape, not a bare 500."""
    gw = await start_gateway(tmp_path, pods, recorder=recorder)
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(gw.url + path, data=body, headers={"Content-Type": "application/json"}) as resp,
        ):
            got = resp.status
            data = (
                await resp.json(content_type=None)
                if resp.content_type == "application/json"
                else None
            )
    finally:
        await gw.stop()
    assert got == 400
    assert data is not None and set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["code"] == "invalid_json"
    assert data["error"]["type"] == "invalid_request_error"
    assert all(not p.requests for p in pods)
    assert recorder.calls == [] and recorder.scheduled == []


async def test_unknown_routes_and_methods(tmp_path: Path, pods: list[FakePod]) -> None:
    """Unknown paths get 404 and wrong methods 405 (with Allow), in the OpenAI error shape."""
    gw = await start_gateway(tmp_path, pods)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url + "/v1/completions") as resp:
                assert resp.status == 405
                assert resp.headers["Allow"] == "POST"
                assert (await resp.json())["error"]["code"] == "method_not_allowed"
            async with s.post(gw.url + "/v1/embeddings", json={}) as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["code"] == "not_found"
    finally:
        await gw.stop()


async def test_oversize_body(tmp_path: Path, pods: list[FakePod]) -> None:
    """Bodies over maxBodyBytes get 413, with a Content-Length or chunked, and reach no pod."""
    gw = await start_gateway(tmp_path, pods, max_body_bytes=4096)
    big = json.dumps({"model": MODEL, "prompt": "x" * 5000}).encode()

    async def chunked() -> Any:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/completions", data=big) as resp:
                assert resp.status == 413
                assert (await resp.json())["error"]["code"] == "request_too_large"
            async with s.post(gw.url + "/v1/completions", data=chunked()) as resp:
                assert resp.status == 413
                assert (await resp.json())["error"]["code"] == "request_too_large"
            ok = json.dumps({"model": MODEL, "prompt": "x" * 3000}).encode()
            async with s.post(gw.url + "/v1/completions", data=ok) as resp:
                assert resp.status == 200
    finally:
        await gw.stop()
    assert sum(len(p.requests) for p in pods) == 1


async def test_stalled_body_gets_408(tmp_path: Path, pods: list[FakePod]) -> None:
    """A client that stops sending its body half-way gets 408 (Connection: close) after
    bodyTimeout, and nothing reaches a pod."""
    gw = await start_gateway(tmp_path, pods, body_timeout=0.3)
    try:
        assert gw.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        body = json.dumps({"model": MODEL, "prompt": "hello"}).encode()
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        await writer.drain()
        t0 = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        waited = time.monotonic() - t0
        length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
        payload = await asyncio.wait_for(reader.readexactly(length), 5)
        writer.close()
    finally:
        await gw.stop()
    assert head.startswith(b"HTTP/1.1 408")
    assert re.search(rb"(?i)connection: *close", head)
    assert json.loads(payload)["error"]["code"] == "request_timeout"
    assert 0.2 < waited < 3
    assert sum(len(p.requests) for p in pods) == 0


async def test_client_disconnect_calls_post_response(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """A client that goes away (waiting for a non-streamed answer, or mid-stream) still gets
    exactly one post_response per request, and the pod's stream is aborted."""
    gw = await start_gateway(tmp_path, pods[:1], recorder=recorder)
    pod = pods[0]
    try:
        async with aiohttp.ClientSession() as s:
            task = asyncio.create_task(
                post(
                    s,
                    gw.url + "/v1/completions",
                    {"model": MODEL, "prompt": "x", "test_pod": {"hold": True}},
                )
            )
            await wait_for(lambda: len(pod.requests) == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await wait_for(lambda: len(recorder.calls) == 1)
        async with aiohttp.ClientSession() as s:
            resp = await s.post(
                gw.url + "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": "x",
                    "stream": True,
                    "test_pod": {"chunks": 50, "delay": 0.05},
                },
            )
            await resp.content.readany()
            resp.close()
        await wait_for(lambda: len(recorder.calls) == 2)
        await wait_for(lambda: pod.aborted == 1)
        assert gw.inflight == 0
    finally:
        pod.release.set()
        await gw.stop()
    assert all(n == 1 for n in recorder.per_request().values())
    assert [info.status for _, _, info in recorder.calls] == [499, 499]
    assert gw.metrics.client_disconnects._value.get() == 2


class SlowDecisionRecorder(Recorder):
    """A recorder whose plugin does blocking I/O (like a precise scorer on a Redis index), so
    the whole decision, pre-request hooks included, runs in a worker thread; its pre-request
    hook is slow when the pick is `slow_on`, so a client can go away during that decision."""

    blocking_io = True

    def __init__(self, slow_on: str) -> None:
        super().__init__()
        self.slow_on = slow_on

    def pre_request(self, ctx: Any, request: SchedulingRequest, result: SchedulingResult) -> None:
        if result.targets[0].id == self.slow_on:
            time.sleep(0.5)
        super().pre_request(ctx, request, result)


async def test_client_gone_during_a_decision_still_releases_it(tmp_path: Path) -> None:
    """A client that goes away while its request is being scheduled (the first pick, or the
    retry after a refused connection) leaves nothing counted: the decision completes and
    post_response, exactly once, releases the pick it made (the active-request scorer's
    in-flight counts drop back to 0)."""
    refused = free_port()
    pod = FakePod("pod-up", MODEL)
    await pod.start()
    down_id, up_id = f"127.0.0.1:{refused}", f"127.0.0.1:{pod.port}"
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(
        yaml.safe_dump(
            {
                "endpoints": [
                    {"name": "down", "address": "127.0.0.1", "port": refused, "model": MODEL},
                    {"name": "up", "address": "127.0.0.1", "port": pod.port, "model": MODEL},
                ]
            }
        )
    )
    recorder = SlowDecisionRecorder(slow_on=up_id)
    config = scheduler_config()
    if not any(p["type"] == "active-request-scorer" for p in config["plugins"]):
        config["plugins"].append({"type": "active-request-scorer"})
    scheduler = Scheduler.from_config(
        config,
        plugin_manager=make_plugin_manager(use_env=False, plugins=[RecorderPlugin(recorder)]),
        seed=0,
    )
    scheduler.use_endpoints_file(endpoints, poll_interval=0.05, scrape=False)
    active = scheduler.plugin("active-request-scorer")
    gw = Gateway(scheduler, GatewayConfig(port=0, unhealthy_cooldown=0), own_scheduler=True)
    await gw.start()
    interrupted: set[str] = set()  # which decisions a cancellation interrupted
    try:
        async with aiohttp.ClientSession() as s:
            for n in range(1, 21):
                task = asyncio.create_task(
                    post(s, gw.url + "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3]})
                )
                await asyncio.sleep(0.15)  # inside the slow decision on the live pod
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await asyncio.sleep(0.5)  # the interrupted decision has ended by now
                await wait_for(lambda n=n: len(recorder.calls) == len(recorder.per_request()) == n)
                assert active.count(down_id) == 0 and active.count(up_id) == 0
                last = recorder.calls[-1][0].request_id
                picks = [t for r, t in recorder.scheduled if r == last]
                if picks == [up_id]:
                    interrupted.add("first pick")
                elif picks == [down_id, up_id]:
                    interrupted.add("retry")
                if interrupted == {"first pick", "retry"}:
                    break
        assert gw.inflight == 0
    finally:
        await gw.stop()
        await pod.stop()
    assert interrupted == {"first pick", "retry"}
    assert all(n == 1 for n in recorder.per_request().values())
    assert {info.status for _, _, info in recorder.calls} == {499}
    assert not pod.requests


async def test_drain_on_shutdown(tmp_path: Path, pods: list[FakePod], recorder: Recorder) -> None:
    """stop() stops accepting connections and lets in-flight requests finish before returning."""
    gw = await start_gateway(tmp_path, pods[:1], recorder=recorder, drain_timeout=5.0)
    url = gw.url
    pod = pods[0]
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(
            post(
                s,
                url + "/v1/completions",
                {"model": MODEL, "prompt": "x", "test_pod": {"hold": True}},
            )
        )
        await wait_for(lambda: len(pod.requests) == 1)
        assert gw.inflight == 1
        stopping = asyncio.create_task(gw.stop())
        await asyncio.sleep(0.3)
        assert not stopping.done()
        assert gw.draining
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as s2:
                await s2.get(url + "/health")
        pod.release.set()
        status, data, _ = await task
        await asyncio.wait_for(stopping, 5)
    assert status == 200 and data["choices"]
    ((_, _, info),) = recorder.calls
    assert info.status == 200


async def test_drain_timeout_cancels(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """Requests still running when drainTimeout expires are cancelled, and post_response runs
    for them."""
    gw = await start_gateway(tmp_path, pods[:1], recorder=recorder, drain_timeout=0.3)
    pod = pods[0]
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(
            post(
                s,
                gw.url + "/v1/completions",
                {"model": MODEL, "prompt": "x", "test_pod": {"hold": True}},
            )
        )
        await wait_for(lambda: len(pod.requests) == 1)
        t0 = time.monotonic()
        await gw.stop()
        assert time.monotonic() - t0 < 3
        with pytest.raises(aiohttp.ClientError):
            await task
    ((_, _, info),) = recorder.calls
    assert info.status == 499 and info.error == "gateway shutting down"


async def test_drain_timeout_ends_a_stream_with_an_error_event(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """A stream still running when drainTimeout expires ends with an SSE error event and
    [DONE], not just a broken connection."""
    gw = await start_gateway(tmp_path, pods[:1], recorder=recorder, drain_timeout=0.3)
    got = bytearray()
    async with aiohttp.ClientSession() as s:

        async def read() -> None:
            body = {
                "model": MODEL,
                "prompt": "x",
                "stream": True,
                "test_pod": {"chunks": 200, "delay": 0.05},
            }
            async with s.post(gw.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                try:
                    async for chunk in resp.content.iter_any():
                        got.extend(chunk)
                except aiohttp.ClientError:
                    pass

        task = asyncio.create_task(read())
        await wait_for(lambda: got.count(b"\n\n") >= 2)
        await gw.stop()
        await asyncio.wait_for(task, 5)
    events = [e for e in bytes(got).split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    err = json.loads(events[-2].removeprefix(b"data: "))
    assert err["error"]["code"] == 503 and "shut down" in err["error"]["message"]
    assert all(json.loads(e.removeprefix(b"data: "))["choices"] for e in events[:-2])
    ((_, _, info),) = recorder.calls
    assert info.status == 499 and info.error == "gateway shutting down"


async def test_health_models_and_metrics(tmp_path: Path, recorder: Recorder) -> None:
    """/health reports the pool, /v1/models is the union over pods (LoRA adapters included) and
    /metrics carries the scheduler's and the gateway's metrics."""
    a = FakePod("a", "base-a", loras=("sql-lora",))
    b = FakePod("b", "base-b")
    for p in (a, b):
        await p.start()
    gw = await start_gateway(tmp_path, [a, b], recorder=recorder)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url + "/health") as resp:
                assert resp.status == 200
                assert (await resp.json())["endpoints"] == 2
            async with s.get(gw.url + "/v1/models") as resp:
                models = await resp.json()
            assert models["object"] == "list"
            assert sorted(m["id"] for m in models["data"]) == ["base-a", "base-b", "sql-lora"]
            status, _, resp = await post(
                s, gw.url + "/v1/completions", {"model": "sql-lora", "prompt": [1] * 20}
            )
            assert status == 200
            assert resp.headers["x-kvaware-endpoint"] == f"127.0.0.1:{a.port}"
            status, _, resp = await post(
                s, gw.url + "/v1/completions", {"model": "base-b", "prompt": "x"}
            )
            assert resp.headers["x-kvaware-endpoint"] == f"127.0.0.1:{b.port}"
            async with s.get(gw.url + "/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
    finally:
        await gw.stop()
        for p in (a, b):
            await p.stop()
    req = recorder.calls[0][0]
    assert (req.model, req.lora_name) == ("base-a", "sql-lora")
    assert f'kvaware_decisions_total{{endpoint="127.0.0.1:{a.port}"}} 1.0' in text
    assert "kvaware_schedule_latency_seconds_count 2.0" in text
    assert 'kvaware_gateway_requests_total{route="completions",status="2xx"} 2.0' in text
    # where the gateway's CPU goes, once (scheduler registry), the event loop as "main"
    assert text.count("# TYPE kvaware_thread_cpu_seconds_total counter") == 1
    assert 'kvaware_thread_cpu_seconds_total{thread="main"}' in text
    assert "kvaware_gateway_prompt_tokens_total" in text


async def test_score_explains_without_side_effects(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """/v1/score returns every scorer's per-endpoint score, the totals and the pick, forwards
    nothing and changes no routing state (no in-flight count, no speculative entry)."""
    gw = await start_gateway(tmp_path, pods, recorder=recorder, config="precise.yaml")
    prompt = list(range(100, 164))  # four 16-token blocks
    try:
        async with aiohttp.ClientSession() as s:
            status, before, _ = await post(
                s, gw.url + "/v1/score", {"model": MODEL, "prompt": prompt}
            )
            assert status == 200
            precise = gw.scheduler.plugin("precise-prefix-cache-scorer")
            assert precise.indexer.index.pods() == []
            # A routed request records speculative entries for its pick ...
            status, _, resp = await post(
                s, gw.url + "/v1/completions", {"model": MODEL, "prompt": prompt}
            )
            picked = resp.headers["x-kvaware-endpoint"]
            # ... which the explanation of the same prompt now shows.
            status, after, _ = await post(
                s,
                gw.url + "/v1/score",
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
            )
            status, again, _ = await post(
                s, gw.url + "/v1/score", {"model": MODEL, "prompt": prompt}
            )
    finally:
        await gw.stop()
    ids = {f"127.0.0.1:{p.port}" for p in pods}
    assert before["object"] == "kvaware.score"
    assert before["kind"] == "completion" and before["prompt_tokens"] == 64
    assert set(before["candidates"]) == ids
    assert set(before["scores"]) == {
        "precise-prefix-cache-scorer",
        "queue-scorer",
        "kv-cache-utilization-scorer",
        "active-request-scorer",
    }
    assert before["weights"]["precise-prefix-cache-scorer"] == 3.0
    for eid in ids:
        total = sum(before["weights"][n] * before["scores"][n][eid] for n in before["scores"])
        assert before["totals"][eid] == pytest.approx(total)
    assert before["pick"]["endpoint"] == before["ranking"][0]["endpoint"] or (
        before["totals"][before["pick"]["endpoint"]] == before["ranking"][0]["total"]
    )
    assert [r["total"] for r in before["ranking"]] == sorted(
        (r["total"] for r in before["ranking"]), reverse=True
    )
    assert all(before["scores"]["precise-prefix-cache-scorer"][e] == 0.0 for e in ids)
    assert after["kind"] == "chat"
    assert again["pick"]["endpoint"] == picked
    assert again["scores"]["precise-prefix-cache-scorer"][picked] == 1.0
    # Only the routed request was scheduled, forwarded and finished.
    assert len(recorder.scheduled) == 1 and len(recorder.calls) == 1
    assert sum(len(p.requests) for p in pods) == 1
    assert again["scores"]["active-request-scorer"][picked] == 1.0


class BrokenFilter:
    """A filter plugin with a bug: it raises on every request."""

    def __init__(self, params: Any, ctx: Any) -> None:
        pass

    def filter(self, ctx: Any, request: Any, endpoints: Any) -> Any:
        raise RuntimeError("filter bug")


class BrokenFilterPlugin:
    @hookimpl
    def kvaware_register_plugins(self, registry: Any) -> None:
        registry.register("test-broken-filter", BrokenFilter, kinds=("filter",))


async def test_broken_plugin_is_an_openai_shaped_500(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """A plugin that breaks scheduling gets 500 internal_error in the OpenAI shape, from the
    inference routes and from /v1/score alike, and nothing is forwarded."""
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(endpoints_yaml(pods))
    config = scheduler_config()
    config["plugins"].append({"type": "test-broken-filter"})
    config["schedulingProfiles"][0]["plugins"].insert(0, {"pluginRef": "test-broken-filter"})
    scheduler = Scheduler.from_config(
        config,
        plugin_manager=make_plugin_manager(
            use_env=False, plugins=[RecorderPlugin(recorder), BrokenFilterPlugin()]
        ),
        seed=0,
    )
    scheduler.use_endpoints_file(endpoints, poll_interval=0.05, scrape=False)
    gw = Gateway(scheduler, GatewayConfig(port=0), own_scheduler=True)
    await gw.start()
    got = []
    try:
        async with aiohttp.ClientSession() as s:
            for path in ("/v1/completions", "/v1/score"):
                async with s.post(gw.url + path, json={"model": MODEL, "prompt": "x"}) as resp:
                    got.append((resp.status, resp.content_type, await resp.text()))
    finally:
        await gw.stop()
    for status, content_type, text in got:
        assert (status, content_type) == (500, "application/json"), text
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert all(not p.requests for p in pods)
    assert recorder.calls == []


async def test_score_null_messages_is_a_completion(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """``"messages": null`` beside a prompt is no chat request (clients send explicit nulls)."""
    gw = await start_gateway(tmp_path, pods, recorder=recorder, config="precise.yaml")
    try:
        async with aiohttp.ClientSession() as s:
            status, body, _ = await post(
                s,
                gw.url + "/v1/score",
                {"model": MODEL, "prompt": list(range(100, 164)), "messages": None},
            )
    finally:
        await gw.stop()
    assert status == 200, body
    assert body["kind"] == "completion" and body["prompt_tokens"] == 64


async def test_score_excluded_reasons(tmp_path: Path) -> None:
    """/v1/score tells why each endpoint was left out: a pod in its connection-failure
    cooldown that serves another model anyway is excluded for the model, not the refusal."""
    refused = free_port()
    other = FakePod("other", "other-model")
    await other.start()
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(
        yaml.safe_dump(
            {
                "endpoints": [
                    {"name": "down", "address": "127.0.0.1", "port": refused, "model": MODEL},
                    {"name": "other", "address": "127.0.0.1", "port": other.port},
                ]
            }
        )
    )
    scheduler = Scheduler.from_config(
        scheduler_config(recorder=False), plugin_manager=make_plugin_manager(use_env=False)
    )
    scheduler.use_endpoints_file(endpoints, poll_interval=0.05, scrape=False)
    gw = Gateway(scheduler, GatewayConfig(port=0, unhealthy_cooldown=30), own_scheduler=True)
    await gw.start()
    try:
        async with aiohttp.ClientSession() as s:
            status, _, _ = await post(
                s, gw.url + "/v1/completions", {"model": MODEL, "prompt": "x"}
            )
            assert status == 502  # the only pod serving MODEL refused: now in its cooldown
            status, score, _ = await post(
                s, gw.url + "/v1/score", {"model": "other-model", "prompt": "x"}
            )
    finally:
        await gw.stop()
        await other.stop()
    assert status == 200
    assert score["candidates"] == [f"127.0.0.1:{other.port}"]
    assert score["excluded"] == {f"127.0.0.1:{refused}": "does not serve the model"}


async def test_shared_prefix_lands_on_one_pod(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """With the precise profile, requests sharing a prefix follow the pod chosen for the first
    one (its blocks are recorded speculatively until KV events confirm them)."""
    gw = await start_gateway(tmp_path, pods, recorder=recorder, config="precise.yaml")
    picks: dict[int, list[str]] = {}
    try:
        async with aiohttp.ClientSession() as s:
            for i in range(12):
                family = i % 3
                prompt = [10_000 * (family + 1) + t for t in range(48)] + [i] * 16
                status, _, resp = await post(
                    s, gw.url + "/v1/completions", {"model": MODEL, "prompt": prompt}
                )
                assert status == 200
                picks.setdefault(family, []).append(resp.headers["x-kvaware-endpoint"])
    finally:
        await gw.stop()
    for family, targets in picks.items():
        assert len(set(targets)) == 1, (family, targets)


async def test_scheduler_start_failure_is_not_fatal(tmp_path: Path, pods: list[FakePod]) -> None:
    """A scheduler part that fails to start is logged and counted; the gateway serves anyway."""
    recorder = FailingStartRecorder()
    gw = await start_gateway(tmp_path, pods, recorder=recorder)
    try:
        async with aiohttp.ClientSession() as s:
            status, _, _ = await post(
                s, gw.url + "/v1/completions", {"model": MODEL, "prompt": "x"}
            )
    finally:
        failures = gw.metrics.lifecycle_errors.labels("start")._value.get()
        await gw.stop()
    assert status == 200
    assert failures == 1
    assert len(recorder.calls) == 1


async def test_retries_end_when_a_plugin_sends_the_pick_elsewhere(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """data-parallel-profile-handler sends every rank pick to the pod's primaryPort: when that
    port refuses, the failed target is no candidate, yet the attempts still end at maxAttempts
    (they are counted, not the distinct pods that failed) with a 502."""
    from tests.harness import pool_scheduler

    dead_port = free_port()
    config = {
        "apiVersion": "llm-d.ai/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [
            {"type": "data-parallel-profile-handler", "parameters": {"primaryPort": dead_port}},
            {"type": "queue-scorer"},
            {"type": "test-recorder"},
        ],
        "schedulingProfiles": [{"name": "default", "plugins": [{"pluginRef": "queue-scorer"}]}],
    }
    scheduler = pool_scheduler(tmp_path, pods, config, [RecorderPlugin(recorder)], with_model=True)
    gw = Gateway(scheduler, GatewayConfig(port=0, max_attempts=3), own_scheduler=True)
    await gw.start()
    try:
        async with aiohttp.ClientSession() as s:
            status, data, _ = await asyncio.wait_for(
                post(s, gw.url + "/v1/completions", {"model": MODEL, "prompt": "x"}), 10
            )
    finally:
        await gw.stop()
    assert status == 502
    assert data["error"]["code"] == "upstream_unavailable"
    assert len(recorder.scheduled) == 3
