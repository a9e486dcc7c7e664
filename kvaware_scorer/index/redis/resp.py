"""The Redis protocol (RESP) on a borrowed redis-py connection: pipelined commands in one send
and their replies read back with as few receives as they need.

This is the one place of the Redis backend that goes below redis-py's public API: it reads the
connection's socket (``Connection._sock``) directly.

NOTE: why not the public ``Connection.send_packed_command`` / ``read_response``: they keep the
round trip (one send, then the replies), but redis-py's reply path costs two to three times the
CPU per call (a receive system call per reply and a general parser): 100-200 us of a ~0.7 ms
lookup on the development VM. Lookups and write batches are this backend's hot path, so they
read the socket here; everything else (connecting, authentication, SCRIPT LOAD, cluster
routing) uses redis-py's public API. Error replies become redis-py's public exception classes
through the table below, not its parser.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any, NoReturn

import redis

__all__ = ["Wire", "encode_command", "error_reply"]

#: Error-reply codes -> the redis-py exception of that reply (as redis-py's parser maps them).
_ERRORS: dict[str, type[redis.exceptions.RedisError]] = {
    "ASK": redis.exceptions.AskError,
    "CLUSTERDOWN": redis.exceptions.ClusterDownError,
    "CROSSSLOT": redis.exceptions.ClusterCrossSlotError,
    "ERR": redis.exceptions.ResponseError,
    "EXECABORT": redis.exceptions.ExecAbortError,
    "LOADING": redis.exceptions.BusyLoadingError,
    "MASTERDOWN": redis.exceptions.MasterDownError,
    "MOVED": redis.exceptions.MovedError,
    "NOPERM": redis.exceptions.NoPermissionError,
    "NOSCRIPT": redis.exceptions.NoScriptError,
    "OOM": redis.exceptions.OutOfMemoryError,
    "READONLY": redis.exceptions.ReadOnlyError,
    "TRYAGAIN": redis.exceptions.TryAgainError,
}


def error_reply(message: str) -> redis.exceptions.RedisError:
    """The redis-py exception of an error reply (NOSCRIPT, LOADING, MOVED, ...).

    A known code is stripped from the message, as redis-py does; other codes (``BUSY``, a
    script's own errors) stay in it.
    """
    code = message.split(" ", 1)[0]
    cls = _ERRORS.get(code)
    if cls is None:
        return redis.exceptions.ResponseError(message)
    return cls(message[len(code) + 1 :])


def encode_command(args: Sequence[Any]) -> bytes:
    """One command in the Redis protocol (RESP)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if a.__class__ is bytes else _arg_bytes(a)
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


def _arg_bytes(a: Any) -> bytes:
    if isinstance(a, str):
        return a.encode("utf-8")
    if isinstance(a, int):
        return b"%d" % a
    return bytes(a)


def _socket_of(conn: Any) -> socket.socket:
    """The connected socket of a redis-py connection (connecting it first if needed).

    NOTE: the private attribute read (see the module docstring for why).
    """
    sock = getattr(conn, "_sock", None)
    if sock is None:
        conn.connect()
        sock = conn._sock
    return sock  # type: ignore[no-any-return]


class Wire:
    """Commands straight over one redis-py connection: one send per round trip.

    A connection that fails mid-call is dropped (it may hold half a reply); redis-py
    reconnects it on next use. Replies are always read whole, so a connection is ready for
    the next call after every successful one.
    """

    __slots__ = ("_buf", "_conn", "_pos", "_sock")

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._sock = _socket_of(conn)
        self._buf = b""
        self._pos = 0

    def send(self, payload: bytes) -> None:
        try:
            self._sock.sendall(payload)
        except BaseException as exc:
            self._fail(exc)

    def replies(self, n: int) -> list[Any]:
        """`n` replies; error replies come back as exception objects."""
        try:
            return [self._reply() for _ in range(n)]
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> NoReturn:
        self._conn.disconnect()
        if isinstance(exc, socket.timeout):
            raise redis.exceptions.TimeoutError(f"Timeout reading from Redis: {exc}") from exc
        if isinstance(exc, OSError):
            raise redis.exceptions.ConnectionError(f"Error talking to Redis: {exc}") from exc
        raise exc

    def _more(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0

    def _line(self) -> bytes:
        while True:
            i = self._buf.find(b"\r\n", self._pos)
            if i >= 0:
                line = self._buf[self._pos : i]
                self._pos = i + 2
                return line
            self._more()

    def _take(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n + 2:
            self._more()
        data = self._buf[self._pos : self._pos + n]
        self._pos += n + 2
        return data

    def _reply(self) -> Any:
        # One branch per RESP2/RESP3 reply type: a flat dispatch is the fastest in CPython.
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._take(n)
        if kind == b":":
            return int(rest)
        if kind == b"*" or kind == b"~" or kind == b">":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        if kind == b"_":
            return None
        if kind == b"+":
            return rest
        if kind == b"-":
            return error_reply(rest.decode("utf-8", "replace"))
        if kind == b"!":
            return error_reply(self._take(int(rest)).decode("utf-8", "replace"))
        if kind == b"#":
            return rest == b"t"
        if kind == b",":
            return float(rest)
        if kind == b"(":
            return int(rest)
        if kind == b"=":
            return self._take(int(rest))[4:]
        if kind == b"%":
            out = {}
            for _ in range(int(rest)):
                key = self._reply()
                out[key] = self._reply()
            return out
        raise redis.exceptions.InvalidResponse(f"unexpected Redis reply {line[:40]!r}")
