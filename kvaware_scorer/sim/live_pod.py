"""One live emulated vLLM pod: the emulator engine in real time behind HTTP and ZMQ.

A `LivePod` drives an `Engine` with one asyncio task (see ``live.py`` for the real-time model),
publishes the engine's KV events with a `VllmEventPublisher` and serves vLLM's API through the
aiohttp application its owner's ``app_factory`` builds (``server.make_app``), so this module
does not depend on the HTTP layer.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kvaware_scorer.sim.engine import Engine, RequestStatus, StepOutput
from kvaware_scorer.sim.hashing import BlockHasher
from kvaware_scorer.sim.profiles import EngineProfile
from kvaware_scorer.sim.request import SimRequest
from kvaware_scorer.sim.wire import EventEncoder, KVEvent, SGLangEventEncoder

if TYPE_CHECKING:
    import zmq
    from aiohttp import web

    from kvaware_scorer.events.publisher import VllmEventPublisher
    from kvaware_scorer.tokenization import TokenizationService
from kvaware_scorer.sim.live_config import LivePodsConfig, OutputText
from kvaware_scorer.sim.live_state import Job, LiveRequest, PodFailure

__all__ = ["MAX_CATCH_UP_S", "LivePod"]

logger = logging.getLogger(__name__)

#: Most wall seconds a late step task may catch up on (beyond it, the emulated GPU stalls too).
MAX_CATCH_UP_S = 0.05
#: Prompts at least this long are hashed in a worker thread.
_HASH_OFF_LOOP_TOKENS = 2048
#: How long a restarted pod retries binding its publisher's ports while ZMQ releases them.
_REBIND_TIMEOUT_S = 2.0


class LivePod:
    """One emulated vLLM server (HTTP + engine + KV-event publisher) on the event loop.

    Args:
        index: Pod number in its fleet (``sim-<index>``).
        config: Fleet settings.
        profile: The engine profile.
        hasher: Block hasher (shared by the fleet, like pods sharing vLLM's hash settings).
        text: Output tokens and their text.
        tokenization: Tokenizes text prompts and renders chat exactly as the scorer does (None
            = token-id prompts only).
        context: ZMQ context for the publisher sockets.
        app_factory: Builds the pod's aiohttp application (``server.make_app``).
    """

    def __init__(
        self,
        index: int,
        config: LivePodsConfig,
        profile: EngineProfile,
        hasher: BlockHasher,
        text: OutputText,
        tokenization: TokenizationService | None,
        context: zmq.Context[Any],
        app_factory: Callable[[LivePod], web.Application],
    ) -> None:
        self.index = index
        self.name = f"sim-{index}"
        self.config = config
        self.profile = profile
        self.hasher = hasher
        self.text = text
        self.tokenization = tokenization
        self.model = config.model_name
        self.speedup = config.speedup
        self.host = config.host
        self.port = config.base_port + index if config.base_port else 0
        self._context = context
        self._app_factory = app_factory
        self.kv_endpoint: str | None = None
        self.replay_endpoint: str | None = None
        self.topic = ""
        self.engine: Engine | None = None
        self.publisher: VllmEventPublisher | None = None
        self.running = False
        self.failed: str | None = None
        #: Times the pod was started (a restart increments it).
        self.starts = 0
        #: KV-event batches and bytes published since the last start.
        self.batches_published = 0
        self.bytes_published = 0
        #: Requests completed and aborted since the last start.
        self.requests_finished = 0
        self.requests_aborted = 0
        self._encoder = EventEncoder() if config.event_format == "vllm" else SGLangEventEncoder()
        self._live: dict[str, LiveRequest] = {}
        self._ops: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count()
        self._epoch = 0.0
        self._subscribed = False

    # -- identity -------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        """Endpoint id ``<address>:<port>`` (the scheduler's and the index's pod id)."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """Base URL of the HTTP server."""
        return f"http://{self.host}:{self.port}"

    def endpoint_entry(self, *, kv_events: bool = True) -> dict[str, Any]:
        """This pod's entry of an endpoints file (with its publisher for connect mode)."""
        entry: dict[str, Any] = {
            "name": self.name,
            "address": self.host,
            "port": self.port,
            "model": self.model,
            "labels": {"llm-d.ai/role": "decode"},
        }
        if kv_events and self.kv_endpoint and not self.config.kv_events_connect:
            entry["kvEvents"] = self.kv_endpoint
            if self.replay_endpoint:
                entry["kvEventsReplay"] = self.replay_endpoint
        return entry

    def event_sources(self) -> dict[str, dict[str, Any]]:
        """vLLM's ``GET /kv_event_sources``: ``{dp_rank: KVEventsConfig}`` as served."""
        if self.publisher is None:
            return {}
        cfg = self.config
        return {
            "0": {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": self.kv_endpoint,
                "replay_endpoint": self.replay_endpoint,
                "buffer_steps": cfg.buffer_steps,
                "hwm": 100_000,
                "max_queue_size": 100_000,
                "topic": self.topic,
            }
        }

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine task, the publisher and the HTTP server (same ports on a restart).

        Raises:
            OSError: A port is taken.
            zmq.ZMQError: A publisher socket cannot be opened.
        """
        from aiohttp import web

        if self.running:
            return
        self.engine = Engine(self.profile, self.hasher, num_gpu_blocks=self.config.num_gpu_blocks)
        self.failed = None
        self._subscribed = False
        self.batches_published = self.bytes_published = 0
        self.requests_finished = self.requests_aborted = 0
        loop = asyncio.get_running_loop()
        self._epoch = loop.time()
        self._wake = asyncio.Event()
        runner = web.AppRunner(
            self._app_factory(self),
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=0.05,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
            self.port = int(runner.addresses[0][1])
            await self._open_publisher()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._task = asyncio.create_task(self._run(), name=f"kvaware-sim-{self.name}")
        self.running = True
        self.starts += 1
        logger.info("%s listening on %s (KV events %s)", self.name, self.url, self.kv_endpoint)

    async def _open_publisher(self) -> None:
        import zmq

        from kvaware_scorer.events.publisher import VllmEventPublisher

        cfg = self.config
        if not cfg.kv_events:
            return
        self.topic = cfg.kv_topic.format(pod=self.id, model=self.model)
        if cfg.kv_events_connect:
            endpoint, bind = cfg.kv_events_connect, False
        else:
            port = cfg.kv_events_base_port + 2 * self.index if cfg.kv_events_base_port else "*"
            endpoint, bind = self.kv_endpoint or f"tcp://{self.host}:{port}", True
        replay: str | None = None
        if cfg.replay:
            rport = cfg.kv_events_base_port + 2 * self.index + 1 if cfg.kv_events_base_port else "*"
            replay = self.replay_endpoint or f"tcp://{self.host}:{rport}"
        # NOTE: on a restart the ports just closed are bound again; ZMQ releases a closed
        # socket's port from its I/O thread, a moment later.
        deadline = asyncio.get_running_loop().time() + _REBIND_TIMEOUT_S
        while True:
            try:
                self.publisher = VllmEventPublisher(
                    endpoint,
                    replay_endpoint=replay,
                    topic=self.topic,
                    buffer_steps=cfg.buffer_steps,
                    bind=bind,
                    context=self._context,
                )
                break
            except zmq.ZMQError as exc:
                retry = self.starts > 0 and exc.errno == errno.EADDRINUSE
                if not retry or asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.01)
        self.kv_endpoint = self.publisher.endpoint
        self.replay_endpoint = self.publisher.replay_endpoint

    async def stop(self) -> None:
        """Kill the pod: the engine stops, open connections are dropped (streams break off),
        the publisher closes. Idempotent."""
        if not self.running:
            return
        self.running = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.exception("%s: step task failed", self.name)
        for _op, fut in self._ops:
            if not fut.done():
                fut.set_exception(ConnectionError("the pod stopped"))
        self._ops.clear()
        self._live.clear()
        runner, self._runner = self._runner, None
        publisher, self.publisher = self.publisher, None
        try:
            if runner is not None:
                await runner.cleanup()
        finally:
            if publisher is not None:
                publisher.close()
        logger.info("%s stopped", self.name)

    async def wait_for_subscriber(self, timeout: float = 5.0) -> bool:
        """Wait until a subscriber has joined this pod's publisher (since its last start).

        ZMQ PUB drops what it sends before a subscriber is connected ("slow joiner"); tests and
        the demo wait here before sending requests whose KV events must arrive.

        Returns:
            Whether one joined within `timeout` seconds (False without a publisher).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.publisher is not None:
            if self._subscribed or self.publisher.wait_for_subscriber(0):
                self._subscribed = True
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return False

    async def restart(self) -> None:
        """Stop, then start again on the same ports: empty KV cache, event seq back at 0."""
        await self.stop()
        await self.start()

    # -- requests -------------------------------------------------------------------------------

    def new_request(
        self, prompt: Sequence[int], max_tokens: int, cache_salt: str | None = None
    ) -> SimRequest:
        """A request for the engine (output tokens chosen here)."""
        ids = np.asarray(prompt, dtype=np.int32)
        loop_now = asyncio.get_running_loop().time()
        return SimRequest(
            request_id=f"{self.name}-{next(self._ids)}",
            arrival_time=(loop_now - self._epoch) * self.speedup,
            prompt=ids,
            output_tokens=self.text.tokens(ids, max_tokens),
            cache_salt=cache_salt or None,
        )

    async def hash_prompts(self, requests: Sequence[SimRequest]) -> None:
        """Compute long prompts' block hashes off the event loop (vLLM's sha256 is ~1 ms per
        4k tokens); short ones are hashed when queued."""
        for r in requests:
            if len(r.prompt) >= _HASH_OFF_LOOP_TOKENS and r.block_hashes is None:
                hashes, state = await asyncio.to_thread(
                    self.hasher.chain, r.prompt, 0, None, r.lora_name, r.cache_salt
                )
                r.block_hashes, r.hash_state = hashes, state

    def validate(self, request: SimRequest) -> str | None:
        """Why vLLM would refuse `request` with a 400, or None."""
        if self.engine is None:
            return "the pod is not running"
        return self.engine.validate(request)

    def submit(self, requests: Sequence[SimRequest]) -> Job:
        """Queue `requests` (validated by the caller) as one HTTP request's choices.

        Raises:
            ConnectionError: The pod is not running or its engine failed.
            ValueError: A request is invalid (nothing was queued).
        """
        engine = self.engine
        if not self.running or engine is None or self._wake is None:
            raise ConnectionError("the pod is not running")
        if self.failed is not None:
            raise ConnectionError(self.failed)
        for r in requests:
            reason = engine.validate(r)
            if reason is not None:
                raise ValueError(reason)
        job = Job()
        for i, r in enumerate(requests):
            lr = LiveRequest(engine.add_request(r), job, i)
            self._live[r.request_id] = lr
            job.requests.append(lr)
        self._wake.set()
        return job

    def abort(self, job: Job) -> None:
        """Abort `job`'s unfinished requests at the next step boundary (frees their blocks)."""
        if job.done or not self.running:
            return
        pending = [lr for lr in job.requests if lr.engine_request.request_id in self._live]
        if not pending:
            return

        def apply() -> None:
            engine = self.engine
            if engine is None:
                return
            for lr in pending:
                rid = lr.engine_request.request_id
                if self._live.pop(rid, None) is not None and engine.abort_request(
                    lr.engine_request
                ):
                    self.requests_aborted += 1

        # Nobody awaits an abort: a pod killed before applying it fails the future, and that
        # failure must be retrieved here or asyncio logs it as an error.
        self._call_between_steps(apply).add_done_callback(_retrieve)

    async def reset_prefix_cache(self) -> bool:
        """vLLM's ``reset_prefix_cache`` between steps; on success ``AllBlocksCleared`` is
        published at once. Fails (False) while any block is in use.

        Raises:
            ConnectionError: The pod is not running.
        """

        def apply() -> bool:
            engine = self.engine
            if engine is None:
                return False
            ok = engine.reset_prefix_cache()
            events = engine.pool.take_events()
            if events:
                self._publish(events)
            return ok

        result: bool = await self._call_between_steps(apply)
        return result

    def _call_between_steps(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        if not self.running or self._wake is None:
            raise ConnectionError("the pod is not running")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops.append((fn, fut))
        self._wake.set()
        return fut

    # -- the step task ----------------------------------------------------------------------------

    def _virtual(self, t: float) -> float:
        return (t - self._epoch) * self.speedup

    def _run_ops(self) -> None:
        ops, self._ops = self._ops, []
        for fn, fut in ops:
            try:
                result = fn()
            except Exception as exc:
                logger.exception("%s: between-steps operation failed", self.name)
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(result)

    async def _run(self) -> None:
        """vLLM's busy loop in real time: step while there is work, sleep otherwise."""
        engine = self.engine
        wake = self._wake
        assert engine is not None and wake is not None
        loop = asyncio.get_running_loop()
        speedup = self.speedup
        deadline: float | None = None
        while True:
            if not self._ops and not engine.has_work():
                deadline = None
                wake.clear()
                await wake.wait()
            if self._ops:
                self._run_ops()
            if not engine.has_work():
                continue
            try:
                now = loop.time()
                start = now if deadline is None else max(deadline, now - MAX_CATCH_UP_S)
                duration = engine.begin_step(self._virtual(now))
                deadline = start + duration / speedup
                delay = deadline - loop.time()
                # NOTE: always yield, even for a step already due, so HTTP handlers run.
                await asyncio.sleep(delay if delay > 0 else 0)
                out = engine.finish_step(self._virtual(loop.time()))
                if out.events:
                    self._publish(out.events)
                self._deliver(out)
            except asyncio.CancelledError:
                raise
            except Exception:
                # NOTE: the engine's state cannot be trusted after a failed step (vLLM's engine
                # core dies too): fail every open request and refuse new ones.
                logger.exception("%s: engine step failed; the pod stops serving", self.name)
                self._fail_all("the emulated engine failed")
                return

    def _publish(self, events: Sequence[KVEvent]) -> None:
        publisher = self.publisher
        if publisher is None:
            return
        payload = self._encoder.encode(time.time(), events, 0)
        try:
            publisher.publish(payload)
        except Exception:
            logger.exception("%s: publishing a KV-event batch failed", self.name)
            return
        self.batches_published += 1
        self.bytes_published += len(payload)

    def _deliver(self, out: StepOutput) -> None:
        live = self._live
        if not live:
            return
        engine = self.engine
        assert engine is not None
        for batch in (engine.running, out.finished):
            for r in batch:
                lr = live.get(r.request_id)
                if lr is None:
                    continue
                n = r.num_output_tokens
                done = r.status is RequestStatus.FINISHED
                if n == lr.sent and not done:
                    continue
                lr.sent = n
                if done:
                    del live[r.request_id]
                    lr.job.finished += 1
                    self.requests_finished += 1
                lr.job.queue.put_nowait((lr.index, n, done))

    def _fail_all(self, message: str) -> None:
        self.failed = message
        failure = PodFailure(message)
        jobs = {id(lr.job): lr.job for lr in self._live.values()}
        self._live.clear()
        for job in jobs.values():
            job.queue.put_nowait(failure)

    # -- tokenization ---------------------------------------------------------------------------

    async def tokenize(
        self,
        prompt: str | None = None,
        messages: Sequence[Any] | None = None,
        **options: Any,
    ) -> list[int]:
        """Token ids of a text prompt or chat messages, as vLLM computes them (off the loop).

        Raises:
            LookupError: The pod has no tokenizer.
            ValueError: Malformed messages or options (a 400).
        """
        if self.tokenization is None:
            raise LookupError(
                "this emulated pod has no tokenizer (start it with --tokenizer); "
                "send the prompt as token ids"
            )
        ids = await self.tokenization.atokenize(
            self.model, prompt=prompt, messages=messages, **options
        )
        return ids


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
