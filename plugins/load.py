"""Load-aware scorers: queue, running requests, KV-cache utilization, llm-d load-aware, and the
scheduler's own in-flight request counts (formulas as upstream, ``ecosystem.md`` §3).

Metrics-based scorers read ``ctx.metrics(endpoint)``; when an endpoint's metrics are unknown
(stale or never scraped) it gets a neutral score (documented per scorer) and the others are
normalised among the known ones. When every candidate is unknown they all score the same, so
the other scorers decide: nothing fails closed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence

from pydantic import Field, field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler import (
    DEFAULT_SCRAPE_INTERVAL,
    Endpoint,
    EndpointMetrics,
    PluginContext,
    PluginRegistry,
    ResponseInfo,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
    parse_duration,
)

__all__ = [
    "ActiveRequestParams",
    "ActiveRequestScorer",
    "KVCacheUtilizationScorer",
    "LoadAwareParams",
    "LoadAwareScorer",
    "QueueScorer",
    "RunningRequestsSizeScorer",
    "register",
]

logger = logging.getLogger(__name__)

#: Score of an endpoint whose metrics are unknown, for the [0, 1] load scorers.
NEUTRAL = 0.5


def _min_max(
    ctx: SchedulingContext,
    endpoints: Sequence[Endpoint],
    value: Callable[[EndpointMetrics], float],
) -> dict[str, float]:
    """``(max - v) / (max - min)`` over known candidates; all equal -> 1.0; unknown -> 0.5."""
    known: dict[str, float] = {}
    out: dict[str, float] = {}
    for e in endpoints:
        m = ctx.metrics(e)
        if m is None:
            out[e.id] = NEUTRAL
        else:
            known[e.id] = value(m)
    if known:
        lo = min(known.values())
        hi = max(known.values())
        span = hi - lo
        for eid, v in known.items():
            out[eid] = 1.0 if span <= 0 else (hi - v) / span
    return out


class QueueScorer:
    """``queue-scorer``: fewer waiting requests is better, min-max normalised over candidates.

    ``score = (maxQ - q) / (maxQ - minQ)`` with q = ``vllm:num_requests_waiting``; 1.0 when all
    candidates are equal; unknown metrics -> 0.5.
    """

    #: Reads scraped pod metrics: the scheduler scrapes at this interval (seconds).
    metrics_interval = DEFAULT_SCRAPE_INTERVAL

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.name = ctx.name

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        return _min_max(ctx, endpoints, lambda m: m.waiting_queue_size)


class RunningRequestsSizeScorer:
    """``running-requests-size-scorer``: the same min-max on ``vllm:num_requests_running``."""

    #: Reads scraped pod metrics: the scheduler scrapes at this interval (seconds).
    metrics_interval = DEFAULT_SCRAPE_INTERVAL

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.name = ctx.name

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        return _min_max(ctx, endpoints, lambda m: m.running_requests_size)


class KVCacheUtilizationScorer:
    """``kv-cache-utilization-scorer``: ``1 - kv_cache_usage_perc``; unknown metrics -> 0.5."""

    #: Reads scraped pod metrics: the scheduler scrapes at this interval (seconds).
    metrics_interval = DEFAULT_SCRAPE_INTERVAL

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.name = ctx.name

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        out: dict[str, float] = {}
        for e in endpoints:
            m = ctx.metrics(e)
            out[e.id] = NEUTRAL if m is None else 1.0 - m.kv_cache_usage_percent
        return out


class LoadAwareParams(ConfigModel):
    """Parameters of ``load-aware-scorer``.

    Attributes:
        threshold: Waiting requests at which the score reaches 0.
    """

    threshold: int = Field(128, ge=1)


class LoadAwareScorer:
    """``load-aware-scorer`` (llm-d): ``q = 0 -> 0.5``; ``q >= threshold -> 0``; else
    ``0.5 * (1 - q / threshold)``; the maximum is 0.5 by design. Unknown metrics -> 0.25."""

    #: Reads scraped pod metrics: the scheduler scrapes at this interval (seconds).
    metrics_interval = DEFAULT_SCRAPE_INTERVAL

    def __init__(self, params: LoadAwareParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.threshold = params.threshold

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        t = self.threshold
        out: dict[str, float] = {}
        for e in endpoints:
            m = ctx.metrics(e)
            if m is None:
                out[e.id] = 0.25
                continue
            q = m.waiting_queue_size
            out[e.id] = 0.5 if q <= 0 else 0.0 if q >= t else 0.5 * (1.0 - q / t)
        return out


class ActiveRequestParams(ConfigModel):
    """Parameters of ``active-request-scorer``.

    Attributes:
        idle_threshold: Endpoints with at most this many in-flight requests score 1.0.
        max_busy_score: Score ceiling of busy endpoints.
        request_timeout: Seconds (or a duration such as ``"5m"``) after which a request whose
            response was never reported stops counting (a safety net against lost
            `post_response` calls; 0 = never).
    """

    idle_threshold: int = Field(0, ge=0)
    max_busy_score: float = Field(1.0, ge=0, le=1)
    request_timeout: float = 300.0

    @field_validator("request_timeout", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)


class ActiveRequestScorer:
    """``active-request-scorer``: the scheduler's own in-flight request counts.

    Exact and instant (no scrape delay): `pre_request` counts a request against its target,
    `post_response` releases it; requests never released expire after ``requestTimeout`` on
    the scheduler's clock. ``count <= idleThreshold -> 1.0``, else
    ``(maxCount - count) / maxCount * maxBusyScore`` with maxCount over the candidates.
    """

    def __init__(self, params: ActiveRequestParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.idle_threshold = params.idle_threshold
        self.max_busy_score = params.max_busy_score
        self.timeout = params.request_timeout
        self.clock = ctx.clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._inflight: dict[int, str] = {}  # token -> endpoint id
        self._by_request: dict[str, int] = {}  # request id -> token
        self._deadlines: list[tuple[float, int]] = []
        self._tokens = itertools.count(1)

    def count(self, endpoint_id: str) -> int:
        """In-flight requests counted against an endpoint."""
        with self._lock:
            self._expire(self.clock())
            return self._counts.get(endpoint_id, 0)

    def _expire(self, now: float) -> None:
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, token = heapq.heappop(dl)
            eid = self._inflight.pop(token, None)
            if eid is not None:
                logger.debug("in-flight request on %s timed out after %.1fs", eid, self.timeout)
                self._release(eid)
        if len(self._by_request) > 2 * len(self._inflight) + 1024:
            live = set(self._inflight)
            self._by_request = {r: t for r, t in self._by_request.items() if t in live}

    def _release(self, eid: str) -> None:
        c = self._counts.get(eid, 0) - 1
        if c > 0:
            self._counts[eid] = c
        else:
            self._counts.pop(eid, None)

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        with self._lock:
            if self._deadlines:
                self._expire(ctx.now)
            counts = [(e.id, self._counts.get(e.id, 0)) for e in endpoints]
        max_count = max((c for _, c in counts), default=0)
        idle = self.idle_threshold
        busy = self.max_busy_score
        return {eid: 1.0 if c <= idle else (max_count - c) / max_count * busy for eid, c in counts}

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        eid = result.targets[0].id
        with self._lock:
            old = request.state.pop(self.name, None)
            if old is None:
                old = self._by_request.get(request.request_id)
            prev = self._inflight.pop(old, None) if old is not None else None
            if prev is not None:
                # NOTE: the same request scheduled again (a retry): it moves, it does not add.
                self._release(prev)
            token = next(self._tokens)
            self._inflight[token] = eid
            self._counts[eid] = self._counts.get(eid, 0) + 1
            if self.timeout > 0:
                heapq.heappush(self._deadlines, (ctx.now + self.timeout, token))
            request.state[self.name] = token
            self._by_request[request.request_id] = token

    def post_response(
        self, request: SchedulingRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        with self._lock:
            # NOTE: the request id is the fallback for callers that pass an equal request
            # rather than the same object.
            token = request.state.pop(self.name, None)
            by_id = self._by_request.get(request.request_id)
            if token is None:
                token = by_id
            if token is None:
                return
            if by_id == token:
                del self._by_request[request.request_id]
            eid = self._inflight.pop(token, None)
            if eid is not None:
                self._release(eid)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        gone = {e.id for e in removed}
        if not gone:
            return
        with self._lock:
            for eid in gone:
                self._counts.pop(eid, None)
            for token in [t for t, eid in self._inflight.items() if eid in gone]:
                del self._inflight[token]


def register(registry: PluginRegistry) -> None:
    """Register the load scorers and the ``kv-cache-scorer`` alias."""
    reg = registry.register
    reg("queue-scorer", QueueScorer, description="fewer waiting requests is better")
    reg(
        "running-requests-size-scorer",
        RunningRequestsSizeScorer,
        description="fewer running requests is better",
    )
    reg(
        "kv-cache-utilization-scorer",
        KVCacheUtilizationScorer,
        description="more free KV cache is better",
    )
    reg(
        "load-aware-scorer",
        LoadAwareScorer,
        params=LoadAwareParams,
        description="llm-d load-aware queue scorer (max 0.5)",
    )
    reg(
        "active-request-scorer",
        ActiveRequestScorer,
        params=ActiveRequestParams,
        kinds=("scorer", "pre-request", "post-response"),
        description="fewer in-flight requests (the scheduler's own exact counts) is better",
    )
    registry.register_alias("kv-cache-scorer", "kv-cache-utilization-scorer")
