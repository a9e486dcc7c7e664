"""The `Gateway`: an aiohttp server that schedules each OpenAI request and proxies it to the pick.

This module wires the parts and runs the server (routes, start, drain); each step of a request
lives in its own module. Per inference request (``POST /v1/completions``,
``POST /v1/chat/completions``):

1. intake (`intake`): the credential, the body (``maxBodyBytes``, else 413) and what routing
   needs from it (400 on bad input, in the OpenAI error shape; the body itself is forwarded
   unchanged), the chat template and prompt bounds;
2. resolve ``model`` to the endpoints serving it (`resolve`, over the `ModelCatalog`; 404 when
   none does) and leave out pods that refused a connection in the last ``unhealthyCooldown``
   seconds;
3. `Scheduler.aschedule` (tokenization off the event loop; pre-request hooks count the request
   in flight and record speculative index entries), shielded from the client going away
   (`accounting`);
4. forward to the pick over the gateway's own pod connections (`forward`, `podstream`): a pod
   that cannot be connected to (or drops the connection before answering) is replaced by
   scheduling the same request again among the candidates left (at most ``maxAttempts`` pods);
5. relay the answer (`relay`, `sse`): non-streamed bodies as they are; SSE streams event by
   event, ending a stream that breaks off with an SSE error event and ``data: [DONE]``;
6. `Scheduler.post_response` exactly once, whatever happened (success, pod error, client
   disconnect, shutdown), with the usage the pod reported.

Also: ``GET /v1/models`` (union over the pool), ``GET /health`` (= ``/health/ready``: 503 when
no endpoint is usable) and ``GET /health/live``, ``GET /metrics`` (scheduler and gateway
metrics) and ``POST /v1/score`` (explains a decision without forwarding). `stop` drains: the
listening socket closes, in-flight requests get up to ``drainTimeout`` seconds to finish.
Defences below HTTP (connection cap, request-head timeout) are `guard`'s; docs/limits.md lists
every bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yarl
from aiohttp import web

from kvaware_scorer.errors import NoEndpointError, RequestRejectedError
from kvaware_scorer.gateway.accounting import decide_shielded
from kvaware_scorer.gateway.admin import AdminRoutes
from kvaware_scorer.gateway.answers import Answers, json_response
from kvaware_scorer.gateway.auth import Credentials
from kvaware_scorer.gateway.catalog import ModelCatalog
from kvaware_scorer.gateway.config import GatewayConfig
from kvaware_scorer.gateway.forward import Forwarder
from kvaware_scorer.gateway.guard import (
    ConnectionGuard,
    GuardedSite,
    LogLimiter,
    fit_connection_cap,
)
from kvaware_scorer.gateway.intake import RequestIntake
from kvaware_scorer.gateway.metrics import GatewayMetrics
from kvaware_scorer.gateway.protocol import APIError, ParsedRequest, RequestParser, error_body
from kvaware_scorer.gateway.relay import Attempt, Relay
from kvaware_scorer.gateway.resolve import Resolver
from kvaware_scorer.scheduler import (
    Endpoint,
    ResponseInfo,
    Scheduler,
    SchedulingRequest,
    SchedulingResult,
)
from kvaware_scorer.scheduler.manager import PoolListener
from kvaware_scorer.threadcpu import register_thread_cpu

__all__ = ["Gateway"]

logger = logging.getLogger(__name__)

#: Seconds the gateway waits at start for its tokenizers to load before it listens anyway.
WARM_UP_TIMEOUT = 10.0

#: Seconds the drain waits for decisions being made before answering their requests 503 (a
#: decision takes milliseconds; one still running is stuck, e.g. on a cold render worker).
_DECISION_GRACE = 1.0


def _shutting_down() -> APIError:
    return APIError(503, "The gateway is shutting down.", code="shutting_down")


class Gateway:
    """OpenAI-compatible routing proxy in front of the scheduler's endpoint pool.

    Args:
        scheduler: The scheduler; its pool (`Scheduler.set_endpoints` or
            `Scheduler.use_endpoints_file`) is the set of pods the gateway may contact.
        config: Gateway settings (defaults when None).
        own_scheduler: `stop` also closes the scheduler (set by `from_files`).

    Raises:
        ConfigError: A configured API or admin key source cannot be read or holds no key.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        config: GatewayConfig | None = None,
        *,
        own_scheduler: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.config = cfg = config if config is not None else GatewayConfig()
        self.own_scheduler = own_scheduler
        self.metrics = GatewayMetrics()
        register_thread_cpu(scheduler.metrics_registry)
        self.credentials = Credentials.load(
            cfg.api_key_file, cfg.api_key_env, cfg.admin_key_file, cfg.admin_key_env
        )
        self.log_limiter = LogLimiter(cfg.error_log_interval)
        self.parser = RequestParser()
        self.intake = RequestIntake(cfg, self.credentials)
        relay = Relay(
            cfg, self.metrics, self.log_limiter, scheduler.first_token, lambda: self._draining
        )
        self.forwarder = Forwarder(cfg, self.metrics, self.log_limiter, scheduler, relay)
        self.resolver = Resolver(scheduler, self.forwarder.cooldowns, cfg.models_refresh_interval)
        self.answers = Answers(self.metrics)
        self.admin = AdminRoutes(
            scheduler,
            self.metrics,
            self.answers,
            self.intake,
            self.parser,
            self.resolver,
            self.forwarder.cooldowns,
            lambda: self._catalog,
            lambda: (self._draining, len(self._forwarding)),
        )
        self._guard: ConnectionGuard | None = None
        self._loop_handler: Any = None
        self._catalog: ModelCatalog | None = None
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener = PoolListener(scheduler, self._pool_changed)
        self._listener_registered = False
        self._scheduler_started = False
        self._forwarding: set[asyncio.Task[Any]] = set()  # handlers of scheduled requests
        self._deciding: set[asyncio.Task[Any]] = set()  # handlers awaiting their decision
        self._cut: set[asyncio.Task[Any]] = set()  # of those, the ones the drain answered 503
        self._draining = False
        self.host: str | None = None
        self.port: int | None = None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_files(
        cls,
        config: str | Path,
        endpoints: str | Path,
        gateway_config: GatewayConfig | None = None,
        *,
        scrape: bool = True,
        poll_interval: float = 1.0,
        scrape_interval: float | None = None,
        **scheduler_kw: Any,
    ) -> Gateway:
        """A gateway over a scheduler built from an EndpointPickerConfig file, with its pool
        taken from an endpoints file (watched for changes; pod metrics scraped).

        Args:
            config: EndpointPickerConfig YAML.
            endpoints: Endpoints YAML.
            gateway_config: Gateway settings.
            scrape: Scrape every pod's ``/metrics``.
            poll_interval: Seconds between checks of the endpoints file.
            scrape_interval: Seconds between pod-metrics scrapes (default: the shortest
                interval a configured plugin asks for).
            scheduler_kw: Passed to `Scheduler.from_yaml` (``seed``, ``clock``...).

        Raises:
            ConfigError: Invalid scheduler config or endpoints file, or a key source that
                cannot be read.
        """
        scheduler = Scheduler.from_yaml(config, **scheduler_kw)
        try:
            scheduler.use_endpoints_file(
                endpoints,
                poll_interval=poll_interval,
                scrape=scrape,
                scrape_interval=scrape_interval,
            )
            return cls(scheduler, gateway_config, own_scheduler=True)
        except BaseException:
            scheduler.close()
            raise

    def make_app(self) -> web.Application:
        """The aiohttp application (routes only; `start` runs it)."""
        app = web.Application(client_max_size=self.config.max_body_bytes)
        r = app.router
        r.add_post("/v1/completions", self._completions)
        r.add_post("/v1/chat/completions", self._chat)
        admin = self.admin
        r.add_post("/v1/score", admin.score)
        r.add_get("/v1/models", admin.models, allow_head=False)
        r.add_get("/health", admin.ready, allow_head=False)
        r.add_get("/health/ready", admin.ready, allow_head=False)
        r.add_get("/health/live", admin.live, allow_head=False)
        r.add_get("/metrics", admin.metrics_route, allow_head=False)
        # NOTE: a catch-all route instead of a middleware keeps the hot path free of a wrapper
        # while unknown paths and methods still get the OpenAI error shape.
        r.add_route("*", "/{tail:.*}", admin.unknown)
        return app

    # -- properties -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the running gateway (``http://host:port``)."""
        if self.port is None:
            raise RuntimeError("the gateway is not running")
        host = self.host or "127.0.0.1"
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return str(yarl.URL.build(scheme="http", host=host, port=self.port))

    @property
    def inflight(self) -> int:
        """Requests forwarded (or being forwarded) and not finished."""
        return len(self._forwarding)

    @property
    def draining(self) -> bool:
        """Whether `stop` has begun."""
        return self._draining

    @property
    def catalog(self) -> ModelCatalog:
        """The model catalog (exists once started)."""
        if self._catalog is None:
            raise RuntimeError("the gateway is not running")
        return self._catalog

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Start the scheduler's background work, poll the pods' models once, and listen.

        A scheduler part that fails to start (e.g. a KV-event subscriber) is logged and counted
        (``kvaware_gateway_lifecycle_errors``); the gateway serves anyway (the KV scorer then
        degrades to what it can see).

        Args:
            host: Listen address (default: the config's).
            port: Listen port (default: the config's; 0 = any free port, see `port`).
        """
        if self._runner is not None:
            raise RuntimeError("the gateway is already running")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._draining = False
        # NOTE: repeated loop errors (e.g. accept() failing at the open-file limit) are logged
        # once per errorLogInterval, not once per occurrence.
        self._loop_handler = loop.get_exception_handler()
        loop.set_exception_handler(self.log_limiter.loop_handler)
        self._open_session()
        await self._start_scheduler()
        try:
            await self.catalog.refresh(self.scheduler.endpoints)
            await self._warm_up()
            self.resolver.start(self.catalog)
            await self._listen(host, port)
        except BaseException:
            if self._runner is not None:
                runner, self._runner = self._runner, None
                await runner.cleanup()
            await self._close_resources()
            raise
        assert self._runner is not None
        addr = self._runner.addresses[0]
        self.host, self.port = str(addr[0]), int(addr[1])
        logger.info(
            "gateway listening on %s (%d endpoint(s))", self.url, len(self.scheduler.endpoints)
        )

    async def _warm_up(self) -> None:
        """Load the pool's tokenizers before listening (at most `WARM_UP_TIMEOUT` seconds; a
        slower load goes on in the background), so the first requests do not pay for it."""
        models = self.catalog.base_models(self.scheduler.endpoints)
        if not models:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(self.scheduler.warm, models), WARM_UP_TIMEOUT)
        except TimeoutError:
            logger.warning(
                "warming the tokenizers of %s took over %.0fs; listening anyway",
                ", ".join(models),
                WARM_UP_TIMEOUT,
            )

    def _open_session(self) -> None:
        """The pooled client session toward the pods, and the model catalog polled over it."""
        session = self.forwarder.open_session()
        self._catalog = ModelCatalog(
            session, timeout=self.config.models_timeout, metrics=self.metrics
        )
        self.forwarder.catalog = self._catalog

    async def _start_scheduler(self) -> None:
        self.scheduler.hooks.pm.register(self._listener)
        self._listener_registered = True
        try:
            await asyncio.to_thread(self.scheduler.start)
            self._scheduler_started = True
        except Exception:
            self.metrics.lifecycle_errors.labels("start").inc()
            logger.exception(
                "the scheduler's background work did not start (KV events, endpoints-file "
                "watching or metrics scraping may be off); serving anyway"
            )

    async def _listen(self, host: str | None, port: int | None) -> None:
        """Serve the app on a guarded TCP site (sets ``_runner``)."""
        cfg = self.config
        self._runner = web.AppRunner(
            self.make_app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=cfg.drain_timeout,
            keepalive_timeout=cfg.keepalive_timeout,
            # NOTE: compressed bodies are inflated by `RequestIntake.read_body`, incrementally
            # and only up to maxBodyBytes; aiohttp would inflate them whole first.
            auto_decompress=False,
        )
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        self._guard = guard = ConnectionGuard(
            server,
            fit_connection_cap(cfg.max_client_connections),
            cfg.header_timeout,
            self._connection_rejected,
        )
        self.metrics.client_connections.set_function(lambda: len(guard.open))
        site = GuardedSite(
            self._runner,
            guard,
            host=host if host is not None else cfg.host,
            port=cfg.port if port is None else port,
            backlog=1024,
            reuse_address=True,
        )
        await site.start()

    async def stop(self) -> None:
        """Drain and stop: stop listening, let in-flight requests finish (up to
        ``drainTimeout`` seconds, then cancel them), then release everything; idempotent."""
        if self._runner is None:
            return
        self._draining = True
        if self._forwarding:
            logger.info(
                "draining %d in-flight request(s) (up to %.1fs)",
                len(self._forwarding),
                self.config.drain_timeout,
            )
        runner, self._runner = self._runner, None
        try:
            for site in list(runner.sites):
                await site.stop()  # no new connections; open ones get 503 while draining
            await self._cut_decisions(min(_DECISION_GRACE, self.config.drain_timeout))
            await self._drain(self.config.drain_timeout)
            await runner.cleanup()
        finally:
            await self._close_resources()
            self.port = None
        logger.info("gateway stopped")

    async def _cut_decisions(self, grace: float) -> None:
        """Give requests still being scheduled `grace` seconds, then answer them 503
        ``shutting_down`` (their decision is released when it ends, see `_abandoned`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._deciding and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for task in list(self._deciding):
            self._cut.add(task)
            task.cancel()

    async def _drain(self, timeout: float) -> None:
        """Wait up to `timeout` s for the forwarded requests to finish, then cancel the rest
        while their connections are still open, so that a cut stream can still say so."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._forwarding and loop.time() < deadline:
            await asyncio.sleep(0.02)
        tasks = list(self._forwarding)
        if not tasks:
            return
        logger.warning("drain timeout: cancelling %d in-flight request(s)", len(tasks))
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=2.0)

    def _connection_rejected(self, reason: str) -> None:
        self.metrics.rejected_connections.labels(reason).inc()
        self.log_limiter.log(
            logger, logging.WARNING, "conn:" + reason, "client connection refused: %s", reason
        )

    async def _close_resources(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.set_exception_handler(self._loop_handler)
        await self.resolver.close()
        await self.forwarder.close_session()
        if self._listener_registered:
            try:
                self.scheduler.hooks.pm.unregister(self._listener)
            except ValueError:
                pass
            self._listener_registered = False
        await self._stop_scheduler()

    async def _stop_scheduler(self) -> None:
        stop: Callable[[], None] | None = None
        if self.own_scheduler:
            stop = self.scheduler.close
        elif self._scheduler_started:
            stop = self.scheduler.stop
        self._scheduler_started = False
        if stop is not None:
            try:
                await asyncio.to_thread(stop)
            except Exception:
                self.metrics.lifecycle_errors.labels("stop").inc()
                logger.exception("stopping the scheduler failed")

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- pool -----------------------------------------------------------------------------------

    def _pool_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        """Called from the scheduler's thread when the pool changed."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._apply_pool_change, added, removed)
        except RuntimeError:
            pass  # the loop closed in between

    def _apply_pool_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        gone = {e.id for e in removed}
        if gone:
            self.forwarder.forget(gone)
            if self._catalog is not None:
                self._catalog.forget(e.id for e in self.scheduler.endpoints)
        if added:
            self.resolver.endpoints_added()

    def usable_endpoints(self) -> int:
        """Endpoints of the pool a request could be sent to now: not in their connection-failure
        cooldown, and not found unreachable by their last ``/v1/models`` poll or request."""
        return self.admin.usable_endpoints()

    # -- inference routes ----------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(
            request, "/v1/completions", "completions", self.parser.completion
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(
            request, "/v1/chat/completions", "chat_completions", self.parser.chat
        )

    async def _inference(
        self,
        request: web.Request,
        path: str,
        route: str,
        parse: Callable[[bytes], ParsedRequest],
    ) -> web.StreamResponse:
        t0 = time.perf_counter()
        if self._draining:
            return self.answers.error(route, _shutting_down(), t0, close=True)
        denied = self.intake.deny(request, admin=False)
        if denied is not None:
            return self.answers.denied(route, denied, t0)
        try:
            body = await self.intake.read_body(request)
            parsed = parse(body)
            self.intake.check_request(parsed)
            res = await self.resolver.resolve(parsed.model)
        except APIError as err:
            return self.answers.error(route, err, t0, close=err.status in (408, 413))
        sreq = self.intake.scheduling_request(request, parsed, res)
        result = await self._decide(route, sreq, res.endpoints, t0)
        if isinstance(result, web.Response):
            return result
        return await self._serve(
            request, path, route, body, sreq, res.endpoints, result, t0, parsed.stream
        )

    async def _decide(
        self, route: str, sreq: SchedulingRequest, candidates: list[Endpoint], t0: float
    ) -> SchedulingResult | web.Response:
        """The decision for `sreq`, or the error answer when there is none (the drain cut it,
        the request was shed, no endpoint can serve it, scheduling failed)."""
        task = asyncio.current_task()
        assert task is not None  # a request handler runs in a task
        self._deciding.add(task)
        try:
            return await decide_shielded(self.scheduler, sreq, candidates, self._abandoned)
        except asyncio.CancelledError:
            if task not in self._cut:
                raise
            task.uncancel()
            return self.answers.error(route, _shutting_down(), t0, close=True)
        except RequestRejectedError as exc:
            # NOTE: shed by admission or flow control (upstream answers 429, or 503 when no
            # endpoint exists).
            return self.answers.error(
                route, APIError(exc.status, f"Request rejected: {exc}", code="rejected"), t0
            )
        except NoEndpointError as exc:
            return self.answers.error(
                route,
                APIError(503, f"No endpoint can serve this request: {exc}", code="no_endpoint"),
                t0,
            )
        except Exception:
            logger.exception("%s: scheduling failed", sreq.request_id)
            return self.answers.error(
                route, APIError(500, "Scheduling failed.", code="internal_error"), t0
            )
        finally:
            self._deciding.discard(task)
            self._cut.discard(task)

    async def _serve(
        self,
        request: web.Request,
        path: str,
        route: str,
        body: bytes,
        sreq: SchedulingRequest,
        candidates: list[Endpoint],
        result: SchedulingResult,
        t0: float,
        stream: bool,
    ) -> web.StreamResponse:
        """Forward a scheduled request and account for it: `Scheduler.post_response` runs
        exactly once, whatever happens (pod failure, client disconnect, cancellation at
        shutdown)."""
        task = asyncio.current_task()
        assert task is not None
        attempt = Attempt(result, sreq)
        info = ResponseInfo(status=0)
        self._forwarding.add(task)
        self.metrics.inflight.inc()
        try:
            try:
                self.intake.check_scheduled(sreq)
            except APIError as err:
                assert err.code is not None
                self.metrics.rejected.labels(err.code).inc()
                info.status, info.error = err.status, err.message
                return json_response(err.body(), err.status)
            return await self.forwarder.forward(
                request, path, body, sreq, candidates, attempt, info, t0, stream
            )
        except asyncio.CancelledError:
            if not info.error:
                info.error = "gateway shutting down" if self._draining else "client disconnected"
            info.status = 499
            self.metrics.client_disconnects.inc()
            raise
        except Exception as exc:
            logger.exception("%s: forwarding failed", sreq.request_id)
            info.status, info.error = 500, f"gateway error: {exc!r}"
            if attempt.started:
                raise
            return json_response(
                error_body("Internal gateway error.", "server_error", None, "internal_error"), 500
            )
        finally:
            self._forwarding.discard(task)
            self.metrics.inflight.dec()
            self.scheduler.post_response(sreq, attempt.result, info)
            self.answers.count(route, info.status or 500, t0)

    def _abandoned(self, sreq: SchedulingRequest, result: SchedulingResult) -> None:
        """Release a decision whose request was cancelled while it was being made."""
        self.metrics.client_disconnects.inc()
        error = "gateway shutting down" if self._draining else "client disconnected"
        self.scheduler.post_response(sreq, result, ResponseInfo(status=499, error=error))
