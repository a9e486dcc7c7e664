"""Wiring of the precise scorer to the real KV-event subscriber across pool changes.

The subscriber's sockets only dial 127.0.0.1 ports nobody listens on (ZMQ connects lazily), so
these tests check which publishers the scorer asks it to dial, not the events themselves
(those are covered end to end in tests/e2e and tests/events).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvaware_scorer.scheduler import Endpoint, Scheduler, make_plugin_manager
from tests.conftest import free_port

from .conftest import config

LOCAL = "127.0.0.1"


def precise(**events: Any) -> Scheduler:
    params: dict[str, Any] = {"kvEventsConfig": events} if events else {}
    return Scheduler.from_config(
        config([{"type": "precise-prefix-cache-scorer", "parameters": params}]),
        plugin_manager=make_plugin_manager(use_env=False),
    )


def subscriber_of(s: Scheduler) -> Any:
    return s.plugin("precise-prefix-cache-scorer")._subscriber


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def tcp(port: int) -> str:
    return f"tcp://{LOCAL}:{port}"


def test_start_dials_endpoint_publishers_and_follows_the_pool() -> None:
    """start() dials each endpoint's kvEvents; removal stops dialing and purges, additions are dialed."""
    s = precise()
    pa, ra, pc = free_port(), free_port(), free_port()
    a = Endpoint("a", LOCAL, 8001, kv_events=tcp(pa), kv_events_replay=tcp(ra), model="m")
    b = Endpoint("b", LOCAL, 8002)  # no publisher: not dialed
    s.set_endpoints([a, b])
    s.start()
    sub = subscriber_of(s)
    try:
        assert sub.indexer is s.plugin("precise-prefix-cache-scorer").indexer
        assert sub.running
        assert sub.endpoints() == {a.id: tcp(pa)}
        assert sub.replay_endpoint(a.id) == tcp(ra)
        indexer = sub.indexer
        indexer.index.add(a.id, [1, 2], [11, 12])
        c = Endpoint("c", LOCAL, 8003, kv_events=tcp(pc))
        s.set_endpoints([b, c])
        assert sub.endpoints() == {c.id: tcp(pc)}
        assert wait_for(lambda: indexer.index.lookup([1, 2], [a.id]) == {})
    finally:
        s.stop()
    assert not sub.running


class _SourcesHandler(http.server.BaseHTTPRequestHandler):
    answer: dict[str, Any] = {}

    def do_GET(self) -> None:
        if self.path != "/kv_event_sources":
            self.send_error(404)
            return
        body = json.dumps(self.answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return


@pytest.fixture
def sources_server() -> Iterator[tuple[int, type[_SourcesHandler]]]:
    handler = type("Handler", (_SourcesHandler,), {"answer": {}})
    server = http.server.ThreadingHTTPServer((LOCAL, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def test_discover_pods_falls_back_to_the_socket_port() -> None:
    """With discoverPods an endpoint that cannot list its sources is dialed at its address and
    socketPort (replay port too)."""
    pub, rep = free_port(), free_port()
    s = precise(discoverPods=True, socketPort=pub, replaySocketPort=rep)
    e = Endpoint("a", LOCAL, free_port())  # nobody serves /kv_event_sources there
    s.set_endpoints([e])
    s.start()
    try:
        sub = subscriber_of(s)
        assert wait_for(lambda: sub.endpoints() == {e.id: tcp(pub)})
        assert sub.replay_endpoint(e.id) == tcp(rep)
    finally:
        s.stop()


def test_discover_pods_uses_the_pods_kv_event_sources(
    sources_server: tuple[int, type[_SourcesHandler]],
) -> None:
    """With discoverPods the publishers the pod lists at /kv_event_sources (vLLM >= 0.33, e.g.
    after binding tcp://*:0) are dialed, wildcard hosts replaced by the pod's address."""
    port, handler = sources_server
    pub, rep = free_port(), free_port()
    handler.answer = {
        "0": {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{pub}",
            "replay_endpoint": f"tcp://*:{rep}",
            "topic": "",
        }
    }
    s = precise(discoverPods=True, socketPort=free_port())
    e = Endpoint("a", LOCAL, port)
    s.set_endpoints([e])
    s.start()
    try:
        sub = subscriber_of(s)
        assert wait_for(lambda: sub.endpoints() == {e.id: tcp(pub)})
        assert sub.replay_endpoint(e.id) == tcp(rep)
    finally:
        s.stop()


def test_nothing_opened_without_a_source() -> None:
    """start() opens no subscriber when there is nothing to receive; a publisher joining later starts it."""
    s = precise()
    s.set_endpoints([Endpoint("a", LOCAL, 8001)])
    s.start()
    try:
        assert subscriber_of(s) is None
        pub = free_port()
        p = Endpoint("p", LOCAL, 8005, kv_events=tcp(pub))
        s.set_endpoints([Endpoint("a", LOCAL, 8001), p])
        sub = subscriber_of(s)
        assert sub is not None and sub.running
        assert sub.endpoints() == {p.id: tcp(pub)}
    finally:
        s.stop()


def test_bind_mode_starts_on_start() -> None:
    """A bound zmqEndpoint starts the subscriber with the scorer's kvEventsConfig."""
    port = free_port()
    s = precise(zmqEndpoint=tcp(port), topicFilter="kv@")
    s.start()
    sub = subscriber_of(s)
    try:
        assert sub.running
        assert sub.config.topic_filter == "kv@"
        assert sub.bound_endpoint == tcp(port)
    finally:
        s.close()
    assert not sub.running


def test_endpoints_no_event_can_come_from_are_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """start() (and a later join) warns about endpoints without any KV-event source, which would
    otherwise score 0 silently; bind mode and publishers silence it."""
    s = precise()
    a, b = Endpoint("a", LOCAL, 8001), Endpoint("b", LOCAL, 8002)
    s.set_endpoints([a])
    with caplog.at_level("WARNING"):
        s.start()
        s.set_endpoints([a, b, Endpoint("p", LOCAL, 8005, kv_events=tcp(free_port()))])
    warned = [r.getMessage() for r in caplog.records if "no KV-event source" in r.getMessage()]
    assert len(warned) == 2
    assert a.id in warned[0] and "discoverPods" in warned[0]
    assert b.id in warned[1] and "8005" not in warned[1]
    s.stop()
    caplog.clear()
    bound = precise(zmqEndpoint=tcp(free_port()))
    bound.set_endpoints([a])
    with caplog.at_level("WARNING"):
        bound.start()
    assert not [r for r in caplog.records if "no KV-event source" in r.getMessage()]
    bound.stop()
