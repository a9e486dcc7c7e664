"""The discrete-event simulator: a fleet of emulated vLLM pods, a router and a workload.

Time is virtual. A heap orders four kinds of events: request arrivals, pod step ends, KV-event
deliveries and periodic metric scrapes. Each pod runs vLLM's busy loop: when a step ends, its
outputs are applied (first tokens, completions, freed blocks), its KV events are published as one
payload, and the next step is scheduled at once if the pod has work; an idle pod starts a step
when a request arrives. Payloads reach every sink of the router after ``event_delay_s`` with a
per-pod sequence number starting at 0, as ``sink.ingest(pod=..., model=..., payload=..., seq=...)``.
Endpoint metrics are scraped every ``metrics_interval_s`` (0 = after every step).

With ``drain_between_stages`` the stages are independent: a stage's first arrival waits until
every request of the stages before it has finished, and that stage and the ones after it move
later on the timeline by the wait (the reported windows are the moved ones). Off by default,
like the upstream ladder, where a stage inherits the queue the previous one left.

A run is deterministic for a seed: all randomness is seeded and ties in the heap break by
insertion order.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from kvaware_scorer.errors import ConfigError, NoEndpointError
from kvaware_scorer.sim.engine import Engine, EngineRequest, EngineStats
from kvaware_scorer.sim.hashing import make_hasher
from kvaware_scorer.sim.profiles import EngineProfile
from kvaware_scorer.sim.request import RequestOutcome, SimRequest
from kvaware_scorer.sim.routing import KVEventSink, PodMetrics, Router, SimEndpoint
from kvaware_scorer.sim.wire import EventEncoder
from kvaware_scorer.sim.workloads import StageWindow, Workload

__all__ = [
    "CLOCK_BASE",
    "EVENT_EPOCH",
    "FleetConfig",
    "FleetSimulator",
    "RequestRecord",
    "RunResult",
]

logger = logging.getLogger(__name__)

#: The router clock reads CLOCK_BASE + virtual time, so that no scrape time is 0 ("never").
CLOCK_BASE = 1000.0
#: KV events are stamped EVENT_EPOCH + virtual time (vLLM stamps wall-clock ``time.time()``).
EVENT_EPOCH = 1_764_000_000.0

_ARRIVAL, _STEP_END, _DELIVER, _SCRAPE, _SAMPLE = 0, 1, 2, 3, 4


@dataclass
class FleetConfig:
    """The emulated fleet.

    Attributes:
        profile: Every pod's profile.
        num_pods: Pods in the fleet.
        engine_hash: Block hash of the pods (``xxh3`` or vLLM's ``sha256``).
        hash_seed: The pods' PYTHONHASHSEED analogue (empty = unset).
        event_delay_s: Delay from publishing a KV-event payload to its delivery to the sinks.
        metrics_interval_s: Metrics scrape period; 0 = after every step.
        sample_interval_s: Period of the report's queue / KV-usage samples.
        model: Served model name (default: the profile's model).
        num_gpu_blocks: Override the profile's pool size (tests).
        drain_timeout_s: Stop this long after the last stage ends even if requests remain
            (they are reported as unfinished); None = run until every request finished.
        event_loss: Probability that a published payload never reaches the sinks (its seq is
            still consumed, so consumers see a gap, as with a ZMQ PUB dropping frames).
        seed: Seed of the event-loss draws.
        drain_between_stages: Start each stage only once every earlier request has finished
            (independent stages; see the module docstring).
    """

    profile: EngineProfile
    num_pods: int = 8
    engine_hash: str = "xxh3"
    hash_seed: str = ""
    event_delay_s: float = 0.005
    metrics_interval_s: float = 0.05
    sample_interval_s: float = 0.5
    model: str | None = None
    num_gpu_blocks: int | None = None
    drain_timeout_s: float | None = None
    event_loss: float = 0.0
    seed: int = 0
    drain_between_stages: bool = False

    def __post_init__(self) -> None:
        if self.num_pods < 1:
            raise ConfigError("must be >= 1", "numPods")
        if self.event_delay_s < 0 or self.metrics_interval_s < 0:
            raise ConfigError("delays and intervals must be >= 0")
        if self.sample_interval_s <= 0:
            raise ConfigError("must be > 0", "sampleInterval")
        if not 0.0 <= self.event_loss < 1.0:
            raise ConfigError("must be in [0, 1)", "eventLoss")

    @property
    def model_name(self) -> str:
        """The served model name."""
        return self.model or self.profile.model.name


@dataclass(slots=True)
class RequestRecord:
    """One request's life, for reports.

    Attributes:
        request_id: Id.
        stage: Load stage it arrived in.
        pod: Pod it was routed to ("" when routing failed).
        status: 200 served, 400 rejected, 503 no endpoint, 0 unfinished at the end of the run.
        arrival: Virtual arrival time.
        first_token: Virtual time of the first token (None without one).
        finish: Virtual completion time (None if unfinished).
        prompt_tokens: Prompt length.
        cached_tokens: Prefix-cache hit at its first admission.
        ideal_cached_tokens: Hit an infinite cache that saw every earlier request would give.
        output_tokens: Tokens generated.
        preemptions: Times it was preempted.
    """

    request_id: str
    stage: int
    pod: str
    status: int
    arrival: float
    first_token: float | None
    finish: float | None
    prompt_tokens: int
    cached_tokens: int
    ideal_cached_tokens: int
    output_tokens: int
    preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass
class RunResult:
    """Everything a run measured.

    Attributes:
        router: Router name.
        stages: Load stages on the timeline.
        records: One record per request.
        stage_output_tokens: Output tokens generated inside each stage's time window.
        samples: (virtual time, mean waiting, mean running, mean KV usage) over pods.
        pods: Pod ids.
        end_time: Virtual time of the last event.
        wall_time_s: Real seconds the run took.
        payloads: KV-event payloads published.
        payload_bytes: Their total size.
        payloads_lost: Payloads dropped on the way to the sinks (``event_loss``).
        sink_errors: Payloads a sink raised on (logged and skipped).
        engine_stats: Per-pod engine counters.
        profile: The pods' profile figures (`EngineProfile.describe`).
        workload: The workload's knobs (`Workload.describe`).
        drain_between_stages: Stages ran independently (each after the previous drained).
        measure_ends: End of each stage's measurement window (output and completion rates):
            its arrival window's end; with ``drain_between_stages``, the next stage's start
            (the last stage: the end of the run), so a stage's drain counts as its own.
    """

    router: str
    stages: list[StageWindow]
    records: list[RequestRecord] = field(default_factory=list)
    stage_output_tokens: list[int] = field(default_factory=list)
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)
    pods: list[str] = field(default_factory=list)
    end_time: float = 0.0
    wall_time_s: float = 0.0
    payloads: int = 0
    payload_bytes: int = 0
    payloads_lost: int = 0
    sink_errors: int = 0
    engine_stats: dict[str, EngineStats] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    drain_between_stages: bool = False
    measure_ends: list[float] = field(default_factory=list)


class FleetSimulator:
    """Runs a workload through a router against a fleet of emulated pods.

    Args:
        config: The fleet.

    Example:
        >>> sim = FleetSimulator(FleetConfig(get_profile("llama-3.1-8b-1xh100"), num_pods=2))
        >>> result = sim.run(workload, RandomRouter(seed=0))  # doctest: +SKIP
    """

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.now = 0.0
        profile = config.profile
        self.hasher = make_hasher(config.engine_hash, profile.block_size, config.hash_seed)
        self.engines = [
            Engine(profile, self.hasher, num_gpu_blocks=config.num_gpu_blocks)
            for _ in range(config.num_pods)
        ]
        self.endpoints = [
            SimEndpoint(
                name=f"pod-{i}",
                address=f"10.0.{i // 250}.{i % 250 + 1}",
                port=8000,
                model=config.model_name,
                metrics=PodMetrics(
                    block_size=profile.block_size, num_blocks=self.engines[i].pool.num_gpu_blocks
                ),
                engine=self.engines[i],
            )
            for i in range(config.num_pods)
        ]
        self._hash_cache: dict[object, tuple[list[int], object | None]] = {}
        self._ran = False

    def clock(self) -> float:
        """The router clock: CLOCK_BASE + virtual time (monotonic, never 0)."""
        return CLOCK_BASE + self.now

    # -- helpers --------------------------------------------------------------------------------

    def _hash_prompt(self, req: SimRequest) -> None:
        if req.block_hashes is not None:
            return
        key = req.prompt_key
        if key is not None:
            full_key = (key, req.lora_name, req.cache_salt)
            hit = self._hash_cache.get(full_key)
            if hit is None:
                hit = self.hasher.chain(req.prompt, 0, None, req.lora_name, req.cache_salt)
                self._hash_cache[full_key] = hit
            req.block_hashes, req.hash_state = hit
        else:
            req.block_hashes, req.hash_state = self.hasher.chain(
                req.prompt, 0, None, req.lora_name, req.cache_salt
            )

    def _scrape(self) -> None:
        now = self.clock()
        for e in self.endpoints:
            eng = e.engine
            m = e.metrics
            m.waiting = len(eng.waiting)
            m.running = len(eng.running)
            m.kv_usage = eng.pool.usage()
            m.update_time = now

    # -- the run --------------------------------------------------------------------------------

    def run(
        self,
        workload: Workload,
        router: Router,
        *,
        progress: bool = False,
        progress_desc: str | None = None,
    ) -> RunResult:
        """Run `workload` to completion (or the drain timeout) through `router`.

        Raises:
            RuntimeError: The simulator was already used, or a router named an unknown pod.
        """
        if self._ran:
            raise RuntimeError("a FleetSimulator runs once; build a new one")
        self._ran = True
        wall0 = time.perf_counter()
        cfg = self.config
        model = cfg.model_name
        bs = cfg.profile.block_size
        endpoints = self.endpoints
        engines = self.engines
        by_id = {e.id: i for i, e in enumerate(endpoints)}
        planned = workload.stages()
        stages = list(planned)  # moved later stage by stage with drain_between_stages
        starts = [s.start for s in stages]
        result = RunResult(
            router=router.name,
            stages=stages,
            stage_output_tokens=[0] * len(stages),
            pods=[e.id for e in endpoints],
            profile=cfg.profile.describe(),
            workload=workload.describe(),
            drain_between_stages=cfg.drain_between_stages,
            measure_ends=[w.end for w in stages],
        )
        measure_ends = result.measure_ends
        records = result.records
        stage_tokens = result.stage_output_tokens

        def drain_deadline() -> float | None:
            load_end = stages[-1].end if stages else 0.0
            return None if cfg.drain_timeout_s is None else load_end + cfg.drain_timeout_s

        deadline = drain_deadline()

        self._scrape()
        router.bind(endpoints)
        sinks: list[KVEventSink] = list(router.event_sinks)
        # NOTE: optional, so that routers written before first-token reports still run.
        on_first: Callable[[SimRequest], None] | None = getattr(router, "first_token", None)
        encoder = EventEncoder()
        seqs = [0] * len(engines)
        busy = [False] * len(engines)
        delay = cfg.event_delay_s
        interval = cfg.metrics_interval_s
        loss = cfg.event_loss
        loss_rng = random.Random(cfg.seed)
        ideal_seen: set[int] = set()
        live: dict[str, tuple[EngineRequest, int, int, str]] = {}

        heap: list[tuple[float, int, int, Any]] = []
        counter = 0
        pending_arrivals = 0
        pending_deliveries = 0

        def push(t: float, kind: int, data: Any) -> None:
            nonlocal counter
            counter += 1
            heapq.heappush(heap, (t, counter, kind, data))

        source: Iterator[SimRequest] = iter(workload.requests())
        source_done = False
        drain = cfg.drain_between_stages
        shift = 0.0  # how much later than planned the current stage runs (drain only)
        current_stage = stages[0].index if stages else 0
        held: SimRequest | None = None  # a next stage's first arrival, waiting for the drain

        def next_from_source() -> None:
            # Called while an arrival is being handled: that request is in flight too.
            nonlocal source_done, held
            req = next(source, None)
            if req is None:
                source_done = True
                return
            if drain and req.stage != current_stage:
                held = req
                return
            release(req)

        def release(req: SimRequest) -> None:
            nonlocal pending_arrivals, shift, current_stage, deadline
            if drain and req.stage != current_stage:
                shift = max(shift, self.now - planned[req.stage].start)
                for k in range(req.stage, len(stages)):
                    w = planned[k]
                    stages[k] = replace(w, start=w.start + shift, end=w.end + shift)
                    starts[k] = stages[k].start
                    measure_ends[k] = stages[k].end
                for k in range(current_stage, req.stage):
                    measure_ends[k] = max(stages[k].end, stages[k + 1].start)
                current_stage = req.stage
                deadline = drain_deadline()
            req.arrival_time += shift
            pending_arrivals += 1
            push(req.arrival_time, _ARRIVAL, (req, True))

        def start_step(i: int) -> None:
            busy[i] = True
            push(self.now + engines[i].begin_step(self.now), _STEP_END, i)

        def deliver(i: int, payload: bytes, seq: int) -> None:
            pod = endpoints[i].id
            for sink in sinks:
                try:
                    sink.ingest(pod=pod, model=model, payload=payload, seq=seq)
                except Exception:
                    result.sink_errors += 1
                    logger.exception("KV-event sink %r failed on %s seq %d", sink, pod, seq)

        def finish_request(er: EngineRequest, status: int, pod: str, error: str | None) -> None:
            req = er.sim
            outcome = RequestOutcome(
                status=status,
                pod=pod,
                prompt_tokens=er.num_prompt_tokens,
                cached_tokens=max(er.num_cached_tokens, 0),
                completion_tokens=er.num_output_tokens,
                arrival_time=req.arrival_time,
                first_token_time=er.first_token_time,
                finish_time=self.now,
                preemptions=er.preemptions,
                error=error,
            )
            router.complete(req, outcome)
            for follow in workload.on_complete(req, self.now):
                push_arrival(follow)

        def push_arrival(req: SimRequest) -> None:
            nonlocal pending_arrivals
            if drain:
                # NOTE: the workload placed it on the planned timeline; while draining, every
                # follow-up belongs to the stage being run.
                req.stage = current_stage
            if req.arrival_time < self.now:
                req.arrival_time = self.now
            pending_arrivals += 1
            push(req.arrival_time, _ARRIVAL, (req, False))

        def ideal_hit(req: SimRequest) -> int:
            hashes = req.block_hashes or []
            limit = (req.num_prompt_tokens - 1) // bs
            n = 0
            for h in hashes[:limit]:
                if h not in ideal_seen:
                    break
                n += 1
            ideal_seen.update(hashes)
            return n * bs

        bar = _progress(progress, workload.expected_requests(), progress_desc or router.name)
        next_from_source()
        if interval > 0:
            push(0.0, _SCRAPE, None)
        push(0.0, _SAMPLE, None)
        heappop = heapq.heappop
        stopped_early = False
        try:
            while heap:
                if held is not None and not live and not pending_arrivals:
                    next_req, held = held, None
                    release(next_req)
                t, _, kind, data = heappop(heap)
                if deadline is not None and t > deadline:
                    stopped_early = True
                    break
                self.now = t
                if kind == _STEP_END:
                    i = data
                    out = engines[i].finish_step(t)
                    if on_first is not None:
                        for er in out.first_tokens:
                            on_first(er.sim)
                    if out.sampled:
                        if drain:
                            stage_tokens[current_stage] += out.sampled
                        else:
                            k = bisect.bisect_right(starts, t) - 1
                            if 0 <= k < len(stages) and t < stages[k].end:
                                stage_tokens[k] += out.sampled
                    if out.events:
                        payload = encoder.encode(EVENT_EPOCH + t, out.events)
                        seq = seqs[i]
                        seqs[i] = seq + 1
                        result.payloads += 1
                        result.payload_bytes += len(payload)
                        if loss and loss_rng.random() < loss:
                            result.payloads_lost += 1
                        elif sinks:
                            if delay > 0:
                                pending_deliveries += 1
                                push(t + delay, _DELIVER, (i, payload, seq))
                            else:
                                deliver(i, payload, seq)
                    for er in out.finished:
                        _, stage, ideal, _pod = live.pop(er.request_id)
                        records.append(
                            RequestRecord(
                                er.request_id,
                                stage,
                                endpoints[i].id,
                                200,
                                er.sim.arrival_time,
                                er.first_token_time,
                                t,
                                er.num_prompt_tokens,
                                max(er.num_cached_tokens, 0),
                                ideal,
                                er.num_output_tokens,
                                er.preemptions,
                            )
                        )
                        ideal_seen.update(er.block_hashes)
                        finish_request(er, 200, endpoints[i].id, None)
                        bar.done()
                    if interval == 0:
                        self._scrape()
                        router.observe(endpoints, self.clock())
                    if engines[i].has_work():
                        start_step(i)
                    else:
                        busy[i] = False
                elif kind == _ARRIVAL:
                    req, from_source = data
                    pending_arrivals -= 1
                    bar.routed()
                    if from_source:
                        next_from_source()
                    self._hash_prompt(req)
                    ideal = ideal_hit(req)
                    try:
                        pod_id = router.route(req, endpoints)
                    except NoEndpointError as exc:
                        logger.warning("no endpoint for %s: %s", req.request_id, exc)
                        records.append(_failed(req, "", 503, ideal))
                        bar.done()
                        continue
                    i = by_id.get(pod_id, -1)
                    if i < 0:
                        raise RuntimeError(f"router {router.name!r} chose unknown pod {pod_id!r}")
                    engine = engines[i]
                    reason = engine.validate(req)
                    if reason is not None:
                        records.append(_failed(req, pod_id, 400, ideal))
                        router.complete(
                            req,
                            RequestOutcome(
                                400, pod_id, req.num_prompt_tokens, 0, 0, t, None, t, 0, reason
                            ),
                        )
                        bar.done()
                        continue
                    er = engine.add_request(req)
                    live[er.request_id] = (er, req.stage, ideal, pod_id)
                    if not busy[i]:
                        start_step(i)
                elif kind == _DELIVER:
                    pending_deliveries -= 1
                    deliver(*data)
                elif kind == _SCRAPE:
                    self._scrape()
                    router.observe(endpoints, self.clock())
                    if live or pending_arrivals or not source_done or pending_deliveries:
                        push(t + interval, _SCRAPE, None)
                else:
                    n = len(engines)
                    result.samples.append(
                        (
                            t,
                            sum(len(e.waiting) for e in engines) / n,
                            sum(len(e.running) for e in engines) / n,
                            sum(e.pool.usage() for e in engines) / n,
                        )
                    )
                    if live or pending_arrivals or not source_done:
                        push(t + cfg.sample_interval_s, _SAMPLE, None)
        finally:
            bar.close()
        if stopped_early:
            for er, stage, ideal, pod_id in live.values():
                records.append(
                    RequestRecord(
                        er.request_id,
                        stage,
                        pod_id,
                        0,
                        er.sim.arrival_time,
                        er.first_token_time,
                        None,
                        er.num_prompt_tokens,
                        max(er.num_cached_tokens, 0),
                        ideal,
                        er.num_output_tokens,
                        er.preemptions,
                    )
                )
        result.end_time = self.now
        if drain and stages:
            measure_ends[current_stage] = max(stages[current_stage].end, self.now)
        result.engine_stats = {e.id: e.engine.stats for e in endpoints}
        result.wall_time_s = time.perf_counter() - wall0
        return result


def _failed(req: SimRequest, pod: str, status: int, ideal: int) -> RequestRecord:
    return RequestRecord(
        req.request_id,
        req.stage,
        pod,
        status,
        req.arrival_time,
        None,
        req.arrival_time,
        req.num_prompt_tokens,
        0,
        ideal,
        0,
    )


class _NoBar:
    def routed(self) -> None:
        return None

    def done(self) -> None:
        return None

    def close(self) -> None:
        return None


#: Seconds between progress-bar refreshes.
PROGRESS_INTERVAL_S = 1.0


class _Progress:
    """A progress bar on stderr where each request counts half when routed and half when done.

    Counting completions alone gives no rate (and an ETA of hours) until the first request has
    generated its whole output, tens of virtual seconds into the run; arrivals advance the bar
    from the first request on. The rate is averaged over the whole run so far (tqdm's
    ``smoothing=0``): the simulator's speed varies with the load, and a short-term rate swings.
    """

    def __init__(self, total: int | None, desc: str) -> None:
        from tqdm import tqdm

        self.total = total
        self._routed = 0
        self._done = 0
        self.bar = tqdm(
            total=None if total is None else 2 * total,
            desc=desc,
            file=sys.stderr,
            mininterval=PROGRESS_INTERVAL_S,
            smoothing=0.0,
            leave=True,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
        )

    def _postfix(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        return f"{self._routed}{of} routed, {self._done} done"

    def routed(self) -> None:
        self._routed += 1
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        self.bar.update(1)

    def done(self) -> None:
        self._done += 1
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        self.bar.close()


def _progress(enabled: bool, total: int | None, desc: str) -> _Progress | _NoBar:
    if not enabled:
        return _NoBar()
    return _Progress(total, desc)
