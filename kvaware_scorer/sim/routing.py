"""How the emulated fleet is routed: the `Router` protocol, built-in baselines, and the adapter
that drives the real `kvaware_scorer.scheduler.Scheduler`.

The simulator talks to one `Router` per run. It binds the fleet's endpoints once, hands over a
metrics snapshot at every scrape (`observe`), asks for a pod per arrival (`route`), reports each
first token (`first_token`) and completion (`complete`), and delivers every pod's KV-event payloads to the router's
`event_sinks`. Routers:

* `SchedulerRouter`: a scheduler YAML (``config/precise.yaml``, ...) through the real
  `Scheduler`, exactly as ``scheduler_api.md`` describes (no ``start()``: events arrive in
  process; clock and seed injected; flow control held in virtual time, `Dispatcher`). This is what ``kvaware bench --configs *.yaml`` runs.
* `RandomRouter` (``builtin:random``): uniform random pod, the cache-blind baseline.
* `RoundRobinRouter` (``builtin:round-robin``): Kubernetes-Service-like rotation.
* `PrefixOracleRouter` (``builtin:oracle``): reads every pod's block pool directly (perfect,
  zero-delay knowledge) and scores like a precise config (prefix 3, kv usage 2, queue 2). Not a
  real router: an upper reference for what a KV-aware router can get on a workload.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kvaware_scorer.errors import ConfigError, NoEndpointError
from kvaware_scorer.events.sink import KVEventSink
from kvaware_scorer.sim.request import RequestOutcome, SimRequest

if TYPE_CHECKING:
    from kvaware_scorer.sim.engine import Engine

__all__ = [
    "BUILTIN_ROUTERS",
    "Dispatcher",
    "KVEventSink",
    "PodMetrics",
    "PrefixOracleRouter",
    "RandomRouter",
    "RoundRobinRouter",
    "Router",
    "SchedulerRouter",
    "SimEndpoint",
    "make_router",
]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PodMetrics:
    """A pod's ``/metrics`` as last scraped (vLLM gauge names in the docstrings).

    Attributes:
        waiting: ``vllm:num_requests_waiting``.
        running: ``vllm:num_requests_running``.
        kv_usage: ``vllm:kv_cache_usage_perc`` (fraction).
        block_size: ``vllm:cache_config_info{block_size}``.
        num_blocks: ``vllm:cache_config_info{num_gpu_blocks}``.
        update_time: Router clock time of the scrape (0 = never).
    """

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    block_size: int = 16
    num_blocks: int = 0
    update_time: float = 0.0


@dataclass(eq=False)
class SimEndpoint:
    """One emulated pod as routers see it.

    Attributes:
        name: Pod name.
        address: IP address.
        port: Serving port.
        model: Served model name.
        metrics: The last scraped metrics.
        engine: The live engine (only oracle baselines may look at it).
    """

    name: str
    address: str
    port: int
    model: str
    metrics: PodMetrics
    engine: Engine

    @property
    def id(self) -> str:
        """``"<address>:<port>"``: the pod id of the index and the KV events."""
        return f"{self.address}:{self.port}"


class Router(Protocol):
    """Picks a pod per request for the emulated fleet."""

    name: str

    @property
    def event_sinks(self) -> Sequence[KVEventSink]:
        """Objects that receive every pod's KV-event payloads."""
        ...

    def bind(self, endpoints: Sequence[SimEndpoint]) -> None:
        """Learn the fleet (called once, before the first request)."""
        ...

    def observe(self, endpoints: Sequence[SimEndpoint], now: float) -> None:
        """A metrics scrape happened at router-clock time `now`."""
        ...

    def route(self, request: SimRequest, endpoints: Sequence[SimEndpoint]) -> str | None:
        """The id of the pod that serves `request`, or None when the router holds it (flow
        control: `Dispatcher.dispatch` hands it out later)."""
        ...

    def first_token(self, request: SimRequest) -> None:
        """`request`'s first output token was sampled (now, on the router's clock)."""
        ...

    def complete(self, request: SimRequest, outcome: RequestOutcome) -> None:
        """`request` finished (or was rejected)."""
        ...

    def close(self) -> None:
        """Release resources."""
        ...


class _Baseline:
    """Shared no-op parts of the built-in routers."""

    name = "baseline"

    @property
    def event_sinks(self) -> Sequence[KVEventSink]:
        return ()

    def bind(self, endpoints: Sequence[SimEndpoint]) -> None:
        if not endpoints:
            raise NoEndpointError("the fleet has no endpoints")

    def observe(self, endpoints: Sequence[SimEndpoint], now: float) -> None:
        return None

    def first_token(self, request: SimRequest) -> None:
        return None

    def complete(self, request: SimRequest, outcome: RequestOutcome) -> None:
        return None

    def close(self) -> None:
        return None


class RandomRouter(_Baseline):
    """Uniformly random pod (seeded)."""

    def __init__(self, seed: int = 0, name: str = "random") -> None:
        self.name = name
        self._rng = random.Random(seed)

    def route(self, request: SimRequest, endpoints: Sequence[SimEndpoint]) -> str:
        return endpoints[self._rng.randrange(len(endpoints))].id


class RoundRobinRouter(_Baseline):
    """Pods in turn."""

    def __init__(self, seed: int = 0, name: str = "round-robin") -> None:
        self.name = name
        self._next = seed

    def route(self, request: SimRequest, endpoints: Sequence[SimEndpoint]) -> str:
        ep = endpoints[self._next % len(endpoints)]
        self._next += 1
        return ep.id


class PrefixOracleRouter(_Baseline):
    """Scores pods from their live block pools and queues (perfect information, no delay).

    Args:
        seed: Tie-break randomness.
        prefix_weight: Weight of the held-prefix fraction.
        kv_weight: Weight of ``1 - kv usage``.
        queue_weight: Weight of the min-max normalized waiting queue (shorter is better).
        name: Report name.
    """

    def __init__(
        self,
        seed: int = 0,
        prefix_weight: float = 3.0,
        kv_weight: float = 2.0,
        queue_weight: float = 2.0,
        name: str = "oracle",
    ) -> None:
        self.name = name
        self._rng = random.Random(seed)
        self.weights = (prefix_weight, kv_weight, queue_weight)

    def route(self, request: SimRequest, endpoints: Sequence[SimEndpoint]) -> str:
        wp, wk, wq = self.weights
        hashes = request.block_hashes or []
        total = len(hashes)
        waits = [e.engine.num_waiting for e in endpoints]
        lo, hi = min(waits), max(waits)
        best: list[int] = []
        best_score = -1.0
        for i, e in enumerate(endpoints):
            engine = e.engine
            bs = engine.block_size
            held = len(engine.pool.longest_hit(hashes, (request.num_prompt_tokens - 1) // bs))
            prefix = held / total if total else 0.0
            queue = (hi - waits[i]) / (hi - lo) if hi > lo else 1.0
            score = wp * prefix + wk * (1.0 - engine.kv_usage()) + wq * queue
            if score > best_score + 1e-12:
                best, best_score = [i], score
            elif abs(score - best_score) <= 1e-12:
                best.append(i)
        pick = best[0] if len(best) == 1 else best[self._rng.randrange(len(best))]
        return endpoints[pick].id


class SchedulerRouter:
    """Drives real `kvaware_scorer.scheduler.Scheduler` replicas built from a scheduler YAML.

    Per ``scheduler_api.md``: built with ``Scheduler.from_yaml(path, clock=..., seed=...)``;
    endpoints are `Endpoint` objects whose ``metrics`` this adapter writes at every scrape;
    ``schedule()`` per arrival; ``first_token()`` when its first token is sampled;
    ``post_response()`` at completion; KV payloads go to
    ``scheduler.event_sinks``; ``start()`` is never called (no sockets).

    With ``replicas`` > 1 the router emulates several scheduler processes behind one load
    balancer (active-active, as upstream deploys its EPP): arrivals go to the replicas in turn,
    each replica has its own plugin state (in-flight counts, routing history, speculative
    entries) and its own copy of the pods' metrics, and every replica's event sinks receive
    every pod's KV events (each replica ingests all events, as upstream's do).

    A config with flow control (a ``flowControl`` section) has its arrivals held while its
    saturation detector reports the pool saturated, in virtual time (`dispatch`), as
    ``Scheduler.aschedule`` holds them live; requests held beyond the TTL are shed with 429.

    Args:
        path: The scheduler YAML.
        clock: The simulator's virtual clock (seconds, never 0).
        seed: Seed for the scheduler's randomness (pickers, tie-breaks); replica i uses seed+i.
        model: Served model name of the fleet.
        name: Report name (default: the file's stem).
        replicas: Scheduler replicas sharing the traffic.

    Raises:
        ConfigError: The scheduler is not available, or the YAML is invalid.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float],
        seed: int,
        model: str,
        name: str | None = None,
        replicas: int = 1,
    ) -> None:
        try:
            from kvaware_scorer import scheduler as sched_mod
        except ImportError as exc:  # pragma: no cover - the package always exists
            raise ConfigError(f"the scheduler package cannot be imported: {exc}") from exc
        scheduler_cls = getattr(sched_mod, "Scheduler", None)
        if scheduler_cls is None:
            raise ConfigError(
                "kvaware_scorer.scheduler.Scheduler is not available in this build; "
                "scheduler YAML configs cannot be benchmarked (use builtin:random or "
                "builtin:oracle)",
                str(path),
            )
        if replicas < 1:
            raise ConfigError("scheduler replicas must be >= 1", str(path))
        self._mod: Any = sched_mod
        self.name = name or Path(path).stem
        if replicas > 1:
            self.name += f" x{replicas}"
        self.model = model
        self._clock = clock
        self.schedulers: list[Any] = [
            scheduler_cls.from_yaml(path, clock=clock, seed=seed + i) for i in range(replicas)
        ]
        self.scheduler: Any = self.schedulers[0]
        self._endpoints: list[list[Any]] = []
        self._by_id: list[dict[str, Any]] = []
        self._inflight: dict[str, tuple[int, Any, Any]] = {}
        self._next = 0
        # NOTE: flow control in virtual time: a replica whose config has a ``flowControl``
        # section holds arrivals while its saturation detector reports the pool saturated
        # (or others wait before them), as `Scheduler.aschedule` does live; the simulator calls
        # `dispatch` after every event that can change saturation (a step's first tokens and
        # completions, a scrape), where the live dispatcher polls every few milliseconds.
        # Emulated requests all have priority 0 and no fairness id: one band, one flow, so the
        # default policies serve them first come, first served.
        self._held: list[deque[tuple[SimRequest, float]]] = [deque() for _ in self.schedulers]
        self.holds = 0  # arrivals flow control held (over the run)

    @property
    def event_sinks(self) -> Sequence[KVEventSink]:
        sinks: list[KVEventSink] = []
        for sched in self.schedulers:
            sinks.extend(sched.event_sinks)
        return sinks

    def bind(self, endpoints: Sequence[SimEndpoint]) -> None:
        endpoint_cls = self._mod.Endpoint
        self._endpoints = []
        self._by_id = []
        for sched in self.schedulers:
            eps = [
                endpoint_cls(name=e.name, address=e.address, port=e.port, model=e.model)
                for e in endpoints
            ]
            by_id = {ep.id: ep for ep in eps}
            for e in endpoints:
                if e.id not in by_id:
                    raise ConfigError(f"Endpoint id of {e.name} does not match {e.id!r}")
            sched.set_endpoints(eps)
            self._endpoints.append(eps)
            self._by_id.append(by_id)
        self.observe(endpoints, self._clock())

    def observe(self, endpoints: Sequence[SimEndpoint], now: float) -> None:
        for by_id in self._by_id:
            for e in endpoints:
                m = by_id[e.id].metrics
                s = e.metrics
                m.waiting_queue_size = s.waiting
                m.running_requests_size = s.running
                m.kv_cache_usage_percent = s.kv_usage
                m.cache_block_size = s.block_size
                m.cache_num_blocks = s.num_blocks
                m.update_time = s.update_time

    def route(self, request: SimRequest, endpoints: Sequence[SimEndpoint]) -> str | None:
        i = self._next
        self._next = (i + 1) % len(self.schedulers)
        flow = self.schedulers[i].flow
        if flow is not None and (self._held[i] or not flow.open_for(0)):
            self._held[i].append((request, self._clock()))
            self.holds += 1
            return None
        return self._schedule(i, request)

    def held(self) -> int:
        return sum(len(q) for q in self._held)

    def dispatch(self) -> tuple[list[tuple[SimRequest, str]], list[SimRequest]]:
        routed: list[tuple[SimRequest, str]] = []
        shed: list[SimRequest] = []
        now = self._clock()
        for i, queue in enumerate(self._held):
            flow = self.schedulers[i].flow
            if not queue or flow is None:
                continue
            ttl = flow.request_ttl
            while queue and ttl > 0 and now - queue[0][1] > ttl:
                shed.append(queue.popleft()[0])
                flow.shed += 1
            while queue and flow.open_for(0):
                request = queue.popleft()[0]
                routed.append((request, self._schedule(i, request)))
        return routed, shed

    def _schedule(self, i: int, request: SimRequest) -> str:
        req = self._mod.SchedulingRequest(
            request_id=request.request_id,
            model=self.model,
            token_ids=request.prompt.tolist(),
            lora_name=request.lora_name,
            cache_salt=request.cache_salt,
        )
        result = self.schedulers[i].schedule(req, self._endpoints[i])
        self._inflight[request.request_id] = (i, req, result)
        target: str = result.targets[0].id
        return target

    def first_token(self, request: SimRequest) -> None:
        entry = self._inflight.get(request.request_id)
        if entry is not None:
            i, req, result = entry
            self.schedulers[i].first_token(req, result)

    def complete(self, request: SimRequest, outcome: RequestOutcome) -> None:
        entry = self._inflight.pop(request.request_id, None)
        if entry is None:
            return
        i, req, result = entry
        info = self._mod.ResponseInfo(
            status=outcome.status,
            prompt_tokens=outcome.prompt_tokens,
            cached_tokens=outcome.cached_tokens,
            completion_tokens=outcome.completion_tokens,
            error=outcome.error,
        )
        self.schedulers[i].post_response(req, result, info)

    def close(self) -> None:
        for sched in self.schedulers:
            stop = getattr(sched, "stop", None)
            if stop is not None:
                stop()


class Dispatcher(Protocol):
    """A router that holds requests (flow control) and hands them out later."""

    def dispatch(self) -> tuple[list[tuple[SimRequest, str]], list[SimRequest]]:
        """(held requests now routed, with their pod; held requests shed with 429)."""
        ...

    def held(self) -> int:
        """Requests held now."""
        ...


#: ``builtin:<name>`` router factories: (seed) -> Router.
BUILTIN_ROUTERS: dict[str, Callable[[int], Router]] = {
    "random": lambda seed: RandomRouter(seed),
    "round-robin": lambda seed: RoundRobinRouter(seed),
    "oracle": lambda seed: PrefixOracleRouter(seed),
}


def make_router(
    spec: str, *, clock: Callable[[], float], seed: int, model: str, replicas: int = 1
) -> Router:
    """A router from a CLI spec: ``builtin:<name>`` or the path of a scheduler YAML
    (`replicas` scheduler processes sharing the traffic; built-ins ignore it).

    Raises:
        ConfigError: Unknown built-in, missing file, or the scheduler cannot be built.
    """
    if spec.startswith("builtin:"):
        key = spec.split(":", 1)[1]
        factory = BUILTIN_ROUTERS.get(key)
        if factory is None:
            raise ConfigError(
                f"unknown built-in router {key!r}; valid: {sorted(BUILTIN_ROUTERS)}", spec
            )
        return factory(seed)
    if not Path(spec).is_file():
        raise ConfigError("no such scheduler config file", spec)
    return SchedulerRouter(spec, clock=clock, seed=seed, model=model, replicas=replicas)
