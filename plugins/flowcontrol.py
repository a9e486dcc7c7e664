"""Flow-control plugins of upstream llm-d: saturation detectors (``utilization-detector``,
``concurrency-detector``), fairness and ordering policies (``global-strict-fairness-policy``,
``round-robin-fairness-policy``, ``fcfs-ordering-policy``), and the request-side plugins
``probabilistic-admitter`` and ``agent-identity``. The queue itself is
`kvaware_scorer.scheduler.flowcontrol.FlowController`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    ResponseInfo,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
    parse_duration,
)
from kvaware_scorer.scheduler.flowcontrol import QueuedRequest

__all__ = [
    "AGENT_SESSION_HEADERS",
    "AgentIdentity",
    "ConcurrencyDetector",
    "FcfsOrderingPolicy",
    "GlobalStrictFairnessPolicy",
    "ProbabilisticAdmitter",
    "RoundRobinFairnessPolicy",
    "UtilizationDetector",
    "register",
]

#: Agent session headers agent-identity reads, in order (upstream's built-in list).
AGENT_SESSION_HEADERS = (
    "x-claude-code-session-id",
    "x-session-affinity",
    "session-id",
    "session_id",
)
#: The request attribute agent-identity sets (``request.state`` key ``attribute:<name>``).
AGENT_IDENTITY_ATTRIBUTE = "agent-identity"


def _roofline(ctx: SchedulingContext, e: Endpoint, queue: float, kv: float) -> float:
    """max(waiting / queue threshold, KV usage / KV threshold); unknown metrics: 1.0."""
    m = ctx.metrics(e)
    if m is None:
        return 1.0
    return max(m.waiting_queue_size / queue, m.kv_cache_usage_percent / kv)


# -- utilization-detector --------------------------------------------------------------------------


class UtilizationParams(ConfigModel):
    """Parameters of ``utilization-detector`` (upstream's)."""

    queue_depth_threshold: int = Field(5, gt=0)
    kv_cache_util_threshold: float = Field(0.8, gt=0, le=1)
    metrics_staleness_threshold: float = 0.2
    headroom: float = Field(0.0, ge=0)

    @field_validator("metrics_staleness_threshold", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError("metricsStalenessThreshold must be > 0")
        return seconds


class UtilizationDetector:
    """``utilization-detector``: pool saturation is the average over endpoints of
    ``max(waiting / queueDepthThreshold, KV usage / kvCacheUtilThreshold)``, stale or unknown
    metrics counting as 1.0 (fail closed). As a filter it drops endpoints beyond the thresholds
    times ``1 + headroom`` (or stale), keeping everything when that would drop all."""

    def __init__(self, params: UtilizationParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.queue = float(params.queue_depth_threshold)
        self.kv = params.kv_cache_util_threshold
        self.staleness = params.metrics_staleness_threshold
        self.headroom = params.headroom

    def _fresh(self, ctx: SchedulingContext, e: Endpoint) -> bool:
        m = ctx.metrics(e)
        return m is not None and (m.update_time == 0 or ctx.now - m.update_time <= self.staleness)

    def saturated(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        total = 0.0
        for e in endpoints:
            total += _roofline(ctx, e, self.queue, self.kv) if self._fresh(ctx, e) else 1.0
        return total / len(endpoints)

    def filter(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        max_q = self.queue * (1 + self.headroom)
        max_kv = min(1.0, self.kv * (1 + self.headroom))
        out = []
        for e in endpoints:
            m = ctx.metrics(e)
            if m is None or not self._fresh(ctx, e):
                continue
            if m.waiting_queue_size <= max_q and m.kv_cache_usage_percent <= max_kv:
                out.append(e)
        return out or endpoints


# -- concurrency-detector -----------------------------------------------------------------------------


class ConcurrencyParams(ConfigModel):
    """Parameters of ``concurrency-detector`` (upstream's)."""

    concurrency_mode: Literal["requests", "tokens", "hybrid"] = "requests"
    max_concurrency: int = Field(100, gt=0)
    max_token_concurrency: int = Field(1_000_000, gt=0)
    headroom: float = Field(0.0, ge=0)
    request_timeout: float = 300.0

    @field_validator("request_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)


class ConcurrencyDetector:
    """``concurrency-detector``: counts the requests (and prompt tokens) it saw dispatched and
    not yet finished per endpoint. Pool saturation: in-flight / capacity over the pool
    (``requests`` or ``tokens``), or in ``hybrid`` the average over endpoints of the larger
    ratio. As a filter it drops endpoints at ``capacity x (1 + headroom)``."""

    #: Its reading moves when a dispatched request is scheduled (pre-request), so flow
    #: control waits for that before the next look (`flowcontrol.ADMISSION_WAIT`).
    counts_scheduled = True

    def __init__(self, params: ConcurrencyParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.params = params
        self._clock = ctx.clock
        self._lock = threading.Lock()
        # NOTE: bounded by the requests in flight; one never released expires after
        # requestTimeout (a front door that crashed mid-request).
        self._inflight: dict[str, tuple[str, int, float]] = {}

    def _loads(self) -> dict[str, tuple[int, int]]:
        now = self._clock()
        timeout = self.params.request_timeout
        out: dict[str, tuple[int, int]] = {}
        with self._lock:
            if timeout:
                for rid in [r for r, (_, _, t) in self._inflight.items() if now - t > timeout]:
                    del self._inflight[rid]
            for pod, tokens, _ in self._inflight.values():
                n, t = out.get(pod, (0, 0))
                out[pod] = (n + 1, t + tokens)
        return out

    def saturated(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        p = self.params
        loads = self._loads()
        reqs = [loads.get(e.id, (0, 0))[0] for e in endpoints]
        toks = [loads.get(e.id, (0, 0))[1] for e in endpoints]
        if p.concurrency_mode == "requests":
            return sum(reqs) / (p.max_concurrency * len(endpoints))
        if p.concurrency_mode == "tokens":
            return sum(toks) / (p.max_token_concurrency * len(endpoints))
        ratios = [
            max(r / p.max_concurrency, t / p.max_token_concurrency)
            for r, t in zip(reqs, toks, strict=True)
        ]
        return sum(ratios) / len(ratios)

    def filter(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        p = self.params
        loads = self._loads()
        max_r = p.max_concurrency * (1 + p.headroom)
        max_t = p.max_token_concurrency * (1 + p.headroom)
        out = []
        for e in endpoints:
            n, t = loads.get(e.id, (0, 0))
            over_r = n >= max_r and p.concurrency_mode in ("requests", "hybrid")
            over_t = t >= max_t and p.concurrency_mode in ("tokens", "hybrid")
            if not (over_r or over_t):
                out.append(e)
        return out

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        tokens = len(request.tokens(list)) if request.has_tokens else 0
        with self._lock:
            self._inflight[request.request_id] = (result.targets[0].id, tokens, self._clock())

    def post_response(
        self, request: SchedulingRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        with self._lock:
            self._inflight.pop(request.request_id, None)


# -- policies ------------------------------------------------------------------------------------------


class FcfsOrderingPolicy:
    """``fcfs-ordering-policy``: first come, first served within a flow."""

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.name = ctx.name

    def order_key(self, item: QueuedRequest) -> Any:
        return (item.arrived, item.seq)


class GlobalStrictFairnessPolicy:
    """``global-strict-fairness-policy``: the flow whose first request comes first by the
    ordering policy (FCFS across every flow of the band)."""

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.name = ctx.name

    def pick_flow(self, flows: Mapping[str, Sequence[QueuedRequest]], ordering: Any) -> str:
        return min(flows, key=lambda f: ordering.order_key(flows[f][0]))


class RoundRobinFairnessPolicy:
    """``round-robin-fairness-policy``: flows take turns in sorted order."""

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.name = ctx.name
        self._last: str | None = None

    def pick_flow(self, flows: Mapping[str, Sequence[QueuedRequest]], ordering: Any) -> str:
        keys = sorted(flows)
        start = (keys.index(self._last) + 1) % len(keys) if self._last in keys else 0
        self._last = keys[start]
        return self._last


# -- admitters -----------------------------------------------------------------------------------------


class ProbabilisticParams(ConfigModel):
    """Parameters of ``probabilistic-admitter`` (upstream's)."""

    queue_depth_threshold: int = Field(5, gt=0)
    kv_cache_util_threshold: float = Field(0.8, gt=0, le=1)
    power: float = Field(5.0, gt=0)
    k: float = Field(300.0, gt=0)


class ProbabilisticAdmitter:
    """``probabilistic-admitter``: sheds a sheddable request (priority < 0) with probability
    ``min(saturation^power x k, 1)``, saturation being the average roofline over the candidates
    (unknown metrics: 1.0); other requests are always admitted."""

    def __init__(self, params: ProbabilisticParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.params = params
        self.rng = ctx.rng

    def shed_probability(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> float:
        """The probability of shedding a sheddable request now."""
        if not endpoints:
            return 0.0
        p = self.params
        q, kv = float(p.queue_depth_threshold), p.kv_cache_util_threshold
        sat = sum(_roofline(ctx, e, q, kv) for e in endpoints) / len(endpoints)
        return float(min(sat**p.power * p.k, 1.0))

    def admit(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> str | None:
        if request.priority >= 0:
            return None
        prob = self.shed_probability(ctx, endpoints)
        if prob > 0 and self.rng.random() < prob:
            return f"sheddable request shed under load (probability {prob:.2f})"
        return None


class AgentIdentityParams(ConfigModel):
    """Parameters of ``agent-identity``."""

    additional_session_headers: list[str] = Field(default_factory=list)


class AgentIdentity:
    """``agent-identity``: the first non-empty agent session header (``additionalSessionHeaders``
    first, then ``x-claude-code-session-id``, ``x-session-affinity``, ``session-id``,
    ``session_id``) becomes the request's ``agent-identity`` attribute, which flow control uses
    as the fairness id when no ``x-llm-d-inference-fairness-id`` header is given."""

    def __init__(self, params: AgentIdentityParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        extra = [h.strip().lower() for h in params.additional_session_headers if h.strip()]
        self.headers = (*extra, *AGENT_SESSION_HEADERS)

    def identity(self, request: SchedulingRequest) -> str | None:
        """The request's agent identity (also stored as its ``agent-identity`` attribute)."""
        for h in self.headers:
            value = request.headers.get(h, "").strip()
            if value:
                request.state[f"attribute:{AGENT_IDENTITY_ATTRIBUTE}"] = value
                return value
        return None

    def admit(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> str | None:
        """Runs with the admitters, before the profiles: records the attribute, never sheds."""
        self.identity(request)
        return None


def register(registry: PluginRegistry) -> None:
    """Register the detectors, policies, admitters and agent-identity."""
    registry.register(
        "utilization-detector",
        UtilizationDetector,
        params=UtilizationParams,
        kinds=("saturation-detector", "filter"),
        description="saturation from queue depth and KV usage (roofline); also a filter",
    )
    registry.register(
        "concurrency-detector",
        ConcurrencyDetector,
        params=ConcurrencyParams,
        kinds=("saturation-detector", "filter", "pre-request", "post-response"),
        description="saturation from in-flight requests or tokens; also a filter",
    )
    registry.register(
        "fcfs-ordering-policy",
        FcfsOrderingPolicy,
        kinds=("ordering-policy",),
        description="first come, first served within a flow",
    )
    registry.register(
        "global-strict-fairness-policy",
        GlobalStrictFairnessPolicy,
        kinds=("fairness-policy",),
        description="serves the flow whose first request is oldest",
    )
    registry.register(
        "round-robin-fairness-policy",
        RoundRobinFairnessPolicy,
        kinds=("fairness-policy",),
        description="flows take turns",
    )
    registry.register(
        "probabilistic-admitter",
        ProbabilisticAdmitter,
        params=ProbabilisticParams,
        kinds=("admitter",),
        description="sheds sheddable requests with a probability rising with saturation",
    )
    registry.register(
        "agent-identity",
        AgentIdentity,
        params=AgentIdentityParams,
        kinds=("admitter",),
        description="agent session header -> fairness id",
    )
