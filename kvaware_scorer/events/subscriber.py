"""The ZMQ subscriber: receives KV-event frames and hands them to an `EventSink` (the ingestor).

Two transport modes, usable together:

* *bind*: one SUB socket bound at ``zmq_endpoint``; pods connect to it and name themselves in
  the topic ``kv@<pod-id>@<model>`` (``kv@<pod-id>`` falls back to ``default_model``). The
  pod id may contain ``:`` (``10.0.0.1:8000``); everything after the second ``@`` is the model.
  vLLM offsets the port of every data-parallel rank's endpoint (rank ``r`` connects to port
  ``+r``), so the socket is also bound at the next ``data_parallel_size - 1`` ports.
* *connect*: one SUB socket per pod, dialing the pod's publisher (every DP rank's port); the
  pod id is the endpoint's id, the model is the endpoint's, else the topic's, else
  ``default_model``. `add_endpoint` / `remove_endpoint` change the set at run time;
  `add_event_sources` dials the publishers a vLLM server lists at ``GET /kv_event_sources``
  (`fetch_event_sources`), the only way to find one bound at ``tcp://*:0`` (a random port per
  rank).

Frames are ``[topic, seq (8-byte big-endian), payload]``; each is handed to ``sink.ingest``
with its seq and engine, which detects restarts and gaps. This class is the sink's `ReplaySource`:
gaps (and joins) are replayed from the pod's ROUTER with a DEALER socket, request
``[b"", start_seq]``, replies ``[b"", topic, seq, payload]`` (``[b"", seq, payload]`` before
vLLM 0.26) until the ``ff*8`` end marker.

One receiving thread owns the SUB sockets and hands frames to a small pool of applying threads
(`PodLanes`): a pod's frames run in order, and a pod stuck in a slow replay never holds up the
others. What may publish is decided by `access` (bind-mode pod admission, CURVE); connect
mode's sockets are dialed, watched and redialed by `dialer.PodDialer`; replays are fetched by
`replay.ReplayClient` and discovery answers read by `discovery`, all bounded. The loops never
die on a bad frame: they log it, count it and go on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import zmq

from kvaware_scorer.config import KVEventsConfig, load_model
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.events.access import CurveKeys, PodAdmission
from kvaware_scorer.events.dialer import PodDialer, Sources
from kvaware_scorer.events.discovery import fetch_event_sources, parse_event_sources
from kvaware_scorer.events.lanes import PodLanes
from kvaware_scorer.events.publisher import offset_endpoint
from kvaware_scorer.events.replay import ReplayClient, replay_endpoint
from kvaware_scorer.events.sink import ReplayResult, SinkProvider

if TYPE_CHECKING:
    from kvaware_scorer.events.sink import EventSink

__all__ = ["KVEventSubscriber", "fetch_event_sources", "parse_event_sources", "parse_topic"]

logger = logging.getLogger(__name__)

#: Longest wait of the receiving loop with nothing to do (ms). Commands (pods added or
#: removed) and `stop` wake it at once through a pipe in the poll set; only the housekeeping
#: that runs on a clock (redials, index-size gauges, open mode's reclaim) waits for it.
#: NOTE: libzmq's zmq_poll asks every socket for its events (a poll system call each) on every
#: call: with a SUB socket and a monitor per pod, a 100 ms wait cost an idle gateway ~2 ms of
#: CPU a second on four pods.
_POLL_MS: Final = 1000
_DRAIN: Final = 512


def parse_topic(topic: bytes) -> tuple[str | None, str | None]:
    """``kv@<pod-id>@<model>`` -> (pod id, model); missing parts are None.

    The prefix before the first ``@`` is not checked (it is the topic filter's business). The
    pod id may contain ``:``; the model is everything after the second ``@``.
    """
    try:
        text = topic.decode("utf-8")
    except UnicodeDecodeError:
        return None, None
    parts = text.split("@", 2)
    pod = parts[1] if len(parts) > 1 and parts[1] else None
    model = parts[2] if len(parts) > 2 and parts[2] else None
    return pod, model


@dataclass(slots=True)
class _PodEndpoint:
    endpoints: dict[int, str]  # DP rank -> publisher
    model: str | None
    replay_base: str | None = None  # rank 0's replay ROUTER (rank r: offset by r, as vLLM does)
    replay_endpoints: dict[int, str] | None = None  # or each rank's, as the pod listed them
    engine: str | None = None  # wire format (None: the config's engine_type)


class KVEventSubscriber:
    """Receives KV events over ZMQ and hands them to `sink`.

    Args:
        sink: Where frames go (an `EventIngestor`), or an owner of one (an `Indexer`: its
            ``ingestor`` is used).
        config: Transport settings (a `KVEventsConfig` or its camelCase dict form).
        context: ZMQ context to use (a private one otherwise, destroyed on `stop`).

    Attributes:
        sink: Where frames go.
        indexer: The owner `sink` was taken from, when one was given (else None).

    Raises:
        ConfigError: Invalid config, or an indexer built with ``ingest=False``.

    Example:
        >>> with KVEventSubscriber(indexer, KVEventsConfig(zmq_endpoint="tcp://*:5557")):
        ...     serve()  # doctest: +SKIP
    """

    def __init__(
        self,
        sink: EventSink | SinkProvider,
        config: KVEventsConfig | dict[str, Any] | None = None,
        *,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if config is None:
            config = KVEventsConfig()
        elif not isinstance(config, KVEventsConfig):
            config = load_model(KVEventsConfig, config, "kvEventsConfig")
        self.indexer: SinkProvider | None = None
        if isinstance(sink, SinkProvider):
            if not sink.ingest_enabled:
                raise ConfigError("this indexer was built with ingest=False", "kvEventsConfig")
            self.indexer = sink
            sink = sink.ingestor
        self.sink: EventSink = sink
        self.config = config
        self._ctx_given = context
        self._ctx: zmq.Context[Any] | None = None
        self._pods: dict[str, _PodEndpoint] = {}
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._lanes: PodLanes | None = None
        #: The receiving loop's wake-up: a byte written to ``[1]`` ends its wait.
        self._wake_pipe: tuple[int, int] | None = None
        self._wake_lock = threading.Lock()
        self._admission = PodAdmission(config, sink.metrics.dropped, self._forget)
        self._curve = CurveKeys(config.curve)
        self._replays = ReplayClient(config, self._curve, sink.metrics.dropped, self._stop_event)
        self._handled_lock = threading.Lock()
        self._bound: str | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        #: Frames taken off the sockets, and frames whose application finished.
        self.frames_received = 0
        self.frames_handled = 0
        for pod_id in config.endpoints:
            entry = config.endpoint_config(pod_id)
            assert entry is not None
            self._register(
                pod_id,
                entry.endpoint,
                entry.replay_endpoint or config.replay_endpoints.get(pod_id),
                entry.model,
                entry.data_parallel_size,
                entry.engine,
            )

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the receiving thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued_frames(self) -> int:
        """Frames received and not yet applied (at most ``queueSize``)."""
        lanes = self._lanes
        return 0 if lanes is None else lanes.queued

    @property
    def bound_endpoint(self) -> str | None:
        """The endpoint the bind-mode socket actually listens on for DP rank 0 (port resolved)."""
        return self._bound

    def start(self, timeout: float = 5.0) -> None:
        """Open the sockets and start receiving; returns once the sockets are set up.

        Raises:
            ConfigError: The bind endpoint or an endpoint cannot be used.
        """
        if self.running:
            return
        self._stop_event.clear()
        self._ready.clear()
        self._start_error = None
        self._ctx = self._ctx_given or zmq.Context()
        cfg = self.config
        sink = self.sink
        sink.set_replay_source(self)
        sink.max_event_tokens = cfg.max_event_tokens
        sink.max_seq_jump = cfg.max_seq_jump
        sink.max_payload_bytes = cfg.max_frame_bytes
        # NOTE: one thread per allowed concurrent replay on top of `concurrency`: a pod stuck
        # in a slow replay never holds up another pod's live events.
        self._lanes = PodLanes(
            cfg.concurrency + cfg.max_concurrent_replays,
            cfg.concurrency,
            cfg.queue_size,
            max(1, cfg.queue_size // (2 * cfg.max_concurrent_replays)),
            self._apply_error,
        )
        if self._wake_pipe is None:  # a receiver that did not stop may still hold one
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._wake_pipe = (r, w)
        self._thread = threading.Thread(target=self._run, name="kvaware-kv-events", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            logger.warning("KV-event subscriber did not report ready within %.1fs", timeout)
        if self._start_error is not None:
            err = self._start_error
            self.stop()
            raise ConfigError(f"cannot open KV-event sockets: {err}", "kvEventsConfig") from err

    def stop(self, timeout: float = 5.0) -> None:
        """Stop receiving and applying, close every socket; bounded by about `timeout`."""
        self._stop_event.set()
        self._wake()
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                logger.warning("KV-event receiver did not stop within %.1fs", timeout)
        if self._thread is None or not self._thread.is_alive():
            # NOTE: under the lock, so a concurrent `_wake` never writes to a closed (and
            # perhaps reused) descriptor; a receiver that did not stop keeps its pipe.
            with self._wake_lock:
                pipe, self._wake_pipe = self._wake_pipe, None
            if pipe is not None:
                for fd in pipe:
                    os.close(fd)
        if self._lanes is not None:
            self._lanes.stop(max(0.0, deadline - time.monotonic()))
        self._curve.stop()
        if self.sink.replay_source is self:
            self.sink.set_replay_source(None)
        if self._ctx is not None and self._ctx_given is None:
            self._ctx.destroy(0)
        self._ctx = None
        self._thread = None
        self._lanes = None

    def __enter__(self) -> KVEventSubscriber:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- endpoints (connect mode) ------------------------------------------------------------

    def add_endpoint(
        self,
        pod_id: str,
        endpoint: str,
        replay_endpoint: str | None = None,
        model: str | None = None,
        *,
        data_parallel_size: int | None = None,
        engine: str | None = None,
    ) -> None:
        """Dial a pod's publisher (replacing any previous endpoint of that pod).

        Args:
            pod_id: The pod's id as the scheduler scores it (``"<address>:<port>"``).
            endpoint: The pod's PUB endpoint (rank 0's).
            replay_endpoint: The pod's replay ROUTER endpoint (rank 0's), if any.
            model: Model of the pod's events (else the topic's, else ``default_model``).
            data_parallel_size: DP ranks; rank ``r`` is dialed at port ``+r``.
            engine: The pod's wire format (``vllm``, ``sglang``; None: ``engine_type``).

        Raises:
            ConfigError: An endpoint that cannot be offset for its DP ranks.
        """
        self._register(pod_id, endpoint, replay_endpoint, model, data_parallel_size, engine)
        # NOTE: before start, registering is enough (start dials every registered pod); a
        # redundant "add" would only redial.
        if self._thread is not None:
            self._command("add", pod_id)

    def add_event_sources(
        self,
        pod_id: str,
        sources: dict[int, tuple[str, str | None]],
        model: str | None = None,
        engine: str | None = None,
    ) -> None:
        """Dial a pod's publishers as its vLLM server lists them (replacing any previous ones).

        Args:
            pod_id: The pod's id as the scheduler scores it (``"<address>:<port>"``).
            sources: DP rank -> (publisher, replay endpoint), from `fetch_event_sources` or
                `parse_event_sources`.
            model: Model of the pod's events (else the topic's, else ``default_model``).

        Raises:
            ConfigError: No publisher in `sources`.
        """
        if not sources:
            raise ConfigError(
                "the pod lists no ZMQ publisher", f"kvEventsConfig.endpoints.{pod_id}"
            )
        replays = {r: rep for r, (_, rep) in sources.items() if rep is not None}
        pubs = {r: e for r, (e, _) in sources.items()}
        self._pods[pod_id] = _PodEndpoint(pubs, model, replay_endpoints=replays, engine=engine)
        if self._thread is not None:
            self._command("add", pod_id)

    def remove_endpoint(self, pod_id: str, *, purge: bool = True) -> None:
        """Stop dialing a pod; by default also purge it from the index (after its queued
        frames)."""
        self._pods.pop(pod_id, None)
        if self._thread is not None:
            self._command("remove", (pod_id, purge))
        elif purge:
            self._purge(pod_id)

    def endpoints(self) -> dict[str, str]:
        """Pod id -> dialed endpoint (connect mode; the lowest DP rank's)."""
        return {p: e.endpoints[min(e.endpoints)] for p, e in self._pods.items()}

    def _register(
        self,
        pod_id: str,
        endpoint: str,
        replay_endpoint: str | None,
        model: str | None,
        data_parallel_size: int | None,
        engine: str | None = None,
    ) -> None:
        ranks = range(data_parallel_size or self.config.data_parallel_size)
        try:
            pubs = {r: offset_endpoint(endpoint, r) for r in ranks}
            if replay_endpoint is not None:
                for r in ranks:
                    offset_endpoint(replay_endpoint, r)
        except ValueError as exc:
            raise ConfigError(str(exc), f"kvEventsConfig.endpoints.{pod_id}") from None
        self._pods[pod_id] = _PodEndpoint(pubs, model, replay_endpoint, engine=engine)

    # -- the receiving loop ------------------------------------------------------------------

    def _new_sub(self) -> zmq.Socket[Any]:
        assert self._ctx is not None
        cfg = self.config
        sock: zmq.Socket[Any] = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, cfg.rcvhwm)
        if cfg.rcvbuf:
            sock.setsockopt(zmq.RCVBUF, cfg.rcvbuf)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_frame_bytes)
        sock.setsockopt(zmq.SUBSCRIBE, cfg.topic_filter.encode("utf-8"))
        return sock

    # -- which pods bind mode accepts ------------------------------------------------------------

    def set_known_pods(self, pods: Iterable[str]) -> None:
        """The pod ids the scheduler knows (its endpoints): in bind mode only their frames are
        applied, unless ``acceptUnknownPods``. Static ``endpoints`` are always known."""
        self._admission.set_known(pods)

    def _forget(self, pod: str) -> None:
        """Open mode reclaimed `pod`: purge it (after its queued frames)."""
        self._dispatch(pod, functools.partial(self._purge, pod, "idle"))

    def _command(self, op: str, arg: Any) -> None:
        self._commands.put((op, arg))
        self._wake()

    def _wake(self) -> None:
        """End the receiving loop's wait now (commands queued, or stopping)."""
        with self._wake_lock:
            pipe = self._wake_pipe
            if pipe is None:
                return
            with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                os.write(pipe[1], b"\0")

    def _poll_ms(self, dialer: PodDialer, next_stats: float) -> int:
        """How long the loop may wait: until the next redial or gauge refresh is due, at most
        `_POLL_MS`."""
        wait = _POLL_MS / 1000
        now = time.monotonic()
        redial = dialer.next_due()
        if redial is not None:
            wait = min(wait, redial - now)
        if self.config.stats_interval:
            wait = min(wait, next_stats - now)
        return max(0, math.ceil(wait * 1000))

    def _run(self) -> None:
        poller = zmq.Poller()
        pipe = self._wake_pipe
        assert pipe is not None
        poller.register(pipe[0], zmq.POLLIN)
        sources: Sources = {}
        dialer = PodDialer(poller, sources, self._new_sub, self._curve, self.sink.metrics.dropped)
        try:
            if self.config.zmq_endpoint:
                sub = self._new_sub()
                sources[sub] = (None, None)
                self._curve.server(sub, self._ctx)
                for i, endpoint in enumerate(self._bind_endpoints()):
                    sub.bind(endpoint)
                    bound = sub.getsockopt_string(zmq.LAST_ENDPOINT)
                    if i == 0:
                        self._bound = bound
                    logger.info("KV-event subscriber bound at %s", bound)
                poller.register(sub, zmq.POLLIN)
            for pod_id in list(self._pods):
                self._connect(dialer, pod_id)
        except (zmq.ZMQError, ConfigError, ValueError) as exc:
            self._start_error = exc
            self._ready.set()
            dialer.close_all()
            return
        self._ready.set()
        next_stats = time.monotonic() + self.config.stats_interval
        gather = self.config.apply_interval
        took_at: float | None = None  # when the frames just handled began to be taken
        while not self._stop_event.is_set():
            try:
                if took_at is not None:
                    # NOTE: frames taken just now: let the next ones gather (applyInterval)
                    left = took_at + gather - time.monotonic()
                    if left > 0 and self._stop_event.wait(left):
                        break
                    took_at = None
                self._commands_due(dialer)
                events = dict(poller.poll(self._poll_ms(dialer, next_stats)))
                for sock in events:
                    if sock == pipe[0]:
                        with contextlib.suppress(OSError):
                            while os.read(pipe[0], 4096):
                                pass
                        continue
                    if sock in dialer.monitors:
                        dialer.on_monitor(sock)
                        continue
                    pod, model = sources.get(sock, (None, None))
                    for _ in range(_DRAIN):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        if gather and took_at is None:
                            took_at = time.monotonic()
                        self.frames_received += 1
                        self._on_frames(frames, pod, model)
                        # NOTE: hand the GIL to waiting threads (the scheduler's score calls)
                        # after every frame rather than after CPython's 5 ms switch interval,
                        # so ingestion at full speed does not stretch the read path's tail.
                        time.sleep(0)
                    else:
                        took_at = None  # more queued than one drain takes: no wait
                if self.config.stats_interval and time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + self.config.stats_interval
                    self.sink.stats()
                    self._admission.reclaim()
            except Exception:
                self.sink.metrics.dropped.labels("internal_error").inc()
                logger.exception("KV-event receive loop error (continuing)")
                time.sleep(0.01)
        dialer.close_all()

    def _bind_endpoints(self) -> list[str]:
        """Where bind mode listens: `zmq_endpoint` for rank 0, offset for the other ranks.

        Raises:
            ValueError: An endpoint that cannot be offset (vLLM refuses it for rank > 0 too).
        """
        base = self.config.zmq_endpoint
        assert base is not None
        ranks = range(self.config.data_parallel_size)
        # NOTE: port 0 is not offset (as in vLLM): one random port serves every rank.
        return list(dict.fromkeys(offset_endpoint(base, r) for r in ranks))

    def _connect(self, dialer: PodDialer, pod_id: str) -> None:
        info = self._pods.get(pod_id)
        if info is None:
            dialer.disconnect(pod_id)
            return
        dialer.connect(pod_id, info.endpoints.values(), info.model)

    def _commands_due(self, dialer: PodDialer) -> None:
        for pod in dialer.due():
            if pod in self._pods:
                self.sink.metrics.dropped.labels("protocol_error").inc()
                logger.info("ZMQ dropped the connection to %s for good; redialing", pod)
                self._connect(dialer, pod)
        while True:
            try:
                op, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                self._connect(dialer, arg)
            elif op == "remove":
                pod_id, purge = arg
                dialer.disconnect(pod_id)
                if purge:
                    self._dispatch(pod_id, functools.partial(self._purge, pod_id))

    def _purge(self, pod_id: str, reason: str = "endpoint_removed") -> None:
        self.sink.purge_pod(pod_id, reason=reason)

    def _on_frames(self, frames: list[bytes], pod: str | None, model: str | None) -> None:
        metrics = self.sink.metrics
        if len(frames) != 3 or len(frames[1]) != 8:
            metrics.dropped.labels("bad_frame").inc()
            logger.debug("dropped a KV-event message of %d frames", len(frames))
            return
        topic, seq8, payload = frames
        topic_pod, topic_model = parse_topic(topic) if topic else (None, None)
        if pod is None:
            pod = topic_pod
            if pod is None:
                metrics.dropped.labels("topic_without_pod").inc()
                logger.debug("dropped a frame whose topic %r names no pod", topic)
                return
            if pod not in self._pods and not self._admission.accepts(pod):
                logger.debug("dropped a frame of unknown pod %r", pod[:80])
                return
        use_model = model or topic_model or self.config.default_model
        seq = int.from_bytes(seq8, "big")
        self._dispatch(pod, functools.partial(self._apply_frame, pod, use_model, payload, seq))

    def _apply_frame(self, pod: str, model: str | None, payload: bytes, seq: int) -> None:
        info = self._pods.get(pod)
        engine = (info.engine if info is not None else None) or self.config.engine_type
        try:
            self.sink.ingest(pod, model, payload, seq, engine=engine)
        finally:
            with self._handled_lock:
                self.frames_handled += 1

    def _dispatch(self, pod: str, work: Callable[[], None]) -> None:
        lanes = self._lanes
        if lanes is None:
            work()
            return
        if not lanes.submit(pod, work):
            self.sink.metrics.dropped.labels("replay_backlog").inc()

    def _apply_error(self) -> None:
        self.sink.metrics.dropped.labels("internal_error").inc()

    # -- replay (the sink's ReplaySource) ------------------------------------------------

    def replay_endpoint(self, pod: str, rank: int = 0) -> str | None:
        """The replay endpoint of `pod`'s rank `rank`, if one is known."""
        info = self._pods.get(pod)
        if info is None:
            return replay_endpoint(None, None, pod, rank, self.config)
        return replay_endpoint(info.replay_endpoints, info.replay_base, pod, rank, self.config)

    def replay(self, pod: str, rank: int, start_seq: int, reason: str) -> ReplayResult | None:
        """Fetch `pod`'s buffered batches from `start_seq` on (vLLM's replay protocol).

        Bounded in time (``replayTimeout`` per answer frame, ``replayDeadline`` in total), in
        frames (``maxReplayBatches``), in bytes (``maxReplayBytes``, each frame at most
        ``maxFrameBytes``) and in number (``maxConcurrentReplays`` at once: one more is
        refused at once with status ``busy`` instead of waiting).

        Returns None when the pod has no replay endpoint (or ``replayOnJoin`` is off for a
        join); otherwise what arrived before the end marker or a bound.
        """
        if reason == "join" and not self.config.replay_on_join:
            return None
        endpoint = self.replay_endpoint(pod, rank)
        ctx = self._ctx
        if endpoint is None or ctx is None:
            return None
        return self._replays.fetch(ctx, endpoint, pod, rank, start_seq, reason, self._lanes)
