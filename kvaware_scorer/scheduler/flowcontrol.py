"""Flow control (upstream's ``flowControl``): requests wait while the pool is saturated, are
served by priority band then fairness between flows then order within a flow, and are shed.

Active when the configuration has a ``flowControl`` section or the ``flowControl`` feature gate.
A request enters `FlowController.wait_turn` (from `Scheduler.aschedule`): with free capacity and
nobody waiting it goes at once; otherwise it waits in its band (``SchedulingRequest.priority``,
higher first) and flow (the ``x-llm-d-inference-fairness-id`` header, else the
``agent-identity`` attribute, else ``default-flow``). A dispatcher task hands turns out, one at
a time, while the saturation detector reports the pool below 1.0; it looks at the saturation
again whenever what the detector reads changes (`FlowController.notify`: first tokens, request
ends, scrapes, the pool), and at least every `IDLE_LOOK` while requests wait. As upstream: a
full band is shed with 429, a wait beyond the request TTL with 429 (503 when the pool has no
endpoint), an empty pool with 503.

The saturation detector, fairness and ordering policies are plugins (roles
``saturation-detector``, ``fairness-policy``, ``ordering-policy``); without them the defaults
are upstream's: ``utilization-detector``, ``global-strict-fairness-policy`` and
``fcfs-ordering-policy`` semantics.

A usage limit policy (``flowControl.usageLimitPolicyPluginRef``, role ``usage-limit-policy``)
gives each priority band a ceiling: a band is served only while the saturation is below its
ceiling, and the bands are looked at from the highest priority down, stopping at the first one
that is gated (lower bands never overtake a held higher one), as upstream's dispatch cycle.
Without one every ceiling is 1.0 (upstream's ``static-usage-limit-policy`` default).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from kvaware_scorer.configio import parse_duration
from kvaware_scorer.errors import ConfigError, RequestRejectedError
from kvaware_scorer.scheduler.types import Endpoint, SchedulingContext, SchedulingRequest

__all__ = [
    "DEFAULT_BAND_MAX_REQUESTS",
    "DEFAULT_FLOW",
    "DEFAULT_REQUEST_TTL",
    "FAIRNESS_HEADERS",
    "FairnessPolicy",
    "FlowController",
    "OrderingPolicy",
    "QueuedRequest",
    "SaturationDetector",
    "UsageLimitPolicy",
    "build_flow_controller",
]

if TYPE_CHECKING:
    from kvaware_scorer.scheduler.resolved import SchedulerConfig

logger = logging.getLogger(__name__)

#: Fairness id headers (current, older), as upstream.
FAIRNESS_HEADERS = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
#: The flow of requests without a fairness id.
DEFAULT_FLOW = "default-flow"
#: Seconds a request may wait for its turn (upstream's default request TTL).
DEFAULT_REQUEST_TTL = 60.0
#: Requests waiting per priority band at most (upstream's default band capacity).
DEFAULT_BAND_MAX_REQUESTS = 5000
#: Seconds the dispatcher waits at most, while requests wait, before it looks at the pool's
#: saturation again when nothing it reads changed meanwhile. It looks at once on a change:
#: a request's first token or end, a metrics scrape, the pool (`FlowController.notify`). The
#: wait catches what changes with time alone (a prefill counted done at its due time).
IDLE_LOOK = 0.1
#: Seconds the dispatcher waits, after handing out a turn, for that request to be scheduled
#: before it looks at the saturation again, when the detector counts scheduled requests itself
#: (``counts_scheduled``: ``concurrency-detector``, ``predicted-ttft-scorer``, whose reading
#: moves only once the request's pre-request hooks ran); a request slower than that no longer
#: holds the queue up. Detectors reading scraped metrics get no wait (it would not change their
#: reading, only slow the queue's drain).
ADMISSION_WAIT = 0.5


@runtime_checkable
class SaturationDetector(Protocol):
    """Reports how saturated the pool is: < 1.0 has room, >= 1.0 is saturated."""

    def saturated(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> float:
        """Pool saturation of `endpoints` (unweighted or aggregate, per detector)."""
        ...


@runtime_checkable
class UsageLimitPolicy(Protocol):
    """Per priority band, the saturation at and above which the band is not served."""

    def compute_limit(self, saturation: float, priorities: Sequence[int]) -> Sequence[float]:
        """One ceiling per entry of `priorities` (the active bands, highest first); an entry
        left out counts as 1.0 (no gating)."""
        ...


@dataclass(eq=False)
class QueuedRequest:
    """A request waiting for its turn."""

    request: SchedulingRequest
    flow: str
    priority: int
    arrived: float
    seq: int
    turn: asyncio.Future[None] = field(repr=False)


@runtime_checkable
class OrderingPolicy(Protocol):
    """Orders requests within a flow: the smallest key goes first."""

    def order_key(self, item: QueuedRequest) -> Any:
        """Sort key of `item` (e.g. arrival for FCFS)."""
        ...


@runtime_checkable
class FairnessPolicy(Protocol):
    """Chooses which flow of a band is served next."""

    def pick_flow(self, flows: Mapping[str, Sequence[QueuedRequest]], ordering: Any) -> str:
        """The flow to serve among the non-empty `flows` (each ordered by `ordering`)."""
        ...


class _Fcfs:
    def order_key(self, item: QueuedRequest) -> Any:
        return (item.arrived, item.seq)


class _GlobalStrict:
    def pick_flow(self, flows: Mapping[str, Sequence[QueuedRequest]], ordering: Any) -> str:
        return min(flows, key=lambda f: ordering.order_key(flows[f][0]))


@dataclass
class _Band:
    priority: int
    max_requests: int
    fairness: Any
    ordering: Any
    flows: dict[str, deque[QueuedRequest]] = field(default_factory=dict)
    size: int = 0


class FlowController:
    """Queues requests while the pool is saturated (see the module docstring).

    Args:
        detector: The saturation detector.
        endpoints: Returns the current pool.
        context: Returns a scheduling context (time, metrics staleness).
        request_ttl: Seconds a request may wait (0 = no limit).
        band_max_requests: Waiting requests per band at most (the bound of the queue).
        bands: Per priority: (max requests, fairness policy, ordering policy) overrides.
        fairness: Default fairness policy.
        ordering: Default ordering policy.
        identity: Resolves a request's fairness id when no header gives one.
        usage_limit: Per-band ceilings on the saturation (None: 1.0 for every band).
        clock: Monotonic clock.
    """

    def __init__(
        self,
        detector: SaturationDetector,
        endpoints: Callable[[], Sequence[Endpoint]],
        context: Callable[[], SchedulingContext],
        *,
        request_ttl: float = DEFAULT_REQUEST_TTL,
        band_max_requests: int = DEFAULT_BAND_MAX_REQUESTS,
        bands: Mapping[int, tuple[int | None, Any, Any]] | None = None,
        fairness: Any = None,
        ordering: Any = None,
        identity: Callable[[SchedulingRequest], str | None] | None = None,
        usage_limit: UsageLimitPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.detector = detector
        self._endpoints = endpoints
        self._context = context
        self.request_ttl = request_ttl
        self.band_max_requests = band_max_requests
        self._band_cfg = dict(bands or {})
        self.fairness = fairness or _GlobalStrict()
        self.ordering = ordering or _Fcfs()
        self._identity = identity
        self.usage_limit = usage_limit
        self._clock = clock
        self._bands: dict[int, _Band] = {}
        self._seq = itertools.count()
        self._dispatcher: asyncio.Task[None] | None = None
        # NOTE: set by `notify` (from any thread) when what the detector reads changed.
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # NOTE: the request whose turn was handed out last and is being scheduled now.
        self._admission: tuple[SchedulingRequest, asyncio.Future[None]] | None = None
        self.shed = 0  # requests turned away (capacity, TTL, empty pool)

    # -- identity ----------------------------------------------------------------------------------

    def flow_of(self, request: SchedulingRequest) -> str:
        """The request's fairness id: header, else agent identity, else ``default-flow``."""
        for name in FAIRNESS_HEADERS:
            value = request.headers.get(name, "").strip()
            if value:
                return value
        ident = self._identity(request) if self._identity is not None else None
        return ident or DEFAULT_FLOW

    def waiting(self) -> int:
        """Requests waiting for their turn."""
        return sum(b.size for b in self._bands.values())

    def saturation(self) -> float:
        """The pool's saturation now (1.0 when it has no endpoint)."""
        eps = self._endpoints()
        if not eps:
            return 1.0
        return self.detector.saturated(self._context(), eps)

    # -- the request side --------------------------------------------------------------------------

    async def wait_turn(self, request: SchedulingRequest) -> None:
        """Return when `request` may be scheduled.

        Raises:
            RequestRejectedError: Shed: its band is full (429), it waited longer than the TTL
                (429; 503 when the pool has no endpoint), or the pool is empty (503).
        """
        if not self._endpoints():
            self.shed += 1
            raise RequestRejectedError("no endpoints available", 503)
        if not self._bands and self.open_for(request.priority):
            return
        band = self._band(request.priority)
        if band.size >= band.max_requests:
            self.shed += 1
            raise RequestRejectedError("flow control queue at capacity", 429)
        loop = asyncio.get_running_loop()
        item = QueuedRequest(
            request,
            self.flow_of(request),
            request.priority,
            self._clock(),
            next(self._seq),
            loop.create_future(),
        )
        band.flows.setdefault(item.flow, deque()).append(item)
        band.size += 1
        self._ensure_dispatcher()
        try:
            if self.request_ttl > 0:
                await asyncio.wait_for(asyncio.shield(item.turn), self.request_ttl)
            else:
                await item.turn
        except TimeoutError:
            self._remove(band, item)
            self.admitted(request)  # a turn granted as the wait ran out is given back
            self.shed += 1
            empty = not self._endpoints()
            raise RequestRejectedError(
                "request timed out in queue" + (" and no endpoints are available" if empty else ""),
                503 if empty else 429,
            ) from None
        except asyncio.CancelledError:
            self._remove(band, item)
            self.admitted(request)  # cancelled (client gone) after its turn was granted
            raise

    def admitted(self, request: SchedulingRequest) -> None:
        """`request`, which had its turn, is scheduled (or failed): its pre-request hooks have
        counted it, so the dispatcher may look at the saturation again (`Scheduler.aschedule`
        calls this)."""
        admission = self._admission
        if admission is not None and admission[0] is request and not admission[1].done():
            admission[1].set_result(None)

    def _band(self, priority: int) -> _Band:
        band = self._bands.get(priority)
        if band is None:
            cap, fairness, ordering = self._band_cfg.get(priority, (None, None, None))
            band = _Band(
                priority,
                cap or self.band_max_requests,
                fairness or self.fairness,
                ordering or self.ordering,
            )
            self._bands[priority] = band
        return band

    def _remove(self, band: _Band, item: QueuedRequest) -> None:
        q = band.flows.get(item.flow)
        if q is not None and item in q:
            q.remove(item)
            band.size -= 1
            if not q:
                del band.flows[item.flow]
        if not band.size:
            self._bands.pop(band.priority, None)

    # -- the dispatcher ----------------------------------------------------------------------------

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            loop = asyncio.get_running_loop()
            if self._loop is not loop or self._changed is None:
                self._loop = loop
                self._changed = asyncio.Event()
            self._dispatcher = loop.create_task(self._dispatch())

    def notify(self) -> None:
        """What the saturation detector reads changed (a request's first token or end, a
        metrics scrape, the pool): the dispatcher looks again at once instead of at its next
        `IDLE_LOOK`. Safe from any thread; nothing happens while no request waits."""
        changed, loop = self._changed, self._loop
        if changed is None or loop is None or not self._bands:
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:  # another thread (a scraper's)
            on_loop = False
        if on_loop:
            changed.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(changed.set)

    # -- usage limits ------------------------------------------------------------------------------

    def _priorities(self, extra: int | None = None) -> list[int]:
        """The active bands, highest first: the configured ones, those with waiting requests
        and `extra` (a request about to be served at once)."""
        levels = set(self._band_cfg) | set(self._bands)
        if extra is not None:
            levels.add(extra)
        return sorted(levels, reverse=True)

    def _ceilings(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        out = [1.0] * len(priorities)
        if self.usage_limit is None:
            return out
        try:
            given = [float(c) for c in self.usage_limit.compute_limit(saturation, priorities)]
        except Exception:
            logger.exception("usage limit policy failed; no band gated by it")
            return out
        for i, c in enumerate(given[: len(out)]):
            # NOTE: a NaN or out-of-range ceiling from a plugin is read as the nearest sane one.
            out[i] = min(1.0, max(0.0, c)) if c == c else 1.0
        return out

    def open_for(self, priority: int, saturation: float | None = None) -> bool:
        """Whether a request of `priority` may go now with nobody waiting: the pool is below
        saturation and no band from the highest down to its own is gated (`saturation`: the
        reading to use; None reads the detector now)."""
        if saturation is None:
            saturation = self.saturation()
        if self.usage_limit is None:
            return saturation < 1.0  # every ceiling 1.0: the common case, no allocation
        levels = self._priorities(priority)
        ceilings = self._ceilings(saturation, levels)
        for level, ceiling in zip(levels, ceilings, strict=True):
            if saturation >= ceiling:
                return False
            if level == priority:
                return True
        return False

    def next_item(self, saturation: float | None = None) -> QueuedRequest | None:
        """Take the next request: highest band, the fairness policy's flow, the ordering
        policy's first request of that flow. With `saturation`, bands are looked at from the
        highest down and none is served from the first one whose ceiling the saturation
        reaches (None: no gating)."""
        gate: dict[int, float] = {}
        if saturation is None or self.usage_limit is None:
            levels = sorted(self._bands, reverse=True)
        else:
            levels = self._priorities()
            gate = dict(zip(levels, self._ceilings(saturation, levels), strict=True))
        for priority in levels:
            if saturation is not None and saturation >= gate.get(priority, 1.0):
                return None
            band = self._bands.get(priority)
            if band is None:
                continue
            flows = {f: q for f, q in band.flows.items() if q}
            if not flows:
                continue
            for q in flows.values():
                if len(q) > 1:
                    ordered = sorted(q, key=band.ordering.order_key)
                    q.clear()
                    q.extend(ordered)
            flow = band.fairness.pick_flow(flows, band.ordering)
            item = band.flows[flow].popleft()
            band.size -= 1
            if not band.flows[flow]:
                del band.flows[flow]
            if not band.size:
                del self._bands[priority]
            return item
        return None

    async def _dispatch(self) -> None:
        # NOTE: bounded work per tick: one turn handed out, then the loop runs the request far
        # enough to count it (pre-request hooks), so the next look at saturation sees it.
        changed = self._changed
        assert changed is not None
        while self._bands:
            changed.clear()  # a change from here on makes the wait below return at once
            try:
                sat = self.saturation()
            except Exception:
                logger.exception("saturation detector failed; treating the pool as saturated")
                sat = math.inf
            item = self.next_item(sat) if sat < 1.0 else None
            if item is not None:
                if not item.turn.done():
                    item.turn.set_result(None)
                    if getattr(self.detector, "counts_scheduled", False):
                        await self._await_admission(item.request)
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), IDLE_LOOK)

    async def _await_admission(self, request: SchedulingRequest) -> None:
        # NOTE: the request is counted by its pre-request hooks only once scheduled (after its
        # tokenization, in a worker thread): looking at the saturation before that would hand
        # out more turns than the pool has room for (a concurrency-detector at its limit).
        done = asyncio.get_running_loop().create_future()
        self._admission = (request, done)
        try:
            await asyncio.wait_for(done, ADMISSION_WAIT)
        except TimeoutError:
            logger.debug(
                "request %s not scheduled within %ss of its turn",
                request.request_id,
                ADMISSION_WAIT,
            )
        finally:
            self._admission = None


def _quantity(value: Any) -> int | None:
    """A Kubernetes quantity of requests (``100``, ``"1k"``) as an int."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    mult = {"k": 1000, "M": 10**6, "G": 10**9, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    for suffix, factor in sorted(mult.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(float(text))


def build_flow_controller(
    config: SchedulerConfig,
    plugins: Mapping[str, object],
    endpoints: Callable[[], Sequence[Endpoint]],
    context: Callable[[], SchedulingContext],
    make_default: Callable[[str, Mapping[str, Any]], object],
) -> FlowController | None:
    """The flow controller a configuration asks for (None when flow control is off).

    Flow control is on with a ``flowControl`` section or the ``flowControl`` feature gate. Its
    detector is ``flowControl.saturationDetector`` (or the older top-level
    ``saturationDetector``: a ``pluginRef`` or inline thresholds), else a default
    ``utilization-detector`` built with `make_default`.
    """
    gates = config.ignored.get("featureGates") or []
    fc = config.ignored.get("flowControl")
    enabled = fc is not None or any(
        str(g).split("=")[0] == "flowControl" and not str(g).endswith("=false") for g in gates
    )
    if not enabled:
        return None
    fc = dict(fc or {})
    legacy = config.ignored.get("saturationDetector")
    sd = fc.get("saturationDetector") or legacy or {}
    ref = sd.get("pluginRef") if isinstance(sd, Mapping) else None
    if ref:
        detector = plugins[ref]
    else:
        params = {k: v for k, v in (sd or {}).items() if k != "pluginRef"}
        detector = make_default("utilization-detector", params)
    if not isinstance(detector, SaturationDetector):
        raise ConfigError(f"{ref!r} is no saturation detector", "flowControl.saturationDetector")
    bands: dict[int, tuple[int | None, Any, Any]] = {}
    for band in fc.get("priorityBands") or []:
        bands[int(band["priority"])] = (
            _quantity(band.get("maxRequests")),
            plugins.get(band.get("fairnessPolicyRef") or ""),
            plugins.get(band.get("orderingPolicyRef") or ""),
        )
    default_band = fc.get("defaultPriorityBand") or {}
    usage_ref = fc.get("usageLimitPolicyPluginRef")
    usage_limit: UsageLimitPolicy | None = None
    if usage_ref:
        found = plugins.get(usage_ref)
        if not isinstance(found, UsageLimitPolicy):
            raise ConfigError(
                f"{usage_ref!r} is no usage limit policy", "flowControl.usageLimitPolicyPluginRef"
            )
        usage_limit = found
    identity: Callable[[SchedulingRequest], str | None] | None = None
    for plugin in plugins.values():
        fn = getattr(plugin, "identity", None)
        if callable(fn):
            identity = fn
            break
    ttl = fc.get("defaultRequestTTL")
    return FlowController(
        detector,
        endpoints,
        context,
        request_ttl=parse_duration(ttl) if ttl is not None else DEFAULT_REQUEST_TTL,
        band_max_requests=_quantity(default_band.get("maxRequests"))
        or _quantity(fc.get("maxRequests"))
        or DEFAULT_BAND_MAX_REQUESTS,
        bands=bands,
        fairness=plugins.get(default_band.get("fairnessPolicyRef") or ""),
        ordering=plugins.get(default_band.get("orderingPolicyRef") or ""),
        identity=identity,
        usage_limit=usage_limit,
    )
