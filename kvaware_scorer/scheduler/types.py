"""The plugin role Protocols, and what plugins see of the scheduler and of each call.

The Protocols are what the scheduler calls on plugin objects; a plugin implements one or more
roles (a scorer that is also a pre-request hook, for instance). The records they take and
return (endpoints, requests, results) are the data model of `kvaware_scorer.scheduler.datamodel`,
re-exported here: a contract shared with the gateway and the emulator, whose fields are only
ever added, never renamed.

This is the bottom of the scheduler package, above only the data model: it imports nothing
else from it. What plugins see of the running scheduler and of its resolved configuration is
declared here as Protocols (`SchedulerView`, `ResolvedConfig`, `ConfiguredPlugin`), which
`pipeline.Scheduler` and `config.SchedulerConfig` satisfy, so no module below the pipeline
needs to know it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from kvaware_scorer.events.sink import KVEventSink
from kvaware_scorer.scheduler.datamodel import (
    DATA_PARALLEL_HEADER,
    ENCODER_HEADER,
    ENGINE_LABELS,
    PEER_ENDPOINT_KEY,
    PREFILL_HEADER,
    ROUTING_HEADERS,
    Endpoint,
    EndpointMetrics,
    ProfileResult,
    ProfileView,
    ResponseInfo,
    SchedulingRequest,
    SchedulingResult,
    ScoredEndpoint,
    engine_of,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "DATA_PARALLEL_HEADER",
    "ENCODER_HEADER",
    "ENGINE_LABELS",
    "PEER_ENDPOINT_KEY",
    "PREFILL_HEADER",
    "ROUTING_HEADERS",
    "ConfiguredPlugin",
    "Endpoint",
    "EndpointMetrics",
    "EndpointsListener",
    "Filter",
    "FirstTokenListener",
    "KVEventSink",
    "Lifecycle",
    "Picker",
    "PostResponse",
    "PreRequest",
    "ProfileHandler",
    "ProfileResult",
    "ProfileView",
    "RequestPreparer",
    "ResolvedConfig",
    "ResponseInfo",
    "SchedulerView",
    "SchedulingContext",
    "SchedulingRequest",
    "SchedulingResult",
    "ScoredEndpoint",
    "Scorer",
    "engine_of",
]


class SchedulingContext:
    """Per-call view the scheduler hands to plugins: the time and which metrics are usable.

    Metrics of an endpoint are *unknown* when they are stale (last update older than the
    scheduler's staleness threshold) or when a scraper tracks the endpoint but has never
    reached it. Each load scorer documents how it treats unknown metrics; none fails closed.

    Args:
        now: Scheduler-clock time of this call.
        staleness: Seconds after which metrics are stale (None = never stale).
        tracked: Ids of endpoints whose metrics a scraper maintains (never-updated -> unknown).
        scheduler: The scheduler running this call (None in unit tests of single plugins).
    """

    __slots__ = ("_stale_before", "now", "scheduler", "tracked")

    def __init__(
        self,
        now: float,
        staleness: float | None = None,
        tracked: frozenset[str] | set[str] = frozenset(),
        scheduler: SchedulerView | None = None,
    ) -> None:
        self.now = now
        self._stale_before = now - staleness if staleness is not None else -math.inf
        self.tracked = tracked
        self.scheduler = scheduler

    def metrics(self, endpoint: Endpoint) -> EndpointMetrics | None:
        """The endpoint's metrics, or None when they are unknown (stale or never scraped)."""
        m = endpoint.metrics
        t = m.update_time
        if t == 0.0:
            return None if endpoint.id in self.tracked else m
        return m if t >= self._stale_before else None


# -- plugin roles ------------------------------------------------------------------------------


@runtime_checkable
class Filter(Protocol):
    """Narrows the candidate endpoints; filters run in profile order."""

    def filter(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        """The endpoints that may serve `request` (a subset of `endpoints`, order kept)."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """Scores candidates in [0, 1]; the scheduler clamps and weights the scores."""

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        """Endpoint id -> score in [0, 1]; endpoints left out score 0."""
        ...


@runtime_checkable
class Picker(Protocol):
    """Chooses the target endpoint(s) from the weighted totals."""

    def pick(
        self, ctx: SchedulingContext, request: SchedulingRequest, scored: Sequence[ScoredEndpoint]
    ) -> list[Endpoint]:
        """The chosen endpoints, best first (at least one when `scored` is not empty)."""
        ...


@runtime_checkable
class ProfileHandler(Protocol):
    """Decides which profiles run for a request and which result is primary."""

    def pick_profiles(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        profiles: Mapping[str, ProfileView],
        results: Mapping[str, ProfileResult],
    ) -> list[str]:
        """Profiles to run next given the results so far; empty = done."""
        ...

    def process_results(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        results: Mapping[str, ProfileResult],
    ) -> str:
        """Name of the primary profile among `results`."""
        ...


@runtime_checkable
class PreRequest(Protocol):
    """Runs after a decision, before the request is sent (speculative indexing, accounting)."""

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """React to the decision; exceptions are logged and counted, never raised."""
        ...


@runtime_checkable
class PostResponse(Protocol):
    """Runs after the response completed or failed."""

    def post_response(
        self, request: SchedulingRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        """React to the outcome; exceptions are logged and counted, never raised."""
        ...


@runtime_checkable
class FirstTokenListener(Protocol):
    """Told when a scheduled request's first output token reached the front door (the end of
    its prefill: queueing and prompt processing are over, decoding starts)."""

    def first_token(self, now: float, request: SchedulingRequest, result: SchedulingResult) -> None:
        """`request`, scheduled as `result`, produced its first token at scheduler time `now`."""
        ...


@runtime_checkable
class Lifecycle(Protocol):
    """A plugin with background work (sockets, threads), started and stopped by the scheduler."""

    def start(self) -> None:
        """Start background work; idempotent."""
        ...

    def stop(self) -> None:
        """Stop it, bounded in time; idempotent."""
        ...


@runtime_checkable
class EndpointsListener(Protocol):
    """Told when the endpoint pool changes (e.g. to purge removed pods from an index)."""

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """`added` joined the pool, `removed` left it."""
        ...


@runtime_checkable
class RequestPreparer(Protocol):
    """Does a request's slow, blocking preparation (tokenization) before scheduling.

    `Scheduler.aschedule` runs `prepare` in a worker thread so the event loop never blocks.
    """

    def prepare(self, request: SchedulingRequest) -> None:
        """Compute and cache what scoring will need (e.g. ``request.tokens(...)``)."""
        ...


# -- what plugins see of the scheduler -------------------------------------------------------------


class ConfiguredPlugin(Protocol):
    """One plugin of the resolved configuration (`kvaware_scorer.scheduler.PluginConfig`).

    Attributes:
        name: Its configured name.
        type: Its canonical YAML type.
        path: YAML path of its entry (``plugins[3]``).
        params: Its validated parameters (an instance of the type's parameter model).
        kinds: The roles its objects play.
        capabilities: What its objects provide to other plugins (``match-info-producer``).
    """

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def params(self) -> Any: ...
    @property
    def kinds(self) -> frozenset[str]: ...
    @property
    def capabilities(self) -> frozenset[str]: ...


class ResolvedConfig(Protocol):
    """The resolved configuration as plugins see it (`kvaware_scorer.scheduler.SchedulerConfig`).

    Attributes:
        plugins: Plugins by name, in YAML order.
        warnings: Warnings issued while loading (checks may add more).
        default_producer: Name of the match-info producer a consumer naming none reads when it
            is configured (declared by a plugin distribution through the registry), or None.
    """

    @property
    def plugins(self) -> Mapping[str, ConfiguredPlugin]: ...
    @property
    def warnings(self) -> list[str]: ...
    @property
    def default_producer(self) -> str | None: ...


class SchedulerView(Protocol):
    """What plugins and hook implementations reach on the running scheduler
    (`kvaware_scorer.scheduler.Scheduler` implements it)."""

    @property
    def config(self) -> ResolvedConfig:
        """The resolved configuration."""
        ...

    @property
    def clock(self) -> Callable[[], float]:
        """The scheduler's monotonic clock in seconds."""
        ...

    @property
    def plugins(self) -> Mapping[str, object]:
        """Plugin objects by configured name."""
        ...

    def plugin(self, name: str) -> Any:
        """The plugin object configured under `name` (KeyError when there is none)."""
        ...

    @property
    def endpoints(self) -> list[Endpoint]:
        """The current endpoint pool."""
        ...

    @property
    def event_sinks(self) -> list[KVEventSink]:
        """Plugins that accept KV-event payloads."""
        ...

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The Prometheus registry the scheduler exposes (extra collectors may be added)."""
        ...

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace the endpoint pool."""
        ...

    async def aschedule(
        self,
        request: SchedulingRequest,
        endpoints: Sequence[Endpoint] | None = None,
        *,
        dry_run: bool = False,
    ) -> SchedulingResult:
        """Choose endpoint(s) for `request` without blocking the event loop."""
        ...

    def post_response(
        self, request: SchedulingRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        """Run the post-response hooks."""
        ...

    def first_token(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        """Tell first-token listeners that `request`'s first token arrived."""
        ...
