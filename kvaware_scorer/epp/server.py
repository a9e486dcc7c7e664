"""The `EndpointPicker`: a ``grpc.aio`` ext_proc server over the shared `Scheduler`.

It serves, like the Go EPP:

* ``envoy.service.ext_proc.v3.ExternalProcessor/Process`` on ``grpcPort`` (TLS by default, a
  self-signed certificate unless a certificate directory is given), one stream per request
  (`kvaware_scorer.epp.stream`);
* the gRPC Health Checking Protocol on ``grpcHealthPort`` and on the ext_proc port (gateways
  health-check the ext_proc port itself), services ``liveness`` (always SERVING once started),
  ``readiness`` and ``envoy.service.ext_proc.v3.ExternalProcessor`` (SERVING once the pool is
  synced, NOT_SERVING while draining); an unknown service is ``SERVICE_UNKNOWN``;
* Prometheus ``/metrics`` on ``metricsPort`` (scheduler, indexer and EPP metrics).

`stop` drains: health turns NOT_SERVING, new streams are refused, streams in progress get up to
``drainTimeout`` seconds to end, then the scheduler stops.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvaware_scorer.epp.config import EppConfig
from kvaware_scorer.epp.metrics import EppMetrics
from kvaware_scorer.epp.stream import ProcessStream, StreamContext
from kvaware_scorer.epp.tls import load_certificate, self_signed
from kvaware_scorer.gateway.protocol import RequestParser
from kvaware_scorer.scheduler import Scheduler
from kvaware_scorer.scheduler.manager import PoolListener
from kvaware_scorer.threadcpu import register_thread_cpu

__all__ = ["EXT_PROC_SERVICE", "EndpointPicker"]

logger = logging.getLogger(__name__)

#: The ext_proc service name, as health-checked by gateways.
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class _Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """gRPC health with the Go EPP's services; `Watch` streams every change."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {
            "": _NOT_SERVING,
            "liveness": _NOT_SERVING,
            "readiness": _NOT_SERVING,
            EXT_PROC_SERVICE: _NOT_SERVING,
        }
        self._changed = asyncio.Event()

    def set(self, *, live: bool, ready: bool) -> None:
        self.status["liveness"] = _SERVING if live else _NOT_SERVING
        for name in ("", "readiness", EXT_PROC_SERVICE):
            self.status[name] = _SERVING if ready else _NOT_SERVING
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(self, request: Any, context: Any) -> Any:
        return health_pb2.HealthCheckResponse(status=self.status.get(request.service, _UNKNOWN))

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        last = None
        while True:
            status = self.status.get(request.service, _UNKNOWN)
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await self._changed.wait()


class _Processor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    # NOTE: grpc.aio recognizes a streaming handler by its being an async generator function;
    # the stream's own generator is the handler, so each message passes one generator.
    Process = ProcessStream.serve

    def __init__(self, picker: EndpointPicker) -> None:
        self.context = picker.context


class EndpointPicker:
    """The ext_proc Endpoint Picker over a scheduler's endpoint pool.

    Args:
        scheduler: The scheduler; its pool (an endpoints file, ``file-discovery`` or
            Kubernetes discovery) is the set of endpoints the EPP may name.
        config: EPP settings (defaults when None).
        own_scheduler: `stop` also closes the scheduler.
        pool_name: Value of the ``name`` label of ``inference_pool_ready_pods``.
        synced: Whether the pool is already complete (an endpoints file); otherwise readiness
            waits for `mark_synced` (Kubernetes discovery after its first list).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        config: EppConfig | None = None,
        *,
        own_scheduler: bool = False,
        pool_name: str = "",
        synced: bool = True,
    ) -> None:
        self.scheduler = scheduler
        self.config = config if config is not None else EppConfig()
        self.own_scheduler = own_scheduler
        self.pool_name = pool_name
        self.metrics = EppMetrics(scheduler.metrics_registry)
        register_thread_cpu(scheduler.metrics_registry)
        prefix = uuid.uuid4().hex[:12]
        ids = itertools.count(1)
        self.context = StreamContext(
            scheduler=scheduler,
            config=self.config,
            metrics=self.metrics,
            parser=RequestParser(),
            next_id=lambda: f"{prefix}-{next(ids)}",
        )
        self._health = _Health()
        self._servers: list[Any] = []
        self._metrics_server: Any = None
        self._metrics_thread: threading.Thread | None = None
        # NOTE: keeps the pool-size gauge current.
        self._listener = PoolListener(scheduler, lambda added, removed: self._pool_gauge())
        self._synced = synced
        self._running = False
        self._draining = False
        self._scheduler_started = False
        self.grpc_port: int | None = None
        self.health_port: int | None = None
        self.metrics_port: int | None = None
        self.cleanups: list[Callable[[], object]] = []

    # -- properties -----------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """ext_proc streams in progress."""
        return len(self.context.active)

    @property
    def draining(self) -> bool:
        """Whether `stop` has begun."""
        return self._draining

    @property
    def ready(self) -> bool:
        """Whether readiness is SERVING."""
        return bool(self._health.status["readiness"] == _SERVING)

    def mark_synced(self) -> None:
        """The pool is complete (discovery listed it): readiness turns SERVING."""
        self._synced = True
        if self._running and not self._draining:
            self._health.set(live=True, ready=True)

    def _pool_gauge(self) -> None:
        self.metrics.ready_pods.labels(self.pool_name).set(len(self.scheduler.endpoints))

    # -- lifecycle -----------------------------------------------------------------------------

    def _credentials(self) -> Any:
        cfg = self.config
        if cfg.cert_path:
            key, cert = load_certificate(cfg.cert_path)
        else:
            key, cert = self_signed()
        return grpc.ssl_server_credentials([(key, cert)])

    async def start(self) -> None:
        """Start the scheduler's background work and the gRPC, health and metrics servers.

        Raises:
            OSError: A port cannot be bound.
            ConfigError: The certificate directory cannot be read.
        """
        if self._running:
            raise RuntimeError("the endpoint picker is already running")
        self.scheduler.hooks.pm.register(self._listener)
        await self._start_scheduler()
        self._pool_gauge()
        try:
            self.grpc_port = self._bind_ext_proc()
            self.health_port = self._bind_health()
            for server in self._servers:
                await server.start()
            self._start_metrics()
        except BaseException:
            await self._close()
            raise
        self._running = True
        self._draining = False
        self._health.set(live=True, ready=self._synced)
        self._log_serving()

    async def _start_scheduler(self) -> None:
        """Start the scheduler's background work; serve anyway if it fails."""
        try:
            await asyncio.to_thread(self.scheduler.start)
            self._scheduler_started = True
        except Exception:
            logger.exception(
                "the scheduler's background work did not start (KV events, endpoint watching or "
                "metrics scraping may be off); serving anyway"
            )

    def _bind_ext_proc(self) -> int:
        """Create the ext_proc gRPC server (with health) and bind it; return the bound port."""
        cfg = self.config
        options = [
            ("grpc.max_receive_message_length", cfg.grpc_max_recv_msg_size),
            ("grpc.so_reuseport", 0),
        ]
        main = grpc.aio.server(options=options)
        ep_grpc.add_ExternalProcessorServicer_to_server(_Processor(self), main)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, main)
        addr = f"{_host(cfg.host)}:{cfg.grpc_port}"
        if cfg.secure_serving:
            port = main.add_secure_port(addr, self._credentials())
        else:
            port = main.add_insecure_port(addr)
        if port == 0:
            raise OSError(f"cannot listen on {addr}")
        self._servers.append(main)
        return int(port)

    def _bind_health(self) -> int:
        """Create the plaintext gRPC health server and bind it; return the bound port."""
        cfg = self.config
        health = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, health)
        haddr = f"{_host(cfg.host)}:{cfg.grpc_health_port}"
        hport = health.add_insecure_port(haddr)
        if hport == 0:
            raise OSError(f"cannot listen on {haddr}")
        self._servers.append(health)
        return int(hport)

    def _start_metrics(self) -> None:
        """Serve the Prometheus registry over HTTP when a metrics port is configured."""
        cfg = self.config
        if cfg.metrics_port is None:
            return
        from prometheus_client import start_http_server

        self._metrics_server, self._metrics_thread = start_http_server(
            cfg.metrics_port, cfg.host, registry=self.scheduler.metrics_registry
        )
        self.metrics_port = int(self._metrics_server.server_port)

    def _log_serving(self) -> None:
        cfg = self.config
        logger.info(
            "endpoint picker serving ext_proc on %s:%d (%s), health on %d, %d endpoint(s)",
            cfg.host,
            self.grpc_port,
            "TLS" if cfg.secure_serving else "plaintext",
            self.health_port,
            len(self.scheduler.endpoints),
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop (idempotent): readiness NOT_SERVING, no new streams, streams in
        progress get `grace` seconds (default ``drainTimeout``), then everything stops."""
        if not self._running:
            return
        self._running = False
        self._draining = True
        self._health.set(live=True, ready=False)
        timeout = self.config.drain_timeout if grace is None else grace
        if self.context.active:
            logger.info("draining %d stream(s) (up to %.1fs)", len(self.context.active), timeout)
        main = self._servers[0] if self._servers else None
        if main is not None:
            await main.stop(timeout)
        await self._close()
        logger.info("endpoint picker stopped")

    async def _close(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            await server.stop(0)
        if self._metrics_server is not None:
            httpd, self._metrics_server = self._metrics_server, None
            await asyncio.to_thread(httpd.shutdown)
            httpd.server_close()
        for cleanup in reversed(self.cleanups):
            try:
                await asyncio.to_thread(cleanup)
            except Exception:
                logger.exception("cleanup failed")
        self.cleanups = []
        try:
            self.scheduler.hooks.pm.unregister(self._listener)
        except ValueError:
            pass
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
                logger.exception("stopping the scheduler failed")

    async def __aenter__(self) -> EndpointPicker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
