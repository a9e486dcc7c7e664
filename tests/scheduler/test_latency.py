"""Latency prediction: the in-process predictor, latency-scorer's buckets and strategies (ported
in spirit from upstream's scorer table), the SLO tier filter and the SLO admitter."""

from __future__ import annotations

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

SLO = {"x-llm-d-slo-ttft-ms": "250"}


def test_online_ridge_learns_a_linear_latency() -> None:
    """The closed-form ridge model recovers a linear relation from a few observations."""
    from kvaware_scorer.plugins.latency import OnlineRidge

    m = OnlineRidge(3, alpha=1e-6)
    for a in range(5):
        for b in range(5):
            m.add([1.0, a, b], 100 + 20 * a + 5 * b)
    assert m.predict([1.0, 3, 2]) == pytest.approx(170, rel=1e-3)


def trained(
    extra: list[dict[str, Any]], refs: list[dict[str, Any]], clock: FakeClock, n: int = 30
) -> tuple[Scheduler, list[Any]]:
    """A scheduler whose producer learned latency = 100 ms + 50 ms per waiting request."""
    plugins = [{"type": "predicted-latency-producer"}, *extra]
    s = build(config(plugins, [{"name": "default", "plugins": refs}]), seed=0, clock=clock)
    eps = endpoints(3)
    for i, e in enumerate(eps):
        e.metrics = EndpointMetrics(waiting_queue_size=2 * i, kv_cache_usage_percent=0.5)
    for k in range(n):
        target = eps[k % 3]
        req = SchedulingRequest(f"t{k}", "m", token_ids=list(range(64)))
        r = s.schedule(req, [target])
        clock.advance((100 + 50 * target.metrics.waiting_queue_size) / 1000)
        s.post_response(req, r, ResponseInfo(200))
    return s, eps


def test_predictions_follow_what_was_learned() -> None:
    """After training, predicted TTFT grows with the pod's queue, and headroom is SLO - predicted."""
    clock = FakeClock()
    s, eps = trained([], [], clock)
    prod = s.plugin("predicted-latency-producer")
    req = SchedulingRequest("q", "m", token_ids=list(range(64)), headers=SLO)
    infos = prod.predictions(s.context(), req, eps)
    assert [infos[e.id].ttft_ms for e in eps] == pytest.approx([100, 200, 300], abs=10)
    assert infos[eps[0].id].ttft_headroom == pytest.approx(250 - infos[eps[0].id].ttft_ms)
    assert infos[eps[0].id].valid and not infos[eps[2].id].valid


def test_streaming_mode_learns_the_time_to_the_first_token() -> None:
    """``streamingMode: true``: the target is the time to the first token (learned once, when
    it is reported), not the end-to-end latency; a request stays in flight until its end, and
    an answer that reports no first token teaches nothing."""
    clock = FakeClock()
    plugins = [{"type": "predicted-latency-producer", "parameters": {"streamingMode": True}}]
    s = build(config(plugins, [{"name": "default", "plugins": []}]), seed=0, clock=clock)
    eps = endpoints(3)
    for i, e in enumerate(eps):
        e.metrics = EndpointMetrics(waiting_queue_size=2 * i, kv_cache_usage_percent=0.5)
    prod = s.plugin("predicted-latency-producer")
    for k in range(30):
        target = eps[k % 3]
        req = SchedulingRequest(f"t{k}", "m", token_ids=list(range(64)))
        r = s.schedule(req, [target])
        clock.advance((100 + 50 * target.metrics.waiting_queue_size) / 1000)
        s.first_token(req, r)
        s.first_token(req, r)  # a second report changes nothing
        assert prod.dispatched(target.id) == 1
        clock.advance(5.0)  # a long decode: not part of the target
        s.post_response(req, r, ResponseInfo(200))
    whole = SchedulingRequest("w", "m", token_ids=list(range(64)), streaming=False)
    r = s.schedule(whole, [eps[0]])
    clock.advance(60.0)
    s.post_response(whole, r, ResponseInfo(200))
    req = SchedulingRequest("q", "m", token_ids=list(range(64)), headers=SLO)
    infos = prod.predictions(s.context(), req, eps)
    assert [infos[e.id].ttft_ms for e in eps] == pytest.approx([100, 200, 300], abs=10)


def test_no_predictions_before_training_falls_back_to_composite() -> None:
    """Without enough samples the scorer uses upstream's composite of KV, queue and prefix."""
    s = build(
        config(
            [
                {"type": "predicted-latency-producer"},
                {"type": "latency-scorer", "parameters": {"compositePrefixWeight": 0}},
            ]
        ),
        seed=0,
    )
    eps = endpoints(2)
    eps[0].metrics = EndpointMetrics(waiting_queue_size=0, kv_cache_usage_percent=0.0)
    eps[1].metrics = EndpointMetrics(waiting_queue_size=4, kv_cache_usage_percent=1.0)
    sc = s.plugin("latency-scorer").score(
        s.context(), SchedulingRequest("r", "m", token_ids=[1]), eps
    )
    assert sc == {eps[0].id: 1.0, eps[1].id: 0.0}


@pytest.mark.parametrize(("strategy", "best"), [("least", 1), ("most", 0)])
def test_latency_scorer_strategies(strategy: str, best: int) -> None:
    """With every pod meeting the SLO, 'least' packs onto the pod closest to the SLO and 'most'
    prefers the most headroom."""
    clock = FakeClock()
    params = {"headroomSelectionStrategy": strategy}
    s, eps = trained(
        [{"type": "latency-scorer", "parameters": params}], [{"pluginRef": "latency-scorer"}], clock
    )
    req = SchedulingRequest(
        "q", "m", token_ids=list(range(64)), headers={"x-llm-d-slo-ttft-ms": "250"}
    )
    sc = s.plugin("latency-scorer").score(s.context(), req, eps[:2])
    assert max(sc, key=sc.__getitem__) == eps[best].id


def test_latency_scorer_only_scores_the_positive_tier() -> None:
    """Pods violating the SLO score 0 when some meet it."""
    clock = FakeClock()
    s, eps = trained([{"type": "latency-scorer"}], [{"pluginRef": "latency-scorer"}], clock)
    req = SchedulingRequest(
        "q", "m", token_ids=list(range(64)), headers={"x-llm-d-slo-ttft-ms": "150"}
    )
    sc = s.plugin("latency-scorer").score(s.context(), req, eps)
    assert sc[eps[0].id] > 0 and sc[eps[1].id] == 0 and sc[eps[2].id] == 0


def test_no_slo_routes_to_the_lowest_prediction() -> None:
    """Without SLO headers headroom is -predicted everywhere: the fastest pod wins."""
    clock = FakeClock()
    s, eps = trained([{"type": "latency-scorer"}], [{"pluginRef": "latency-scorer"}], clock)
    # keep a request in flight everywhere so no pod counts as idle
    for k, e in enumerate(eps):
        s.schedule(SchedulingRequest(f"busy{k}", "m", token_ids=list(range(64))), [e])
    r = s.schedule(SchedulingRequest("q", "m", token_ids=list(range(64))), eps, dry_run=True)
    assert r.target is eps[0]


@pytest.mark.parametrize(("epsilon", "kept"), [(0.0, [0]), (1.0, [1, 2])])
def test_slo_tier_filter(epsilon: float, kept: list[int]) -> None:
    """The positive tier is kept; epsilonExploreNeg picks the negative tier instead."""
    clock = FakeClock()
    s, eps = trained(
        [{"type": "slo-headroom-tier-filter", "parameters": {"epsilonExploreNeg": epsilon}}],
        [],
        clock,
    )
    req = SchedulingRequest(
        "q", "m", token_ids=list(range(64)), headers={"x-llm-d-slo-ttft-ms": "150"}
    )
    out = s.plugin("slo-headroom-tier-filter").filter(s.context(), req, eps)
    assert out == [eps[i] for i in kept]


def test_latency_admitter_sheds_sheddable_requests_only() -> None:
    """A sheddable request (priority < 0) no pod can serve within its SLO is rejected with 429;
    a normal one, or one without SLO, is admitted."""
    clock = FakeClock()
    s, eps = trained([{"type": "latency-slo-admitter"}], [], clock)
    for e in eps:
        e.metrics.running_requests_size = 3  # nobody idle, nobody cold
    slo = {"x-llm-d-slo-ttft-ms": "50"}
    with pytest.raises(RequestRejectedError) as info:
        s.schedule(
            SchedulingRequest("a", "m", token_ids=list(range(64)), headers=slo, priority=-1), eps
        )
    assert info.value.status == 429
    s.schedule(SchedulingRequest("b", "m", token_ids=list(range(64)), headers=slo), eps)
    s.schedule(SchedulingRequest("c", "m", token_ids=list(range(64)), priority=-1), eps)
    eps[0].metrics.running_requests_size = 0  # an idle pod admits
    s.schedule(
        SchedulingRequest("d", "m", token_ids=list(range(64)), headers=slo, priority=-1), eps
    )
