"""The `Gateway`: an aiohttp server that schedules each OpenAI request and proxies it to the pick.

Per inference request (``POST /v1/completions``, ``POST /v1/chat/completions``):

1. read the body (``maxBodyBytes``, else 413) and parse what routing needs (400 on bad input,
   in the OpenAI error shape; the body itself is forwarded unchanged);
2. resolve ``model`` to the endpoints serving it (`ModelCatalog`; 404 when none does) and leave
   out pods that refused a connection in the last ``unhealthyCooldown`` seconds;
3. `Scheduler.aschedule` (tokenization off the event loop; pre-request hooks count the request
   in flight and record speculative index entries);
4. forward to the pick over one pooled `aiohttp.ClientSession`. Only endpoints of the pool are
   ever contacted: the target is always an `Endpoint` the scheduler chose, never anything from
   the request. A pod that cannot be connected to (or drops the connection before answering) is
   replaced by scheduling the same request again among the candidates left (at most
   ``maxAttempts`` pods; tokens and block keys are reused, in-flight accounting moves);
5. relay the answer: non-streamed bodies as they are; SSE streams chunk by chunk as bytes
   arrive (only an incomplete trailing event is held until its end arrives, so a pod dying
   mid-event never leaves a torn event). A stream that breaks off gets a final SSE error event
   and ``data: [DONE]``;
6. `Scheduler.post_response` exactly once, whatever happened (success, pod error, client
   disconnect, shutdown), with the usage the pod reported (``prompt_tokens``,
   ``prompt_tokens_details.cached_tokens``, ``completion_tokens``).

Also: ``GET /v1/models`` (union over the pool), ``GET /health`` (= ``/health/ready``: 503 when
no endpoint is usable) and ``GET /health/live``, ``GET /metrics`` (scheduler and gateway
metrics) and ``POST /v1/score`` (explains a decision without forwarding). `stop` drains: the
listening socket closes, in-flight requests get up to ``drainTimeout`` seconds to finish.

Defences (docs/limits.md lists every bound): API keys on the inference routes and an admin
credential on ``/v1/score`` and ``/metrics`` (`auth`); a client-connection cap and a request-head
timeout below HTTP (`guard`); compressed bodies inflated only up to the body cap (`body`);
prompt size bounds before and after tokenization; a request's own ``chat_template`` refused
unless trusted; time-to-first-byte and stream-idle timeouts toward the pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import yarl
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvaware_scorer.errors import NoEndpointError, RequestRejectedError
from kvaware_scorer.gateway.auth import Access, Credentials
from kvaware_scorer.gateway.body import decode_body
from kvaware_scorer.gateway.catalog import ModelCatalog, Resolution
from kvaware_scorer.gateway.config import GatewayConfig
from kvaware_scorer.gateway.explainer import explain
from kvaware_scorer.gateway.guard import ConnectionGuard, LogLimiter, fit_connection_cap
from kvaware_scorer.gateway.metrics import GatewayMetrics
from kvaware_scorer.gateway.protocol import APIError, ParsedRequest, RequestParser, error_body
from kvaware_scorer.scheduler import (
    ROUTING_HEADERS,
    Endpoint,
    ResponseInfo,
    Scheduler,
    SchedulingRequest,
    SchedulingResult,
    hookimpl,
)

__all__ = ["Gateway"]

logger = logging.getLogger(__name__)

#: Hop-by-hop headers (RFC 9110 §7.6.1) and framing: never passed on in either direction.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
#: Request headers never forwarded: hop-by-hop ones, those the client library sets itself,
#: Accept-Encoding (pods answer uncompressed so usage can be read and SSE is never held back by
#: a compressor), Content-Type (the body was parsed as JSON, so it is sent as
#: application/json whatever the client declared, e.g. curl's form default) and
#: Content-Encoding (the server decodes a compressed body before the gateway reads it, and the
#: decoded body is what is forwarded).
_DROP_REQUEST = _HOP_BY_HOP | {
    "host",
    "proxy-authorization",
    "accept-encoding",
    "content-type",
    "content-encoding",
    "expect",
}
#: Response headers never relayed: hop-by-hop ones, the encoding (the client session decodes)
#: and those the gateway's server sets itself.
_DROP_RESPONSE = _HOP_BY_HOP | {"content-encoding", "date", "server"}


def _sse_error(message: str, status: int, torn: bool) -> bytes:
    """A final SSE error event (OpenAI error shape) and ``[DONE]``; `torn`: the bytes relayed
    so far end inside an event, which the leading blank line closes."""
    err = error_body(message, "server_error", None, status)
    return (
        (b"\n\n" if torn else b"") + b"data: " + msgspec.json.encode(err) + b"\n\ndata: [DONE]\n\n"
    )


_ROUTES = {
    "/v1/completions": "POST",
    "/v1/chat/completions": "POST",
    "/v1/score": "POST",
    "/v1/models": "GET",
    "/health": "GET",
    "/health/live": "GET",
    "/health/ready": "GET",
    "/metrics": "GET",
}
#: Seconds the drain waits for decisions being made before answering their requests 503 (a
#: decision takes milliseconds; one still running is stuck, e.g. on a cold render worker).
_DECISION_GRACE = 1.0
#: Compressed bodies up to this size are inflated on the event loop, larger ones in a thread.
_INLINE_INFLATE = 1 << 16
#: Largest incomplete SSE event held back; a pod that never ends its events is relayed as is.
_MAX_HELD = 1 << 20
#: Seconds between on-demand polls of endpoints that never listed their models.
_UNKNOWN_POLL_INTERVAL = 1.0
_JSON = "application/json"


def _ends_stream(events: bytes) -> bool:
    """Whether SSE data starting at an event boundary holds the ``data: [DONE]`` sentinel.

    NOTE: a line of its own, not the bytes anywhere: generated text may contain "[DONE]" (even
    "data: [DONE]"), and JSON escapes its newlines, so only a real line starts with it.
    """
    for sentinel in (b"data: [DONE]", b"data:[DONE]"):
        if events.startswith(sentinel) or b"\n" + sentinel in events:
            return True
    return False


class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _Details | None = None


class _Envelope(msgspec.Struct):
    usage: _Usage | None = None


class _PoolListener:
    """Hook implementation that tells the gateway (on its loop) when the pool changes."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @hookimpl
    def kvaware_endpoints_changed(
        self, scheduler: Scheduler, added: Sequence[Endpoint], removed: Sequence[Endpoint]
    ) -> None:
        if scheduler is self.gateway.scheduler:
            self.gateway._pool_changed(list(added), list(removed))


class _Attempt:
    """The current decision of a request (it changes when a retry schedules it again)."""

    __slots__ = ("first_token", "request", "result", "started")

    def __init__(self, result: SchedulingResult, request: SchedulingRequest) -> None:
        self.result = result
        self.request = request
        self.started = False  # response headers sent to the client
        self.first_token = False  # reported to the scheduler


class _GuardedSite(web.TCPSite):
    """A TCP site whose connections go through a `ConnectionGuard` first."""

    __slots__ = ("_factory",)

    def __init__(self, runner: web.AppRunner, factory: ConnectionGuard, **kw: Any) -> None:
        super().__init__(runner, **kw)
        self._factory = factory

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]


def _message_chars(parsed: ParsedRequest) -> int:
    """Characters of a chat request's text: message contents, tools and template kwargs."""
    n = 0
    for message in parsed.messages or ():
        content = message.get("content")
        if isinstance(content, str):
            n += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    n += len(part["text"])
                elif isinstance(part, str):
                    n += len(part)
    for key in ("tools", "chat_template_kwargs"):
        value = parsed.chat.get(key)
        if value:
            n += len(msgspec.json.encode(value))
    return n


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
        self.config = config if config is not None else GatewayConfig()
        self.own_scheduler = own_scheduler
        self.metrics = GatewayMetrics()
        cfg = self.config
        self.credentials = Credentials.load(
            cfg.api_key_file, cfg.api_key_env, cfg.admin_key_file, cfg.admin_key_env
        )
        self.log_limiter = LogLimiter(cfg.error_log_interval)
        self._guard: ConnectionGuard | None = None
        self._loop_handler: Any = None
        self.parser = RequestParser()
        self._envelope = msgspec.json.Decoder(_Envelope)
        self._session: aiohttp.ClientSession | None = None
        self._catalog: ModelCatalog | None = None
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._models_task: asyncio.Task[None] | None = None
        self._models_wake: asyncio.Event | None = None
        self._unknown_poll: asyncio.Future[None] | None = None
        self._unknown_polled = -math.inf
        self._listener = _PoolListener(self)
        self._listener_registered = False
        self._scheduler_started = False
        self._forwarding: set[asyncio.Task[Any]] = set()  # handlers of scheduled requests
        self._deciding: set[asyncio.Task[Any]] = set()  # handlers awaiting their decision
        self._cut: set[asyncio.Task[Any]] = set()  # of those, the ones the drain answered 503
        self._draining = False
        self._down: dict[str, float] = {}
        self._urls: dict[tuple[str, str], yarl.URL] = {}
        self._prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count(1)
        self._counted: dict[tuple[str, int], Any] = {}
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.config.connect_timeout,
            sock_read=self.config.read_timeout or None,
        )
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
            scheduler_kw: Passed to `Scheduler.from_yaml` (``seed``, ``clock``...).

        Raises:
            ConfigError: Invalid scheduler config or endpoints file, or a key source that
                cannot be read.
        """
        scheduler = Scheduler.from_yaml(config, **scheduler_kw)
        try:
            scheduler.use_endpoints_file(endpoints, poll_interval=poll_interval, scrape=scrape)
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
        r.add_post("/v1/score", self._score)
        r.add_get("/v1/models", self._models, allow_head=False)
        r.add_get("/health", self._ready, allow_head=False)
        r.add_get("/health/ready", self._ready, allow_head=False)
        r.add_get("/health/live", self._live, allow_head=False)
        r.add_get("/metrics", self._metrics, allow_head=False)
        # NOTE: a catch-all route instead of a middleware keeps the hot path free of a wrapper
        # while unknown paths and methods still get the OpenAI error shape.
        r.add_route("*", "/{tail:.*}", self._unknown)
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
        cfg = self.config
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._draining = False
        # NOTE: repeated loop errors (e.g. accept() failing at the open-file limit) are logged
        # once per errorLogInterval, not once per occurrence.
        self._loop_handler = loop.get_exception_handler()
        loop.set_exception_handler(self.log_limiter.loop_handler)
        connector = aiohttp.TCPConnector(
            limit=cfg.max_connections,
            limit_per_host=cfg.max_connections_per_endpoint,
            keepalive_timeout=cfg.upstream_keepalive,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            skip_auto_headers=("Accept-Encoding",),
            # NOTE: cookies from one client must never reach another's requests.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._catalog = ModelCatalog(
            self._session, timeout=cfg.models_timeout, metrics=self.metrics
        )
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
        try:
            await self.catalog.refresh(self.scheduler.endpoints)
            self._models_wake = asyncio.Event()
            self._models_task = loop.create_task(self._models_loop(), name="kvaware-models")
            app = self.make_app()
            self._runner = web.AppRunner(
                app,
                handler_cancellation=True,
                access_log=None,
                shutdown_timeout=cfg.drain_timeout,
                keepalive_timeout=cfg.keepalive_timeout,
                # NOTE: compressed bodies are inflated by `_read_body`, incrementally and only
                # up to maxBodyBytes; aiohttp would inflate them whole first.
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
            site = _GuardedSite(
                self._runner,
                guard,
                host=host if host is not None else cfg.host,
                port=cfg.port if port is None else port,
                backlog=1024,
                reuse_address=True,
            )
            await site.start()
        except BaseException:
            if self._runner is not None:
                runner, self._runner = self._runner, None
                await runner.cleanup()
            await self._close_resources()
            raise
        addr = self._runner.addresses[0]
        self.host, self.port = str(addr[0]), int(addr[1])
        logger.info(
            "gateway listening on %s (%d endpoint(s))", self.url, len(self.scheduler.endpoints)
        )

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
        if self._unknown_poll is not None:
            self._unknown_poll.cancel()
            self._unknown_poll = None
        if self._models_task is not None:
            self._models_task.cancel()
            try:
                await self._models_task
            except asyncio.CancelledError:
                pass
            self._models_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._listener_registered:
            try:
                self.scheduler.hooks.pm.unregister(self._listener)
            except ValueError:
                pass
            self._listener_registered = False
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

    # -- pool and models ------------------------------------------------------------------------

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
            for key in [k for k in self._urls if k[0] in gone]:
                del self._urls[key]
            for eid in gone:
                self._down.pop(eid, None)
            if self._catalog is not None:
                self._catalog.forget(e.id for e in self.scheduler.endpoints)
        if added and self._models_wake is not None:
            self._models_wake.set()

    async def _models_loop(self) -> None:
        wake = self._models_wake
        assert wake is not None
        interval = self.config.models_refresh_interval
        while True:
            try:
                await asyncio.wait_for(wake.wait(), interval)
            except TimeoutError:
                pass
            wake.clear()
            try:
                await self.catalog.refresh(self.scheduler.endpoints)
            except Exception:
                logger.exception("refreshing the model catalog failed")

    async def _resolve(self, model: str) -> Resolution:
        """The candidates for `model`, without pods in their connection-failure cooldown.

        When no endpoint is known to serve `model` but some never listed their models (a pod
        still starting), those are polled now (one poll shared by concurrent requests, at most
        one per second) rather than failing until the next periodic refresh.

        Raises:
            APIError: 503 when the pool is empty or only endpoints that never listed their
                models could serve `model`, 404 when no endpoint serves it.
        """
        pool = self.scheduler.endpoints
        if not pool:
            raise APIError(503, "No endpoints are available.", code="no_endpoint")
        catalog = self.catalog
        res = catalog.resolve(model, pool)
        if not res.endpoints:
            unknown = [e for e in pool if not e.model and not catalog.known(e.id)]
            if unknown:
                await self._poll_unknown(unknown)
                res = catalog.resolve(model, pool)
                unknown = [e for e in unknown if not catalog.known(e.id)]
        if not res.endpoints:
            if unknown:
                raise APIError(
                    503,
                    f"No endpoint serving the model `{model}` is ready: {len(unknown)} "
                    "endpoint(s) have not listed their models yet.",
                    param="model",
                    code="model_not_ready",
                )
            raise APIError(
                404,
                f"The model `{model}` does not exist or is not served by any endpoint.",
                param="model",
                code="model_not_found",
            )
        down = self._down
        if down:
            now = time.monotonic()
            for eid in [k for k, until in down.items() if until <= now]:
                del down[eid]
            if down:
                up = [e for e in res.endpoints if e.id not in down]
                # NOTE: when every candidate failed recently, try them anyway: a pod that is
                # back must not wait out its cooldown while clients get errors.
                if up:
                    res.endpoints = up
        return res

    async def _poll_unknown(self, unknown: list[Endpoint]) -> None:
        task = self._unknown_poll
        if task is None:
            if time.monotonic() - self._unknown_polled < _UNKNOWN_POLL_INTERVAL:
                return
            task = self._unknown_poll = asyncio.ensure_future(self._poll_endpoints(unknown))
        # NOTE: shielded: a client going away must not cancel the poll other requests await.
        await asyncio.shield(task)

    async def _poll_endpoints(self, endpoints: list[Endpoint]) -> None:
        try:
            await asyncio.gather(*(self.catalog.poll(e) for e in endpoints))
        finally:
            self._unknown_polled = time.monotonic()
            self._unknown_poll = None

    def _scheduling_request(
        self, request: web.Request, parsed: ParsedRequest, res: Resolution
    ) -> SchedulingRequest:
        headers = {k.lower(): v for k, v in request.headers.items()}
        return SchedulingRequest(
            request_id=f"{self._prefix}-{next(self._ids)}",
            model=res.model,
            token_ids=parsed.token_ids,
            prompt=parsed.prompt,
            messages=parsed.messages,
            lora_name=res.lora_name,
            cache_salt=parsed.cache_salt,
            headers=headers,
            chat=parsed.chat,
        )

    # -- responses ------------------------------------------------------------------------------

    def _count(self, route: str, status: int, t0: float) -> None:
        key = (route, status // 100)
        child = self._counted.get(key)
        if child is None:
            child = self._counted[key] = (
                self.metrics.requests.labels(route, f"{status // 100}xx"),
                self.metrics.duration.labels(route),
            )
        child[0].inc()
        child[1].observe(time.perf_counter() - t0)

    def _error(self, route: str, err: APIError, t0: float, *, close: bool = False) -> web.Response:
        self._count(route, err.status, t0)
        if err.status < 500 and err.code is not None:
            self.metrics.rejected.labels(err.code).inc()
        resp = web.Response(
            body=msgspec.json.encode(err.body()), status=err.status, content_type=_JSON
        )
        if close:
            resp.force_close()
        return resp

    @staticmethod
    def _json(data: Any, status: int = 200) -> web.Response:
        return web.Response(body=msgspec.json.encode(data), status=status, content_type=_JSON)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.max_body_bytes
        length = request.content_length
        too_large = APIError(
            413,
            f"The request body exceeds the limit of {limit} bytes.",
            code="request_too_large",
        )
        if length is not None and length > limit:
            raise too_large
        try:
            data = await asyncio.wait_for(request.read(), self.config.body_timeout)
        except TimeoutError:
            raise APIError(
                408,
                f"The request body did not arrive within {self.config.body_timeout:g} s.",
                code="request_timeout",
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        except (aiohttp.ClientPayloadError, ValueError) as exc:
            raise APIError(400, f"Could not read the request body: {exc}") from None
        encoding = request.headers.get("Content-Encoding")
        if encoding is None:
            return data
        if len(data) <= _INLINE_INFLATE:
            return decode_body(data, encoding, limit)
        return await asyncio.to_thread(decode_body, data, encoding, limit)

    def _check_request(self, parsed: ParsedRequest) -> None:
        """Refuse what must not reach tokenization: an untrusted chat template (400) and a
        prompt over ``maxPromptChars`` / ``maxPromptTokens`` (413).

        Raises:
            APIError: As above.
        """
        cfg = self.config
        chat = parsed.chat
        if not cfg.trust_request_chat_template and (
            "chat_template" in chat or "chat_template" in (chat.get("chat_template_kwargs") or {})
        ):
            raise APIError(
                400,
                "Chat template is passed with the request, but the gateway does not trust "
                "request chat templates (trustRequestChatTemplate, "
                "--trust-request-chat-template). Refused request with untrusted chat template.",
                param="chat_template",
                code="untrusted_chat_template",
            )
        if parsed.prompt is not None:
            chars = len(parsed.prompt)
        elif parsed.messages is not None:
            chars = _message_chars(parsed)
        else:
            chars = 0
        if chars > cfg.max_prompt_chars:
            raise APIError(
                413,
                f"The prompt has {chars} characters, more than the limit of "
                f"{cfg.max_prompt_chars}.",
                param="messages" if parsed.messages is not None else "prompt",
                code="prompt_too_large",
            )
        if parsed.token_ids is not None:
            self._check_tokens(len(parsed.token_ids))

    def _check_tokens(self, n: int) -> None:
        if n > self.config.max_prompt_tokens:
            raise APIError(
                413,
                f"The prompt has {n} tokens, more than the limit of "
                f"{self.config.max_prompt_tokens}.",
                param="prompt",
                code="prompt_too_large",
            )

    @staticmethod
    def _tokens_of(sreq: SchedulingRequest) -> int:
        """Tokens the scheduling of `sreq` computed (0 when none were)."""
        if not sreq.has_tokens:
            return 0
        return len(sreq.tokens(list))

    def _deny(self, request: web.Request, admin: bool) -> APIError | None:
        """The 401/403 for a request without the credential its route needs, else None."""
        creds = self.credentials
        if not admin and not creds.api:
            return None  # the common case: no API keys, nothing to read
        auth = request.headers.get("Authorization")
        access = creds.check_admin(auth, request.remote) if admin else creds.check_inference(auth)
        if access is Access.OK:
            return None
        if access is Access.MISSING:
            return APIError(
                401,
                "Incorrect or missing API key: send it as Authorization: Bearer <key>."
                if not admin
                else "This route needs the admin key: send it as Authorization: Bearer <key>.",
                code="invalid_api_key",
            )
        return APIError(
            403,
            "This route needs the admin key."
            if creds.admin
            else "This route is served to loopback clients only (no admin key is configured).",
            code="forbidden",
        )

    def _denied(self, route: str, err: APIError, t0: float) -> web.Response:
        resp = self._error(route, err, t0)
        if err.status == 401:
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    # -- routes -------------------------------------------------------------------------------------

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
            return self._error(
                route,
                APIError(503, "The gateway is shutting down.", code="shutting_down"),
                t0,
                close=True,
            )
        denied = self._deny(request, admin=False)
        if denied is not None:
            return self._denied(route, denied, t0)
        try:
            body = await self._read_body(request)
            parsed = parse(body)
            self._check_request(parsed)
            res = await self._resolve(parsed.model)
        except APIError as err:
            return self._error(route, err, t0, close=err.status in (408, 413))
        sreq = self._scheduling_request(request, parsed, res)
        # NOTE: the decision is shielded from the request's cancellation (a client going away,
        # the end of the drain): with a blocking-I/O plugin it runs in a worker thread that
        # cancellation cannot stop, whose pre-request hooks (in-flight count, speculative
        # entries) would then never be released. An abandoned decision is released when it ends.
        decision = asyncio.ensure_future(self.scheduler.aschedule(sreq, res.endpoints))
        task = asyncio.current_task()
        assert task is not None  # a request handler runs in a task
        self._deciding.add(task)
        try:
            result = await asyncio.shield(decision)
        except asyncio.CancelledError:
            decision.add_done_callback(functools.partial(self._abandoned, sreq))
            if task not in self._cut:
                raise
            task.uncancel()
            return self._error(
                route,
                APIError(503, "The gateway is shutting down.", code="shutting_down"),
                t0,
                close=True,
            )
        except RequestRejectedError as exc:
            # NOTE: shed by admission or flow control (upstream answers 429, or 503 when no
            # endpoint exists).
            return self._error(
                route, APIError(exc.status, f"Request rejected: {exc}", code="rejected"), t0
            )
        except NoEndpointError as exc:
            return self._error(
                route,
                APIError(503, f"No endpoint can serve this request: {exc}", code="no_endpoint"),
                t0,
            )
        except Exception:
            logger.exception("%s: scheduling failed", sreq.request_id)
            return self._error(
                route, APIError(500, "Scheduling failed.", code="internal_error"), t0
            )
        finally:
            self._deciding.discard(task)
            self._cut.discard(task)
        # NOTE: from here on the request is scheduled: post_response must run exactly once,
        # whatever happens (pod failure, client disconnect, cancellation at shutdown).
        attempt = _Attempt(result, sreq)
        info = ResponseInfo(status=0)
        self._forwarding.add(task)
        self.metrics.inflight.inc()
        try:
            try:
                self._check_tokens(self._tokens_of(sreq))
            except APIError as err:
                assert err.code is not None
                self.metrics.rejected.labels(err.code).inc()
                info.status, info.error = err.status, err.message
                return self._json(err.body(), err.status)
            return await self._forward(
                request, path, body, sreq, res.endpoints, attempt, info, t0, parsed.stream
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
            return self._json(
                error_body("Internal gateway error.", "server_error", None, "internal_error"), 500
            )
        finally:
            self._forwarding.discard(task)
            self.metrics.inflight.dec()
            self.scheduler.post_response(sreq, attempt.result, info)
            self._count(route, info.status or 500, t0)

    async def _forward(
        self,
        request: web.Request,
        path: str,
        body: bytes,
        sreq: SchedulingRequest,
        candidates: list[Endpoint],
        attempt: _Attempt,
        info: ResponseInfo,
        t0: float,
        stream: bool = False,
    ) -> web.StreamResponse:
        session = self._session
        assert session is not None
        cfg = self.config
        headers = self._forward_headers(request, sreq)
        failed: set[str] = set()
        # NOTE: vLLM starts a stream (headers) as soon as it accepts the request, but answers a
        # non-streamed one only once generation is done: two different first-byte bounds.
        first_byte = cfg.first_byte_timeout if stream else cfg.response_timeout
        self.metrics.overhead.observe(time.perf_counter() - t0)
        for name in ROUTING_HEADERS:
            headers.pop(name, None)
        while True:
            target = attempt.result.targets[0]
            url = self._url(target, path)
            try:
                # NOTE: a redirect is the pod's answer, relayed as is: following it would
                # contact a host outside the pool. The scheduler's routing headers (the P/D
                # prefill pick for the decode pod's sidecar) go with each attempt's own pick.
                async with asyncio.timeout(first_byte):
                    resp = await session.post(
                        url,
                        data=body,
                        headers={**headers, **attempt.result.headers},
                        allow_redirects=False,
                    )
                break
            except (
                aiohttp.ClientConnectorError,
                aiohttp.ConnectionTimeoutError,
                aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError,
            ) as exc:
                connect = isinstance(
                    exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
                )
                kind = "connect" if connect else "disconnect"
                failure: BaseException = exc
            except aiohttp.SocketTimeoutError as exc:
                self.metrics.upstream_errors.labels(target.id, "timeout").inc()
                info.status, info.error = 504, f"{target.id}: {exc}"
                return self._json(
                    error_body(
                        f"The endpoint did not answer within {self.config.read_timeout}s.",
                        "server_error",
                        None,
                        "upstream_timeout",
                    ),
                    504,
                )
            except aiohttp.ClientError as exc:
                self.metrics.upstream_errors.labels(target.id, "protocol").inc()
                logger.warning(
                    "%s %s: invalid answer from %s: %s", sreq.request_id, path, target.id, exc
                )
                info.status, info.error = 502, f"{target.id}: {exc}"
                return self._json(
                    error_body(
                        "Invalid answer from the endpoint.",
                        "server_error",
                        None,
                        "upstream_error",
                    ),
                    502,
                )
            except TimeoutError as exc:
                # The pod accepted the connection but did not start answering in time.
                if not stream:
                    self.metrics.upstream_errors.labels(target.id, "timeout").inc()
                    self.log_limiter.log(
                        logger,
                        logging.WARNING,
                        f"timeout:{target.id}",
                        "%s %s: %s did not answer within %gs",
                        sreq.request_id,
                        path,
                        target.id,
                        first_byte,
                    )
                    info.status, info.error = 504, f"{target.id}: no answer in {first_byte:g}s"
                    return self._json(
                        error_body(
                            f"The endpoint did not answer within {first_byte:g}s.",
                            "server_error",
                            None,
                            "upstream_timeout",
                        ),
                        504,
                    )
                kind, connect, failure = "first_byte", True, exc
            # A pod that could not be reached (or did not start a stream in time): try another.
            self.metrics.upstream_errors.labels(target.id, kind).inc()
            self.log_limiter.log(
                logger,
                logging.WARNING,
                f"{kind}:{target.id}",
                "%s %s: %s failed (%s): %r",
                sreq.request_id,
                path,
                target.id,
                kind,
                failure,
            )
            if connect:
                self._catalog_unreachable(target.id)
                if cfg.unhealthy_cooldown > 0:
                    self._down[target.id] = time.monotonic() + cfg.unhealthy_cooldown
            failed.add(target.id)
            info.error = f"{target.id}: {failure!r}"
            remaining = [e for e in candidates if e.id not in failed]
            # NOTE: client-facing messages never name pod addresses; the log does.
            unreachable = error_body(
                f"Could not reach an endpoint for model `{sreq.lora_name or sreq.model}` "
                f"after {len(failed)} attempt(s).",
                "server_error",
                None,
                "upstream_unavailable",
            )
            if len(failed) >= cfg.max_attempts or not remaining:
                info.status = 502
                return self._json(unreachable, 502)
            retry = asyncio.ensure_future(self.scheduler.aschedule(sreq, remaining))
            try:
                attempt.result = await asyncio.shield(retry)
            except asyncio.CancelledError:
                # NOTE: as for the first decision (see `_inference`), but the request is
                # already counted: let the retry end (it moves the in-flight count), so
                # post_response releases the pick it made, not the pod that failed.
                try:
                    attempt.result = await retry
                except Exception:
                    pass
                raise
            except NoEndpointError:
                info.status = 502
                return self._json(unreachable, 502)
            self.metrics.retries.inc()
        if self._catalog is not None:
            self._catalog.mark(target.id, reachable=True)
        info.status = resp.status
        info.error = None
        if resp.content_type == "text/event-stream":
            return await self._relay_stream(request, resp, target, info, attempt)
        return await self._relay_body(resp, target, info, attempt.result.response_headers)

    def _catalog_unreachable(self, endpoint_id: str) -> None:
        if self._catalog is not None:
            self._catalog.mark(endpoint_id, reachable=False)

    def _abandoned(
        self, sreq: SchedulingRequest, decision: asyncio.Future[SchedulingResult]
    ) -> None:
        """Release a decision whose request was cancelled while it was being made."""
        if decision.cancelled() or decision.exception() is not None:
            return
        self.metrics.client_disconnects.inc()
        error = "gateway shutting down" if self._draining else "client disconnected"
        self.scheduler.post_response(sreq, decision.result(), ResponseInfo(status=499, error=error))

    def _url(self, target: Endpoint, path: str) -> yarl.URL:
        key = (target.id, path)
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = yarl.URL.build(
                scheme="http", host=target.address, port=target.port, path=path
            )
        return url

    @staticmethod
    def _forward_headers(request: web.Request, sreq: SchedulingRequest) -> dict[str, str]:
        src = sreq.headers
        drop: frozenset[str] | set[str] = _DROP_REQUEST
        conn = src.get("connection")
        if conn:
            # NOTE: headers named in Connection are hop-by-hop too (RFC 9110 §7.6.1).
            drop = _DROP_REQUEST | {t.strip().lower() for t in conn.split(",")}
        out = {k: v for k, v in src.items() if k not in drop}
        remote = request.remote
        if remote:
            prior = src.get("x-forwarded-for")
            out["x-forwarded-for"] = f"{prior}, {remote}" if prior else remote
        out["content-type"] = _JSON
        out.setdefault("x-request-id", sreq.request_id)
        return out

    def _response_headers(
        self,
        resp: aiohttp.ClientResponse,
        target: Endpoint,
        extra: Mapping[str, str] | None = None,
    ) -> CIMultiDict[str]:
        out: CIMultiDict[str] = CIMultiDict()
        drop: frozenset[str] | set[str] = _DROP_RESPONSE
        conn = resp.headers.get("connection")
        if conn:
            drop = _DROP_RESPONSE | {t.strip().lower() for t in conn.split(",")}
        for k, v in resp.headers.items():
            if k.lower() not in drop:
                out.add(k, v)
        if self.config.endpoint_header:
            out["x-kvaware-endpoint"] = target.id
        # NOTE: headers the scheduler's plugins set for the client (a session token).
        for k, v in (extra or {}).items():
            out[k] = v
        return out

    def _usage(self, info: ResponseInfo, usage: _Usage) -> None:
        m = self.metrics
        if usage.prompt_tokens is not None:
            info.prompt_tokens = usage.prompt_tokens
            m.prompt_tokens.inc(usage.prompt_tokens)
        if usage.completion_tokens is not None:
            info.completion_tokens = usage.completion_tokens
            m.completion_tokens.inc(usage.completion_tokens)
        details = usage.prompt_tokens_details
        if details is not None and details.cached_tokens is not None:
            info.cached_tokens = details.cached_tokens
            m.cached_tokens.inc(details.cached_tokens)

    def _usage_from_events(self, events: bytes) -> _Usage | None:
        found: _Usage | None = None
        for line in events.split(b"\n"):
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    env = self._envelope.decode(line[5:])
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                    continue
                if env.usage is not None:
                    found = env.usage
        return found

    async def _relay_body(
        self,
        resp: aiohttp.ClientResponse,
        target: Endpoint,
        info: ResponseInfo,
        extra: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        try:
            async with asyncio.timeout(self.config.stream_idle_timeout):
                data = await resp.read()
        except asyncio.CancelledError:
            resp.close()
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            resp.close()
            kind = "timeout" if isinstance(exc, TimeoutError) else "disconnect"
            self.metrics.upstream_errors.labels(target.id, kind).inc()
            info.status, info.error = 502, f"{target.id}: {exc!r}"
            logger.warning("answer from %s broke off: %r", target.id, exc)
            return self._json(
                error_body(
                    "The endpoint failed while answering.",
                    "server_error",
                    None,
                    "upstream_error",
                ),
                502,
            )
        finally:
            resp.release()
        if resp.status >= 400:
            info.error = data[:512].decode("utf-8", errors="replace")
        elif b'"usage"' in data:
            try:
                env = self._envelope.decode(data)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                env = None
            if env is not None and env.usage is not None:
                self._usage(info, env.usage)
        return web.Response(
            body=data, status=resp.status, headers=self._response_headers(resp, target, extra)
        )

    async def _relay_stream(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        target: Endpoint,
        info: ResponseInfo,
        attempt: _Attempt,
    ) -> web.StreamResponse:
        out = web.StreamResponse(
            status=resp.status,
            headers=self._response_headers(resp, target, attempt.result.response_headers),
        )
        content = resp.content
        held = b""  # an incomplete trailing event, relayed once its end arrives
        done = False  # data: [DONE] seen
        torn = False  # the last bytes relayed end inside an event (only past _MAX_HELD)
        usage: _Usage | None = None
        failure: str | None = None
        idle = self.config.stream_idle_timeout
        try:
            await out.prepare(request)
            attempt.started = True
            while True:
                try:
                    async with asyncio.timeout(idle):
                        chunk = await content.readany()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    kind = "timeout" if isinstance(exc, TimeoutError) else "mid_stream"
                    self.metrics.upstream_errors.labels(target.id, kind).inc()
                    failure = repr(exc)
                    break
                if not chunk:
                    if held and _ends_stream(held):
                        done = True
                        await out.write(held)
                    if not done:
                        self.metrics.upstream_errors.labels(target.id, "mid_stream").inc()
                        failure = "the stream ended without [DONE]"
                    break
                if held:
                    chunk = held + chunk
                    held = b""
                cut = chunk.rfind(b"\n\n")
                end = cut + 2 if cut >= 0 else 0
                if end == 0:
                    cut = chunk.rfind(b"\r\n\r\n")
                    end = cut + 4 if cut >= 0 else 0
                if end == len(chunk):
                    torn = False
                elif end == 0 and len(chunk) > _MAX_HELD:
                    torn = True  # a pod that never ends its events: relay it as it is
                else:
                    held = chunk[end:]
                    if end == 0:
                        continue
                    chunk = chunk[:end]
                    torn = False
                if b'"usage"' in chunk:
                    usage = self._usage_from_events(chunk) or usage
                if not done and _ends_stream(chunk):
                    done = True
                await out.write(chunk)
                if not attempt.first_token:
                    # NOTE: a stream's first event carries the first token: the prefill is over
                    # (predicted-ttft-scorer stops counting it as queued and learns from it).
                    attempt.first_token = True
                    self.scheduler.first_token(attempt.request, attempt.result)
            if failure is not None:
                info.error = f"{target.id}: {failure}"
                self.log_limiter.log(
                    logger,
                    logging.WARNING,
                    f"stream:{target.id}",
                    "stream from %s broke off: %s",
                    target.id,
                    failure,
                )
                await out.write(
                    _sse_error(
                        "The endpoint failed during the stream; the response is incomplete.",
                        502,
                        torn,
                    )
                )
            await out.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
            # The client went away: dropping the pod connection makes vLLM abort the request.
            resp.close()
            self.metrics.client_disconnects.inc()
            info.status, info.error = 499, f"client disconnected: {exc}"
            return out
        except asyncio.CancelledError:
            resp.close()
            if self._draining and out.prepared:
                # NOTE: the drain timed out: a last error event tells the client the response is
                # cut short (a bare broken connection looks like a network fault).
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        out.write(
                            _sse_error(
                                "The gateway shut down during the stream; "
                                "the response is incomplete.",
                                503,
                                torn,
                            )
                        ),
                        0.5,
                    )
            raise
        finally:
            if usage is not None:
                self._usage(info, usage)
            if failure is not None:
                resp.close()
            else:
                resp.release()
        return out

    async def _score(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        route = "score"
        denied = self._deny(request, admin=True)
        if denied is not None:
            return self._denied(route, denied, t0)
        try:
            body = await self._read_body(request)
            chat = self.parser.is_chat(body)
            parsed = self.parser.chat(body) if chat else self.parser.completion(body)
            self._check_request(parsed)
            res = await self._resolve(parsed.model)
        except APIError as err:
            return self._error(route, err, t0, close=err.status in (408, 413))
        sreq = self._scheduling_request(request, parsed, res)
        try:
            result = await self.scheduler.aschedule(sreq, res.endpoints, dry_run=True)
            self._check_tokens(self._tokens_of(sreq))
        except APIError as err:
            return self._error(route, err, t0)
        except NoEndpointError as exc:
            return self._error(
                route,
                APIError(503, f"No endpoint can serve this request: {exc}", code="no_endpoint"),
                t0,
            )
        except Exception:
            logger.exception("%s: explaining the decision failed", sreq.request_id)
            return self._error(
                route, APIError(500, "Scheduling failed.", code="internal_error"), t0
            )
        out = explain(result, res.endpoints)
        candidates = {e.id for e in res.endpoints}
        pool = self.scheduler.endpoints
        # NOTE: the cooldown is only why a pod serving the model was left out.
        serving = {e.id for e in self.catalog.resolve(parsed.model, pool).endpoints}
        excluded: dict[str, str] = {}
        for e in pool:
            if e.id in candidates:
                continue
            excluded[e.id] = (
                "connection refused recently"
                if e.id in serving and e.id in self._down
                else "does not serve the model"
            )
        out = {
            "object": "kvaware.score",
            "model": parsed.model,
            "scheduled_model": sreq.model,
            "lora_name": sreq.lora_name,
            "kind": "chat" if chat else "completion",
            "prompt_tokens": len(sreq.token_ids) if sreq.token_ids is not None else None,
            **out,
            "excluded": excluded,
        }
        self._count(route, 200, t0)
        return self._json(out)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        denied = self._deny(request, admin=False)
        if denied is not None:
            return self._denied("models", denied, time.perf_counter())
        return self._json({"object": "list", "data": self.catalog.models(self.scheduler.endpoints)})

    def usable_endpoints(self) -> int:
        """Endpoints of the pool a request could be sent to now: not in their connection-failure
        cooldown, and not found unreachable by their last ``/v1/models`` poll or request."""
        down = self._down
        now = time.monotonic()
        catalog = self._catalog
        n = 0
        for e in self.scheduler.endpoints:
            if down.get(e.id, 0.0) > now:
                continue
            if catalog is not None and not catalog.reachable(e.id):
                continue
            n += 1
        return n

    async def _ready(self, request: web.Request) -> web.StreamResponse:
        if self._draining:
            return self._json({"status": "draining", "inflight": len(self._forwarding)}, 503)
        usable = self.usable_endpoints()
        return self._json(
            {
                "status": "ok" if usable else "unavailable",
                "endpoints": len(self.scheduler.endpoints),
                "usable": usable,
                "inflight": len(self._forwarding),
            },
            200 if usable else 503,
        )

    async def _live(self, request: web.Request) -> web.StreamResponse:
        return self._json({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        denied = self._deny(request, admin=True)
        if denied is not None:
            return self._denied("metrics", denied, time.perf_counter())
        data = generate_latest(self.scheduler.metrics_registry) + generate_latest(
            self.metrics.registry
        )
        resp = web.Response(body=data)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _unknown(self, request: web.Request) -> web.StreamResponse:
        method = _ROUTES.get(request.path)
        if method is not None:
            resp = self._json(
                error_body(
                    f"Method {request.method} is not allowed on {request.path}; use {method}.",
                    "invalid_request_error",
                    None,
                    "method_not_allowed",
                ),
                405,
            )
            resp.headers["Allow"] = method
            return resp
        return self._json(
            error_body(f"Unknown path {request.path}.", "invalid_request_error", None, "not_found"),
            404,
        )
