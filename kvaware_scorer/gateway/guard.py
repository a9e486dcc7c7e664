"""The gateway's defences below HTTP: a client-connection cap, a request-head timeout, and
rate-limited logging of repeated errors.

`ConnectionGuard` wraps aiohttp's per-connection protocol. A connection beyond
``maxClientConnections`` is answered ``503`` and closed at once, before aiohttp sees it, so a
flood of connections can never take the process to its open-file limit (where ``accept()``
itself fails and even ``/health`` cannot be answered). A connection whose first request head is
not complete within ``headerTimeout`` gets ``408`` and is closed (later heads on a kept-alive
connection are bounded by aiohttp's keep-alive timeout, ``keepaliveTimeout``).

`GuardedSite` is the aiohttp TCP site that puts a `ConnectionGuard` in front of every accepted
connection.

`LogLimiter` lets the first occurrence of an error through with its traceback, then at most one
line per ``errorLogInterval`` per kind of error, saying how many were suppressed.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

import msgspec
from aiohttp import web

from kvaware_scorer.gateway.protocol import error_body

__all__ = ["ConnectionGuard", "GuardedSite", "LogLimiter", "fit_connection_cap"]

logger = logging.getLogger(__name__)

#: Error kinds remembered by a `LogLimiter` (least recently seen forgotten first).
MAX_LOG_KINDS = 256
#: File descriptors kept free for pod connections, the listening socket, logs and config files.
FD_RESERVE = 256


def _canned(status: int, reason: str, message: str, code: str) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = msgspec.json.encode(error_body(message, kind, None, code))
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_TOO_MANY = _canned(
    503, "Service Unavailable", "Too many open connections; retry later.", "too_many_connections"
)
_HEAD_TIMEOUT = _canned(
    408, "Request Timeout", "The request head did not arrive in time.", "request_timeout"
)


class LogLimiter:
    """Rate limits log lines per kind of error.

    Args:
        interval: Seconds between two lines of one kind (0 = no limit).
        clock: Monotonic clock.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._kinds: OrderedDict[str, list[float]] = OrderedDict()  # kind -> [last, suppressed]

    def allow(self, kind: str) -> int | None:
        """None when a line of `kind` must be suppressed now, else how many were suppressed
        since the last one."""
        if self.interval <= 0:
            return 0
        now = self.clock()
        state = self._kinds.get(kind)
        if state is None:
            self._kinds[kind] = [now, 0]
            while len(self._kinds) > MAX_LOG_KINDS:
                self._kinds.popitem(last=False)
            return 0
        self._kinds.move_to_end(kind)
        if now - state[0] < self.interval:
            state[1] += 1
            return None
        suppressed = int(state[1])
        state[0], state[1] = now, 0
        return suppressed

    def log(
        self,
        log: logging.Logger,
        level: int,
        kind: str,
        msg: str,
        *args: Any,
        exc_info: Any = None,
    ) -> bool:
        """Log `msg % args` unless a line of `kind` was logged within the interval; the first
        line of a kind carries `exc_info`, later ones only the count of suppressed lines."""
        suppressed = self.allow(kind)
        if suppressed is None:
            return False
        if suppressed:
            log.log(level, "%s (%d similar suppressed)", msg % args if args else msg, suppressed)
        else:
            log.log(level, msg, *args, exc_info=exc_info)
        return True

    def loop_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An asyncio exception handler that rate limits the default one (e.g. one
        ``socket.accept() out of system resource`` traceback per interval, not per accept)."""
        exc = context.get("exception")
        kind = f"{context.get('message')}|{type(exc).__name__ if exc is not None else ''}"
        suppressed = self.allow(kind)
        if suppressed is None:
            return
        if suppressed:
            context = dict(context)
            context["message"] = f"{context.get('message')} ({suppressed} similar suppressed)"
        loop.default_exception_handler(context)


def fit_connection_cap(wanted: int) -> int:
    """The client-connection cap the open-file limit allows: the soft limit is raised toward
    the hard one when `wanted` plus `FD_RESERVE` does not fit, and the cap lowered if it still
    does not."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - platform without the limit
        return wanted
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    cap = max(1, soft - FD_RESERVE if soft > 2 * FD_RESERVE else soft // 2)
    logger.warning(
        "maxClientConnections %d does not fit the open-file limit %d: capping at %d",
        wanted,
        soft,
        cap,
    )
    return cap


_REFUSED = asyncio.Protocol()  # the inner protocol of a refused connection (never called)


class _Guarded(asyncio.Protocol):
    """One client connection: refused when over the cap, timed until its first head."""

    __slots__ = ("_guard", "_inner", "_refused", "_tail", "_timer", "_transport")

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._inner: asyncio.Protocol = _REFUSED
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        # NOTE: a stream transport (uvloop's is not an asyncio.Transport subclass).
        self._transport = cast(asyncio.Transport, transport)
        transport = self._transport
        if len(guard.open) >= guard.cap:
            self._refused = True
            guard.count("limit")
            transport.write(_TOO_MANY)
            transport.close()
            return
        guard.open.add(self)
        self._timer = guard.loop.call_later(guard.header_timeout, self._head_timeout)
        self._inner = guard.factory()
        self._inner.connection_made(transport)

    def _head_timeout(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._guard.count("header_timeout")
        transport.write(_HEAD_TIMEOUT)
        transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._timer is not None:
            # NOTE: the head ends at the first empty line; it may be split across reads.
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self._timer.cancel()
                self._timer = None
                self._tail = b""
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._refused:
            return None
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        if self._refused:
            return
        self._guard.open.discard(self)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self._refused:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            self._inner.resume_writing()


class ConnectionGuard:
    """A protocol factory wrapping aiohttp's (``AppRunner.server``) with the connection cap and
    the head timeout.

    Args:
        factory: The wrapped protocol factory.
        cap: Open client connections at most.
        header_timeout: Seconds until the first request head is complete.
        on_reject: Called with ``"limit"`` or ``"header_timeout"`` for each connection refused
            or timed out (metrics).
    """

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        cap: int,
        header_timeout: float,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.factory = factory
        self.cap = cap
        self.header_timeout = header_timeout
        self.on_reject = on_reject
        self.loop = asyncio.get_running_loop()
        self.open: set[_Guarded] = set()

    def count(self, reason: str) -> None:
        if self.on_reject is not None:
            self.on_reject(reason)

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self)


class GuardedSite(web.TCPSite):
    """A TCP site whose connections go through a `ConnectionGuard` first."""

    # NOTE: aiohttp >= 3.11 keeps the bound port in a `_bound_port` slot of TCPSite (read by
    # its `port` property); older releases have no such slot, so this class adds it.
    __slots__ = ("_factory",) + (() if "_bound_port" in web.TCPSite.__slots__ else ("_bound_port",))

    def __init__(self, runner: web.AppRunner, factory: ConnectionGuard, **kw: Any) -> None:
        super().__init__(runner, **kw)
        self._factory = factory

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]
