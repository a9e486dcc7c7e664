"""Flow control and admission: saturation detectors, the queue (priority, fairness, ordering,
shedding with 429/503), probabilistic admission and agent identity (ported in spirit from
upstream's detector, policy and admitter tables)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from kvaware_scorer.errors import RequestRejectedError
from kvaware_scorer.scheduler import (
    EndpointMetrics,
    ResponseInfo,
    Scheduler,
    SchedulingRequest,
)

from .conftest import FakeClock, build, config, endpoints


def plugin(
    type_name: str, params: dict[str, Any] | None = None, **kw: Any
) -> tuple[Scheduler, Any]:
    entry: dict[str, Any] = {"type": type_name}
    if params is not None:
        entry["parameters"] = params
    s = build(config([entry]), seed=0, **kw)
    return s, s.plugin(type_name)


def req(rid: str, **kw: Any) -> SchedulingRequest:
    return SchedulingRequest(rid, "m", token_ids=list(range(32)), **kw)


# -- detectors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "saturation"),
    [
        ([(0, 0.0), (0, 0.0)], 0.0),
        ([(5, 0.0), (0, 0.4)], 0.75),  # max(5/5, 0) = 1 and max(0, 0.4/0.8) = 0.5
        ([(10, 0.0), (0, 0.8)], 1.5),
        ([(0, 0.0), None], 0.5),  # unknown metrics count as saturated (fail closed)
    ],
)
def test_utilization_detector_roofline(metrics: list[Any], saturation: float) -> None:
    """Pool saturation is the average of max(queue / 5, kv / 0.8), unknown = 1."""
    s, d = plugin("utilization-detector")
    eps = endpoints(len(metrics))
    clock_now = s.context().now
    for e, m in zip(eps, metrics, strict=True):
        if m is None:
            e.metrics = EndpointMetrics(update_time=1.0)  # long stale
        else:
            e.metrics = EndpointMetrics(
                waiting_queue_size=m[0], kv_cache_usage_percent=m[1], update_time=clock_now
            )
    assert d.saturated(s.context(), eps) == pytest.approx(saturation)


def test_utilization_filter_fails_open() -> None:
    """Endpoints over the limits are dropped, but never all of them."""
    s, d = plugin("utilization-detector", {"queueDepthThreshold": 2})
    eps = endpoints(2)
    eps[0].metrics = EndpointMetrics(waiting_queue_size=1)
    eps[1].metrics = EndpointMetrics(waiting_queue_size=3)
    assert d.filter(s.context(), req("a"), eps) == [eps[0]]
    eps[0].metrics = EndpointMetrics(waiting_queue_size=9)
    assert d.filter(s.context(), req("a"), eps) == eps


@pytest.mark.parametrize(
    ("mode", "expected"), [("requests", 0.75), ("tokens", 96 / 20000), ("hybrid", 0.75)]
)
def test_concurrency_detector_counts_in_flight(mode: str, expected: float) -> None:
    """In-flight requests (or prompt tokens) over capacity; released requests stop counting."""
    params = {"concurrencyMode": mode, "maxConcurrency": 2, "maxTokenConcurrency": 10000}
    s = build(config([{"type": "concurrency-detector", "parameters": params}]), seed=0)
    d = s.plugin("concurrency-detector")
    eps = endpoints(2)
    done = []
    for k, e in enumerate([eps[0], eps[0], eps[1], eps[1]]):
        r = req(f"r{k}")
        done.append((r, s.schedule(r, [e])))
    s.post_response(*done[3], ResponseInfo(200))
    assert d.saturated(s.context(), eps) == pytest.approx(expected)
    if mode != "tokens":
        assert d.filter(s.context(), req("x"), eps) == [eps[1]]  # eps[0] at 2 = max


# -- the queue -------------------------------------------------------------------------------------


class Gate:
    """A saturation detector the test opens and closes."""

    def __init__(self) -> None:
        self.value = 1.0

    def saturated(self, ctx: Any, endpoints: Any) -> float:
        return self.value


def controller(**kw: Any) -> tuple[Any, Gate]:
    from kvaware_scorer.scheduler.flowcontrol import FlowController

    s = build(config([{"type": "queue-scorer"}]), seed=0)
    eps = endpoints(2)
    gate = Gate()
    fc = FlowController(gate, lambda: eps, s.context, **kw)
    return fc, gate


async def test_queue_serves_priority_then_fairness_then_order() -> None:
    """While saturated requests wait; on release the higher band goes first, then flows take
    turns (round robin) in arrival order within a flow."""
    from kvaware_scorer.scheduler.flowcontrol import QueuedRequest

    class RoundRobin:
        def __init__(self) -> None:
            self.last: str | None = None

        def pick_flow(self, flows: Any, ordering: Any) -> str:
            keys = sorted(flows)
            i = (keys.index(self.last) + 1) % len(keys) if self.last in keys else 0
            self.last = keys[i]
            return self.last

    fc, gate = controller(fairness=RoundRobin())
    order: list[str] = []

    async def one(rid: str, flow: str, priority: int = 0) -> None:
        await fc.wait_turn(
            req(rid, headers={"x-llm-d-inference-fairness-id": flow}, priority=priority)
        )
        order.append(rid)

    tasks = [
        asyncio.create_task(one("a1", "a")),
        asyncio.create_task(one("a2", "a")),
        asyncio.create_task(one("b1", "b")),
        asyncio.create_task(one("hi", "c", priority=5)),
    ]
    await asyncio.sleep(0.05)
    assert order == [] and fc.waiting() == 4
    gate.value = 0.0
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order == ["hi", "a1", "b1", "a2"]
    assert isinstance(QueuedRequest, type)


async def test_queue_sheds_with_upstream_statuses() -> None:
    """A full band is shed with 429, a wait past the TTL with 429, an empty pool with 503."""
    fc, gate = controller(request_ttl=0.05, band_max_requests=1)
    waiting = asyncio.create_task(fc.wait_turn(req("w")))
    await asyncio.sleep(0.01)
    with pytest.raises(RequestRejectedError) as full:
        await fc.wait_turn(req("x"))
    assert full.value.status == 429
    with pytest.raises(RequestRejectedError) as ttl:
        await waiting
    assert ttl.value.status == 429 and "timed out" in str(ttl.value)
    from kvaware_scorer.scheduler.flowcontrol import FlowController

    empty = FlowController(gate, list, fc._context)
    with pytest.raises(RequestRejectedError) as none:
        await empty.wait_turn(req("y"))
    assert none.value.status == 503


async def test_flow_control_configured_from_yaml_queues_in_aschedule() -> None:
    """flowControl in the config puts aschedule behind the saturation detector (here
    concurrency, 1 request per pod): the third request waits until one finishes."""
    data = config(
        [
            {"type": "concurrency-detector", "parameters": {"maxConcurrency": 1}},
            {"type": "queue-scorer"},
        ]
    )
    data["flowControl"] = {
        "saturationDetector": {"pluginRef": "concurrency-detector"},
        "defaultRequestTTL": "5s",
    }
    s = build(data, seed=0)
    eps = endpoints(2)
    s.set_endpoints(eps)
    assert s.flow is not None
    r1 = await s.aschedule(req("1"))
    r2 = await s.aschedule(req("2"))
    third = asyncio.create_task(s.aschedule(req("3")))
    await asyncio.sleep(0.05)
    assert not third.done() and s.flow.waiting() == 1
    s.post_response(req("1"), r1, ResponseInfo(200))
    r3 = await asyncio.wait_for(third, 2)
    assert r3.target is r1.target and r2.target is not r1.target


# -- admitters and identity -------------------------------------------------------------------------


@pytest.mark.parametrize(("queue", "prob"), [(0, 0.0), (1, min(0.2**5 * 300, 1.0)), (5, 1.0)])
def test_probabilistic_admitter_curve(queue: int, prob: float) -> None:
    """p = min(saturation^power * k, 1) over the roofline saturation."""
    s, a = plugin("probabilistic-admitter")
    eps = endpoints(1)
    eps[0].metrics = EndpointMetrics(waiting_queue_size=queue)
    assert a.shed_probability(s.context(), eps) == pytest.approx(prob)


def test_probabilistic_admitter_sheds_only_sheddable() -> None:
    """At full saturation sheddable requests get 429 and others pass."""
    s = build(config([{"type": "probabilistic-admitter"}, {"type": "queue-scorer"}]), seed=0)
    eps = endpoints(1)
    eps[0].metrics = EndpointMetrics(waiting_queue_size=50)
    with pytest.raises(RequestRejectedError) as info:
        s.schedule(req("a", priority=-1), eps)
    assert info.value.status == 429
    s.schedule(req("b"), eps)


def test_agent_identity_is_the_fairness_id() -> None:
    """The first agent session header becomes the flow (an explicit fairness header wins)."""
    data = config(
        [
            {"type": "agent-identity", "parameters": {"additionalSessionHeaders": ["X-My-Agent"]}},
            {"type": "queue-scorer"},
        ]
    )
    data["featureGates"] = ["flowControl"]
    s = build(data, seed=0)
    assert s.flow is not None
    assert s.flow.flow_of(req("a", headers={"session-id": "codex-1"})) == "codex-1"
    assert s.flow.flow_of(req("b", headers={"x-my-agent": "m", "session-id": "c"})) == "m"
    explicit = {"x-llm-d-inference-fairness-id": "tenant", "session-id": "c"}
    assert s.flow.flow_of(req("c", headers=explicit)) == "tenant"
    assert s.flow.flow_of(req("d")) == "default-flow"
    r = req("e", headers={"x-claude-code-session-id": "cc"})
    s.schedule(r, endpoints(1))
    assert r.state["attribute:agent-identity"] == "cc"


def test_without_flow_control_nothing_queues() -> None:
    """No flowControl section and no gate: no controller."""
    s = build(config([{"type": "queue-scorer"}]), seed=0, clock=FakeClock())
    assert s.flow is None


@pytest.mark.parametrize("section", [{}, {"saturationDetector": {}}])
def test_saturation_detector_reference_is_optional(section: dict[str, Any]) -> None:
    """Upstream's ``saturationDetector.pluginRef`` is optional (``omitempty``): without one
    flow control uses a default utilization-detector, as upstream's loader defaults it."""
    from kvaware_scorer.plugins.flowcontrol import UtilizationDetector

    data = config([{"type": "queue-scorer"}])
    data["flowControl"] = section
    s = build(data, seed=0, clock=FakeClock())
    assert s.flow is not None
    assert isinstance(s.flow.detector, UtilizationDetector)
    assert not [w for w in s.config.warnings if "saturationDetector" in w]


def test_detector_named_by_flow_control_is_not_unused() -> None:
    """A detector that only ``flowControl.saturationDetector`` references is in use: no
    "used by no profile" warning (it is also a filter, so it could be in a profile)."""
    data = config(
        [
            {"type": "queue-scorer"},
            {"type": "utilization-detector", "name": "gate"},
            {"type": "concurrency-detector", "name": "spare"},
        ],
        [{"name": "default", "plugins": [{"pluginRef": "queue-scorer"}]}],
    )
    data["flowControl"] = {"saturationDetector": {"pluginRef": "gate"}}
    s = build(data, seed=0, clock=FakeClock())
    assert s.flow is not None and s.flow.detector is s.plugin("gate")
    warned = " ".join(s.config.warnings)
    assert "'gate'" not in warned
    assert "'spare' is in no profile" in warned  # an unreferenced one still warns


def test_feature_gate_warning_names_only_the_ignored_gates() -> None:
    """The flowControl gate is honoured, so only the other gates are reported as ignored."""
    data = config([{"type": "queue-scorer"}])
    data["featureGates"] = ["flowControl"]
    s = build(data, seed=0, clock=FakeClock())
    assert s.flow is not None
    assert not [w for w in s.config.warnings if "featureGates" in w]
    data["featureGates"] = ["flowControl", "dataLayer=true"]
    s = build(data, seed=0, clock=FakeClock())
    (warning,) = [w for w in s.config.warnings if "featureGates" in w]
    assert "dataLayer=true" in warning and "flowControl" not in warning


async def test_dispatcher_waits_for_each_turn_to_be_counted() -> None:
    """A turn handed out is counted by the detector only once that request is scheduled (its
    pre-request hook): the dispatcher waits for it before looking again, so a pool with room
    for one more request lets exactly one queued request through, not all of them."""
    data = config(
        [
            {"type": "concurrency-detector", "parameters": {"maxConcurrency": 1}},
            {"type": "queue-scorer"},
        ]
    )
    data["flowControl"] = {"saturationDetector": {"pluginRef": "concurrency-detector"}}
    s = build(data, seed=0)
    eps = endpoints(1)
    s.set_endpoints(eps)
    assert s.flow is not None
    r1 = await s.aschedule(req("1"))
    queued = [asyncio.create_task(s.aschedule(req(str(i)))) for i in (2, 3, 4)]
    await asyncio.sleep(0.05)
    assert s.flow.waiting() == 3
    s.post_response(req("1"), r1, ResponseInfo(200))
    await asyncio.sleep(0.2)
    done = [t for t in queued if t.done()]
    assert len(done) == 1 and done[0].exception() is None
    assert s.flow.waiting() == 2
    for t in queued:
        t.cancel()
    await asyncio.gather(*queued, return_exceptions=True)


class CountingGate(Gate):
    """A detector whose reading moves when requests are scheduled (like concurrency-detector)."""

    counts_scheduled = True


def counting_controller(**kw: Any) -> tuple[Any, CountingGate]:
    from kvaware_scorer.scheduler.flowcontrol import FlowController

    s = build(config([{"type": "queue-scorer"}]), seed=0)
    eps = endpoints(2)
    gate = CountingGate()
    return FlowController(gate, lambda: eps, s.context, **kw), gate


async def test_a_slow_admission_does_not_hold_the_queue_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request that never reports being scheduled holds the dispatcher for ADMISSION_WAIT
    at most."""
    from kvaware_scorer.scheduler import flowcontrol

    monkeypatch.setattr(flowcontrol, "ADMISSION_WAIT", 0.05)
    fc, gate = counting_controller()
    first = asyncio.create_task(fc.wait_turn(req("a")))
    second = asyncio.create_task(fc.wait_turn(req("b")))
    await asyncio.sleep(0.03)
    gate.value = 0.0  # room; "a" never calls admitted()
    await asyncio.wait_for(asyncio.gather(first, second), 1)


async def test_a_turn_given_back_by_a_cancelled_waiter_holds_nobody() -> None:
    """A waiter cancelled (client gone) just as its turn is granted reports itself, so the
    next request does not wait out ADMISSION_WAIT behind it."""
    # NOTE: without a TTL the waiter awaits its turn directly, so a cancellation that lands
    # after the turn was granted still raises in it (asyncio.wait_for would swallow it and
    # return, and the caller's own report then covers it).
    fc, gate = counting_controller(request_ttl=0)
    a, b = req("a"), req("b")
    first = asyncio.create_task(fc.wait_turn(a))
    second = asyncio.create_task(fc.wait_turn(b))
    await asyncio.sleep(0.02)
    gate.value = 0.0
    while fc.waiting() == 2:  # the dispatcher grants "a" its turn ...
        await asyncio.sleep(0)
    first.cancel()  # ... and "a" is cancelled before it resumes
    t0 = asyncio.get_running_loop().time()
    await asyncio.wait_for(second, 1)
    assert asyncio.get_running_loop().time() - t0 < 0.2
    with contextlib.suppress(asyncio.CancelledError):
        await first


async def test_detector_reading_scraped_metrics_drains_the_queue_at_once() -> None:
    """Without counts_scheduled (a detector reading scraped metrics, which a scheduled request
    does not move) the dispatcher does not wait for each request: a queue built up while the
    pool was saturated drains as soon as it has room, though none of them reports back."""
    fc, gate = controller()
    waiters = [asyncio.create_task(fc.wait_turn(req(str(i)))) for i in range(50)]
    await asyncio.sleep(0.02)
    assert fc.waiting() == 50
    gate.value = 0.0
    await asyncio.wait_for(asyncio.gather(*waiters), 0.5)


async def test_dispatcher_looks_again_on_a_change_not_on_a_timer() -> None:
    """While requests wait and nothing changes, the saturation is read about once per
    IDLE_LOOK, not every few milliseconds; `notify` (a first token, a request's end, a
    scrape: from any thread) makes it look at once."""
    import threading

    from kvaware_scorer.scheduler.flowcontrol import IDLE_LOOK

    class Counting(Gate):
        def __init__(self) -> None:
            super().__init__()
            self.reads = 0

        def saturated(self, ctx: Any, endpoints: Any) -> float:
            self.reads += 1
            return self.value

    from kvaware_scorer.scheduler.flowcontrol import FlowController

    s = build(config([{"type": "queue-scorer"}]), seed=0)
    eps = endpoints(2)
    gate = Counting()
    fc = FlowController(gate, lambda: eps, s.context)
    loop = asyncio.get_running_loop()
    waiter = asyncio.create_task(fc.wait_turn(req("a")))
    await asyncio.sleep(0.01)
    gate.reads = 0
    await asyncio.sleep(5 * IDLE_LOOK)
    assert gate.reads <= 7, gate.reads  # ~5 idle looks (10 ms polling read ~50 times)
    gate.value = 0.0
    t0 = loop.time()
    threading.Thread(target=fc.notify).start()  # e.g. the scraping thread after a round
    await asyncio.wait_for(waiter, 1)
    assert loop.time() - t0 < IDLE_LOOK / 2
    # nothing waits: notify is a no-op
    fc.notify()


async def test_first_tokens_and_request_ends_wake_flow_control() -> None:
    """The scheduler tells flow control when a request's first token or end arrives and after
    each scrape round (`Scheduler.metrics_updated`), so a freed pod is used at once."""
    data = config(
        [
            {"type": "concurrency-detector", "parameters": {"maxConcurrency": 1}},
            {"type": "queue-scorer"},
        ]
    )
    data["flowControl"] = {"saturationDetector": {"pluginRef": "concurrency-detector"}}
    s = build(data, seed=0)
    s.set_endpoints(endpoints(1))
    assert s.flow is not None
    loop = asyncio.get_running_loop()
    r1 = await s.aschedule(req("1"))
    queued = asyncio.create_task(s.aschedule(req("2")))
    await asyncio.sleep(0.3)  # the dispatcher is in its idle wait
    t0 = loop.time()
    s.post_response(req("1"), r1, ResponseInfo(200))
    r2 = await asyncio.wait_for(queued, 1)
    from kvaware_scorer.scheduler.flowcontrol import IDLE_LOOK

    assert loop.time() - t0 < IDLE_LOOK / 2
    assert r2.target is r1.target
