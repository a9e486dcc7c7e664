"""The scraper's HTTP/1.1 GET, against real sockets on 127.0.0.1: framings, keep-alive, bounds,
and servers that misbehave."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from kvaware_scorer.scheduler.pagefetch import MAX_HEAD, PageConnection


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
