"""The replay client: one request to a pod's replay ROUTER, read within every bound.

`ReplayClient` is what the subscriber asks (at most ``maxConcurrentReplays`` at once);
`replay_endpoint` finds a pod rank's ROUTER; `fetch_replay` runs one request.

vLLM's protocol: a DEALER sends ``[b"", start_seq (8 bytes BE)]``; the ROUTER answers
``[b"", topic, seq, payload]`` (``[b"", seq, payload]`` before vLLM 0.26) per buffered batch,
then the ``ff*8`` end marker. The answer comes from a pod, so it is bounded: ``replayTimeout``
per frame, ``replayDeadline`` in total, ``maxReplayBatches`` frames, ``maxReplayBytes`` bytes
and ``maxFrameBytes`` per frame (the socket drops a larger one).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Final

import zmq

from kvaware_scorer.config import KVEventsConfig
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.events.access import CurveKeys
from kvaware_scorer.events.publisher import END_SEQ, offset_endpoint
from kvaware_scorer.events.sink import ReplayResult

if TYPE_CHECKING:
    from kvaware_scorer.events.lanes import PodLanes

__all__ = ["ReplayClient", "fetch_replay", "replay_endpoint"]

logger = logging.getLogger(__name__)

_POLL_MS: Final = 100


def _recv(
    sock: zmq.Socket[Any], deadline: float, timeout: float, stop: threading.Event
) -> list[bytes] | None:
    """The next reply message, or None after `timeout` seconds without one, past `deadline`,
    or on `stop`."""
    until = min(deadline, time.monotonic() + timeout)
    while not stop.is_set():
        left = until - time.monotonic()
        if left <= 0:
            return None
        if sock.poll(int(min(left, _POLL_MS / 1000) * 1000) + 1):
            return sock.recv_multipart()
    return None


def _parse_reply(parts: list[bytes]) -> tuple[bytes, bytes] | None:
    """(seq, payload) of one reply message, in either form; None when malformed."""
    if len(parts) == 4 and parts[0] == b"":  # >= 0.26: [b"", topic, seq, payload]
        seq8, payload = parts[2], parts[3]
    elif len(parts) == 3 and parts[0] == b"":  # < 0.26: [b"", seq, payload]
        seq8, payload = parts[1], parts[2]
    else:
        return None
    return (seq8, payload) if len(seq8) == 8 else None


def replay_endpoint(
    listed: dict[int, str] | None,
    base: str | None,
    pod: str,
    rank: int,
    config: KVEventsConfig,
) -> str | None:
    """The replay ROUTER of `pod`'s rank `rank`, if one is known.

    Args:
        listed: DP rank -> replay endpoint, as the pod listed them (``/kv_event_sources``).
        base: Rank 0's replay endpoint as configured for the pod (rank r: offset by r).
        pod: Pod id (``"<address>:<port>"``; the address serves ``replaySocketPort``).
        rank: Data-parallel rank.
        config: The config's ``replayEndpoints`` and ``replaySocketPort``.
    """
    if listed is not None:
        return listed.get(rank)
    if base is None:
        base = config.replay_endpoints.get(pod)
    if base is None and config.replay_socket_port:
        host, sep, _ = pod.rpartition(":")
        if sep and host:
            base = config.discovery_endpoints(host.strip("[]"))[1]
    if base is None:
        return None
    try:
        return offset_endpoint(base, rank)
    except ValueError:
        logger.warning("replay endpoint %s cannot serve rank %d", base, rank)
        return None


class ReplayClient:
    """Runs replays for the subscriber, at most ``maxConcurrentReplays`` at once (one more is
    refused at once with status ``busy`` instead of waiting).

    Args:
        config: The bounds.
        curve: CURVE client options.
        dropped: The ``kvaware_dropped_messages`` counter family.
        stop: Ends a running replay early when set.
    """

    def __init__(
        self, config: KVEventsConfig, curve: CurveKeys, dropped: Any, stop: threading.Event
    ) -> None:
        self._config = config
        self._curve = curve
        self._dropped = dropped
        self._stop = stop
        self._slots = threading.BoundedSemaphore(config.max_concurrent_replays)

    def fetch(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        pod: str,
        rank: int,
        start_seq: int,
        reason: str,
        lanes: PodLanes | None,
    ) -> ReplayResult:
        """Fetch `pod`'s batches from `start_seq` on at `endpoint`; `lanes` is told the pod
        is replaying meanwhile (its live frames wait in a lane of their own)."""
        if not self._slots.acquire(blocking=False):
            self._dropped.labels("replay_busy").inc()
            logger.info("replay (%s) of %s rank %d refused: too many replays", reason, pod, rank)
            return ReplayResult([], "busy")
        if lanes is not None:
            lanes.replaying(pod, True)
        try:
            frames, status = fetch_replay(
                ctx, endpoint, start_seq, self._config, self._curve, self._dropped, self._stop
            )
        finally:
            if lanes is not None:
                lanes.replaying(pod, False)
            self._slots.release()
        logger.info(
            "replay (%s) of %s rank %d from seq %d: %d batches, %s",
            reason,
            pod,
            rank,
            start_seq,
            len(frames),
            status,
        )
        return ReplayResult(frames, status)


def _read_replies(
    sock: zmq.Socket[Any],
    frames: list[tuple[int, bytes]],
    deadline: float,
    config: KVEventsConfig,
    dropped: Any,
    stop: threading.Event,
) -> str:
    """Read reply messages into `frames` until the end marker or a bound; returns the status
    (see `fetch_replay`). Frames read before an error stay in `frames`."""
    limit, max_bytes = config.max_replay_batches, config.max_replay_bytes
    size = 0
    status = "timeout"
    while True:
        parts = _recv(sock, deadline, config.replay_timeout, stop)
        if parts is None:
            if time.monotonic() >= deadline:
                status = "deadline"
            break
        reply = _parse_reply(parts)
        if reply is None:
            dropped.labels("bad_replay_frame").inc()
            continue
        seq8, payload = reply
        if seq8 == END_SEQ:
            status = "ok"
            break
        if len(frames) >= limit or size + len(payload) > max_bytes:
            dropped.labels("replay_too_large").inc()
            status = "truncated"
            break
        size += len(payload)
        frames.append((int.from_bytes(seq8, "big"), payload))
    return status


def fetch_replay(
    ctx: zmq.Context[Any],
    endpoint: str,
    start_seq: int,
    config: KVEventsConfig,
    curve: CurveKeys,
    dropped: Any,
    stop: threading.Event,
) -> tuple[list[tuple[int, bytes]], str]:
    """Ask `endpoint` for its batches from `start_seq` on.

    Args:
        ctx: ZMQ context for the DEALER socket.
        endpoint: The pod's replay ROUTER.
        start_seq: First sequence number wanted.
        config: The bounds.
        curve: CURVE client options (connect mode).
        dropped: The ``kvaware_dropped_messages`` counter family.
        stop: Ends the wait early when set.

    Returns:
        ``(seq, payload)`` pairs in the order received, and the status: ``ok`` (end marker),
        ``timeout``, ``deadline``, ``truncated`` (a frame or byte bound) or ``error``.
    """
    deadline = time.monotonic() + config.replay_deadline
    frames: list[tuple[int, bytes]] = []
    # NOTE: one socket per replay, closed after it: replays are rare (gaps, joins), a kept
    # socket per endpoint would outlive its pod (and keep reconnecting to it), and late
    # replies to an abandoned request die with their socket instead of being read as the
    # next answer.
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, config.max_frame_bytes)
        curve.client(sock)
        sock.connect(endpoint)
        sock.send_multipart((b"", start_seq.to_bytes(8, "big")))
        status = _read_replies(sock, frames, deadline, config, dropped, stop)
    except zmq.ZMQError as exc:
        logger.warning("replay from %s failed: %s", endpoint, exc)
        status = "error"
    except ConfigError as exc:
        logger.warning("replay from %s impossible: %s", endpoint, exc)
        status = "error"
    finally:
        sock.close(0)
    return frames, status
