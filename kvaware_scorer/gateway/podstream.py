"""Inference requests to the pods over the gateway's own HTTP/1.1 connections, the answer's
body handed to a callback as it arrives.

Relaying SSE token events is most of the gateway's CPU. With aiohttp's client every event
wakes the relaying task through a future (`StreamReader.readany`); here the pod connection is
an asyncio protocol whose ``data_received`` decodes the body framing and calls the relay's sink
at once, which writes the events to the client: no task wake-up per event. Measured with
``benchmarks/bench_relay.py``: about half the relay CPU per streamed answer. Only the model
catalog's ``/v1/models`` polls still use an aiohttp session.

Bounds: a response head of at most `MAX_HEAD` bytes (and `MAX_HEADERS` lines), a chunk-size
line or trailer line of at most `MAX_LINE`; at most ``per_endpoint`` connections per pod and
``total`` in all (further requests wait for one, within their first-byte timeout); idle
connections are closed after ``keepalive`` seconds. A pod that breaks these rules gets its
connection closed and the request a `PodProtocolError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Mapping
from typing import cast

from multidict import CIMultiDict

__all__ = [
    "MAX_BODY",
    "MAX_HEAD",
    "MAX_HEADERS",
    "MAX_LINE",
    "PodConnectError",
    "PodDisconnected",
    "PodProtocolError",
    "PodResponse",
    "PodStreamPool",
]

#: Largest response head (status line and headers) read from a pod.
MAX_HEAD = 64 * 1024
#: Most header lines in one response head.
MAX_HEADERS = 256
#: Longest chunk-size or trailer line.
MAX_LINE = 4096
#: Largest whole (non-SSE) answer the relay reads (`PodResponse.read`).
MAX_BODY = 64 * 1024 * 1024

_CRLF = b"\r\n"
#: Request headers the pool writes itself.
_OWN_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "accept-encoding"}
)


class PodConnectError(OSError):
    """The pod could not be connected to (refused, unreachable, connect timeout)."""


class PodDisconnected(ConnectionError):
    """The pod closed the connection before or while answering."""


class PodProtocolError(ValueError):
    """The pod's answer is not valid HTTP/1.1 (or breaks a bound)."""


Sink = Callable[[bytes], None]
End = Callable[[BaseException | None], None]


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a pod; one request at a time."""

    def __init__(self, pool: PodStreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.counted = True  # in the pool's open counts until connection_lost
        self.paused = False  # reading paused (`PodResponse.pause`)
        self.idle_handle: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.buf = b""  # an incomplete chunk-size or trailer line
        self.head_buf = bytearray()  # an incomplete response head
        self.head: asyncio.Future[PodResponse] | None = None
        self.sink: Sink | None = None
        self.end: End | None = None
        self.pending: list[bytes] = []  # body bytes that arrived before the sink was set
        self.mode = "head"  # head, chunk-size, chunk-data, chunk-crlf, trailer, length, close, done
        self.remaining = 0
        self.failure: BaseException | None = None
        self.finished = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # NOTE: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._feed(data)
        except PodProtocolError as exc:
            self._fail(exc)
        except Exception as exc:  # a sink that raised: the stream ends with it
            self._fail(exc)

    def eof_received(self) -> bool | None:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        self.pool._lost(self)
        if self.mode == "close" and exc is None:
            self._finish(None)  # a close-delimited body ends with the connection
            return
        if not self.finished:
            self._fail(PodDisconnected(f"the pod closed the connection ({exc or 'eof'})"))

    # -- framing --------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        while self.mode == "head":
            if self.head_buf:
                # NOTE: a head trickling in byte by byte costs linear time: appended in
                # place, searched from where the last search stopped.
                start = max(0, len(self.head_buf) - 3)
                self.head_buf += data
                buf: bytes | bytearray = self.head_buf
                end = buf.find(b"\r\n\r\n", start)
            else:
                buf = data
                end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise PodProtocolError(f"response head over {MAX_HEAD} bytes")
                if buf is data:
                    self.head_buf = bytearray(data)
                return
            if end > MAX_HEAD:
                raise PodProtocolError(f"response head over {MAX_HEAD} bytes")
            self.head_buf = bytearray()
            response = self._parse_head(bytes(buf[:end]))
            data = bytes(buf[end + 4 :])
            if response is None:  # an interim 1xx answer: the real head follows
                if not data:
                    return
                continue
            if self.head is not None and not self.head.done():
                self.head.set_result(response)
            if self.mode == "done":
                self._finish(None)
                if data:
                    self._close()  # bytes after a complete answer: the connection is unusable
                return
        if data:
            self._body(data)

    def _parse_head(self, head: bytes) -> PodResponse | None:
        lines = head.split(_CRLF)
        if len(lines) > MAX_HEADERS + 1:
            raise PodProtocolError(f"over {MAX_HEADERS} header lines")
        status_line = lines[0]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3:
            raise PodProtocolError(f"bad status line {status_line[:80]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise PodProtocolError(f"bad status line {status_line[:80]!r}") from None
        if not 100 <= status <= 599:
            raise PodProtocolError(f"bad status {status}")
        if 100 <= status < 200 and status != 101:
            return None
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
                raise PodProtocolError(f"bad header line {line[:80]!r}")
            headers.add(name.decode("latin-1"), value.strip().decode("latin-1"))
        http10 = parts[0] == b"HTTP/1.0"
        conn = headers.get("connection", "").lower()
        keep = ("keep-alive" in conn) if http10 else ("close" not in conn)
        coding = headers.get("content-encoding", "identity").strip().lower()
        if coding not in ("", "identity"):
            # NOTE: asked for none (`PodStreamPool.request`): a coded answer could not be framed
            # or read for usage, nor relayed without its header.
            raise PodProtocolError(f"content-encoding {coding}")
        te = headers.get("transfer-encoding", "").lower()
        if status in (101, 204, 304):
            self.mode = "done"
            keep = keep and status != 101
        elif te:
            if not te.replace(" ", "").endswith("chunked"):
                self.mode, keep = "close", False
            else:
                self.mode = "chunk-size"
        elif "content-length" in headers:
            values = {v.strip() for v in headers.getall("content-length")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise PodProtocolError("bad content-length")
            self.remaining = int(next(iter(values)))
            self.mode = "length" if self.remaining else "done"
        else:
            self.mode, keep = "close", False
        return PodResponse(self, status, headers, keep)

    def _body(self, data: bytes) -> None:
        mode = self.mode
        if mode == "length":
            extra = len(data) > self.remaining
            if extra:
                data = data[: self.remaining]
            self.remaining -= len(data)
            self._deliver(data)
            if self.remaining == 0:
                self.mode = "done"
                self._finish(None)
            if extra:
                self._close()  # bytes past the declared length: the connection is unusable
            return
        if mode == "close":
            self._deliver(data)
            return
        if mode == "done":
            raise PodProtocolError("bytes after a complete answer")
        self._chunked(data)

    def _chunked(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        self.buf = b""
        pos = 0
        n = len(buf)
        out: list[bytes] = []
        try:
            while pos < n:
                mode = self.mode
                if mode == "chunk-data":
                    take = min(self.remaining, n - pos)
                    out.append(buf[pos : pos + take])
                    pos += take
                    self.remaining -= take
                    if self.remaining == 0:
                        self.mode = "chunk-crlf"
                    continue
                eol = buf.find(_CRLF, pos)
                if eol < 0:
                    if n - pos > MAX_LINE:
                        raise PodProtocolError(f"chunk line over {MAX_LINE} bytes")
                    self.buf = buf[pos:]
                    break
                line = buf[pos:eol]
                pos = eol + 2
                if mode == "chunk-crlf":
                    if line:
                        raise PodProtocolError("chunk data longer than its size")
                    self.mode = "chunk-size"
                elif mode == "chunk-size":
                    size_text = line.split(b";", 1)[0].strip()
                    if not size_text or len(size_text) > 16:
                        raise PodProtocolError(f"bad chunk size {line[:40]!r}")
                    try:
                        size = int(size_text, 16)
                    except ValueError:
                        raise PodProtocolError(f"bad chunk size {line[:40]!r}") from None
                    if size < 0:
                        raise PodProtocolError(f"bad chunk size {line[:40]!r}")
                    if size == 0:
                        self.mode = "trailer"
                    else:
                        self.mode, self.remaining = "chunk-data", size
                elif mode == "trailer":
                    if not line:
                        self.mode = "done"
                        if pos < n:
                            self._close()  # bytes past the answer: the connection is unusable
                        break
                    if len(line) > MAX_LINE:
                        raise PodProtocolError(f"trailer line over {MAX_LINE} bytes")
                else:  # "done"
                    raise PodProtocolError("bytes after a complete answer")
        finally:
            if out:
                self._deliver(out[0] if len(out) == 1 else b"".join(out))
        if self.mode == "done":
            self._finish(None)

    # -- delivery -------------------------------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        if self.sink is None:
            self.pending.append(data)
        else:
            self.sink(data)

    def _finish(self, exc: BaseException | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.failure = exc
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc or PodDisconnected("the pod closed the connection"))
        if self.end is not None:
            self.end(exc)

    def _fail(self, exc: BaseException) -> None:
        self._close()
        self._finish(exc)

    def _close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    def start(self, sink: Sink, end: End) -> None:
        """Deliver the body to `sink` from now on (what arrived already first), then `end`."""
        self.sink, self.end = sink, end
        pending, self.pending = self.pending, []
        for data in pending:
            sink(data)
        if self.finished:
            end(self.failure)


class PodResponse:
    """A pod's answer to one request: status and headers; the body through `start`
    (as it arrives) or `read` (whole)."""

    __slots__ = ("_conn", "_keep", "headers", "status")

    def __init__(self, conn: _Conn, status: int, headers: CIMultiDict[str], keep: bool) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        self._keep = keep

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    def start(self, sink: Sink, end: End) -> None:
        """Call `sink` with each piece of the decoded body as it arrives (on the event loop),
        then `end` once with None (complete) or the error that cut it short."""
        self._conn.start(sink, end)

    async def read(self, limit: int) -> bytes:
        """The whole body (at most `limit` bytes, else `PodProtocolError`)."""
        parts: list[bytes] = []
        size = 0
        done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

        def sink(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > limit:
                raise PodProtocolError(f"answer body over {limit} bytes")
            parts.append(data)

        def end(exc: BaseException | None) -> None:
            if not done.done():
                done.set_result(exc)

        try:
            self.start(sink, end)
        except BaseException:
            self.close()
            raise
        exc = await done
        if exc is not None:
            raise exc
        return b"".join(parts)

    def pause(self) -> None:
        """Stop reading from the pod (the client is slow to take the answer)."""
        conn = self._conn
        if conn.transport is not None and not conn.lost and not conn.paused:
            conn.paused = True
            conn.transport.pause_reading()

    def resume(self) -> None:
        conn = self._conn
        if conn.transport is not None and not conn.lost and conn.paused:
            conn.paused = False
            conn.transport.resume_reading()

    def close(self) -> None:
        """Drop the connection (vLLM aborts a request whose connection closes)."""
        self._conn._close()
        self._conn.pool._discard(self._conn)

    def release(self) -> None:
        """Give the connection back: kept for the next request when the answer ended cleanly
        and the pod keeps it alive, else closed."""
        conn = self._conn
        usable = conn.transport is not None and not conn.lost and not conn.transport.is_closing()
        if self._keep and conn.finished and conn.failure is None and usable:
            # NOTE: an answer may end while the relay had paused the reads (its last bytes
            # were in the same read): the next request must be read.
            self.resume()
            conn.pool._idle(conn)
        else:
            self.close()


class PodStreamPool:
    """Keep-alive HTTP/1.1 connections to the pods for the gateway's inference requests.

    Args:
        per_endpoint: Most connections open to one pod (0 = no limit).
        total: Most connections open in all (0 = no limit).
        keepalive: Seconds an idle connection is kept.
        connect_timeout: Seconds to connect.
    """

    def __init__(
        self, per_endpoint: int, total: int, keepalive: float, connect_timeout: float
    ) -> None:
        self.per_endpoint = per_endpoint
        self.total = total
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self._idle_conns: dict[tuple[str, int], deque[_Conn]] = {}
        self._open: dict[tuple[str, int], int] = {}
        self._open_total = 0
        self._room = asyncio.Condition()
        self._waiting = 0  # requests waiting for room
        self._closed = False

    def _count(self, key: tuple[str, int], delta: int) -> None:
        n = self._open.get(key, 0) + delta
        if n > 0:
            self._open[key] = n
        else:
            self._open.pop(key, None)
        self._open_total += delta

    def _take_idle(self, key: tuple[str, int], newest: bool) -> _Conn | None:
        """An idle connection to `key` taken out of the pool (the newest or the oldest)."""
        idle = self._idle_conns.get(key)
        if not idle:
            return None
        conn = idle.pop() if newest else idle.popleft()
        if not idle:
            del self._idle_conns[key]
        if conn.idle_handle is not None:
            conn.idle_handle.cancel()
            conn.idle_handle = None
        return conn

    async def _acquire(self, key: tuple[str, int]) -> _Conn:
        while True:
            while (conn := self._take_idle(key, newest=True)) is not None:
                if not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                    conn._reset()
                    return conn
            full = (self.per_endpoint and self._open.get(key, 0) >= self.per_endpoint) or (
                self.total and self._open_total >= self.total
            )
            if not full:
                break
            if self.total and self._open_total >= self.total and self._idle_conns:
                # NOTE: another pod's idle connection makes room once it has closed (_lost)
                oldest = self._take_idle(next(iter(self._idle_conns)), newest=False)
                if oldest is not None:
                    oldest._close()
            self._waiting += 1
            try:
                async with self._room:
                    await self._room.wait()
            finally:
                self._waiting -= 1
        self._count(key, 1)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout or None):
                _, proto = await loop.create_connection(lambda: _Conn(self, key), key[0], key[1])
        except BaseException as exc:
            self._count(key, -1)
            self._notify()
            where = f"{key[0]}:{key[1]}"
            if isinstance(exc, TimeoutError):
                raise PodConnectError(f"connect to {where} timed out") from exc
            if isinstance(exc, OSError):
                raise PodConnectError(f"cannot connect to {where}: {exc}") from exc
            raise
        return proto

    def _notify(self) -> None:
        if not self._waiting:
            return
        room = self._room

        async def wake() -> None:
            async with room:
                room.notify()

        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(wake())

    def _idle(self, conn: _Conn) -> None:
        if self._closed:
            conn._close()
            return
        # NOTE: nothing of the finished request stays reachable from an idle connection (its
        # mode stays "done": bytes a pod sends unasked close it).
        conn.head = conn.sink = conn.end = None
        self._idle_conns.setdefault(conn.key, deque()).append(conn)
        loop = asyncio.get_running_loop()
        conn.idle_handle = loop.call_later(self.keepalive, self._expire, conn)
        self._notify()

    def _expire(self, conn: _Conn) -> None:
        conn.idle_handle = None
        self._discard(conn)
        conn._close()

    def _discard(self, conn: _Conn) -> None:
        idle = self._idle_conns.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle_conns[conn.key]

    def _lost(self, conn: _Conn) -> None:
        self._discard(conn)
        if conn.counted:
            conn.counted = False
            self._count(conn.key, -1)
            self._notify()

    async def request(
        self,
        host: str,
        port: int,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> PodResponse:
        """POST `body` to the pod; its response head (the body follows through the answer).

        Raises:
            PodConnectError: The pod could not be connected to.
            PodDisconnected: It closed the connection before a complete head.
            PodProtocolError: Its head is not valid HTTP/1.1.
        """
        if self._closed:
            raise PodConnectError("the gateway is shutting down")
        key = (host, port)
        conn = await self._acquire(key)
        loop = asyncio.get_running_loop()
        conn.head = loop.create_future()
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}"]
        for k, v in headers.items():
            if k.lower() in _OWN_HEADERS:
                continue
            if any(c in k or c in v for c in "\r\n\0"):
                # NOTE: never a header split: aiohttp's server refuses such values from a
                # client, so only a plugin could produce one.
                raise ValueError(f"header {k!r} holds a line break")
            lines.append(f"{k}: {v}")
        # NOTE: answers must come uncompressed (the relay frames SSE events and reads usage);
        # without Accept-Encoding any coding would be acceptable (RFC 9110 §12.5.3).
        lines.append("Accept-Encoding: identity")
        lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        assert conn.transport is not None
        conn.transport.write(head + body)
        try:
            return await conn.head
        except BaseException:
            conn._close()
            raise

    async def close(self) -> None:
        """Close every idle connection; those in use close when their answer ends."""
        self._closed = True
        for idle in list(self._idle_conns.values()):
            for conn in list(idle):
                if conn.idle_handle is not None:
                    conn.idle_handle.cancel()
                conn._close()
        self._idle_conns.clear()
