"""The scraper's HTTP/1.1 GET, against real sockets on 127.0.0.1: framings, keep-alive, bounds,
and servers that misbehave."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from kvaware_scorer.scheduler.pagefetch import MAX_HEAD, PageConnection, fetch_pages


class Scripted:
    """A TCP server answering each request it reads with the next scripted reply; a reply
    ending in `CLOSE` is sent and then the connection is closed. Counts accepted connections."""

    def __init__(self, replies: list[bytes]) -> None:
        self.replies = list(replies)
        self.accepted = 0
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self.replies:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                buf = b""
                while self.replies:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(4096)
                        if not data:
                            break
                        buf += data
                    if b"\r\n\r\n" not in buf:
                        break
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    self.requests.append(head)
                    reply = self.replies.pop(0)
                    conn.sendall(reply.removesuffix(CLOSE))
                    if reply.endswith(CLOSE):
                        break

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[list[Scripted]]:
    made: list[Scripted] = []
    yield made
    for s in made:
        s.close()


CLOSE = b"<close>"


def start(made: list[Scripted], *replies: bytes) -> Scripted:
    s = Scripted(list(replies))
    made.append(s)
    return s


PAGE = b"vllm:num_requests_waiting 1\n"


def test_content_length_pages_share_one_connection(server: list[Scripted]) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(PAGE), PAGE)
    s = start(server, ok, ok)
    conn = PageConnection("127.0.0.1", s.port, timeout=2.0)
    assert conn.get("/metrics") == (200, PAGE)
    assert conn.get("/metrics") == (200, PAGE)
    assert s.accepted == 1
    assert s.requests[0].startswith(b"GET /metrics HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:%d" % s.port in s.requests[0]
    conn.close()


def test_chunked_page_with_extensions_and_trailers(server: list[Scripted]) -> None:
    body = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nvllm:\r\n17\r\nnum_requests_waiting 1\n\r\n0\r\nX-Trailer: y\r\n\r\n"
    )
    s = start(server, body, body)
    conn = PageConnection("127.0.0.1", s.port, timeout=2.0)
    assert conn.get("/metrics") == (200, PAGE)
    assert conn.get("/metrics") == (200, PAGE)  # the trailer was consumed: same connection
    assert s.accepted == 1
    conn.close()


def test_http10_page_read_to_close_then_reconnect(server: list[Scripted]) -> None:
    s = start(server, b"HTTP/1.0 200 OK\r\n\r\n" + PAGE + CLOSE, b"HTTP/1.0 404 NF\r\n\r\n" + CLOSE)
    conn = PageConnection("127.0.0.1", s.port, timeout=2.0)
    assert conn.get("/metrics") == (200, PAGE)
    assert conn.get("/metrics") == (404, b"")
    assert s.accepted == 2


def test_connection_close_reply_then_a_new_connection(server: list[Scripted]) -> None:
    first = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (
        len(PAGE),
        PAGE,
    )
    s = start(server, first + CLOSE, first + CLOSE)
    conn = PageConnection("127.0.0.1", s.port, timeout=2.0)
    assert conn.get("/metrics") == (200, PAGE)
    assert conn.get("/metrics") == (200, PAGE)
    assert s.accepted == 2


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n", "over the 1024-byte limit"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + b"a" * 1024 + b"\r\n"
            b"400\r\n" + b"a" * 1024 + b"\r\n0\r\n\r\n",
            "over the 1024-byte limit",
        ),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEAD + 10), "head over"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
    ],
)
def test_hostile_answers_are_errors_and_drop_the_connection(
    server: list[Scripted], reply: bytes, error: str
) -> None:
    s = start(server, reply)
    conn = PageConnection("127.0.0.1", s.port, timeout=2.0, max_bytes=1024)
    with pytest.raises(OSError, match=error):
        conn.get("/metrics")
    assert conn._sock is None


def test_a_silent_server_times_out(server: list[Scripted]) -> None:
    quiet = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) and never answers
    try:
        conn = PageConnection("127.0.0.1", quiet.getsockname()[1], timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(OSError):
            conn.get("/metrics")
        assert time.monotonic() - t0 < 3.0
    finally:
        quiet.close()


def test_a_closed_port_is_an_error() -> None:
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(OSError):
        PageConnection("127.0.0.1", port, timeout=1.0).get("/metrics")


def test_a_kept_alive_connection_the_pod_dropped_is_retried_once(server: list[Scripted]) -> None:
    # The pod closes the connection after its answer without saying so (its keep-alive timeout
    # ran out between two scrapes): the next request finds the socket closed and goes out again
    # on a fresh connection, instead of failing one scrape in two.
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(PAGE), PAGE)
    s = start(server, ok + CLOSE, ok + CLOSE, ok)
    conn = PageConnection("127.0.0.1", s.port, timeout=2.0)
    assert conn.get("/metrics") == (200, PAGE)
    time.sleep(0.05)  # the close reaches this side
    assert conn.get("/metrics") == (200, PAGE)
    assert conn.get("/metrics") == (200, PAGE)
    assert s.accepted == 3
    conn.close()


def test_a_kept_alive_connection_the_pod_reset_is_retried_once() -> None:
    # The pod resets the idle connection (RST, not FIN): the request, sent at once on the kept
    # connection, fails in the send itself or in the read after it; either way it goes out
    # again on a fresh connection.
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(PAGE), PAGE)
    srv = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def serve() -> None:
        for n in range(2):
            conn, _ = srv.accept()
            accepted.append(n)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(4096)
            conn.sendall(ok)
            if n == 0:
                time.sleep(0.05)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    conn = PageConnection("127.0.0.1", srv.getsockname()[1], timeout=2.0)
    try:
        assert conn.get("/metrics") == (200, PAGE)
        time.sleep(0.2)  # the reset reaches this side
        assert conn.get("/metrics") == (200, PAGE)
        assert accepted == [0, 1]
    finally:
        conn.close()
        srv.close()
        thread.join(2)


def test_a_fresh_connection_closed_before_answering_is_not_retried(server: list[Scripted]) -> None:
    s = start(server, CLOSE, CLOSE)  # reads the request, closes without a byte
    conn = PageConnection("127.0.0.1", s.port, timeout=2.0)
    with pytest.raises(OSError, match="closed before a response"):
        conn.get("/metrics")
    assert s.accepted == 1


class Slow:
    """Answers each request on its own thread after `delay` seconds (0 = never answers)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            conn.recv(4096)
            if not self.delay:
                return
            time.sleep(self.delay)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(PAGE), PAGE))
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_one_round_waits_for_all_pods_at_once_and_a_silent_one_stalls_nobody() -> None:
    slow = [Slow(0.4) for _ in range(4)]
    silent = Slow(0)
    try:
        conns = [PageConnection("127.0.0.1", s.port, timeout=5.0) for s in [*slow, silent]]
        t0 = time.monotonic()
        results = fetch_pages([(c, "/metrics") for c in conns], timeout=1.0)
        took = time.monotonic() - t0
        assert results[:4] == [(200, PAGE)] * 4
        assert isinstance(results[4], TimeoutError)
        assert conns[4]._sock is None  # the silent pod's connection is dropped
        # One after the other, the four answers alone would take 1.6 s; the round ends at its
        # timeout, however long the silent pod stays silent.
        assert 0.9 <= took < 1.5
    finally:
        for s in [*slow, silent]:
            s.close()


def test_each_connection_gets_its_own_answer_or_its_own_error(server: list[Scripted]) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(PAGE), PAGE)
    good = start(server, ok, ok)
    bad = start(server, b"SSH-2.0-OpenSSH\r\n\r\n")
    free = socket.create_server(("127.0.0.1", 0))
    closed_port = free.getsockname()[1]
    free.close()
    conns = [
        PageConnection("127.0.0.1", good.port, timeout=2.0),
        PageConnection("127.0.0.1", bad.port, timeout=2.0),
        PageConnection("127.0.0.1", closed_port, timeout=2.0),
    ]
    results = fetch_pages([(c, "/metrics") for c in conns], timeout=2.0)
    assert results[0] == (200, PAGE)
    assert isinstance(results[1], OSError) and "not an HTTP/1.x response" in str(results[1])
    assert isinstance(results[2], OSError)
    assert conns[0]._sock is not None and conns[1]._sock is None and conns[2]._sock is None
    assert conns[0].get("/metrics") == (200, PAGE)  # kept alive
    assert good.accepted == 1


def test_host_names_resolve_and_a_hung_resolver_stalls_no_other_pod(
    server: list[Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(PAGE), PAGE)
    by_name = start(server, ok)
    by_ip = start(server, ok)
    real = socket.getaddrinfo

    def resolver(host: str, *args: object, **kw: object) -> object:
        if host == "hangs.example":
            time.sleep(3.0)
        if host == "missing.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    conns = [
        PageConnection("localhost", by_name.port, timeout=5.0),
        PageConnection("127.0.0.1", by_ip.port, timeout=5.0),
        PageConnection("hangs.example", 80, timeout=5.0),
        PageConnection("missing.example", 80, timeout=5.0),
    ]
    t0 = time.monotonic()
    results = fetch_pages([(c, "/metrics") for c in conns], timeout=0.5)
    took = time.monotonic() - t0
    assert results[0] == (200, PAGE) and results[1] == (200, PAGE)
    assert isinstance(results[2], TimeoutError) and "resolving hangs.example" in str(results[2])
    assert isinstance(results[3], OSError) and "cannot resolve missing.example" in str(results[3])
    assert took < 2.0  # the round's timeout, not the hung resolver's 3 s
