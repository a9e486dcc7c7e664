"""Hostile or broken engines over real ZMQ sockets on 127.0.0.1: poison frames, sizes, slow
replays, absurd sequence numbers, unknown and unauthenticated publishers."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.auth

from kvaware_scorer import Indexer
from kvaware_scorer.errors import EventDecodeError
from kvaware_scorer.events import VllmEventPublisher
from kvaware_scorer.events.decode import (
    AllBlocksCleared,
    BlockStored,
    EventDecoder,
    encode_batch,
)
from tests.conftest import free_port
from tests.events.test_subscriber import MODEL, POD, counter, make_sub, store, tcp, wait_until

OTHER = "10.0.0.2:8000"


def poison(depth: int = 996) -> bytes:
    """A ~1 KB batch whose BlockStored nests `depth` arrays in its extra keys."""
    enc = msgspec.msgpack.encode
    ev = b"".join(
        [
            b"\x86",
            enc("type"),
            enc("BlockStored"),
            enc("block_hashes"),
            enc([1]),
            enc("parent_block_hash"),
            b"\xc0",
            enc("token_ids"),
            enc(list(range(16))),
            enc("block_size"),
            enc(16),
            enc("extra_keys"),
            b"\x91" * depth + b"\xc0",
        ]
    )
    return b"\x93" + enc(1.0) + b"\x91" + ev + enc(0)


# -- poison frames --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(poison(), id="nested-996"),
        pytest.param(poison(20_000), id="nested-20000"),
        pytest.param(
            encode_batch([BlockStored([1], None, list(range(16)), 16, medium="GPU")]).replace(
                b"GPU", b"\xff\xfe\xfd"
            ),
            id="medium-not-utf8",
        ),
        pytest.param(b"\x93\xcb" + b"\x00" * 8 + b"\xdd\xff\xff\xff\xff", id="huge-array-header"),
        pytest.param(b"\xc1", id="reserved-byte"),
    ],
)
def test_undecodable_frames_are_decode_errors(indexer: Indexer, payload: bytes) -> None:
    """Every undecodable frame is dropped and counted as a decode error (or a malformed event),
    never an internal error with a traceback."""
    decoder = EventDecoder()
    try:
        batch = decoder.decode(payload)
    except EventDecodeError as exc:
        assert exc.reason == "decode_error"
    else:
        assert batch.events == [] and batch.rejected
    indexer.ingest(POD, MODEL, payload, 0)
    dropped = counter(indexer, "kvaware_dropped_messages_total", {"reason": "decode_error"})
    malformed = counter(indexer, "kvaware_dropped_messages_total", {"reason": "malformed_event"})
    assert dropped + malformed == 1
    assert counter(indexer, "kvaware_dropped_messages_total", {"reason": "internal_error"}) == 0


def test_poison_frame_is_skipped_once_and_never_replayed(indexer: Indexer) -> None:
    """A poison frame between good ones is counted once; it triggers no replay of itself, and
    every later good frame is applied."""
    toks = list(range(16 * 17))
    port, rport = free_port(), free_port()
    with VllmEventPublisher(tcp(port), tcp(rport), bind=True) as pub:
        with make_sub(indexer) as sub:
            sub.add_endpoint(POD, tcp(port), tcp(rport))
            assert pub.wait_for_subscriber(10)
            pub.publish([store([1], toks[:16])])
            wait_until(lambda: sub.frames_handled == 1)
            pub.publish(poison())
            for i in range(1, 16):
                pub.publish([store([i + 1], toks[16 * i : 16 * (i + 1)], parent=i)])
            wait_until(lambda: sub.frames_handled == 17)
        assert pub.replays_served == 0
    assert indexer.score(MODEL, toks[: 16 * 16], [POD]) == {POD: 1.0}
    assert counter(indexer, "kvaware_dropped_messages_total", {"reason": "decode_error"}) == 1
    assert counter(indexer, "kvaware_seq_gaps_total") == 0
    assert counter(indexer, "kvaware_lost_batches_total") == 0


# -- sizes ----------------------------------------------------------------------------------


def test_oversized_live_frame_is_refused_by_the_socket(indexer: Indexer) -> None:
    """A live frame above maxFrameBytes never reaches the decoder; the publisher's next frames
    still arrive."""
    big = list(range(16 * 4096))  # 4096 blocks: ~190 KB on the wire
    small = list(range(1000, 1016))
    port = free_port()
    with (
        VllmEventPublisher(tcp(port), bind=True) as pub,
        make_sub(indexer, max_frame_bytes=64 * 1024) as sub,
    ):
        sub.add_endpoint(POD, tcp(port))
        assert pub.wait_for_subscriber(10)
        pub.publish([store(list(range(1, 4097)), big)])
        deadline = time.monotonic() + 10
        while indexer.score(MODEL, small, [POD]) != {POD: 1.0}:
            assert time.monotonic() < deadline
            pub.publish([store([9000], small)])
            time.sleep(0.1)
    assert counter(indexer, "kvaware_dropped_messages_total", {"reason": "protocol_error"}) >= 1
    assert indexer.score(MODEL, big, [POD]) == {POD: 0.0}


def test_replay_answer_is_bounded_in_bytes(indexer: Indexer) -> None:
    """A replay answer beyond maxReplayBytes is cut there (counted), whatever the publisher
    sends."""
    port, rport = free_port(), free_port()
    frame = b"x" * (100 * 1024)
    with VllmEventPublisher(tcp(port), tcp(rport), bind=True) as pub:
        for _ in range(60):
            pub.publish(frame, send=False)
        sub = make_sub(indexer, max_replay_bytes=1 << 20)
        sub.add_endpoint(POD, tcp(port), tcp(rport))
        with sub:
            result = sub.replay(POD, 0, 0, "gap")
    assert result is not None and result.status == "truncated"
    assert sum(len(p) for _, p in result.frames) <= 1 << 20
    assert len(result.frames) == 10
    assert counter(indexer, "kvaware_dropped_messages_total", {"reason": "replay_too_large"}) == 1


def test_event_tokens_are_bounded(indexer: Indexer) -> None:
    """A BlockStored with more token ids than maxEventTokens is dropped whole (counted) instead
    of creating one key per block size of tokens."""
    sub = make_sub(indexer, max_event_tokens=32_768)
    with sub:
        huge = BlockStored([7], None, list(range(16 * 4096)), 16 * 4096, medium="GPU")
        indexer.ingest(POD, MODEL, encode_batch([huge]), None)
    assert indexer.index.stats().entries == 0
    assert counter(indexer, "kvaware_dropped_messages_total", {"reason": "too_many_tokens"}) == 1


# -- slow replays ---------------------------------------------------------------------------


class TricklingRouter:
    """A replay ROUTER that answers one frame every `interval` seconds and never ends."""

    def __init__(self, interval: float) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.port = free_port()
        self.sock.bind(tcp(self.port))
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ident = None
        seq = 1
        payload = encode_batch([])
        while not self.stop.is_set():
            if self.sock.poll(int(self.interval * 1000)):
                ident = self.sock.recv_multipart()[0]
            if ident is not None and not self.stop.is_set():
                self.sock.send_multipart([ident, b"", b"", seq.to_bytes(8, "big"), payload])
                seq += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def same_lock_pod(indexer: Indexer, pod: str) -> str:
    """Another pod id whose frames apply under the same (striped) lock as `pod`'s."""
    lock = indexer.ingestor._lock_for(pod)
    for i in range(10_000):
        other = f"10.9.{i // 256}.{i % 256}:8000"
        if indexer.ingestor._lock_for(other) is lock:
            return other
    raise AssertionError("no pod id shares the lock")


@pytest.mark.parametrize("same_lock", [False, True])
def test_trickling_replay_has_a_deadline_and_never_stalls_other_pods(
    indexer: Indexer, same_lock: bool
) -> None:
    """A replay trickling one frame every 0.5 s ends at replayDeadline, and meanwhile another
    pod's live events are applied at once (also a pod whose frames share the replaying pod's
    lock)."""
    other = same_lock_pod(indexer, POD) if same_lock else OTHER
    router = TricklingRouter(0.5)
    a_port, b_port = free_port(), free_port()
    b_toks = list(range(500, 516))
    try:
        with (
            VllmEventPublisher(tcp(a_port), bind=True) as a,
            VllmEventPublisher(tcp(b_port), bind=True) as b,
            make_sub(indexer, replay_deadline=3.0, replay_on_join=False) as sub,
        ):
            sub.add_endpoint(POD, tcp(a_port), tcp(router.port))
            sub.add_endpoint(other, tcp(b_port))
            assert a.wait_for_subscriber(10) and b.wait_for_subscriber(10)
            a.publish([store([1], list(range(16)))])
            for _ in range(3):
                a.publish([], send=False)
            t0 = time.monotonic()
            a.publish([])  # a gap: replay from the trickling router
            time.sleep(0.5)
            b.publish([store([2], b_toks)])
            wait_until(lambda: indexer.score(MODEL, b_toks, [other]) == {other: 1.0}, 10)
            stalled = time.monotonic() - t0 - 0.5
            wait_until(
                lambda: counter(indexer, "kvaware_replays_total", {"result": "deadline"}), 10
            )
            replay_took = time.monotonic() - t0
    finally:
        router.close()
    assert stalled < 1.0
    assert replay_took < 5.0


def test_concurrent_replays_beyond_the_bound_are_refused_not_queued(indexer: Indexer) -> None:
    """With maxConcurrentReplays replays running, one more is refused at once (busy)."""
    router = TricklingRouter(0.2)
    try:
        sub = make_sub(indexer, max_concurrent_replays=1, replay_deadline=2.0)
        sub.add_endpoint(POD, tcp(free_port()), tcp(router.port))
        sub.add_endpoint(OTHER, tcp(free_port()), tcp(router.port))
        with sub:
            first = threading.Thread(target=sub.replay, args=(POD, 0, 1, "gap"))
            first.start()
            time.sleep(0.3)
            t0 = time.monotonic()
            result = sub.replay(OTHER, 0, 1, "gap")
            assert time.monotonic() - t0 < 0.5
            first.join(5)
    finally:
        router.close()
    assert result is not None and result.status == "busy"


# -- sequence numbers -------------------------------------------------------------------------


def test_absurd_seq_jump_is_a_restart_not_a_loss(indexer: Indexer) -> None:
    """A seq jumping to 2**64-1 is a publisher restart (purge), not 1.8e19 lost batches."""
    toks = list(range(32))
    indexer.ingest(POD, MODEL, encode_batch([store([1], toks[:16])]), 0)
    indexer.ingest(POD, MODEL, encode_batch([store([2], toks[16:], parent=1)]), 2**64 - 1)
    assert counter(indexer, "kvaware_lost_batches_total") == 0
    assert counter(indexer, "kvaware_purges_total", {"reason": "publisher_restart"}) == 1
    assert counter(indexer, "kvaware_dropped_messages_total", {"reason": "seq_jump"}) == 1


# -- bind mode: who may publish ---------------------------------------------------------------


def test_bind_mode_applies_only_known_pods(indexer: Indexer) -> None:
    """In bind mode a frame naming a pod the scheduler does not know is dropped (counted); a
    known pod's frames apply."""
    port = free_port()
    toks = list(range(16))
    with make_sub(indexer, zmq_endpoint=tcp(port)) as sub:
        sub.set_known_pods([POD])
        pubs = [
            VllmEventPublisher(tcp(port), topic=f"kv@{POD}@{MODEL}", bind=False),
            VllmEventPublisher(tcp(port), topic=f"kv@{OTHER}@{MODEL}", bind=False),
        ]
        try:
            for i, p in enumerate(pubs):
                assert p.wait_for_subscriber(10)
                p.publish([store([i + 1], toks)])
            wait_until(lambda: sub.frames_handled == 1 and sub.frames_received == 2)
        finally:
            for p in pubs:
                p.close()
    assert indexer.index.pods() == [POD]
    assert counter(indexer, "kvaware_dropped_messages_total", {"reason": "unknown_pod"}) == 1


def test_open_bind_mode_bounds_and_reclaims_pods(indexer: Indexer) -> None:
    """Open mode tracks at most maxPods pods; idle ones are reclaimed so new pods get in."""
    port = free_port()
    toks = list(range(16))
    cfg = {"zmq_endpoint": tcp(port), "accept_unknown_pods": True, "max_pods": 5}
    with make_sub(indexer, **cfg, pod_idle_seconds=0.5) as sub:
        pub = VllmEventPublisher(tcp(port), bind=False)
        try:
            assert pub.wait_for_subscriber(10)
            for i in range(20):
                pub._topic = f"kv@10.1.0.{i}:80@{MODEL}".encode()
                pub.publish([store([i + 1], toks)])
            wait_until(lambda: sub.frames_received == 20)
            wait_until(lambda: sub.frames_handled == 5)
            assert len(indexer.index.pods()) == 5
            time.sleep(1.2)
            pub._topic = f"kv@10.2.0.1:80@{MODEL}".encode()
            pub.publish([store([99], toks)])
            wait_until(lambda: "10.2.0.1:80" in indexer.index.pods())
        finally:
            pub.close()
    assert counter(indexer, "kvaware_dropped_messages_total", {"reason": "too_many_pods"}) == 15
    assert len(indexer.index.pods()) <= 5


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Any]:
    """CURVE certificates: ours (the scheduler's), a trusted pod's and a stranger's."""
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    out: dict[str, Any] = {"allowed_dir": str(allowed)}
    for name in ("scheduler", "pod", "stranger"):
        public_file, secret_file = zmq.auth.create_certificates(str(keys), name)
        out[name] = zmq.auth.load_certificate(secret_file)
        out[name + "_secret_file"] = secret_file
        if name == "pod":
            (allowed / "pod.key").write_bytes(Path(public_file).read_bytes())
    return out


def test_curve_bind_mode_accepts_only_allowed_publishers(
    indexer: Indexer, certs: dict[str, Any]
) -> None:
    """With CURVE in bind mode, a publisher whose key is allowed delivers; a stranger's and a
    plain publisher's frames never arrive."""
    port = free_port()
    toks = list(range(16))
    curve = {"certificate": certs["scheduler_secret_file"], "client_keys_dir": certs["allowed_dir"]}
    server_key = certs["scheduler"][0]
    with make_sub(indexer, zmq_endpoint=tcp(port), curve=curve) as sub:
        sub.set_known_pods([POD])
        topic = f"kv@{POD}@{MODEL}"
        stranger = VllmEventPublisher(
            tcp(port), topic=topic, bind=False, curve=certs["stranger"], curve_server_key=server_key
        )
        plain = VllmEventPublisher(tcp(port), topic=topic, bind=False)
        good = VllmEventPublisher(
            tcp(port), topic=topic, bind=False, curve=certs["pod"], curve_server_key=server_key
        )
        try:
            assert not stranger.wait_for_subscriber(1) and not plain.wait_for_subscriber(0.5)
            stranger.publish([AllBlocksCleared()])
            plain.publish([store([5], list(range(100, 116)))])
            assert good.wait_for_subscriber(10)
            good.publish([store([1], toks)])
            wait_until(lambda: indexer.score(MODEL, toks, [POD]) == {POD: 1.0})
        finally:
            for p in (stranger, plain, good):
                p.close()
    assert sub.frames_received == 1


def test_curve_connect_mode_authenticates_the_publisher(
    indexer: Indexer, certs: dict[str, Any]
) -> None:
    """In connect mode with CURVE, the pod's publisher is dialed with its public key; events
    and replays flow encrypted."""
    port, rport = free_port(), free_port()
    toks = list(range(32))
    curve = {"certificate": certs["scheduler_secret_file"], "server_key": certs["pod"][0].decode()}
    with VllmEventPublisher(tcp(port), tcp(rport), bind=True, curve=certs["pod"]) as pub:
        pub.publish([store([1], toks[:16])])
        with make_sub(indexer, curve=curve) as sub:
            sub.add_endpoint(POD, tcp(port), tcp(rport))
            assert pub.wait_for_subscriber(10)
            pub.publish([store([2], toks[16:], parent=1)])
            wait_until(lambda: indexer.score(MODEL, toks, [POD]) == {POD: 1.0})
        assert pub.replays_served == 1


def test_precise_scorer_in_bind_mode_follows_the_schedulers_pods() -> None:
    """The precise scorer's bound subscriber applies events of the scheduler's endpoints only,
    and follows the pool as it changes."""
    from kvaware_scorer.scheduler import Endpoint, Scheduler, make_plugin_manager

    port = free_port()
    params = {"kvEventsConfig": {"zmqEndpoint": tcp(port), "defaultModel": MODEL}}
    s = Scheduler.from_config(
        {
            "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
            "kind": "EndpointPickerConfig",
            "plugins": [{"type": "precise-prefix-cache-scorer", "parameters": params}],
            "schedulingProfiles": [
                {"name": "default", "plugins": [{"pluginRef": "precise-prefix-cache-scorer"}]}
            ],
        },
        plugin_manager=make_plugin_manager(use_env=False),
    )
    a, b = Endpoint("a", "127.0.0.1", 8001), Endpoint("b", "127.0.0.1", 8002)
    s.set_endpoints([a])
    s.start()
    scorer = s.plugin("precise-prefix-cache-scorer")
    ix = scorer.indexer
    toks = list(range(16))
    pubs = {
        e.id: VllmEventPublisher(tcp(port), topic=f"kv@{e.id}@{MODEL}", bind=False) for e in (a, b)
    }
    try:
        for p in pubs.values():
            assert p.wait_for_subscriber(10)
        pubs[b.id].publish([store([2], toks)])
        pubs[a.id].publish([store([1], toks)])
        wait_until(lambda: ix.score(MODEL, toks, [a.id]) == {a.id: 1.0})
        # NOTE: the two publishers' messages are fair-queued, so a's can be applied before b's
        # is looked at: wait for b's to be dropped before b joins the pool.
        wait_until(
            lambda: counter(ix, "kvaware_dropped_messages_total", {"reason": "unknown_pod"}) == 1
        )
        assert ix.score(MODEL, toks, [b.id]) == {b.id: 0.0}
        s.set_endpoints([a, b])
        pubs[b.id].publish([store([3], toks)])
        wait_until(lambda: ix.score(MODEL, toks, [b.id]) == {b.id: 1.0})
    finally:
        for p in pubs.values():
            p.close()
        s.close()
    assert counter(ix, "kvaware_dropped_messages_total", {"reason": "unknown_pod"}) == 1
