"""The gateway's own pod connections for streamed requests (`kvaware_scorer.gateway.podstream`):
HTTP/1.1 framing against raw servers on 127.0.0.1 (answers cut at every byte), keep-alive
reuse and limits, failures, and a slow client through the whole gateway (the pod is paused,
the gateway buffers a bounded amount)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Self

import aiohttp
import pytest

from kvaware_scorer.gateway.podstream import (
    MAX_HEAD,
    PodConnectError,
    PodDisconnected,
    PodProtocolError,
    PodStreamPool,
)

from .conftest import MODEL, start_gateway
from .pods import FakePod

CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    b"7\r\ndata: a\r\n"
    b"a;ext=1\r\n\n\ndata: bc\r\n"
    b"3\r\n\n\n\n\r\n"
    b"0\r\nx-trailer: 1\r\n\r\n"
)
CHUNKED_BODY = b"data: a\n\ndata: bc\n\n\n"


class _RawServer:
    """A server on 127.0.0.1 that reads each request (head and content-length body) and has
    `answer` write the reply; with `close_after`, one request per connection."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self.close_after = False
        self._server: asyncio.AbstractServer | None = None

    async def answer(self, head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await self.answer(head, await reader.readexactly(length), writer)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


class RawPod(_RawServer):
    """Answers the n-th request with `reply(n)`, written in pieces of `piece` bytes."""

    def __init__(self, reply: Callable[[int], bytes], piece: int = 0, close: bool = False):
        super().__init__()
        self.reply = reply
        self.piece = piece
        self.close_after = close
        self.requests: list[bytes] = []

    async def answer(self, head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        self.requests.append(head + body)
        data = self.reply(len(self.requests) - 1)
        step = self.piece or len(data)
        for i in range(0, len(data), step):
            writer.write(data[i : i + step])
            await writer.drain()


async def _read(pool: PodStreamPool, port: int) -> tuple[int, bytes, object]:
    resp = await pool.request("127.0.0.1", port, "/v1/completions", {"x-a": "1"}, b'{"p":1}')
    data = await resp.read(1 << 20)
    resp.release()
    return resp.status, data, resp


def _pool(**kw: float) -> PodStreamPool:
    settings = {"per_endpoint": 0, "total": 0, "keepalive": 4.0, "connect_timeout": 2.0}
    settings.update(kw)
    return PodStreamPool(**settings)  # type: ignore[arg-type]


async def test_chunked_answer_cut_at_every_byte_decodes_the_same() -> None:
    for piece in (1, 2, 3, 5, 11, len(CHUNKED)):
        async with RawPod(lambda _: CHUNKED, piece=piece) as pod:
            pool = _pool()
            status, data, resp = await _read(pool, pod.port)
            assert (status, data) == (200, CHUNKED_BODY), piece
            assert resp.content_type == "text/event-stream"  # type: ignore[attr-defined]
            await pool.close()


async def test_request_head_and_body_as_sent() -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    async with RawPod(lambda _: ok) as pod:
        pool = _pool()
        assert (await _read(pool, pod.port))[:2] == (200, b"ok")
        sent = pod.requests[0]
        assert sent.startswith(b"POST /v1/completions HTTP/1.1\r\n")
        assert b"\r\nx-a: 1\r\n" in sent
        assert b"\r\nContent-Length: 7\r\n" in sent
        assert sent.endswith(b'\r\n\r\n{"p":1}')
        await pool.close()


async def test_keep_alive_reuses_one_connection_and_close_does_not() -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    async with RawPod(lambda _: ok) as pod:
        pool = _pool()
        for _ in range(3):
            assert (await _read(pool, pod.port))[:2] == (200, b"ok")
        assert pod.connections == 1
        await pool.close()
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"
    async with RawPod(lambda _: closing, close=True) as pod:
        pool = _pool()
        for _ in range(2):
            assert (await _read(pool, pod.port))[:2] == (200, b"ok")
        assert pod.connections == 2
        await pool.close()


async def test_a_close_delimited_body_ends_with_the_connection() -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: x\n\n"
    async with RawPod(lambda _: answer, close=True) as pod:
        pool = _pool()
        assert (await _read(pool, pod.port))[:2] == (200, b"data: x\n\n")
        await pool.close()


async def test_interim_100_answer_is_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 1\r\n\r\nz"
    async with RawPod(lambda _: answer, piece=4) as pod:
        pool = _pool()
        assert (await _read(pool, pod.port))[:2] == (201, b"z")
        await pool.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTX/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n bad: fold\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno-colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nx: " + b"y" * (MAX_HEAD + 10) + b"\r\n\r\n",
    ],
)
async def test_invalid_heads_are_protocol_errors(answer: bytes) -> None:
    async with RawPod(lambda _: answer, close=True) as pod:
        pool = _pool()
        with pytest.raises(PodProtocolError):
            await pool.request("127.0.0.1", pod.port, "/", {}, b"")
        await pool.close()


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nab\r\n0\r\n\r\n",  # not hex
        b"2\r\nabc\r\n0\r\n\r\n",  # data longer than its size
        b"2" * 5000,  # a size line that never ends
    ],
)
async def test_invalid_chunks_end_the_body_with_an_error(body: bytes) -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    async with RawPod(lambda _: head + body, close=True) as pod:
        pool = _pool()
        resp = await pool.request("127.0.0.1", pod.port, "/", {}, b"")
        with pytest.raises(PodProtocolError):
            await resp.read(1 << 20)
        resp.release()
        await pool.close()


async def test_body_over_the_read_limit_is_refused() -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 100
    async with RawPod(lambda _: answer, piece=30) as pod:
        pool = _pool()
        resp = await pool.request("127.0.0.1", pod.port, "/", {}, b"")
        with pytest.raises(PodProtocolError):
            await resp.read(50)
        await pool.close()


async def test_refused_connection_and_early_close() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = _pool()
    with pytest.raises(PodConnectError):
        await pool.request("127.0.0.1", port, "/", {}, b"")
    async with RawPod(lambda _: b"HTTP/1.1 200", close=True) as pod:
        with pytest.raises(PodDisconnected):
            await pool.request("127.0.0.1", pod.port, "/", {}, b"")
    # a body cut short (content-length not reached) ends with the disconnect
    short = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"
    async with RawPod(lambda _: short, close=True) as pod:
        resp = await pool.request("127.0.0.1", pod.port, "/", {}, b"")
        with pytest.raises(PodDisconnected):
            await resp.read(100)
    await pool.close()


async def test_header_values_with_line_breaks_are_refused() -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    async with RawPod(lambda _: ok) as pod:
        pool = _pool()
        with pytest.raises(ValueError, match="line break"):
            await pool.request("127.0.0.1", pod.port, "/", {"x": "a\r\nevil: 1"}, b"")
        await pool.close()


async def test_per_endpoint_limit_makes_the_next_request_wait() -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    async with RawPod(lambda _: ok) as pod:
        pool = _pool(per_endpoint=1)
        first = await pool.request("127.0.0.1", pod.port, "/", {}, b"")
        second = asyncio.ensure_future(pool.request("127.0.0.1", pod.port, "/", {}, b""))
        await asyncio.sleep(0.1)
        assert not second.done()  # the one connection is in use
        assert await first.read(10) == b"ok"
        first.release()
        resp = await asyncio.wait_for(second, 2)
        assert await resp.read(10) == b"ok"
        resp.release()
        assert pod.connections == 1
        await pool.close()


async def test_idle_connections_close_after_keepalive() -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    async with RawPod(lambda _: ok) as pod:
        pool = _pool(keepalive=0.05)
        await _read(pool, pod.port)
        await asyncio.sleep(0.2)
        await _read(pool, pod.port)
        assert pod.connections == 2
        await pool.close()


# -- through the gateway ------------------------------------------------------------------------


class StreamingPod(_RawServer):
    """A pod for the gateway: GETs (``/v1/models``, ``/health``) get the model list, every
    completion is streamed as `events` SSE events of `size` bytes as fast as the connection
    takes them (or answered with `answer_bytes` when set); records when its last write was
    taken by the gateway."""

    def __init__(self, events: int, size: int) -> None:
        super().__init__()
        self.events = events
        self.size = size
        self.name = "raw-0"
        self.model = MODEL
        self.finished_at: float | None = None
        self.written = 0  # events taken by the gateway so far
        self.answer_bytes: bytes | None = None

    async def answer(self, head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        if not head.startswith(b"POST"):
            models = b'{"object":"list","data":[{"id":"%s","object":"model"}]}' % MODEL.encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(models), models)
            )
            return
        if self.answer_bytes is not None:
            writer.write(self.answer_bytes)
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for i in range(self.events):
            text = b"%06d" % i + b"x" * (self.size - 6)
            event = b'data: {"choices":[{"text":"' + text + b'"}]}\n\n'
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            self.written = i + 1
        event = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
        await writer.drain()
        self.finished_at = time.monotonic()


@asynccontextmanager
async def _gateway(tmp_path: Path, pod: StreamingPod) -> AsyncIterator[SimpleNamespace]:
    gw = await start_gateway(tmp_path, [pod], config="random.yaml")  # type: ignore[list-item]
    try:
        yield SimpleNamespace(url=gw.url, gateway=gw)
    finally:
        await gw.stop()


async def test_a_slow_client_pauses_the_pod_and_gets_every_event(tmp_path: Path) -> None:
    # ~32 MB: more than the socket buffers on the way can hold (loopback's grow to a few MB)
    events, size = 2000, 16_000
    async with StreamingPod(events, size) as pod, _gateway(tmp_path, pod) as gw:
        # a raw client with a small receive buffer that reads nothing for a while
        host, port = gw.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.connect((host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock)
        body = b'{"model":"%s","prompt":"hi","stream":true}' % MODEL.encode()
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        await asyncio.sleep(1.0)
        started_reading = time.monotonic()
        # the pod could not finish: the gateway stopped reading from it for the slow client
        # (without the pause it would have read the whole answer into memory by now)
        assert pod.finished_at is None
        assert pod.written < events // 2
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            part = await asyncio.wait_for(reader.read(65536), 10)
            assert part, "the gateway closed the stream"
            data += part
        writer.close()
        assert pod.finished_at is not None and pod.finished_at > started_reading
        seen = [int(data[i : i + 6]) for i in _find_all(data, b'"text":"')]
        assert seen == list(range(events))
        assert data.count(b"data: [DONE]") == 1


def _find_all(data: bytes, needle: bytes) -> list[int]:
    """Where each occurrence of `needle` ends."""
    out, i = [], data.find(needle)
    while i >= 0:
        out.append(i + len(needle))
        i = data.find(needle, i + 1)
    return out


async def test_streams_through_the_gateway_reuse_pod_connections(tmp_path: Path) -> None:
    async with StreamingPod(5, 100) as pod, _gateway(tmp_path, pod) as gw:
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                payload = {"model": MODEL, "prompt": "hi", "stream": True}
                async with s.post(gw.url + "/v1/completions", json=payload) as resp:
                    assert resp.status == 200
                    text = await resp.text()
                assert text.count("data: {") == 5 and text.endswith("data: [DONE]\n\n")
        pool = gw.gateway.forwarder.pods
        assert pool is not None
        assert sum(len(v) for v in pool._idle_conns.values()) == 1


async def test_bytes_a_pod_sends_unasked_close_the_idle_connection() -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    # the first answer carries extra bytes after its end: the connection is not reused
    async with RawPod(lambda n: ok + (b"junk" if n == 0 else b""), piece=len(ok)) as pod:
        pool = _pool()
        assert (await _read(pool, pod.port))[:2] == (200, b"ok")
        await asyncio.sleep(0.05)
        assert (await _read(pool, pod.port))[:2] == (200, b"ok")
        assert pod.connections == 2
        await pool.close()


async def test_read_timeout_bounds_a_silent_pod_before_and_inside_a_stream(
    tmp_path: Path, pod: FakePod
) -> None:
    gw = await start_gateway(tmp_path, [pod], config="random.yaml", read_timeout=0.3)
    try:
        async with aiohttp.ClientSession() as s:
            # no head at all: 504 after readTimeout, not firstByteTimeout (60 s)
            body = {"model": MODEL, "prompt": "x", "stream": True, "test_pod": {"hold": True}}
            t0 = time.monotonic()
            async with s.post(gw.url + "/v1/completions", json=body) as resp:
                assert resp.status == 504
                assert (await resp.json())["error"]["code"] == "upstream_timeout"
            assert time.monotonic() - t0 < 5
            pod.release.set()
            # silence inside the stream: it ends with an SSE error and [DONE]
            body = {"model": MODEL, "prompt": "x", "stream": True, "test_pod": {"delay": 1.0}}
            async with s.post(gw.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                text = await resp.text()
            assert "The endpoint failed during the stream" in text
            assert text.endswith("data: [DONE]\n\n")
    finally:
        await gw.stop()


async def test_a_connection_released_while_paused_reads_the_next_answer() -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    async with RawPod(lambda _: ok) as pod:
        pool = _pool()
        resp = await pool.request("127.0.0.1", pod.port, "/", {}, b"")
        resp.pause()  # as the relay does for a slow client; the answer had ended already
        assert await resp.read(10) == b"ok"
        resp.release()
        resp = await asyncio.wait_for(pool.request("127.0.0.1", pod.port, "/", {}, b""), 2)
        assert await resp.read(10) == b"ok"
        resp.release()
        assert pod.connections == 1
        await pool.close()


async def test_a_head_trickling_in_byte_by_byte_is_read() -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"p" * 20_000 + b"\r\ncontent-length: 2\r\n\r\nok"
    async with RawPod(lambda _: head, piece=1) as pod:
        pool = _pool()
        assert (await _read(pool, pod.port))[:2] == (200, b"ok")
        await pool.close()


async def test_a_compressed_or_invalid_answer_is_a_502(tmp_path: Path) -> None:
    answers = (
        b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: 2\r\n\r\nzz",
        b"HTTP/1.1 OK\r\n\r\n",
    )
    async with (
        StreamingPod(1, 10) as pod,
        _gateway(tmp_path, pod) as gw,
        aiohttp.ClientSession() as s,
    ):
        for answer in answers:
            pod.answer_bytes = answer
            for stream in (True, False):
                payload = {"model": MODEL, "prompt": "hi", "stream": stream}
                async with s.post(gw.url + "/v1/completions", json=payload) as resp:
                    assert resp.status == 502, (answer, stream)
                    assert (await resp.json())["error"]["code"] == "upstream_error"


async def test_total_limit_closes_an_idle_connection_for_another_pod() -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    async with RawPod(lambda _: ok) as a, RawPod(lambda _: ok) as b:
        pool = _pool(total=1)
        first = await pool.request("127.0.0.1", a.port, "/", {}, b"")
        other = asyncio.ensure_future(pool.request("127.0.0.1", b.port, "/", {}, b""))
        await asyncio.sleep(0.1)
        assert not other.done()  # the one connection allowed is in use
        assert await first.read(10) == b"ok"
        first.release()  # idle now: closed to make room for the other pod
        resp = await asyncio.wait_for(other, 2)
        assert await resp.read(10) == b"ok"
        resp.release()
        assert (a.connections, b.connections) == (1, 1)
        await pool.close()


async def test_endless_interim_answers_cost_no_recursion() -> None:
    flood = b"HTTP/1.1 100 Continue\r\n\r\n" * 5000  # one read of many 1xx heads
    answer = flood + b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    async with RawPod(lambda _: answer) as pod:
        pool = _pool()
        assert (await _read(pool, pod.port))[:2] == (200, b"ok")
        await pool.close()
