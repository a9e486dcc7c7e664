"""Forwarding a scheduled request to its pick, and failing over: one attempt per pod
(time-to-first-byte and response timeouts), another candidate scheduled when a pod cannot be
reached or does not start a stream in time (at most ``maxAttempts`` pods; in-flight accounting
moves with the pick), and the cooldown of pods that refused a connection.

Only endpoints of the pool are ever contacted: the target is always an `Endpoint` the
scheduler chose, never anything from the request. Relaying the answer that comes back is
`kvaware_scorer.gateway.relay`'s job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import NamedTuple

import aiohttp
from aiohttp import web

from kvaware_scorer.errors import NoEndpointError
from kvaware_scorer.gateway.answers import json_response
from kvaware_scorer.gateway.catalog import ModelCatalog
from kvaware_scorer.gateway.config import GatewayConfig
from kvaware_scorer.gateway.guard import LogLimiter
from kvaware_scorer.gateway.metrics import GatewayMetrics
from kvaware_scorer.gateway.podstream import (
    PodConnectError,
    PodDisconnected,
    PodProtocolError,
    PodResponse,
    PodStreamPool,
)
from kvaware_scorer.gateway.protocol import error_body
from kvaware_scorer.gateway.relay import Attempt, Relay
from kvaware_scorer.scheduler import (
    ROUTING_HEADERS,
    Endpoint,
    ResponseInfo,
    Scheduler,
    SchedulingRequest,
)

__all__ = ["Cooldowns", "Forwarder"]

logger = logging.getLogger(__name__)


class Cooldowns:
    """Pods that refused a connection, left out of scheduling until their cooldown ends.

    Bounded by the pool: one entry per endpoint at most, forgotten when it leaves the pool.

    Args:
        seconds: Cooldown length (``unhealthyCooldown``; 0 turns it off).
    """

    __slots__ = ("seconds", "until")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.until: dict[str, float] = {}

    def __contains__(self, endpoint_id: object) -> bool:
        """Whether a cooldown was started for the endpoint (expired ones linger until pruned)."""
        return endpoint_id in self.until

    def start(self, endpoint_id: str) -> None:
        if self.seconds > 0:
            self.until[endpoint_id] = time.monotonic() + self.seconds

    def forget(self, endpoint_id: str) -> None:
        self.until.pop(endpoint_id, None)

    def cooling(self, endpoint_id: str, now: float) -> bool:
        """Whether the endpoint is in its cooldown at `now` (`time.monotonic`)."""
        return self.until.get(endpoint_id, 0.0) > now

    def usable(self, endpoints: list[Endpoint]) -> list[Endpoint]:
        """`endpoints` without those in their cooldown (expired cooldowns are pruned).

        NOTE: when every one failed recently, all are returned: a pod that is back must not
        wait out its cooldown while clients get errors.
        """
        down = self.until
        if not down:
            return endpoints
        now = time.monotonic()
        for eid in [k for k, until in down.items() if until <= now]:
            del down[eid]
        if not down:
            return endpoints
        up = [e for e in endpoints if e.id not in down]
        return up if up else endpoints


class _Failed(NamedTuple):
    """An attempt another pod may succeed at."""

    kind: str  # upstream error kind: connect, disconnect or first_byte
    connect: bool  # the pod could not be connected to (cooldown, marked unreachable)
    error: BaseException


class Forwarder:
    """Sends a scheduled request to its pick, retrying other candidates when a pod fails.

    `open_session` opens the connections toward the pods (`pods`: every inference request;
    `session`: the model catalog's polls); `catalog` is set by the gateway while it runs.

    Args:
        config: Gateway settings (timeouts, ``maxAttempts``, ``unhealthyCooldown``).
        metrics: The gateway's metrics.
        log_limiter: Rate limit of repeated warnings.
        scheduler: Schedules a retry among the candidates left.
        relay: Relays the answer that comes back.
    """

    def __init__(
        self,
        config: GatewayConfig,
        metrics: GatewayMetrics,
        log_limiter: LogLimiter,
        scheduler: Scheduler,
        relay: Relay,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.log_limiter = log_limiter
        self.scheduler = scheduler
        self.relay = relay
        self.cooldowns = Cooldowns(config.unhealthy_cooldown)
        self.session: aiohttp.ClientSession | None = None
        self.pods: PodStreamPool | None = None
        self.catalog: ModelCatalog | None = None

    def open_session(self) -> aiohttp.ClientSession:
        """Open the connection pools toward the pods; the aiohttp session (for the model
        catalog's polls) is returned."""
        cfg = self.config
        connector = aiohttp.TCPConnector(
            limit=cfg.max_connections,
            limit_per_host=cfg.max_connections_per_endpoint,
            keepalive_timeout=cfg.upstream_keepalive,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=cfg.connect_timeout,
                sock_read=cfg.read_timeout or None,
            ),
            skip_auto_headers=("Accept-Encoding",),
            # NOTE: cookies from one client must never reach another's requests.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        # NOTE: inference requests go over the gateway's own connections (podstream: the
        # answer reaches the relay by callback, half the CPU per relayed event of the aiohttp
        # client); the same limits apply to them apart.
        self.pods = PodStreamPool(
            per_endpoint=cfg.max_connections_per_endpoint,
            total=cfg.max_connections,
            keepalive=cfg.upstream_keepalive,
            connect_timeout=cfg.connect_timeout,
        )
        return self.session

    async def close_session(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.pods is not None:
            await self.pods.close()
            self.pods = None

    def forget(self, endpoint_ids: Iterable[str]) -> None:
        """Drop what is kept about endpoints that left the pool."""
        gone = set(endpoint_ids)
        for eid in gone:
            self.cooldowns.forget(eid)

    async def forward(
        self,
        request: web.Request,
        path: str,
        body: bytes,
        sreq: SchedulingRequest,
        candidates: list[Endpoint],
        attempt: Attempt,
        info: ResponseInfo,
        t0: float,
        stream: bool = False,
    ) -> web.StreamResponse:
        """Send the request to ``attempt.result``'s pick (failing over as needed) and relay the
        answer; `info` ends up with the status and error the post-response hooks get."""
        headers = self.relay.forward_headers(request, sreq)
        failed: set[str] = set()
        # NOTE: vLLM starts a stream (headers) as soon as it accepts the request, but answers a
        # non-streamed one only once generation is done: two different first-byte bounds.
        first_byte = self.config.first_byte_timeout if stream else self.config.response_timeout
        self.metrics.overhead.observe(time.perf_counter() - t0)
        for name in ROUTING_HEADERS:
            headers.pop(name, None)
        pods = self.pods
        assert pods is not None
        while True:
            target = attempt.result.targets[0]
            outcome = await self._try(
                pods, target, path, body, headers, attempt, info, first_byte, stream
            )
            if isinstance(outcome, PodResponse):
                resp = outcome
                break
            if isinstance(outcome, web.StreamResponse):
                return outcome
            answer = await self._fail_over(
                outcome, target, path, sreq, candidates, failed, attempt, info
            )
            if answer is not None:
                return answer
        if self.catalog is not None:
            self.catalog.mark(target.id, reachable=True)
        info.status = resp.status
        info.error = None
        if resp.content_type == "text/event-stream":
            return await self.relay.stream(request, resp, target, info, attempt)
        return await self.relay.body(resp, target, info, attempt.result.response_headers)

    async def _try(
        self,
        pods: PodStreamPool,
        target: Endpoint,
        path: str,
        body: bytes,
        headers: dict[str, str],
        attempt: Attempt,
        info: ResponseInfo,
        first_byte: float,
        stream: bool,
    ) -> PodResponse | web.Response | _Failed:
        """One attempt at `target`: the pod's response head, the error answer the client
        gets, or a failure another pod may not have.

        NOTE: a redirect is the pod's answer, relayed as is (never followed: it would contact
        a host outside the pool). The scheduler's routing headers (the P/D prefill pick for
        the decode pod's sidecar) go with each attempt's own pick.
        """
        # NOTE: ``readTimeout``, when shorter, bounds the wait for the head: a silent pod then
        # gets 504, not another candidate.
        read = self.config.read_timeout
        silent = bool(read) and read < first_byte
        try:
            async with asyncio.timeout(read if silent else first_byte):
                return await pods.request(
                    target.address,
                    target.port,
                    path,
                    {**headers, **attempt.result.headers},
                    body,
                )
        except PodConnectError as exc:
            return _Failed("connect", True, exc)
        except PodDisconnected as exc:
            return _Failed("disconnect", False, exc)
        except (PodProtocolError, ValueError) as exc:
            return self._invalid(target, path, attempt, info, str(exc))
        except TimeoutError as exc:
            if silent:
                self.metrics.upstream_errors.labels(target.id, "timeout").inc()
                info.status, info.error = 504, f"{target.id}: no answer in {read:g}s"
                return _upstream_error(
                    504, f"The endpoint did not answer within {read}s.", "upstream_timeout"
                )
            # The pod accepted the connection but did not start answering in time.
            if stream:
                return _Failed("first_byte", True, exc)
            return self._timed_out(target, path, attempt, info, first_byte)
        except OSError as exc:
            return _Failed("disconnect", False, exc)

    def _invalid(
        self, target: Endpoint, path: str, attempt: Attempt, info: ResponseInfo, why: str
    ) -> web.Response:
        """The 502 of an answer that is not valid HTTP (or not one the relay can pass on)."""
        self.metrics.upstream_errors.labels(target.id, "protocol").inc()
        logger.warning(
            "%s %s: invalid answer from %s: %s", attempt.request.request_id, path, target.id, why
        )
        info.status, info.error = 502, f"{target.id}: {why}"
        return _upstream_error(502, "Invalid answer from the endpoint.", "upstream_error")

    def _timed_out(
        self,
        target: Endpoint,
        path: str,
        attempt: Attempt,
        info: ResponseInfo,
        first_byte: float,
    ) -> web.Response:
        """The 504 of a non-streamed request the pod did not answer within `first_byte` s."""
        self.metrics.upstream_errors.labels(target.id, "timeout").inc()
        self.log_limiter.log(
            logger,
            logging.WARNING,
            f"timeout:{target.id}",
            "%s %s: %s did not answer within %gs",
            attempt.request.request_id,
            path,
            target.id,
            first_byte,
        )
        info.status, info.error = 504, f"{target.id}: no answer in {first_byte:g}s"
        return _upstream_error(
            504, f"The endpoint did not answer within {first_byte:g}s.", "upstream_timeout"
        )

    async def _fail_over(
        self,
        failure: _Failed,
        target: Endpoint,
        path: str,
        sreq: SchedulingRequest,
        candidates: list[Endpoint],
        failed: set[str],
        attempt: Attempt,
        info: ResponseInfo,
    ) -> web.Response | None:
        """Account a pod that could not be reached (or did not start a stream in time) and
        schedule the request among the candidates left: None when ``attempt`` holds the new
        pick, else the 502 the client gets."""
        self.metrics.upstream_errors.labels(target.id, failure.kind).inc()
        self.log_limiter.log(
            logger,
            logging.WARNING,
            f"{failure.kind}:{target.id}",
            "%s %s: %s failed (%s): %r",
            sreq.request_id,
            path,
            target.id,
            failure.kind,
            failure.error,
        )
        if failure.connect:
            if self.catalog is not None:
                self.catalog.mark(target.id, reachable=False)
            self.cooldowns.start(target.id)
        failed.add(target.id)
        # NOTE: attempts are counted, not the distinct pods in `failed`: a pick a plugin sends
        # elsewhere (data-parallel's primaryPort) fails under an id that is no candidate's, and
        # would otherwise be retried without end.
        attempt.failures += 1
        info.error = f"{target.id}: {failure.error!r}"
        remaining = [e for e in candidates if e.id not in failed]
        if attempt.failures < self.config.max_attempts and remaining:
            try:
                await self._reschedule(sreq, remaining, attempt)
            except NoEndpointError:
                pass
            else:
                self.metrics.retries.inc()
                return None
        info.status = 502
        # NOTE: client-facing messages never name pod addresses; the log does.
        return json_response(
            error_body(
                f"Could not reach an endpoint for model `{sreq.lora_name or sreq.model}` "
                f"after {attempt.failures} attempt(s).",
                "server_error",
                None,
                "upstream_unavailable",
            ),
            502,
        )

    async def _reschedule(
        self, sreq: SchedulingRequest, remaining: list[Endpoint], attempt: Attempt
    ) -> None:
        retry = asyncio.ensure_future(self.scheduler.aschedule(sreq, remaining))
        try:
            attempt.result = await asyncio.shield(retry)
        except asyncio.CancelledError:
            # NOTE: as for the first decision, but the request is already counted: let the
            # retry end (it moves the in-flight count), so post_response releases the pick it
            # made, not the pod that failed.
            try:
                attempt.result = await retry
            except Exception:
                pass
            raise


def _upstream_error(status: int, message: str, code: str) -> web.Response:
    """The client's answer when the pod failed (OpenAI error shape)."""
    return json_response(error_body(message, "server_error", None, code), status)
