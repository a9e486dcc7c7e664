"""A small HTTP/1.1 ``GET`` over kept-alive sockets, for the pods' metrics pages: one page, or
one page from each of many pods at once from a single thread.

A scrape needs the status, the body's framing (``Content-Length``, ``chunked`` or read to close)
and whether the pod closes the connection, nothing else. ``http.client`` parsed every response
head with the ``email`` package, which was most of a scrape's CPU (each pod is scraped up to ten
times a second); this reads the head with a few byte operations.

`fetch_pages` sends every pod its request, then waits on all the sockets at once (``selectors``)
and parses each answer as its bytes arrive. One thread scrapes the whole pool this way: a thread
per pod cost a wake-up, a hand-off and a lock per pod per round, which was most of an idle
gateway's CPU. A slow or silent pod costs the others nothing: every answer that completes is
used, and the round ends at its timeout whatever the slow one does. Host names (IP addresses
need none) are resolved once per connection, all at once, by `RESOLVER_THREADS` threads and
within the round's timeout, so a resolver that hangs on one name stalls no other pod either.

Bounded: the head at `MAX_HEAD` bytes, the body at the connection's ``max_bytes`` (a page over
it is an error, and the connection is dropped), each request (connect, send, answer) at
``timeout`` seconds. Any error closes the connection; the next request opens a new one. A
kept-alive connection the pod closed while it was idle (its keep-alive timeout) is retried
once on a fresh connection.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import selectors
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["MAX_HEAD", "MAX_PAGE", "RESOLVER_THREADS", "PageConnection", "PagePool", "fetch_pages"]

#: Largest response head (status line and headers) read, in bytes.
MAX_HEAD = 64 * 1024
#: Largest page read by default, in bytes (a vLLM page is a few hundred KiB at most).
MAX_PAGE = 16 * 1024 * 1024

_RECV = 65536
#: poll(2) where there is one: a round's few sockets are registered in user space (epoll costs
#: a system call to create, one per socket to register and one to remove, every round).
_Selector: type[selectors.BaseSelector] = getattr(
    selectors, "PollSelector", selectors.DefaultSelector
)


class PageConnection:
    """One keep-alive connection to ``host:port`` serving ``GET`` requests one at a time.

    Args:
        host: Address to connect to.
        port: TCP port.
        timeout: Seconds for one request (connect, send and the whole answer).
        max_bytes: Largest body accepted.
    """

    def __init__(self, host: str, port: int, timeout: float, max_bytes: int = MAX_PAGE) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._out = b""  # the request's bytes not sent yet
        self._connecting = False
        self._reused = False  # the request went out on a connection an earlier one used
        self._addr: tuple[socket.AddressFamily, tuple[Any, ...]] | None = None  # resolved
        #: Seconds the last answer took to arrive (from the start of its `fetch_pages` round).
        self.elapsed = 0.0

    def close(self) -> None:
        """Drop the connection (the next `get` opens a new one)."""
        sock, self._sock = self._sock, None
        self._buf.clear()
        self._out = b""
        self._connecting = False
        if sock is not None:
            sock.close()

    def get(self, path: str, accept: str = "text/plain") -> tuple[int, bytes]:
        """``GET path``: returns (status, body).

        Raises:
            OSError: Connection failure, timeout, a malformed or oversized response.
        """
        (result,) = fetch_pages([(self, path)], self.timeout, accept)
        if isinstance(result, OSError):
            raise result
        return result

    # -- one request, driven by `fetch_pages` ------------------------------------------------------

    def _begin(self, path: str, accept: str) -> None:
        """Queue the request; opens a non-blocking connection when there is none (the address
        resolved already: `fetch_pages` resolves names first)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._out = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{self.port}\r\nAccept: {accept}\r\n"
            "User-Agent: kvaware-scraper\r\n\r\n"
        ).encode("latin-1")
        self._buf.clear()
        self._reused = self._sock is not None
        if self._sock is None:
            self._connect()

    def _connect(self) -> None:
        assert self._addr is not None
        family, addr = self._addr
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                raise OSError(err, f"connect to {self.host}:{self.port}: {os.strerror(err)}")
        except BaseException:
            sock.close()
            self._addr = None  # resolve the name again next time
            raise
        self._sock = sock
        self._connecting = err != 0

    def _literal(self) -> bool:
        """Whether the host is an IP address (no name to resolve); sets the address."""
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return False
        if ip.version == 4:
            self._addr = (socket.AF_INET, (self.host, self.port))
        else:
            self._addr = (socket.AF_INET6, (self.host, self.port, 0, 0))
        return True

    def _writable(self) -> bool:
        """Send what is left of the request; True once all of it is out."""
        assert self._sock is not None
        if self._connecting:
            err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._addr = None
                raise OSError(err, f"connect to {self.host}:{self.port}: {os.strerror(err)}")
            self._connecting = False
        sent = self._sock.send(self._out)
        self._out = self._out[sent:]
        return not self._out

    def _readable(self) -> tuple[int, bytes, bool] | None:
        """Receive and parse; (status, body, the connection closes after) once the answer is
        complete, else None."""
        assert self._sock is not None
        try:
            data = self._sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return None
        if data:
            self._buf += data
        return self._parse(eof=not data)

    def _stale(self) -> bool:
        """Whether the pod closed a reused connection before answering (keep-alive timeout):
        worth one retry on a fresh connection."""
        return self._reused and not self._buf

    # -- parsing ----------------------------------------------------------------------------------

    def _parse(self, eof: bool) -> tuple[int, bytes, bool] | None:
        """(status, body, the connection closes after) of the complete answer at the start of
        the buffer, consumed; None while it is incomplete.

        Raises:
            OSError: A malformed or oversized answer, or the stream ended inside it.
        """
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise OSError(f"response head over {MAX_HEAD} bytes")
            _ended(eof, "connection closed before a response")
            return None
        status, length, chunked, close = _head(bytes(buf[:end]))
        pos = end + 4
        if chunked:
            parsed = self._chunked(pos, eof)
            if parsed is None:
                return None
            body, pos = parsed
        elif length is not None:
            if length > self.max_bytes:
                raise OSError(f"page of {length} bytes is over the {self.max_bytes}-byte limit")
            if len(buf) - pos < length:
                _ended(eof, "connection closed inside the body")
                return None
            body = bytes(buf[pos : pos + length])
            pos += length
        else:
            if len(buf) - pos > self.max_bytes:
                raise OSError(f"page over the {self.max_bytes}-byte limit")
            if not eof:
                return None
            body = bytes(buf[pos:])
            pos, close = len(buf), True
        del buf[:pos]
        return status, body, close

    def _line_end(self, pos: int, eof: bool, what: str) -> int | None:
        """Where the line starting at `pos` ends (its CRLF); None while it is incomplete."""
        line_end = self._buf.find(b"\r\n", pos)
        if line_end >= 0:
            return line_end
        if len(self._buf) - pos > MAX_HEAD:
            raise OSError(f"{what} too long")
        _ended(eof, "connection closed inside the body")
        return None

    def _chunked(self, pos: int, eof: bool) -> tuple[bytes, int] | None:
        buf = self._buf
        parts: list[bytes] = []
        total = 0
        while True:
            line_end = self._line_end(pos, eof, "chunk header line")
            if line_end is None:
                return None
            size_text = bytes(buf[pos:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise OSError(f"bad chunk size {size_text[:40]!r}") from None
            pos = line_end + 2
            if size == 0:
                while True:  # trailers, up to the blank line
                    line_end = self._line_end(pos, eof, "chunk trailer")
                    if line_end is None:
                        return None
                    blank = line_end == pos
                    pos = line_end + 2
                    if blank:
                        return b"".join(parts), pos
            if size < 0:
                raise OSError(f"bad chunk size {size_text[:40]!r}")
            total += size
            if total > self.max_bytes:
                raise OSError(f"page over the {self.max_bytes}-byte limit")
            if len(buf) - pos < size + 2:
                _ended(eof, "connection closed inside the body")
                return None
            parts.append(bytes(buf[pos : pos + size]))
            if buf[pos + size : pos + size + 2] != b"\r\n":
                raise OSError("chunk not followed by CRLF")
            pos += size + 2


def _ended(eof: bool, why: str) -> None:
    """Raise `why` when the stream ended inside an answer (else wait for more bytes)."""
    if eof:
        raise OSError(why)


def _head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """(status, Content-Length or None, chunked, the connection closes after)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise OSError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    status = int(parts[1])
    close = parts[0] == b"HTTP/1.0"
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise OSError(f"malformed header line {line[:80]!r}")
        key = name.strip().lower()
        value = value.strip().lower()
        if key == b"content-length":
            if not value.isdigit():
                raise OSError(f"bad Content-Length {value[:40]!r}")
            length = int(value)
        elif key == b"transfer-encoding":
            chunked = value.endswith(b"chunked")
        elif key == b"connection":
            close = b"close" in value or (close and b"keep-alive" not in value)
    return status, length, chunked, close


#: Threads resolving pod host names (IP addresses need none): a resolver that hangs on one name
#: holds one of them, and a round waits for names at most its own timeout.
RESOLVER_THREADS = 4
#: Seconds between two looks at the names being resolved during a round.
RESOLVE_POLL = 0.005
_resolver: ThreadPoolExecutor | None = None
_resolver_lock = threading.Lock()


def _start_resolving(conns: Sequence[PageConnection]) -> dict[int, Future[Any]]:
    """Start resolving the host names of the connections that need a new socket and have no
    address; per position, the resolution under way."""
    global _resolver
    names = [
        i for i, c in enumerate(conns) if c._sock is None and c._addr is None and not c._literal()
    ]
    if not names:
        return {}
    with _resolver_lock:
        if _resolver is None:
            _resolver = ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="kvaware-resolve")
        pool = _resolver
    return {
        i: pool.submit(socket.getaddrinfo, conns[i].host, conns[i].port, 0, socket.SOCK_STREAM)
        for i in names
    }


def _resolved(conn: PageConnection, fut: Future[Any]) -> OSError | None:
    """Set the connection's address from a finished resolution; the error when it failed."""
    exc = fut.exception()
    if exc is not None:
        return OSError(f"cannot resolve {conn.host}: {exc}")
    infos = fut.result()
    if not infos:
        return OSError(f"cannot resolve {conn.host}: no address")
    # NOTE: IPv4 first when a name has both (vLLM and SGLang listen on 0.0.0.0 by default,
    # and "localhost" often resolves to ::1 first).
    family, _, _, _, addr = min(infos, key=lambda info: info[0] != socket.AF_INET)
    conn._addr = (family, addr)
    return None


def fetch_pages(
    requests: Sequence[tuple[PageConnection, str]], timeout: float, accept: str = "text/plain"
) -> list[tuple[int, bytes] | OSError]:
    """``GET`` one path on each connection, all at once from this thread.

    Args:
        requests: (connection, path) pairs; each connection at most once.
        timeout: Seconds for the whole round; an answer not complete by then is a
            `TimeoutError` (and its connection is dropped).
        accept: The ``Accept`` header sent.

    Returns:
        Per request, in order: (status, body), or the `OSError` that ended it.
    """
    results: list[tuple[int, bytes] | OSError | None] = [None] * len(requests)
    retried: set[int] = set()
    with _Selector() as sel:

        def fail(i: int, conn: PageConnection, exc: OSError) -> None:
            if conn._sock is not None:
                sel.unregister(conn._sock)
            conn.close()
            results[i] = exc

        def begin(i: int, conn: PageConnection, path: str) -> None:
            try:
                conn._begin(path, accept)
                assert conn._sock is not None
                # NOTE: a kept-alive connection takes the request at once (a few hundred bytes
                # into an idle socket's buffer): no wait for it to be writable first.
                sent = not conn._connecting and conn._writable()
            except OSError as exc:
                stale = conn._stale() and i not in retried
                conn.close()
                results[i] = exc
                if stale and conn._addr is not None:
                    retried.add(i)
                    results[i] = None
                    begin(i, conn, path)
                return
            sel.register(conn._sock, selectors.EVENT_READ if sent else selectors.EVENT_WRITE, i)

        start = time.monotonic()
        deadline = start + timeout
        resolving = _start_resolving([c for c, _ in requests])
        for i, (conn, path) in enumerate(requests):
            if i not in resolving:
                begin(i, conn, path)
        pending = sum(r is None for r in results)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if resolving:
                # NOTE: names being resolved (a new connection's first round): look at them
                # every few ms while the sockets of the others are served.
                for i in [i for i, f in resolving.items() if f.done()]:
                    conn, path = requests[i]
                    error = _resolved(conn, resolving.pop(i))
                    if error is None:
                        begin(i, conn, path)
                    else:
                        results[i] = error
                    if results[i] is not None:
                        pending -= 1
                if not pending:
                    break
                remaining = min(remaining, RESOLVE_POLL)
            for key, events in sel.select(remaining):
                i = key.data
                conn, path = requests[i]
                try:
                    if events & selectors.EVENT_WRITE:
                        if conn._writable():
                            sel.modify(key.fileobj, selectors.EVENT_READ, i)
                        continue
                    answer = conn._readable()
                except OSError as exc:
                    stale = conn._stale() and i not in retried
                    fail(i, conn, exc)
                    if stale and conn._addr is not None:
                        retried.add(i)
                        results[i] = None
                        begin(i, conn, path)
                        if results[i] is None:
                            continue
                    pending -= 1
                    continue
                if answer is not None:
                    status, body, close = answer
                    sel.unregister(key.fileobj)
                    if close or conn._buf:
                        conn.close()  # a pod that closes, or bytes beyond the answer: afresh
                    results[i] = (status, body)
                    conn.elapsed = time.monotonic() - start
                    pending -= 1
        for i, fut in resolving.items():
            fut.cancel()
            results[i] = TimeoutError(f"resolving {requests[i][0].host} took over {timeout:g} s")
        for i, (conn, _) in enumerate(requests):
            if results[i] is None:
                fail(i, conn, TimeoutError(f"no complete answer within {timeout:g} s"))
    return [r if r is not None else TimeoutError() for r in results]


class PagePool:
    """Kept-alive connections by key (an endpoint id), for rounds of `fetch_pages`.

    A connection serves one request at a time: it is taken out of the pool for a round and put
    back after (two rounds over one key at once open a second connection, and the one given
    back last is kept). A key whose address changed gets a new connection. Bounded by the keys
    the caller keeps (`keep_only`).
    """

    def __init__(self) -> None:
        self._conns: dict[str, PageConnection] = {}
        self._lock = threading.Lock()

    def _take(self, key: str, host: str, port: int, timeout: float) -> PageConnection:
        with self._lock:
            conn = self._conns.pop(key, None)
        if conn is not None and (conn.host, conn.port) != (host, port):
            conn.close()
            conn = None
        return conn if conn is not None else PageConnection(host, port, timeout=timeout)

    def _give_back(self, key: str, conn: PageConnection) -> None:
        with self._lock:
            old = self._conns.pop(key, None)
            self._conns[key] = conn
        if old is not None and old is not conn:
            old.close()

    def get(
        self, targets: Sequence[tuple[str, str, int, str]], timeout: float
    ) -> list[tuple[bytes | OSError, float]]:
        """``GET`` each ``(key, host, port, path)`` at once, within `timeout` seconds; per
        target, in order, the body of its 200 answer and the seconds it took, or the `OSError`
        that ended it (an answer of another status is one, and drops the connection)."""
        conns = [self._take(key, host, port, timeout) for key, host, port, _ in targets]
        answers = fetch_pages([(c, t[3]) for c, t in zip(conns, targets, strict=True)], timeout)
        out: list[tuple[bytes | OSError, float]] = []
        for (key, _, _, path), conn, answer in zip(targets, conns, answers, strict=True):
            if isinstance(answer, OSError):
                out.append((answer, 0.0))
            elif answer[0] != 200:
                conn.close()
                out.append((OSError(f"HTTP {answer[0]} from {key}{path}"), 0.0))
            else:
                out.append((answer[1], conn.elapsed))
            self._give_back(key, conn)
        return out

    def keep_only(self, keys: set[str]) -> None:
        """Close the connections of every key not in `keys`."""
        with self._lock:
            gone = [self._conns.pop(k) for k in [k for k in self._conns if k not in keys]]
        for conn in gone:
            conn.close()

    def close(self) -> None:
        """Close every connection."""
        self.keep_only(set())
