"""Affinity scorers and endpoint-attribute plugins (tables ported in spirit from upstream's
lora-affinity, session-affinity, context-length-aware, header-label and endpoint-attribute tests)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import (
    Endpoint,
    EndpointMetrics,
    SchedulingRequest,
    parse_vllm_metrics,
)

from .conftest import FakeClock, build, config, endpoints


def plugin(type_name: str, params: dict[str, Any] | None = None, **kw: Any) -> Any:
    entry: dict[str, Any] = {"type": type_name}
    if params is not None:
        entry["parameters"] = params
    s = build(config([entry]), seed=0, **kw)
    return s, s.plugin(type_name)


# -- lora ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("active", "waiting", "max_lora", "score"),
    [
        ({"sql"}, set(), 2, 1.0),  # running
        ({"other"}, set(), 2, 0.8),  # a free slot
        ({"a", "b"}, {"sql"}, 2, 0.6),  # waiting, no slot
        ({"a", "b"}, set(), 2, 0.0),  # neither
    ],
)
def test_lora_affinity_table(
    active: set[str], waiting: set[str], max_lora: int, score: float
) -> None:
    """Running 1.0, free slot 0.8, waiting 0.6, else 0."""
    s, p = plugin("lora-affinity-scorer")
    (ep,) = endpoints(1)
    ep.metrics = EndpointMetrics(
        active_models=frozenset(active),
        waiting_models=frozenset(waiting),
        max_active_models=max_lora,
    )
    req = SchedulingRequest("r", "base", token_ids=[1], lora_name="sql")
    assert p.score(s.context(), req, [ep]) == {ep.id: score}


def test_lora_adapters_scraped_from_vllm_metrics() -> None:
    """vllm:lora_requests_info: the newest sample's running / waiting adapters and max_lora."""
    text = (
        "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n"
        "# TYPE vllm:lora_requests_info gauge\n"
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.0\n'
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b",waiting_lora_adapters="c"} 2.0\n'
    )
    m = parse_vllm_metrics(text)
    assert m.active_models == {"a", "b"} and m.waiting_models == {"c"} and m.max_active_models == 4


# -- session affinity ------------------------------------------------------------------------------


def test_session_token_round_trip() -> None:
    """encoded_endpoint_header: the pick's token is returned; sending it back scores that pod 1."""
    s, p = plugin("session-affinity-scorer")
    eps = endpoints(3)
    r = s.schedule(SchedulingRequest("a", "m", token_ids=[1]), eps)
    token = r.response_headers["x-session-token"]
    assert base64.b64decode(token).decode() == r.target.id
    req = SchedulingRequest("b", "m", token_ids=[1], headers={"x-session-token": token})
    scores = p.score(s.context(), req, eps)
    assert scores[r.target.id] == 1.0 and sum(scores.values()) == 1.0
    bad = SchedulingRequest("c", "m", token_ids=[1], headers={"x-session-token": "%%%"})
    assert set(p.score(s.context(), bad, eps).values()) == {0.0}


def test_session_id_binds_sticks_migrates_and_expires() -> None:
    """session_id: the first pick binds; the bound pod scores 1; when it is no candidate the new
    pick re-binds; bindings expire after evictionTtlSeconds."""
    clock = FakeClock()
    params = {"strategy": "session_id", "sessionIdConfig": {"evictionTtlSeconds": 60}}
    s, p = plugin("session-affinity-scorer", params, clock=clock)
    eps = endpoints(3)

    def req(rid: str) -> SchedulingRequest:
        return SchedulingRequest(rid, "m", token_ids=[1], headers={"x-session-id": "s1"})

    first = s.schedule(req("a"), eps).target
    assert p.score(s.context(), req("b"), eps)[first.id] == 1.0
    others = [e for e in eps if e is not first]
    moved = s.schedule(req("c"), others).target
    assert p.score(s.context(), req("d"), eps)[moved.id] == 1.0
    clock.advance(61)
    assert set(p.score(s.context(), req("e"), eps).values()) == {0.0}


def test_session_bindings_are_bounded() -> None:
    """maxSessions bounds the bindings (least recently used dropped)."""
    params = {"strategy": "session_id", "sessionIdConfig": {"maxSessions": 2}}
    s, p = plugin("session-affinity-scorer", params)
    eps = endpoints(2)
    for sid in ("a", "b", "c"):
        s.schedule(SchedulingRequest(sid, "m", token_ids=[1], headers={"x-session-id": sid}), eps)
    assert len(p.bindings) == 2 and p.bindings.bound("a") is None


def test_session_source_needs_exactly_one_of_header_or_attribute() -> None:
    """A session-id source with both header and attribute is a configuration error."""
    params = {
        "strategy": "session_id",
        "sessionIdConfig": {"sources": [{"header": "h", "attribute": "a"}]},
    }
    with pytest.raises(ConfigError, match="exactly one"):
        plugin("session-affinity-scorer", params)


# -- context length --------------------------------------------------------------------------------


def labeled(ranges: list[str | None]) -> list[Endpoint]:
    return [
        Endpoint(f"p{i}", f"10.0.2.{i}", 8000, {"llm-d.ai/context-length-range": r} if r else {})
        for i, r in enumerate(ranges)
    ]


def test_context_length_scores_and_filters() -> None:
    """In range beats out of range, narrower ranges win, unlabeled 0.5, malformed 0; with
    enableFiltering only fitting and unlabeled pods remain."""
    s, p = plugin("context-length-aware", {"enableFiltering": True})
    eps = labeled(["0-1000", "0-100000", "2000-4000", None, "bad"])
    req = SchedulingRequest("r", "m", token_ids=list(range(500)))
    sc = p.score(s.context(), req, eps)
    narrow, wide, outside, unlabeled, bad = (sc[e.id] for e in eps)
    assert narrow > wide > outside > 0 and unlabeled == 0.5 and bad == 0.0
    assert narrow == pytest.approx(0.3 + 0.7 * (0.7 / 1.1 + 0.3 * 0.5))
    assert outside == pytest.approx(0.3 / 2.5)
    kept = p.filter(s.context(), req, eps)
    assert [e.name for e in kept] == ["p0", "p1", "p3"]


# -- header label ----------------------------------------------------------------------------------


def test_header_label_affinity() -> None:
    """Pods whose label equals the header score 1; no header scores 0 everywhere."""
    s, p = plugin("header-label-affinity-scorer", {"headerName": "X-Tier", "labelKey": "tier"})
    eps = [Endpoint("a", "10.0.3.1", 8000, {"tier": "gold"}), Endpoint("b", "10.0.3.2", 8000, {})]
    req = SchedulingRequest("r", "m", token_ids=[1], headers={"x-tier": "gold"})
    assert p.score(s.context(), req, eps) == {eps[0].id: 1.0, eps[1].id: 0.0}
    assert set(p.score(s.context(), SchedulingRequest("q", "m", token_ids=[1]), eps).values()) == {
        0.0
    }


def test_header_label_affinity_requires_both_parameters() -> None:
    """headerName and labelKey are required."""
    with pytest.raises(ConfigError):
        plugin("header-label-affinity-scorer", {"headerName": "x"})


# -- endpoint attributes ----------------------------------------------------------------------------


def attr_fleet(values: list[float | None]) -> list[Endpoint]:
    eps = endpoints(len(values))
    for e, v in zip(eps, values, strict=True):
        e.metrics = EndpointMetrics(attributes={} if v is None else {"gpu_temp": v})
    return eps


@pytest.mark.parametrize(
    ("op", "kept"),
    [
        ("LessThan", [0]),
        ("LessThanOrEqual", [0, 1]),
        ("GreaterThan", [2]),
        ("GreaterThanOrEqual", [1, 2]),
        ("Equal", [1]),
        ("NotEqual", [0, 2]),
    ],
)
def test_endpoint_attribute_filter_operators(op: str, kept: list[int]) -> None:
    """Each threshold operator keeps the endpoints it should (missing passes by default)."""
    params = {
        "attribute": "gpu_temp",
        "algorithm": {"type": "threshold", "threshold": {"operator": op, "value": 70}},
    }
    s, p = plugin("endpoint-attribute-filter", params)
    eps = attr_fleet([60, 70, 80, None])
    out = p.filter(s.context(), SchedulingRequest("r", "m", token_ids=[1]), eps)
    assert out == [eps[i] for i in kept] + [eps[3]]


def test_endpoint_attribute_filter_missing_and_fallback() -> None:
    """onMissing Fail drops endpoints without the attribute; fallbackOnEmpty keeps all when none pass."""
    algo = {"type": "threshold", "threshold": {"operator": "GreaterThan", "value": 100}}
    s, p = plugin(
        "endpoint-attribute-filter",
        {"attribute": "gpu_temp", "onMissing": "Fail", "algorithm": algo},
    )
    eps = attr_fleet([60, None])
    req = SchedulingRequest("r", "m", token_ids=[1])
    assert p.filter(s.context(), req, eps) == []
    s2, p2 = plugin(
        "endpoint-attribute-filter",
        {"attribute": "gpu_temp", "onMissing": "Fail", "fallbackOnEmpty": True, "algorithm": algo},
    )
    assert p2.filter(s2.context(), req, eps) == eps


def test_endpoint_attribute_with_slash_needs_a_producer() -> None:
    """An 'attribute/producer' spelling without producer is an error naming the split."""
    algo = {"type": "threshold", "threshold": {"operator": "Equal", "value": 1}}
    with pytest.raises(ConfigError, match="split"):
        plugin("endpoint-attribute-filter", {"attribute": "temp/dcgm", "algorithm": algo})


def test_endpoint_attribute_scorer_normalizations() -> None:
    """Adaptive min-max over candidates, fixed range clamped, missing 0, all equal 1."""
    req = SchedulingRequest("r", "m", token_ids=[1])
    s, p = plugin(
        "endpoint-attribute-scorer",
        {"attributeKey": "gpu_temp", "algorithm": {"type": "linear_lower_is_better"}},
    )
    eps = attr_fleet([50, 70, 90, None])
    assert [p.score(s.context(), req, eps)[e.id] for e in eps] == [1.0, 0.5, 0.0, 0.0]
    same = attr_fleet([70, 70])
    assert set(p.score(s.context(), req, same).values()) == {1.0}
    fixed = {
        "type": "linear_higher_is_better",
        "normalization": {"fixedRange": {"min": 60, "max": 80}},
    }
    s2, p2 = plugin("endpoint-attribute-scorer", {"attributeKey": "gpu_temp", "algorithm": fixed})
    assert [p2.score(s2.context(), req, eps)[e.id] for e in eps] == [0.0, 0.5, 1.0, 0.0]


def test_endpoint_attribute_reads_core_metrics_by_name() -> None:
    """Upstream's core metric names (WaitingQueueSize...) read the scraped metrics."""
    s, p = plugin(
        "endpoint-attribute-scorer",
        {"attributeKey": "WaitingQueueSize", "algorithm": {"type": "linear_lower_is_better"}},
    )
    eps = endpoints(2)
    eps[0].metrics = EndpointMetrics(waiting_queue_size=0)
    eps[1].metrics = EndpointMetrics(waiting_queue_size=10)
    assert p.score(s.context(), SchedulingRequest("r", "m", token_ids=[1]), eps) == {
        eps[0].id: 1.0,
        eps[1].id: 0.0,
    }
