"""`/kv_event_sources` answers from a hostile pod, over a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvaware_scorer.events.subscriber import fetch_event_sources, parse_event_sources

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


def source(endpoint: str, replay: str | None = None) -> dict[str, Any]:
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint,
            "replay_endpoint": replay}  # fmt: skip


@pytest.fixture
def pod() -> Iterator[tuple[str, dict[str, Handler]]]:
    """An HTTP server on 127.0.0.1 whose routes the test sets (path -> handler)."""
    routes: dict[str, Handler] = {}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            handler = routes.get(self.path)
            if handler is None:
                self.send_error(404)
                return
            handler(self)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()


def json_answer(data: Any) -> Handler:
    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        body = json.dumps(data).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handle


def test_redirects_are_not_followed(pod: tuple[str, dict[str, Handler]]) -> None:
    """A pod answering with a redirect (to an internal URL, say) gets no second request."""
    base, routes = pod
    fetched: list[str] = []

    def redirect(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", base + "/internal")
        h.send_header("Content-Length", "0")
        h.end_headers()

    def internal(h: http.server.BaseHTTPRequestHandler) -> None:
        fetched.append(h.path)
        json_answer({"0": source("tcp://127.0.0.1:5557")})(h)

    routes["/kv_event_sources"] = redirect
    routes["/internal"] = internal
    with pytest.raises(OSError, match="302"):
        fetch_event_sources(base)
    assert fetched == []


def test_only_tcp_on_the_pods_host_unless_allowed(pod: tuple[str, dict[str, Handler]]) -> None:
    """Endpoints on another host or over another transport are refused; an allow-list admits
    other hosts (never another transport)."""
    base, routes = pod
    routes["/kv_event_sources"] = json_answer({"0": source("tcp://10.9.9.9:5557")})
    with pytest.raises(ValueError, match="not on the pod's host"):
        fetch_event_sources(base)
    got = fetch_event_sources(base, allowed_hosts=["10.9.9.9"])
    assert got == {0: ("tcp://10.9.9.9:5557", None)}
    routes["/kv_event_sources"] = json_answer({"0": source("ipc:///tmp/x")})
    with pytest.raises(ValueError, match="not tcp"):
        fetch_event_sources(base, allowed_hosts=["*"])
    routes["/kv_event_sources"] = json_answer({"0": source("tcp://*:5557", "tcp://[::]:5558")})
    assert fetch_event_sources(base) == {0: ("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558")}


def test_ranks_and_answer_bytes_are_bounded(pod: tuple[str, dict[str, Handler]]) -> None:
    """10,000 listed ranks are refused whole, and so is an answer above the byte bound."""
    base, routes = pod
    many = {str(r): source(f"tcp://127.0.0.1:{10000 + r}") for r in range(10_000)}
    routes["/kv_event_sources"] = json_answer(many)
    with pytest.raises((ValueError, OSError)):
        fetch_event_sources(base, max_bytes=10 << 20)
    with pytest.raises(ValueError, match="ranks"):
        parse_event_sources(many, "127.0.0.1")
    with pytest.raises(OSError, match="bytes"):
        fetch_event_sources(base)


def test_a_trickling_answer_meets_the_total_deadline(pod: tuple[str, dict[str, Handler]]) -> None:
    """A pod answering one byte every 50 ms cannot stretch the request past its deadline."""
    base, routes = pod
    body = json.dumps({"0": source("tcp://127.0.0.1:5557")}).encode() * 2

    def trickle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        try:
            for b in body:
                h.wfile.write(bytes([b]))
                h.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    routes["/kv_event_sources"] = trickle
    t0 = time.monotonic()
    with pytest.raises(OSError):
        fetch_event_sources(base, timeout=1.0)
    assert time.monotonic() - t0 < 1.8


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"0": {"endpoint": "\xff\xfe"}}', b"\x00\x01"],
    ids=["nested", "not-utf8", "binary"],
)
def test_undecodable_answers_are_value_errors(
    pod: tuple[str, dict[str, Handler]], body: bytes
) -> None:
    """An answer that is not JSON (too deep, not UTF-8, binary) is a ValueError, which the
    precise scorer turns into its socketPort fallback."""
    base, routes = pod

    def raw(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    routes["/kv_event_sources"] = raw
    with pytest.raises(ValueError):
        fetch_event_sources(base)
