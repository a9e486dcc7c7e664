"""A KV-event publisher that speaks vLLM's ZMQ protocol (for the emulator, tests and benchmarks).

It follows vLLM's ``ZmqEventPublisher`` (``vllm/distributed/kv_events.py``):

* frames ``[topic, seq (8-byte big-endian), payload]`` on a PUB socket, seq counting from 0 per
  publisher instance;
* a ROUTER replay socket (when configured) keeping the last `buffer_steps` ``(seq, payload)``;
  a request ``[identity, b"", start_seq]`` gets one reply ``[identity, b"", topic, seq,
  payload]`` per buffered batch with ``seq >= start_seq`` and then the end marker
  ``[identity, b"", b"", ff*8, b""]`` (before vLLM 0.26: no topic frame, and the end marker
  ``[identity, b"", ff*8, b""]``); malformed requests are ignored;
* endpoints: bound when they contain ``*`` or ``::`` or use ``ipc://`` / ``inproc://``,
  connected otherwise (override with `bind`).

The PUB side is an XPUB socket so that `wait_for_subscriber` can tell when a subscriber has
joined; subscribers see no difference.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Final

import msgspec
import zmq

from kvaware_scorer.events.decode import KVCacheEvent, encode_batch

__all__ = ["END_SEQ", "VllmEventPublisher", "offset_endpoint", "vllm_binds"]

logger = logging.getLogger(__name__)

#: vLLM's replay end marker: ``(-1).to_bytes(8, "big", signed=True)``.
END_SEQ: Final = b"\xff" * 8


def vllm_binds(endpoint: str) -> bool:
    """Whether vLLM's publisher would bind (rather than connect) `endpoint`."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def offset_endpoint(endpoint: str, rank: int) -> str:
    """The endpoint of DP rank `rank`, as vLLM offsets it (tcp port + rank; inproc ``_dp<r>``).

    Raises:
        ValueError: For another scheme with rank > 0 (vLLM refuses those too).
    """
    if rank == 0:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{rank}"
    if endpoint.startswith("tcp://"):
        head, sep, port = endpoint.rpartition(":")
        if sep and port.isdigit():
            p = int(port)
            return endpoint if p == 0 else f"{head}:{p + rank}"
    raise ValueError(f"cannot offset {endpoint!r} for data-parallel rank {rank}")


class VllmEventPublisher:
    """Publishes KV-event batches exactly as one vLLM engine (one DP rank) does.

    Args:
        endpoint: PUB endpoint (e.g. ``tcp://127.0.0.1:5557``).
        replay_endpoint: ROUTER endpoint for replays; None = no replay (as vLLM's default).
        topic: Topic frame (vLLM's default is ``""``; llm-d uses ``kv@<pod>@<model>``).
        buffer_steps: Batches kept for replay.
        hwm: Send high-water mark of the PUB socket.
        data_parallel_rank: Rank written into batches that carry none.
        bind: Bind (True) or connect (False) the PUB socket; None = vLLM's rule.
        legacy_replay: Answer replays in the pre-0.26 form (no topic frame).
        context: ZMQ context to use (a private one otherwise).
        curve: Our CURVE (public, secret) keys: with `curve_server_key` the sockets are CURVE
            clients of that server (a pod publishing to a bound subscriber); without, they are
            CURVE servers (a pod whose subscribers dial it). None = plain ZMQ.
        curve_server_key: The public key of the CURVE server we connect to.
    """

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        data_parallel_rank: int = 0,
        bind: bool | None = None,
        legacy_replay: bool = False,
        context: zmq.Context[Any] | None = None,
        curve: tuple[bytes, bytes] | None = None,
        curve_server_key: bytes | None = None,
    ) -> None:
        self._own_ctx = context is None
        self._curve = curve
        self._curve_server_key = curve_server_key
        self._ctx: zmq.Context[Any] = context or zmq.Context()
        self.topic = topic
        self._topic = topic.encode("utf-8")
        self.data_parallel_rank = data_parallel_rank
        self.legacy_replay = legacy_replay
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._lock = threading.Lock()
        self._encoder = msgspec.msgpack.Encoder()
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._secure(self._pub)
        do_bind = vllm_binds(endpoint) if bind is None else bind
        if do_bind:
            self._pub.bind(endpoint)
        else:
            self._pub.connect(endpoint)
        self.endpoint: str = self._pub.getsockopt_string(zmq.LAST_ENDPOINT) if do_bind else endpoint
        self.replay_endpoint: str | None = None
        self.replays_served = 0
        self._router: zmq.Socket[Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if replay_endpoint is not None:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.SNDHWM, 2 * (buffer_steps + 1))
            router.setsockopt(zmq.LINGER, 0)
            self._secure(router)
            router.bind(replay_endpoint)
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._router = router
            self._thread = threading.Thread(
                target=self._serve_replays, name="kvaware-replay-router", daemon=True
            )
            self._thread.start()

    def _secure(self, sock: zmq.Socket[Any]) -> None:
        if self._curve is None:
            return
        public, secret = self._curve
        if self._curve_server_key is None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        else:
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            sock.setsockopt(zmq.CURVE_SERVERKEY, self._curve_server_key)

    @property
    def next_seq(self) -> int:
        """The sequence number the next batch will carry."""
        return self._seq

    def wait_for_subscriber(self, timeout: float = 5.0) -> bool:
        """Block until a subscriber's subscription reaches this socket (or `timeout`)."""
        if self._pub.poll(int(timeout * 1000)):
            while self._pub.poll(0):
                self._pub.recv()
            return True
        return False

    def publish(
        self,
        events: Iterable[KVCacheEvent] | bytes,
        ts: float | None = None,
        *,
        send: bool = True,
        legacy: bool = False,
    ) -> int:
        """Publish one batch; returns its sequence number.

        Args:
            events: The step's events, or an already encoded payload.
            ts: Batch timestamp (now when None).
            send: False records the batch (seq and replay buffer) without sending it, as if
                the network dropped it.
            legacy: Encode events in the vLLM <= 0.23 array form.
        """
        if isinstance(events, bytes | bytearray):
            payload = bytes(events)
        else:
            payload = encode_batch(
                events,
                time.time() if ts is None else ts,
                self.data_parallel_rank,
                legacy=legacy,
                encoder=self._encoder,
            )
        with self._lock:
            seq = self._seq
            self._seq += 1
            self._buffer.append((seq, payload))
        if send:
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        return seq

    def _serve_replays(self) -> None:
        router = self._router
        assert router is not None
        while not self._stop.is_set():
            try:
                if not router.poll(50):
                    continue
                frames = router.recv_multipart()
                if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                    logger.debug("invalid replay request: %d frames", len(frames))
                    continue
                ident, start = frames[0], int.from_bytes(frames[2], "big")
                with self._lock:
                    items = [(s, p) for s, p in self._buffer if s >= start]
                for s, p in items:
                    seq8 = s.to_bytes(8, "big")
                    if self.legacy_replay:
                        router.send_multipart((ident, b"", seq8, p))
                    else:
                        router.send_multipart((ident, b"", self._topic, seq8, p))
                if self.legacy_replay:
                    router.send_multipart((ident, b"", END_SEQ, b""))
                else:
                    router.send_multipart((ident, b"", b"", END_SEQ, b""))
                self.replays_served += 1
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    break
                logger.warning("replay router error: %s", exc)

    def close(self) -> None:
        """Stop the replay thread and close the sockets (linger 0, as vLLM does)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._router is not None:
            self._router.close(0)
        self._pub.close(0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> VllmEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
