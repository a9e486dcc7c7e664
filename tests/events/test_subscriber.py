"""The ZMQ subscriber over real sockets on 127.0.0.1: both modes, replay, restarts, lifecycle."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from kvaware_scorer import Indexer
from kvaware_scorer.config import KVEventsConfig
from kvaware_scorer.events import KVEventSubscriber, VllmEventPublisher, parse_topic
from kvaware_scorer.events.decode import BlockStored, encode_batch
from kvaware_scorer.events.subscriber import fetch_event_sources, parse_event_sources
from tests.conftest import free_port
from tests.events.conftest import EVENTS_DIR, stream_frames

POD = "10.0.0.1:8000"
MODEL = "m"


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def counter(ix: Indexer, name: str, labels: dict[str, str] | None = None) -> float:
    value = ix.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def two_free_ports() -> int:
    """A port p such that p and p+1 are both free (DP rank offsets)."""
    import socket

    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no consecutive free ports")


def store(hashes: list[int], toks: list[int], parent: int | None = None) -> BlockStored:
    return BlockStored(
        hashes, parent, toks, 16, medium="GPU", extra_keys=[None] * len(hashes), group_idx=0
    )


def make_sub(ix: Indexer, **cfg: Any) -> KVEventSubscriber:
    config = KVEventsConfig(default_model=MODEL, replay_timeout=1.0, stats_interval=0.2, **cfg)
    return KVEventSubscriber(ix, config)


def test_parse_topic() -> None:
    """Topics name the pod (which may contain ':') and optionally the model (which may
    contain '@')."""
    assert parse_topic(b"kv@10.0.0.1:8000@meta-llama/Llama-3.1-8B") == (
        "10.0.0.1:8000",
        "meta-llama/Llama-3.1-8B",
    )
    assert parse_topic(b"kv@[fd00::1]:8000") == ("[fd00::1]:8000", None)
    assert parse_topic(b"kv@pod@model@v2") == ("pod", "model@v2")
    assert parse_topic(b"") == (None, None)
    assert parse_topic(b"kv-events") == (None, None)
    assert parse_topic(b"kv@@m") == (None, "m")
    assert parse_topic(b"\xff\xfe") == (None, None)


def test_connect_mode_applies_vllm_frames_byte_for_byte(
    indexer: Indexer, manifest: dict[str, Any]
) -> None:
    """Fixture frames sent as vLLM sends them ([b"", seq8, payload]) reach the index in order
    and leave vLLM's pool state."""
    port = free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)  # the wire is PUB's; XPUB only tells us when the SUB joined
    pub.bind(tcp(port))
    names = stream_frames(manifest)["inproc://kv-events"]
    try:
        with make_sub(indexer) as sub:
            sub.add_endpoint(POD, tcp(port))
            assert pub.poll(10_000)
            pub.recv()
            for seq, name in names:
                payload = (EVENTS_DIR / name).read_bytes()
                pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
            wait_until(
                lambda: counter(indexer, "kvaware_event_batches_total", {"source": "live"}) == 9
            )
            assert sub.frames_received == 9
            pool = manifest["files"][names[-1][1]]["pool_state_after"]
            want = {int(e["u64_hex"], 16): e["physical_blocks"] for e in pool["GPU"]}
            assert indexer.ingestor.held(POD, "gpu") == want
            r9 = manifest["request_inputs"]["r9"]
            assert indexer.score(
                MODEL, r9["tokens"], [POD], lora_name="sql-lora", cache_salt="tenant-a"
            ) == {POD: 1.0}
            assert counter(indexer, "kvaware_seq_gaps_total") == 0
        assert not sub.running
    finally:
        pub.close(0)
        ctx.term()


def test_bind_mode_takes_pod_and_model_from_the_topic(indexer: Indexer) -> None:
    """Pods connecting to the bound socket are told apart by topic; a topic without a model
    uses the default model, and one without a pod is dropped and counted."""
    toks = list(range(32))
    port = free_port()
    with make_sub(
        indexer, accept_unknown_pods=True, zmq_endpoint=tcp(port), topic_filter=""
    ) as sub:
        assert sub.bound_endpoint == tcp(port)
        pubs = [
            VllmEventPublisher(tcp(port), topic="kv@10.0.0.1:8000@model-a", bind=False),
            VllmEventPublisher(tcp(port), topic="kv@10.0.0.2:8000", bind=False),
            VllmEventPublisher(tcp(port), topic="", bind=False),
        ]
        try:
            for i, p in enumerate(pubs):
                assert p.wait_for_subscriber(10)
                p.publish([store([i + 1, i + 10], toks)])
            wait_until(lambda: sub.frames_received == 3)
            wait_until(lambda: len(indexer.index.pods()) == 2)
        finally:
            for p in pubs:
                p.close()
    pods = ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert indexer.score("model-a", toks, pods) == {pods[0]: 1.0, pods[1]: 0.0}
    assert indexer.score(MODEL, toks, pods) == {pods[0]: 0.0, pods[1]: 1.0}
    assert counter(indexer, "kvaware_dropped_messages_total", {"reason": "topic_without_pod"}) == 1


def test_topic_filter_selects_frames(indexer: Indexer) -> None:
    """With topic filter "kv@", frames under other topics are not received."""
    port = free_port()
    with make_sub(
        indexer, accept_unknown_pods=True, zmq_endpoint=tcp(port), topic_filter="kv@"
    ) as sub:
        good = VllmEventPublisher(tcp(port), topic="kv@p:1@m", bind=False)
        other = VllmEventPublisher(tcp(port), topic="other@p:2@m", bind=False)
        try:
            assert good.wait_for_subscriber(10) and other.wait_for_subscriber(10)
            other.publish([store([1], list(range(16)))])
            good.publish([store([2], list(range(16)))])
            wait_until(lambda: sub.frames_received >= 1)
            time.sleep(0.2)
        finally:
            good.close()
            other.close()
    assert sub.frames_received == 1 and indexer.index.pods() == ["p:1"]


@pytest.mark.parametrize("legacy_replay", [False, True], ids=["0.26+", "pre-0.26"])
def test_gap_is_replayed_over_dealer_router(indexer: Indexer, legacy_replay: bool) -> None:
    """A frame lost on the wire is fetched from the pod's replay ROUTER (both reply forms)
    and applied before the frame after it."""
    toks = list(range(48))
    port, rport = free_port(), free_port()
    pub = VllmEventPublisher(tcp(port), tcp(rport), bind=True, legacy_replay=legacy_replay)
    try:
        with make_sub(indexer) as sub:
            sub.add_endpoint(POD, tcp(port), tcp(rport))
            assert pub.wait_for_subscriber(10)
            pub.publish([store([1], toks[:16])])
            pub.publish([store([2], toks[16:32], parent=1)], send=False)
            pub.publish([store([3], toks[32:48], parent=2)])
            wait_until(lambda: indexer.ingestor.streams(POD).get(0) is not None
                       and indexer.ingestor.streams(POD)[0].last_seq == 2)  # fmt: skip
        assert pub.replays_served == 1
    finally:
        pub.close()
    assert indexer.score(MODEL, toks, [POD]) == {POD: 1.0}
    assert counter(indexer, "kvaware_seq_gaps_total") == 1
    assert counter(indexer, "kvaware_replays_total", {"result": "ok"}) == 1
    assert counter(indexer, "kvaware_lost_batches_total") == 0
    assert counter(indexer, "kvaware_orphaned_blocks_total") == 0


def test_gap_without_replay_endpoint_is_counted_as_loss(indexer: Indexer) -> None:
    """Without a replay endpoint a lost frame is counted (gap and lost batch) and its
    continuation is orphaned, never keyed as a prompt start."""
    toks = list(range(48))
    port = free_port()
    with VllmEventPublisher(tcp(port), bind=True) as pub, make_sub(indexer) as sub:
        sub.add_endpoint(POD, tcp(port))
        assert pub.wait_for_subscriber(10)
        pub.publish([store([1], toks[:16])])
        pub.publish([store([2], toks[16:32], parent=1)], send=False)
        pub.publish([store([3], toks[32:48], parent=2)])
        wait_until(lambda: sub.frames_received == 2)
        wait_until(lambda: counter(indexer, "kvaware_orphaned_blocks_total") == 1)
    assert counter(indexer, "kvaware_seq_gaps_total") == 1
    assert counter(indexer, "kvaware_lost_batches_total") == 1
    assert indexer.score(MODEL, toks, [POD]) == {POD: 1 / 3}


def test_publisher_restart_purges_stale_blocks(indexer: Indexer) -> None:
    """A pod whose publisher restarts (seq back to 0) loses its old blocks, keeps new ones."""
    old, new = list(range(32)), list(range(100, 132))
    port = free_port()
    with make_sub(indexer) as sub:
        sub.add_endpoint(POD, tcp(port))
        with VllmEventPublisher(tcp(port), bind=True) as first:
            assert first.wait_for_subscriber(10)
            first.publish([store([1, 2], old)])
            first.publish([])
            wait_until(lambda: sub.frames_received == 2)
        with VllmEventPublisher(tcp(port), bind=True) as second:
            assert second.wait_for_subscriber(10)
            second.publish([store([5, 6], new)])
            wait_until(lambda: sub.frames_received == 3)
            wait_until(lambda: indexer.score(MODEL, new, [POD]) == {POD: 1.0})
    assert indexer.score(MODEL, old, [POD]) == {POD: 0.0}
    assert counter(indexer, "kvaware_purges_total", {"reason": "publisher_restart"}) == 1


def test_join_replays_history_published_before_subscribing(indexer: Indexer) -> None:
    """Batches published before the subscriber connected are replayed before the first live
    one, so a live continuation finds its parent."""
    toks = list(range(48))
    port, rport = free_port(), free_port()
    with VllmEventPublisher(tcp(port), tcp(rport), bind=True) as pub:
        pub.publish([store([1, 2], toks[:32])])
        pub.publish([])
        with make_sub(indexer) as sub:
            sub.add_endpoint(POD, tcp(port), tcp(rport))
            assert pub.wait_for_subscriber(10)
            pub.publish([store([3], toks[32:], parent=2)])
            wait_until(lambda: indexer.score(MODEL, toks, [POD]) == {POD: 1.0})
    assert counter(indexer, "kvaware_replayed_batches_total", {"reason": "join"}) == 2
    assert counter(indexer, "kvaware_seq_gaps_total") == 0


def test_replay_answer_matches_vllm_exchange(indexer: Indexer, manifest: dict[str, Any]) -> None:
    """A replay from seq 4 of the main fixture stream returns seq 4..8 with the payloads vLLM
    sent, then the end marker (manifest's recorded exchange)."""
    example = manifest["frame_layout"]["replay"]["example"]
    port, rport = free_port(), free_port()
    with VllmEventPublisher(tcp(port), tcp(rport), bind=True) as pub:
        for _, name in stream_frames(manifest)["inproc://kv-events"]:
            pub.publish((EVENTS_DIR / name).read_bytes(), send=False)
        sub = make_sub(indexer)
        sub.add_endpoint(POD, tcp(port), tcp(rport))
        with sub:
            result = sub.replay(POD, 0, example["start_seq"], "gap")
    assert result is not None and result.status == "ok"
    want = [r for r in example["responses_as_received_by_DEALER"] if r["payload_sha256"]]
    assert [s for s, _ in result.frames] == [r["seq_signed"] for r in want]
    assert [hashlib.sha256(p).hexdigest() for _, p in result.frames] == [
        r["payload_sha256"] for r in want
    ]


def test_replay_request_to_a_silent_router_times_out(indexer: Indexer) -> None:
    """A replay endpoint that never answers yields a timeout result within the configured
    time; the gap is then counted as lost."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    rport = free_port()
    router.bind(tcp(rport))
    try:
        sub = make_sub(indexer)
        sub.add_endpoint(POD, tcp(free_port()), tcp(rport))
        with sub:
            t0 = time.monotonic()
            result = sub.replay(POD, 0, 3, "gap")
            elapsed = time.monotonic() - t0
        assert result is not None and result.status == "timeout" and result.frames == []
        assert 0.9 <= elapsed < 3.0
        assert router.poll(1000)
        _ident, empty, seq8 = router.recv_multipart()
        assert empty == b"" and int.from_bytes(seq8, "big") == 3
    finally:
        router.close(0)
        ctx.term()


def test_replay_connection_is_closed_once_answered(indexer: Indexer) -> None:
    """Each replay's DEALER connection is closed once the end marker is read, so no replay
    socket outlives its pod (and keeps dialing it)."""
    from zmq.utils.monitor import recv_monitor_message

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    rport = free_port()
    router.bind(tcp(rport))
    mon = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)

    def events(n: int) -> list[int]:
        got = []
        while len(got) < n and mon.poll(5000):
            got.append(recv_monitor_message(mon)["event"])
        return got

    def serve_once() -> None:
        assert router.poll(5000)
        ident, _empty, _seq8 = router.recv_multipart()
        router.send_multipart([ident, b"", b"", b"\xff" * 8, b""])

    try:
        sub = make_sub(indexer)
        sub.add_endpoint(POD, tcp(free_port()), tcp(rport))
        with sub:
            for _ in range(2):
                server = threading.Thread(target=serve_once)
                server.start()
                result = sub.replay(POD, 0, 0, "gap")
                server.join(5)
                assert result is not None and result.status == "ok"
                assert events(2) == [zmq.EVENT_ACCEPTED, zmq.EVENT_DISCONNECTED]
    finally:
        router.disable_monitor()
        mon.close(0)
        router.close(0)
        ctx.term()


def test_endpoints_added_and_removed_at_run_time(indexer: Indexer) -> None:
    """add_endpoint dials a pod while running; remove_endpoint stops it and purges the pod."""
    toks = list(range(16))
    port = free_port()
    with VllmEventPublisher(tcp(port), bind=True) as pub, make_sub(indexer) as sub:
        sub.add_endpoint(POD, tcp(port), model="model-x")
        assert pub.wait_for_subscriber(10)
        pub.publish([store([1], toks)])
        wait_until(lambda: indexer.score("model-x", toks, [POD]) == {POD: 1.0})
        sub.remove_endpoint(POD)
        wait_until(lambda: indexer.index.stats().entries == 0)
        assert sub.endpoints() == {}
        pub.publish([store([2], list(range(16, 32)))])
        time.sleep(0.2)
        assert sub.frames_received == 1
    assert counter(indexer, "kvaware_purges_total", {"reason": "endpoint_removed"}) == 1


def test_commands_and_stop_wake_the_idle_loop(
    indexer: Indexer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing to receive the loop waits long (one poll of every socket per wait), yet a
    pod added or removed meanwhile, and `stop`, take effect at once: they wake it."""
    import kvaware_scorer.events.subscriber as subscriber_mod

    monkeypatch.setattr(subscriber_mod, "_POLL_MS", 60_000)  # a wait the test would notice
    toks = list(range(16))
    port = free_port()
    with VllmEventPublisher(tcp(port), bind=True) as pub:
        # NOTE: no gauge refreshes either (they would end the wait every stats_interval).
        sub = KVEventSubscriber(indexer, KVEventsConfig(default_model=MODEL, stats_interval=0))
        sub.start()
        try:
            time.sleep(0.3)  # the loop is in its wait now
            sub.add_endpoint(POD, tcp(port), model="model-x")
            assert pub.wait_for_subscriber(10)
            pub.publish([store([1], toks)])
            wait_until(lambda: indexer.score("model-x", toks, [POD]) == {POD: 1.0})
            time.sleep(0.3)
            sub.remove_endpoint(POD)
            wait_until(lambda: indexer.index.stats().entries == 0)
        finally:
            t0 = time.monotonic()
            sub.stop()
        assert not sub.running and time.monotonic() - t0 < 10.0
    assert sub._wake_pipe is None  # closed with the loop


def test_loop_wait_ends_when_housekeeping_is_due(indexer: Indexer) -> None:
    """The receiving loop's wait: the idle bound, shortened to the next redial or the next
    refresh of the index-size gauges."""
    from kvaware_scorer.events.subscriber import _POLL_MS

    class Dialer:
        due: float | None = None

        def next_due(self) -> float | None:
            return self.due

    sub = make_sub(indexer)
    dialer = Dialer()
    far = time.monotonic() + 3600
    assert sub._poll_ms(dialer, far) == _POLL_MS  # type: ignore[arg-type]
    dialer.due = time.monotonic() + 0.2
    assert 0 < sub._poll_ms(dialer, far) <= 200  # type: ignore[arg-type]
    dialer.due = time.monotonic() - 1  # overdue: no wait at all
    assert sub._poll_ms(dialer, far) == 0  # type: ignore[arg-type]
    dialer.due = None
    assert 0 < sub._poll_ms(dialer, time.monotonic() + 0.3) <= 300  # type: ignore[arg-type]


def test_bad_messages_never_stop_the_loop(indexer: Indexer) -> None:
    """Malformed messages are counted by reason and the next good frame is still applied."""
    port = free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.bind(tcp(port))
    try:
        with make_sub(indexer) as sub:
            sub.add_endpoint(POD, tcp(port))
            assert pub.poll(10_000)
            pub.recv()
            pub.send_multipart([b"", b"\x00" * 8])
            pub.send_multipart([b"", b"\x00" * 4, b"x"])
            pub.send_multipart([b"", (0).to_bytes(8, "big"), b"\xc1\xc1"])
            good = encode_batch([store([1], list(range(16)))], 1.0, 0)
            pub.send_multipart([b"", (1).to_bytes(8, "big"), good])
            wait_until(lambda: indexer.ingestor.held(POD) == {1: 1})
            assert sub.running
    finally:
        pub.close(0)
        ctx.term()
    assert counter(indexer, "kvaware_dropped_messages_total", {"reason": "bad_frame"}) == 2
    assert counter(indexer, "kvaware_dropped_messages_total", {"reason": "decode_error"}) == 1


def two_ranks_with_a_gap(
    indexer: Indexer, pubs: list[VllmEventPublisher], a: list[int], b: list[int]
) -> None:
    """Rank 0 stores `a`, rank 1 stores `b` in two batches and loses the second on the wire."""
    for p in pubs:
        assert p.wait_for_subscriber(10)
    pubs[0].publish([store([1, 2], a)])
    pubs[1].publish([store([3], b[:16])])
    pubs[1].publish([store([4], b[16:], parent=3)], send=False)
    pubs[1].publish([])
    wait_until(lambda: indexer.ingestor.held(POD) == {1: 1, 2: 1, 3: 1, 4: 1})


def test_data_parallel_ranks_on_offset_ports(indexer: Indexer) -> None:
    """A pod with two DP ranks is dialed on port and port+1; each rank's gap is replayed from
    its own replay port."""
    a, b = list(range(32)), list(range(100, 132))
    port, rport = two_free_ports(), two_free_ports()
    pubs = [
        VllmEventPublisher(tcp(port + r), tcp(rport + r), bind=True, data_parallel_rank=r)
        for r in range(2)
    ]
    try:
        with make_sub(indexer) as sub:
            sub.add_endpoint(POD, tcp(port), tcp(rport), data_parallel_size=2)
            two_ranks_with_a_gap(indexer, pubs, a, b)
        assert pubs[1].replays_served == 1 and pubs[0].replays_served == 0
    finally:
        for p in pubs:
            p.close()
    assert indexer.score(MODEL, a, [POD]) == {POD: 1.0}
    assert indexer.score(MODEL, b, [POD]) == {POD: 1.0}


def test_bind_mode_listens_on_every_data_parallel_ranks_port(indexer: Indexer) -> None:
    """In bind mode, DP rank r's publisher (which vLLM points at port + r) reaches the index."""
    a, b = list(range(32)), list(range(100, 132))
    port = two_free_ports()
    topic = f"kv@{POD}@{MODEL}"
    with make_sub(
        indexer, accept_unknown_pods=True, zmq_endpoint=tcp(port), data_parallel_size=2
    ) as sub:
        assert sub.bound_endpoint == tcp(port)
        pubs = [
            VllmEventPublisher(tcp(port + r), topic=topic, bind=False, data_parallel_rank=r)
            for r in range(2)
        ]
        try:
            for p in pubs:
                assert p.wait_for_subscriber(10)
            pubs[0].publish([store([1, 2], a)])
            pubs[1].publish([store([3, 4], b)])
            wait_until(lambda: indexer.ingestor.held(POD) == {1: 1, 2: 1, 3: 1, 4: 1})
        finally:
            for p in pubs:
                p.close()
    assert set(indexer.ingestor.streams(POD)) == {0, 1}
    assert indexer.score(MODEL, b, [POD]) == {POD: 1.0}


def test_parse_event_sources() -> None:
    """vLLM's /kv_event_sources map gives each rank's endpoints, wildcard hosts replaced by the
    pod's address; ranks without ZMQ events are left out and unresolved ports refused."""
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": ""}
    sources = {
        "0": {**cfg, "endpoint": "tcp://10.0.0.5:41001", "replay_endpoint": "tcp://*:41002"},
        "1": {**cfg, "endpoint": "tcp://0.0.0.0:41007", "replay_endpoint": None},
        "2": {**cfg, "enable_kv_cache_events": False, "endpoint": "tcp://*:5559"},
        "3": {**cfg, "publisher": "null", "endpoint": "tcp://*:5560"},
    }
    assert parse_event_sources(sources, "10.0.0.5") == {
        0: ("tcp://10.0.0.5:41001", "tcp://10.0.0.5:41002"),
        1: ("tcp://10.0.0.5:41007", None),
    }
    v6 = {"0": {**cfg, "endpoint": "tcp://[::]:5557", "replay_endpoint": None}}
    assert parse_event_sources(v6, "fd00::1") == {0: ("tcp://[fd00::1]:5557", None)}
    for bad in (
        [],
        {"x": {}},
        {"0": {**cfg, "endpoint": "tcp://*:0"}},
        {"0": {**cfg, "endpoint": 5557}},
    ):
        with pytest.raises(ValueError):
            parse_event_sources(bad, "10.0.0.5")


def test_event_sources_of_a_vllm_server_are_dialed_per_rank(indexer: Indexer) -> None:
    """Publishers bound at random ports (vLLM's tcp://*:0), found through the server's
    /kv_event_sources, are dialed per rank, and each rank's gap is replayed from its own
    replay endpoint."""
    a, b = list(range(32)), list(range(100, 132))
    pubs = [
        VllmEventPublisher(
            "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", bind=True, data_parallel_rank=r
        )
        for r in range(2)
    ]
    served: dict[str, Any] = {}
    for r, p in enumerate(pubs):
        assert p.replay_endpoint is not None
        served[str(r)] = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": p.endpoint.replace("127.0.0.1", "*") if r == 0 else p.endpoint,
            "replay_endpoint": p.replay_endpoint,
            "buffer_steps": 10_000,
            "hwm": 100_000,
            "max_queue_size": 100_000,
            "topic": "",
        }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(served).encode()
            self.send_response(200 if self.path == "/kv_event_sources" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    try:
        sources = fetch_event_sources(f"http://127.0.0.1:{http_server.server_port}")
        assert sources[0][0] == pubs[0].endpoint
        with make_sub(indexer) as sub:
            sub.add_event_sources(POD, sources)
            two_ranks_with_a_gap(indexer, pubs, a, b)
        assert pubs[1].replays_served == 1 and pubs[0].replays_served == 0
        with pytest.raises(OSError):
            fetch_event_sources(f"http://127.0.0.1:{free_port()}", timeout=1.0)
    finally:
        http_server.shutdown()
        http_server.server_close()
        for p in pubs:
            p.close()
    assert indexer.score(MODEL, b, [POD]) == {POD: 1.0}


def test_concurrent_appliers_keep_each_pod_in_order(indexer: Indexer) -> None:
    """With several applying threads, every pod's frames still apply in order."""
    port = free_port()
    pods = [f"10.0.0.{i}:8000" for i in range(1, 5)]
    with make_sub(indexer, accept_unknown_pods=True, zmq_endpoint=tcp(port), concurrency=3) as sub:
        pubs = [VllmEventPublisher(tcp(port), topic=f"kv@{p}@{MODEL}", bind=False) for p in pods]
        try:
            for p in pubs:
                assert p.wait_for_subscriber(10)
            for i in range(40):
                for j, p in enumerate(pubs):
                    base = 1000 * j + 16 * i
                    toks = list(range(base, base + 16))
                    p.publish([store([base + 1], toks, parent=None if i == 0 else base - 15)])
            wait_until(lambda: sub.frames_received == 160)
            wait_until(
                lambda: all(
                    indexer.ingestor.streams(p).get(0) is not None
                    and indexer.ingestor.streams(p)[0].last_seq == 39
                    for p in pods
                )
            )
        finally:
            for p in pubs:
                p.close()
    for j, p in enumerate(pods):
        toks = list(range(1000 * j, 1000 * j + 640))
        assert indexer.score(MODEL, toks, [p]) == {p: 1.0}
    assert counter(indexer, "kvaware_orphaned_blocks_total") == 0
    assert counter(indexer, "kvaware_seq_gaps_total") == 0


def test_start_stop_is_clean_and_bounded(indexer: Indexer) -> None:
    """Start and stop return promptly, stop is idempotent, and a bad bind endpoint raises a
    ConfigError instead of leaving a thread behind."""
    from kvaware_scorer.errors import ConfigError

    sub = make_sub(indexer, zmq_endpoint=tcp(free_port()))
    t0 = time.monotonic()
    sub.start()
    assert sub.running
    sub.stop()
    sub.stop()
    assert not sub.running and time.monotonic() - t0 < 3.0
    assert indexer.ingestor.replay_source is None
    bad = make_sub(indexer, zmq_endpoint="tcp://256.1.1.1:1")
    with pytest.raises(ConfigError):
        bad.start()
    assert not bad.running


def test_endpoints_from_config_and_validation(indexer: Indexer) -> None:
    """Config endpoints (strings or objects) are dialed at start; an endpoint that cannot be
    offset for its DP ranks is refused."""
    from kvaware_scorer.errors import ConfigError

    toks = list(range(16))
    port = free_port()
    config = {
        "defaultModel": MODEL,
        "endpoints": {POD: tcp(port), "p:2": {"endpoint": "ipc:///nonexistent", "model": "x"}},
    }
    with VllmEventPublisher(tcp(port), bind=True) as pub:
        with KVEventSubscriber(indexer, config) as sub:
            assert set(sub.endpoints()) == {POD, "p:2"}
            assert pub.wait_for_subscriber(10)
            pub.publish([store([1], toks)])
            wait_until(lambda: indexer.score(MODEL, toks, [POD]) == {POD: 1.0})
        with pytest.raises(ConfigError):
            sub.add_endpoint("p:3", "ipc:///x", data_parallel_size=2)


def test_bind_mode_gap_is_replayed_from_the_configured_endpoint(indexer: Indexer) -> None:
    """In bind mode a pod's gap is replayed from its replayEndpoints entry."""
    toks = list(range(48))
    port, rport = free_port(), free_port()
    pod = "10.0.0.7:8000"
    sub = make_sub(
        indexer,
        accept_unknown_pods=True,
        zmq_endpoint=tcp(port),
        replay_endpoints={pod: tcp(rport)},
    )
    topic = f"kv@{pod}@{MODEL}"
    with sub, VllmEventPublisher(tcp(port), tcp(rport), topic=topic, bind=False) as pub:
        assert pub.wait_for_subscriber(10)
        pub.publish([store([1], toks[:16])])
        pub.publish([store([2], toks[16:32], parent=1)], send=False)
        pub.publish([store([3], toks[32:], parent=2)])
        wait_until(lambda: sub.frames_handled == 2)
    assert indexer.score(MODEL, toks, [pod]) == {pod: 1.0}
    assert counter(indexer, "kvaware_replays_total", {"result": "ok"}) == 1


def test_replay_endpoints_per_rank_and_discovery() -> None:
    """Replay endpoints are offset by DP rank as vLLM offsets them, and derived from the
    replay socket port for pods known only by address."""
    ix = Indexer()
    sub = KVEventSubscriber(ix, KVEventsConfig(replay_socket_port=5558, socket_port=5557))
    sub.add_endpoint("a:1", "tcp://10.0.0.1:5557", "tcp://10.0.0.1:6000")
    assert sub.replay_endpoint("a:1", 0) == "tcp://10.0.0.1:6000"
    assert sub.replay_endpoint("a:1", 3) == "tcp://10.0.0.1:6003"
    assert sub.replay_endpoint("10.0.0.9:8000", 1) == "tcp://10.0.0.9:5559"
    assert sub.replay_endpoint("[fd00::2]:8000", 0) == "tcp://[fd00::2]:5558"
    assert sub.config.discovery_endpoints("10.0.0.3") == (
        "tcp://10.0.0.3:5557",
        "tcp://10.0.0.3:5558",
    )
    plain = KVEventSubscriber(ix, KVEventsConfig())
    assert plain.replay_endpoint("10.0.0.9:8000", 0) is None
    assert plain.replay("10.0.0.9:8000", 0, 0, "gap") is None


def test_apply_interval_takes_a_lone_frame_at_once_and_gathers_the_next(
    indexer: Indexer,
) -> None:
    """``applyInterval``: the first frame after a quiet spell is taken at once; frames that
    come within the interval after it wait in the socket's queue and are taken together once
    it has passed, none lost; `stop` ends that wait at once."""
    toks = list(range(48))
    port = free_port()
    with VllmEventPublisher(tcp(port), bind=True) as pub:
        sub = make_sub(indexer, apply_interval=1.0)
        sub.start()
        try:
            sub.add_endpoint(POD, tcp(port))
            assert pub.wait_for_subscriber(10)
            pub.publish([store([1], toks[:16])])
            wait_until(lambda: sub.frames_received == 1)
            seen = time.monotonic()
            pub.publish([store([2], toks[16:32], parent=1)])
            pub.publish([store([3], toks[32:], parent=2)])
            time.sleep(0.2)
            # NOTE: the interval began when the first frame was taken, a little before `seen`
            # (a loaded machine may have been slower to get here)
            if time.monotonic() - seen < 0.5:
                assert sub.frames_received == 1
            wait_until(lambda: sub.frames_received == 3)
            wait_until(lambda: indexer.score(MODEL, toks, [POD]) == {POD: 1.0})
        finally:
            sub.stop()
        assert counter(indexer, "kvaware_seq_gaps_total") == 0

    # a stop while the loop lets frames gather ends the wait (here one far longer than the
    # test); a new publisher, which sees this subscriber join
    port = free_port()
    with VllmEventPublisher(tcp(port), bind=True) as pub:
        sub = make_sub(indexer)
        object.__setattr__(sub.config, "apply_interval", 600.0)
        sub.start()
        try:
            sub.add_endpoint("10.0.0.2:8000", tcp(port))
            assert pub.wait_for_subscriber(10)
            pub.publish([store([4], toks[:16])])
            wait_until(lambda: sub.frames_received == 1)
        finally:
            t0 = time.monotonic()
            sub.stop()
        assert not sub.running and time.monotonic() - t0 < 10.0
