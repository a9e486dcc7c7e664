"""The discrete-event fleet: event delivery, determinism, routing baselines and accounting."""

from __future__ import annotations

import itertools

import numpy as np

from kvaware_scorer.sim.fleet import CLOCK_BASE, FleetConfig, FleetSimulator
from kvaware_scorer.sim.report import summarize
from kvaware_scorer.sim.request import RequestOutcome, SimRequest
from kvaware_scorer.sim.routing import PrefixOracleRouter, RandomRouter, SimEndpoint
from kvaware_scorer.sim.workloads import LoadStage, SharedPrefixWorkload

from .helpers import RecordingSink, small_profile


def _workload(
    seed: int = 0, groups: int = 12, rate: float = 20.0, duration: float = 6.0
) -> SharedPrefixWorkload:
    return SharedPrefixWorkload(
        num_groups=groups,
        num_prompts_per_group=3,
        system_prompt_len=600,
        question_len=100,
        output_len=40,
        load=[LoadStage(rate / 2, 2.0), LoadStage(rate, duration)],
        vocab_size=32000,
        seed=seed,
    )


def _fleet(**kw: object) -> FleetConfig:
    base: dict[str, object] = {"profile": small_profile(16), "num_pods": 4, "num_gpu_blocks": 400}
    base.update(kw)
    return FleetConfig(**base)  # type: ignore[arg-type]


class SinkRouter(RandomRouter):
    """The random baseline plus a recording KV-event sink (to observe the event path)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.sink = RecordingSink()
        self.completions: list[RequestOutcome] = []
        self.observed: list[float] = []

    @property
    def event_sinks(self) -> list[RecordingSink]:  # type: ignore[override]
        return [self.sink]

    def observe(self, endpoints: object, now: float) -> None:
        self.observed.append(now)

    def complete(self, request: SimRequest, outcome: RequestOutcome) -> None:
        self.completions.append(outcome)


def test_events_reach_sinks_in_per_pod_seq_order_and_rebuild_each_pool() -> None:
    """Every pod's payloads arrive with seq 0, 1, 2, ... and replaying them gives the pool's cache."""
    sim = FleetSimulator(_fleet())
    router = SinkRouter()
    result = sim.run(_workload(), router)
    sink = router.sink
    assert len(sink.frames) == result.payloads > 0
    by_pod: dict[str, list[int | None]] = {}
    for pod, model, seq, batch in sink.frames:
        by_pod.setdefault(pod, []).append(seq)
        assert model == sim.config.model_name and len(batch) == 3 and batch[2] == 0
    assert set(by_pod) == {e.id for e in sim.endpoints}
    for seqs in by_pod.values():
        assert seqs == list(range(len(seqs)))
    for e in sim.endpoints:
        assert dict(sink.held[e.id]) == e.engine.pool.cached_hashes()
    assert len(router.completions) == len(result.records)
    assert all(o.status == 200 and o.completion_tokens == 40 for o in router.completions)
    assert router.observed and min(router.observed) >= CLOCK_BASE


def test_event_delay_postpones_delivery() -> None:
    """With a delivery delay, payload timestamps precede the virtual time at which sinks see them."""
    seen: list[tuple[float, float]] = []

    class Clocked(SinkRouter):
        def __init__(self, sim: FleetSimulator) -> None:
            super().__init__()
            self.sim = sim

    sim = FleetSimulator(_fleet(event_delay_s=0.25))
    router = Clocked(sim)
    original = router.sink.ingest

    def ingest(pod: str, model: str | None, payload: bytes, seq: int | None = None) -> None:
        original(pod, model, payload, seq)
        seen.append((sim.now, router.sink.frames[-1][3][0]))

    router.sink.ingest = ingest  # type: ignore[method-assign]
    sim.run(_workload(), router)
    assert seen
    from kvaware_scorer.sim.fleet import EVENT_EPOCH

    assert all(abs(now - (ts - EVENT_EPOCH) - 0.25) < 1e-6 for now, ts in seen)


def test_runs_are_deterministic_for_a_seed() -> None:
    """The same seed gives the same records; another seed gives other arrivals."""

    def run(seed: int) -> list[tuple[str, str, float | None]]:
        sim = FleetSimulator(_fleet())
        res = sim.run(_workload(seed), RandomRouter(seed))
        return [(r.request_id, r.pod, r.first_token) for r in res.records]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_oracle_reaches_the_ideal_hit_rate_and_random_does_not() -> None:
    """With groups spread over pods, the pool-reading oracle hits ~ideal; random hits far less."""
    fleet = _fleet(num_gpu_blocks=400)
    rnd = summarize(FleetSimulator(fleet).run(_workload(groups=16), RandomRouter(0)))
    orc = summarize(FleetSimulator(fleet).run(_workload(groups=16), PrefixOracleRouter(0)))
    assert orc["prefix_hit_rate"] >= 0.9 * orc["ideal_hit_rate"]
    assert rnd["prefix_hit_rate"] < 0.8 * rnd["ideal_hit_rate"]
    assert rnd["ideal_hit_rate"] == orc["ideal_hit_rate"]
    assert orc["ttft_mean_s"] < rnd["ttft_mean_s"]
    assert orc["completed"] == rnd["completed"] == rnd["requests"]


def test_too_long_requests_are_rejected_and_reported() -> None:
    """A prompt beyond max_model_len gets a 400 outcome, routed but never queued."""
    fleet = _fleet(profile=small_profile(16, max_model_len=500))
    router = SinkRouter()
    res = FleetSimulator(fleet).run(_workload(), router)
    assert res.records and all(r.status == 400 for r in res.records)
    assert all(o.status == 400 and o.error for o in router.completions)
    assert res.payloads == 0


def test_drain_timeout_reports_unfinished_requests() -> None:
    """Past the drain deadline the run stops and open requests are reported as unfinished."""
    fleet = _fleet(num_pods=1, drain_timeout_s=0.0)
    wl = SharedPrefixWorkload(
        num_groups=2,
        num_prompts_per_group=2,
        system_prompt_len=400,
        question_len=50,
        output_len=3000,
        load=[LoadStage(5, 2.0)],
        vocab_size=1000,
    )
    res = FleetSimulator(fleet).run(wl, RandomRouter(0))
    summary = summarize(res)
    assert summary["unfinished"] > 0
    assert summary["unfinished"] + summary["completed"] == summary["requests"]
    # Unfinished requests still count for the pod they were sent to (load balance reports).
    assert summary["per_pod_requests"] == {"10.0.0.1:8000": len(res.records)}
    assert all(r.pod == "10.0.0.1:8000" for r in res.records)


def test_router_choosing_an_unknown_pod_is_an_error() -> None:
    """A router that names a pod outside the fleet stops the run with a clear error."""

    class Bad(RandomRouter):
        def route(self, request: SimRequest, endpoints: object) -> str:
            return "10.9.9.9:1"

    import pytest

    with pytest.raises(RuntimeError, match="unknown pod"):
        FleetSimulator(_fleet()).run(_workload(), Bad())


def test_endpoint_ids_are_address_and_port() -> None:
    """Pods are identified as '<address>:<port>', the form KV events and the index use."""
    sim = FleetSimulator(_fleet(num_pods=3))
    assert [e.id for e in sim.endpoints] == ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
    assert all(isinstance(e, SimEndpoint) and e.metrics.num_blocks == 400 for e in sim.endpoints)
    assert np.all([e.engine.block_size == 16 for e in sim.endpoints])


def test_event_loss_leaves_seq_gaps() -> None:
    """With event loss, some payloads never arrive and the delivered seqs show the gaps."""
    sim = FleetSimulator(_fleet(event_loss=0.3, seed=4))
    router = SinkRouter()
    result = sim.run(_workload(), router)
    assert 0 < result.payloads_lost < result.payloads
    assert len(router.sink.frames) == result.payloads - result.payloads_lost
    by_pod: dict[str, list[int]] = {}
    for pod, _model, seq, _batch in router.sink.frames:
        assert seq is not None
        by_pod.setdefault(pod, []).append(seq)
    gaps = sum(1 for seqs in by_pod.values() for a, b in itertools.pairwise(seqs) if b != a + 1)
    assert gaps > 0
    assert all(seqs == sorted(seqs) for seqs in by_pod.values())


def test_scrapes_follow_the_routers_reads() -> None:
    """As the live scheduler scrapes: at the interval while requests arrive faster than it,
    once per request when they arrive slower (right after its routing decision), and at the
    idle period with no requests; `scrape_on_read=False` scrapes at the interval throughout."""

    def run(rate: float, on_read: bool) -> tuple[list[float], list[float]]:
        router = SinkRouter()
        routed: list[float] = []
        route = router.route

        def recording(req: SimRequest, endpoints: list[SimEndpoint]) -> str | None:
            routed.append(req.arrival_time)
            return route(req, endpoints)

        router.route = recording  # type: ignore[method-assign]
        fleet = _fleet(metrics_interval_s=0.05, scrape_on_read=on_read, idle_scrape_s=1.0)
        FleetSimulator(fleet).run(_workload(rate=rate, duration=8.0), router)
        return [t - CLOCK_BASE for t in router.observed], routed

    fast, _ = run(40.0, True)
    slow, slow_reads = run(2.0, True)
    periodic, _ = run(2.0, False)
    span = max(slow_reads) - min(slow_reads)
    # 2 req/s: about one scrape per request (no more than one per read plus one a second)
    assert len(slow) <= len(slow_reads) + span + 3, (len(slow), len(slow_reads))
    assert len(slow) >= len(slow_reads) // 2
    assert len(periodic) >= 15 * span  # every 50 ms
    # every request after the first saw a scrape taken after the previous request's arrival
    for prev, cur in itertools.pairwise(sorted(slow_reads)):
        if cur - prev > 0.05:
            assert any(prev - 1e-6 <= s <= cur + 1e-6 for s in slow), (prev, cur)
    # 40 req/s: at the interval, never closer together than it
    gaps = np.diff(sorted(fast))
    assert gaps.min() >= 0.05 - 1e-9
    busy = [g for g in gaps if g < 0.5]
    assert np.median(busy) <= 0.06
