"""The discrete-event simulator: a fleet of emulated vLLM pods, a router and a workload.

Time is virtual. A heap orders four kinds of events: request arrivals, pod step ends, KV-event
deliveries and periodic metric scrapes. Each pod runs vLLM's busy loop: when a step ends, its
outputs are applied (first tokens, completions, freed blocks), its KV events are published as one
payload, and the next step is scheduled at once if the pod has work; an idle pod starts a step
when a request arrives. Payloads reach every sink of the router after ``event_delay_s`` with a
per-pod sequence number starting at 0, as ``sink.ingest(pod=..., model=..., payload=..., seq=...)``.
Endpoint metrics are scraped as the live scheduler scrapes them (``scrape_on_read``: every
``metrics_interval_s`` while the router reads them at least that often, at the next read when
it reads them less often, once per ``idle_scrape_s`` without reads), or every
``metrics_interval_s`` regardless, or after every step (0).

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
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from kvaware_scorer.errors import NoEndpointError
from kvaware_scorer.sim.engine import Engine, EngineRequest
from kvaware_scorer.sim.fleet_types import FleetConfig, RequestRecord, RunResult
from kvaware_scorer.sim.hashing import make_hasher
from kvaware_scorer.sim.progress import progress_bar
from kvaware_scorer.sim.request import RequestOutcome, SimRequest
from kvaware_scorer.sim.routing import Dispatcher, KVEventSink, PodMetrics, Router, SimEndpoint
from kvaware_scorer.sim.wire import EventEncoder
from kvaware_scorer.sim.workloads import Workload

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
        run = _Run(self, workload, router, progress, progress_desc)
        handlers = (run.on_arrival, run.on_step_end, run.on_deliver, run.on_scrape, run.on_sample)
        heap = run.heap
        heappop = heapq.heappop
        stopped_early = False
        try:
            while heap:
                run.release_held()
                t, _, kind, data = heappop(heap)
                if run.deadline is not None and t > run.deadline:
                    stopped_early = True
                    break
                self.now = t
                handlers[kind](t, data)
        finally:
            run.bar.close()
        return run.finish(stopped_early, wall0)


class _Run:
    """One run's state: the event heap, the stage timeline, in-flight requests, the result.

    `FleetSimulator.run` pops the heap and calls the ``on_*`` method of each event's kind.
    """

    def __init__(
        self,
        sim: FleetSimulator,
        workload: Workload,
        router: Router,
        progress: bool,
        progress_desc: str | None,
    ) -> None:
        # NOTE: long: a run's whole state, set up in the order it reads the router and workload.
        cfg = sim.config
        self.sim = sim
        self.cfg = cfg
        self.workload = workload
        self.router = router
        self.model = cfg.model_name
        self.bs = cfg.profile.block_size
        self.endpoints = endpoints = sim.endpoints
        self.engines = engines = sim.engines
        self.by_id = {e.id: i for i, e in enumerate(endpoints)}
        self.planned = workload.stages()
        self.stages = stages = list(self.planned)  # moved later stage by stage while draining
        self.starts = [s.start for s in stages]
        self.result = RunResult(
            router=router.name,
            stages=stages,
            stage_output_tokens=[0] * len(stages),
            pods=[e.id for e in endpoints],
            profile=cfg.profile.describe(),
            workload=workload.describe(),
            drain_between_stages=cfg.drain_between_stages,
            measure_ends=[w.end for w in stages],
        )
        self.measure_ends = self.result.measure_ends
        self.records = self.result.records
        self.stage_tokens = self.result.stage_output_tokens
        self.deadline = self._drain_deadline()

        sim._scrape()
        router.bind(endpoints)
        self.sinks: list[KVEventSink] = list(router.event_sinks)
        # NOTE: optional, so that routers written before first-token reports still run.
        self.on_first: Callable[[SimRequest], None] | None = getattr(router, "first_token", None)
        self.encoder = EventEncoder()
        self.seqs = [0] * len(engines)
        self.busy = [False] * len(engines)
        self.delay = cfg.event_delay_s
        self.interval = cfg.metrics_interval_s
        # NOTE: scrape-on-read: the pending scrape's time (inf: none) and the last one's.
        self.on_read = cfg.scrape_on_read and self.interval > 0
        self.idle_scrape = max(cfg.idle_scrape_s, self.interval)
        self.next_scrape = 0.0 if self.interval > 0 else float("inf")
        self.last_scrape = 0.0
        self.loss = cfg.event_loss
        self.loss_rng = random.Random(cfg.seed)
        self.ideal_seen: set[int] = set()
        self.live: dict[str, tuple[EngineRequest, int, int, str]] = {}
        # NOTE: requests the router holds (flow control), with their ideal hit.
        self.gated: dict[str, tuple[SimRequest, int]] = {}
        self.dispatcher: Dispatcher | None = (
            router if callable(getattr(router, "dispatch", None)) else None  # type: ignore[assignment]
        )

        self.heap: list[tuple[float, int, int, Any]] = []
        self.counter = 0
        self.pending_arrivals = 0
        self.pending_deliveries = 0

        self.source: Iterator[SimRequest] = iter(workload.requests())
        self.source_done = False
        self.drain = cfg.drain_between_stages
        self.shift = 0.0  # how much later than planned the current stage runs (drain only)
        self.current_stage = stages[0].index if stages else 0
        self.held: SimRequest | None = None  # a next stage's first arrival, waiting to drain

        self.bar = progress_bar(
            progress, workload.expected_requests(), progress_desc or router.name
        )
        self._next_from_source()
        if self.interval > 0:
            self._push(0.0, _SCRAPE, 0.0)
        self._push(0.0, _SAMPLE, None)

    # -- helpers --------------------------------------------------------------------------------

    def _drain_deadline(self) -> float | None:
        load_end = self.stages[-1].end if self.stages else 0.0
        timeout = self.cfg.drain_timeout_s
        return None if timeout is None else load_end + timeout

    def _push(self, t: float, kind: int, data: Any) -> None:
        self.counter += 1
        heapq.heappush(self.heap, (t, self.counter, kind, data))

    def _next_from_source(self) -> None:
        # Called while an arrival is being handled: that request is in flight too.
        req = next(self.source, None)
        if req is None:
            self.source_done = True
            return
        if self.drain and req.stage != self.current_stage:
            self.held = req
            return
        self._release(req)

    def release_held(self) -> None:
        """Release a held next-stage arrival once the fleet has drained."""
        if self.held is not None and not (self.live or self.gated or self.pending_arrivals):
            req, self.held = self.held, None
            self._release(req)

    def _release(self, req: SimRequest) -> None:
        if self.drain and req.stage != self.current_stage:
            self._move_stages(req.stage)
        req.arrival_time += self.shift
        self.pending_arrivals += 1
        self._push(req.arrival_time, _ARRIVAL, (req, True))

    def _move_stages(self, stage: int) -> None:
        """Start `stage` now: it and the stages after it move later by the drain's wait."""
        stages, planned, measure_ends = self.stages, self.planned, self.measure_ends
        self.shift = max(self.shift, self.sim.now - planned[stage].start)
        shift = self.shift
        for k in range(stage, len(stages)):
            w = planned[k]
            stages[k] = replace(w, start=w.start + shift, end=w.end + shift)
            self.starts[k] = stages[k].start
            measure_ends[k] = stages[k].end
        for k in range(self.current_stage, stage):
            measure_ends[k] = max(stages[k].end, stages[k + 1].start)
        self.current_stage = stage
        self.deadline = self._drain_deadline()

    def _start_step(self, i: int) -> None:
        self.busy[i] = True
        now = self.sim.now
        self._push(now + self.engines[i].begin_step(now), _STEP_END, i)

    def _deliver(self, i: int, payload: bytes, seq: int) -> None:
        pod = self.endpoints[i].id
        for sink in self.sinks:
            try:
                sink.ingest(pod=pod, model=self.model, payload=payload, seq=seq)
            except Exception:
                self.result.sink_errors += 1
                logger.exception("KV-event sink %r failed on %s seq %d", sink, pod, seq)

    def _finish_request(self, er: EngineRequest, status: int, pod: str, error: str | None) -> None:
        req = er.sim
        now = self.sim.now
        outcome = RequestOutcome(
            status=status,
            pod=pod,
            prompt_tokens=er.num_prompt_tokens,
            cached_tokens=max(er.num_cached_tokens, 0),
            completion_tokens=er.num_output_tokens,
            arrival_time=req.arrival_time,
            first_token_time=er.first_token_time,
            finish_time=now,
            preemptions=er.preemptions,
            error=error,
        )
        self.router.complete(req, outcome)
        for follow in self.workload.on_complete(req, now):
            self._push_arrival(follow)

    def _push_arrival(self, req: SimRequest) -> None:
        if self.drain:
            # NOTE: the workload placed it on the planned timeline; while draining, every
            # follow-up belongs to the stage being run.
            req.stage = self.current_stage
        if req.arrival_time < self.sim.now:
            req.arrival_time = self.sim.now
        self.pending_arrivals += 1
        self._push(req.arrival_time, _ARRIVAL, (req, False))

    def _ideal_hit(self, req: SimRequest) -> int:
        bs = self.bs
        hashes = req.block_hashes or []
        limit = (req.num_prompt_tokens - 1) // bs
        n = 0
        for h in hashes[:limit]:
            if h not in self.ideal_seen:
                break
            n += 1
        self.ideal_seen.update(hashes)
        return n * bs

    def _in_flight(self) -> bool:
        return bool(self.live or self.gated or self.pending_arrivals or not self.source_done)

    # -- events ---------------------------------------------------------------------------------

    def on_step_end(self, t: float, i: int) -> None:
        """A pod's step ended: apply it, publish its events, record finished requests."""
        out = self.engines[i].finish_step(t)
        if self.on_first is not None:
            for er in out.first_tokens:
                self.on_first(er.sim)
        if out.sampled:
            self._count_tokens(t, out.sampled)
        if out.events:
            self._publish(t, i, self.encoder.encode(EVENT_EPOCH + t, out.events))
        pod = self.endpoints[i].id
        for er in out.finished:
            _, stage, ideal, _pod = self.live.pop(er.request_id)
            self.records.append(
                RequestRecord(
                    er.request_id,
                    stage,
                    pod,
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
            self.ideal_seen.update(er.block_hashes)
            self._finish_request(er, 200, pod, None)
            self.bar.done()
        if self.interval == 0:
            self.sim._scrape()
            self.router.observe(self.endpoints, self.sim.clock())
        if self.engines[i].has_work():
            self._start_step(i)
        else:
            self.busy[i] = False
        self._dispatch_held()

    def _count_tokens(self, t: float, sampled: int) -> None:
        if self.drain:
            self.stage_tokens[self.current_stage] += sampled
        else:
            k = bisect.bisect_right(self.starts, t) - 1
            if 0 <= k < len(self.stages) and t < self.stages[k].end:
                self.stage_tokens[k] += sampled

    def _publish(self, t: float, i: int, payload: bytes) -> None:
        result = self.result
        seq = self.seqs[i]
        self.seqs[i] = seq + 1
        result.payloads += 1
        result.payload_bytes += len(payload)
        if self.loss and self.loss_rng.random() < self.loss:
            result.payloads_lost += 1
        elif self.sinks:
            if self.delay > 0:
                self.pending_deliveries += 1
                self._push(t + self.delay, _DELIVER, (i, payload, seq))
            else:
                self._deliver(i, payload, seq)

    def on_arrival(self, t: float, data: tuple[SimRequest, bool]) -> None:
        """A request arrives: route it and queue it on the chosen pod (or the router holds it)."""
        req, from_source = data
        self.pending_arrivals -= 1
        self.bar.routed()
        if from_source:
            self._next_from_source()
        self.sim._hash_prompt(req)
        ideal = self._ideal_hit(req)
        try:
            pod_id = self.router.route(req, self.endpoints)
        except NoEndpointError as exc:
            logger.warning("no endpoint for %s: %s", req.request_id, exc)
            self.records.append(_failed(req, "", 503, ideal))
            self.bar.done()
            return
        finally:
            self._read(t)  # the router read the metrics for this decision
        if pod_id is None:
            self.gated[req.request_id] = (req, ideal)
            return
        self._send(t, req, pod_id, ideal)

    def _send(self, t: float, req: SimRequest, pod_id: str, ideal: int) -> None:
        """Queue a routed request on its pod."""
        i = self.by_id.get(pod_id, -1)
        if i < 0:
            raise RuntimeError(f"router {self.router.name!r} chose unknown pod {pod_id!r}")
        engine = self.engines[i]
        reason = engine.validate(req)
        if reason is not None:
            self.records.append(_failed(req, pod_id, 400, ideal))
            self.router.complete(
                req,
                RequestOutcome(400, pod_id, req.num_prompt_tokens, 0, 0, t, None, t, 0, reason),
            )
            self.bar.done()
            return
        er = engine.add_request(req)
        self.live[er.request_id] = (er, req.stage, ideal, pod_id)
        if not self.busy[i]:
            self._start_step(i)

    def _dispatch_held(self) -> None:
        """Send the requests the router's flow control releases now; record those it shed."""
        if self.dispatcher is None or not self.gated:
            return
        routed, shed = self.dispatcher.dispatch()
        t = self.sim.now
        self._read(t)  # flow control looked at the pool's load
        for req in shed:
            self.records.append(_failed(req, "", 429, self.gated.pop(req.request_id)[1]))
            self.bar.done()
        for req, pod_id in routed:
            self._send(t, req, pod_id, self.gated.pop(req.request_id)[1])

    def on_deliver(self, t: float, data: tuple[int, bytes, int]) -> None:
        """A delayed KV-event payload reaches the sinks."""
        self.pending_deliveries -= 1
        self._deliver(*data)

    def _read(self, t: float) -> None:
        """The router read the metrics at `t` (scrape-on-read: the next scrape is due
        ``interval`` after the last one, or now when that has passed)."""
        if not self.on_read:
            return
        due = max(t, self.last_scrape + self.interval)
        if due < self.next_scrape:
            self.next_scrape = due
            self._push(due, _SCRAPE, due)

    def on_scrape(self, t: float, data: float) -> None:
        """A metrics scrape (periodic, or the one a read made due)."""
        if self.on_read:
            if data != self.next_scrape:
                return  # superseded by an earlier one a read made due
            self.last_scrape = t
            self.next_scrape = float("inf")
        self.sim._scrape()
        self.router.observe(self.endpoints, self.sim.clock())
        self._dispatch_held()
        if not (self._in_flight() or self.pending_deliveries):
            return
        if not self.on_read:
            self._push(t + self.interval, _SCRAPE, t + self.interval)
        elif self.next_scrape == float("inf"):
            self.next_scrape = t + self.idle_scrape
            self._push(self.next_scrape, _SCRAPE, self.next_scrape)

    def on_sample(self, t: float, data: None) -> None:
        """The periodic fleet-average sample (queue lengths, KV usage)."""
        engines = self.engines
        n = len(engines)
        self.result.samples.append(
            (
                t,
                sum(len(e.waiting) for e in engines) / n,
                sum(len(e.running) for e in engines) / n,
                sum(e.pool.usage() for e in engines) / n,
            )
        )
        if self._in_flight():
            self._push(t + self.cfg.sample_interval_s, _SAMPLE, None)

    # -- the end --------------------------------------------------------------------------------

    def finish(self, stopped_early: bool, wall0: float) -> RunResult:
        """The result: requests cut off by the drain timeout recorded, windows closed."""
        result = self.result
        now = self.sim.now
        if stopped_early:
            for er, stage, ideal, pod_id in self.live.values():
                self.records.append(
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
            for req, ideal in self.gated.values():
                self.records.append(_failed(req, "", 0, ideal))
        result.end_time = now
        if self.drain and self.stages:
            current = self.current_stage
            self.measure_ends[current] = max(self.stages[current].end, now)
        result.engine_stats = {e.id: e.engine.stats for e in self.endpoints}
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
