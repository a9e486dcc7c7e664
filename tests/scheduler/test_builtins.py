"""Built-in scorers, filters and the approximate and precise prefix scorers."""

from __future__ import annotations

import random
from typing import Any

import pytest

from kvaware_scorer.scheduler import (
    Endpoint,
    ResponseInfo,
    Scheduler,
    SchedulingContext,
    SchedulingRequest,
    make_plugin_manager,
)

from .conftest import FakeClock, config, endpoints, with_metrics


def build(
    plugins: list[dict[str, Any]], profiles: list[dict[str, Any]] | None = None, **kw: Any
) -> Scheduler:
    return Scheduler.from_config(
        config(plugins, profiles), plugin_manager=make_plugin_manager(use_env=False), **kw
    )


def scores(
    s: Scheduler, name: str, eps: list[Endpoint], request: SchedulingRequest | None = None
) -> dict[str, float]:
    r = s.schedule(request or SchedulingRequest("r", "m", token_ids=[1]), eps)
    return {e.name: r.scores[name][e.id] for e in eps}


# -- load scorers ---------------------------------------------------------------------------------


def test_queue_scorer_min_max() -> None:
    """queue-scorer = (maxQ - q) / (maxQ - minQ); all equal -> 1."""
    s = build([{"type": "queue-scorer"}])
    eps = [
        with_metrics(e, waiting_queue_size=q) for e, q in zip(endpoints(3), (0, 5, 10), strict=True)
    ]
    assert scores(s, "queue-scorer", eps) == {"pod-0": 1.0, "pod-1": 0.5, "pod-2": 0.0}
    same = [with_metrics(e, waiting_queue_size=4) for e in endpoints(2)]
    assert scores(s, "queue-scorer", same) == {"pod-0": 1.0, "pod-1": 1.0}


def test_running_requests_size_scorer_min_max() -> None:
    """running-requests-size-scorer is the same min-max on running requests."""
    s = build([{"type": "running-requests-size-scorer"}])
    eps = [
        with_metrics(e, running_requests_size=q)
        for e, q in zip(endpoints(3), (2, 4, 10), strict=True)
    ]
    assert scores(s, "running-requests-size-scorer", eps) == {
        "pod-0": 1.0,
        "pod-1": 0.75,
        "pod-2": 0.0,
    }


def test_kv_cache_utilization_scorer() -> None:
    """kv-cache-utilization-scorer = 1 - usage."""
    s = build([{"type": "kv-cache-utilization-scorer"}])
    eps = [
        with_metrics(e, kv_cache_usage_percent=u)
        for e, u in zip(endpoints(2), (0.25, 0.9), strict=True)
    ]
    got = scores(s, "kv-cache-utilization-scorer", eps)
    assert got == pytest.approx({"pod-0": 0.75, "pod-1": 0.1})


def test_load_aware_scorer() -> None:
    """load-aware-scorer: q=0 -> 0.5, q>=threshold -> 0, else 0.5(1 - q/threshold)."""
    s = build([{"type": "load-aware-scorer", "parameters": {"threshold": 10}}])
    eps = [
        with_metrics(e, waiting_queue_size=q)
        for e, q in zip(endpoints(4), (0, 5, 10, 50), strict=True)
    ]
    assert scores(s, "load-aware-scorer", eps) == {
        "pod-0": 0.5,
        "pod-1": 0.25,
        "pod-2": 0.0,
        "pod-3": 0.0,
    }


def test_stale_metrics_are_neutral_and_never_fail_closed() -> None:
    """Stale metrics score neutral; when every endpoint is stale all score alike and one is still picked."""
    clock = FakeClock(100.0)
    s = build(
        [
            {"type": "queue-scorer"},
            {"type": "kv-cache-utilization-scorer"},
            {"type": "load-aware-scorer"},
        ],
        clock=clock,
        metrics_staleness=2.0,
    )
    eps = endpoints(3)
    with_metrics(eps[0], t=99.5, waiting_queue_size=0, kv_cache_usage_percent=0.0)
    with_metrics(eps[1], t=99.0, waiting_queue_size=8, kv_cache_usage_percent=0.8)
    with_metrics(eps[2], t=90.0, waiting_queue_size=0, kv_cache_usage_percent=0.0)  # stale
    r = s.schedule(SchedulingRequest("r", "m", token_ids=[1]), eps)
    ids = [e.id for e in eps]
    assert r.scores["queue-scorer"] == {ids[0]: 1.0, ids[1]: 0.0, ids[2]: 0.5}
    assert r.scores["kv-cache-utilization-scorer"] == pytest.approx(
        {ids[0]: 1.0, ids[1]: 0.2, ids[2]: 0.5}
    )
    assert r.scores["load-aware-scorer"][ids[2]] == 0.25
    clock.advance(100)  # now all stale
    r = s.schedule(SchedulingRequest("r", "m", token_ids=[1]), eps)
    assert len(set(r.totals.values())) == 1
    assert r.targets


def test_tracked_endpoints_never_scraped_are_unknown() -> None:
    """An endpoint a scraper tracks but never reached has unknown metrics, not zero load."""
    eps = endpoints(2)
    ctx = SchedulingContext(10.0, 2.0, tracked=frozenset({eps[0].id}))
    assert ctx.metrics(eps[0]) is None
    assert ctx.metrics(eps[1]) is eps[1].metrics  # written in process, never stamped: used as is


def test_active_request_scorer_counts_in_flight_exactly() -> None:
    """active-request-scorer counts pre_request/post_response instantly and spreads a burst."""
    s = build([{"type": "active-request-scorer"}])
    eps = endpoints(3)
    reqs = [SchedulingRequest(f"r{i}", "m", token_ids=[1]) for i in range(6)]
    results = [s.schedule(r, eps) for r in reqs]
    # a burst with no other signal: in-flight counts spread it evenly
    assert sorted(r.targets[0].name for r in results) == [
        "pod-0",
        "pod-0",
        "pod-1",
        "pod-1",
        "pod-2",
        "pod-2",
    ]
    scorer = s.plugin("active-request-scorer")
    for r, res in zip(reqs[:2], results[:2], strict=True):
        s.post_response(r, res, ResponseInfo())
    counts = {e.name: scorer.count(e.id) for e in eps}
    assert sum(counts.values()) == 4
    s.post_response(reqs[0], results[0], ResponseInfo())  # twice: no double release
    assert sum(scorer.count(e.id) for e in eps) == 4


def test_active_request_formula() -> None:
    """Score = 1 at or below idleThreshold, else (max - c)/max * maxBusyScore."""
    s = build(
        [{"type": "active-request-scorer", "parameters": {"idleThreshold": 1, "maxBusyScore": 0.8}}]
    )
    eps = endpoints(3)
    scorer = s.plugin("active-request-scorer")
    # place 1, 2 and 4 requests by pinning the pool
    for target, n in ((eps[0], 1), (eps[1], 2), (eps[2], 4)):
        for i in range(n):
            s.schedule(SchedulingRequest(f"{target.name}-{i}", "m", token_ids=[1]), [target])
    got = scorer.score(s.context(), SchedulingRequest("x", "m"), eps)
    assert got == pytest.approx({eps[0].id: 1.0, eps[1].id: 0.4, eps[2].id: 0.0})


def test_active_request_timeout_on_the_injected_clock() -> None:
    """A request whose response never comes stops counting after requestTimeout of scheduler time."""
    clock = FakeClock()
    s = build(
        [{"type": "active-request-scorer", "parameters": {"requestTimeout": "30s"}}], clock=clock
    )
    ep = endpoints(1)
    s.schedule(SchedulingRequest("lost", "m", token_ids=[1]), ep)
    scorer = s.plugin("active-request-scorer")
    assert scorer.count(ep[0].id) == 1
    clock.advance(29)
    assert scorer.count(ep[0].id) == 1
    clock.advance(2)
    assert scorer.count(ep[0].id) == 0


def test_active_request_retry_moves_the_count() -> None:
    """Scheduling the same request object again (a retry) moves its count, never doubles it."""
    s = build([{"type": "active-request-scorer"}])
    eps = endpoints(2)
    r = SchedulingRequest("r", "m", token_ids=[1])
    s.schedule(r, [eps[0]])
    res = s.schedule(r, [eps[1]])
    scorer = s.plugin("active-request-scorer")
    assert (scorer.count(eps[0].id), scorer.count(eps[1].id)) == (0, 1)
    s.post_response(r, res, ResponseInfo())
    assert scorer.count(eps[1].id) == 0


# -- filters ----------------------------------------------------------------------------------------


def test_decode_filter_roles_and_unlabeled() -> None:
    """decode-filter keeps decode-capable roles and unlabeled pods, drops prefill/encode-only pods."""
    s = build([{"type": "decode-filter"}, {"type": "random-picker"}], seed=0)
    roles = ["decode", "prefill-decode", "both", "encode-prefill-decode", "prefill", "encode", None]
    eps = []
    for i, role in enumerate(roles):
        labels = {"llm-d.ai/role": role} if role else {}
        eps.append(Endpoint(f"pod-{i}", f"10.0.1.{i}", 8000, labels))
    r = s.schedule(SchedulingRequest("r", "m", token_ids=[1]), eps)
    kept = {e.labels.get("llm-d.ai/role") for e in eps if e.id in r.candidates}
    assert kept == {"decode", "prefill-decode", "both", "encode-prefill-decode", None}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"matchLabels": {"zone": "a"}}, {"p0", "p1"}),
        (
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]},
            {"p0", "p1", "p2"},
        ),
        (
            {"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]},
            {"p2", "p3"},
        ),
        ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, {"p1", "p3"}),
        ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, {"p0", "p2"}),
        (
            {
                "matchLabels": {"zone": "a"},
                "matchExpressions": [{"key": "gpu", "operator": "Exists"}],
            },
            {"p1"},
        ),
        ({}, {"p0", "p1", "p2", "p3"}),
        ({"label": "zone", "validValues": ["b"], "allowsNoLabel": True}, {"p2", "p3"}),
        ({"label": "zone", "validValues": ["b"]}, {"p2"}),
    ],
)
def test_label_selector_filter(params: dict[str, Any], expected: set[str]) -> None:
    """label-selector-filter follows Kubernetes selector semantics (NotIn passes absent keys)."""
    s = build(
        [{"type": "label-selector-filter", "parameters": params}, {"type": "random-picker"}], seed=0
    )
    eps = [
        Endpoint("p0", "10.0.2.0", 8000, {"zone": "a"}),
        Endpoint("p1", "10.0.2.1", 8000, {"zone": "a", "gpu": "h100"}),
        Endpoint("p2", "10.0.2.2", 8000, {"zone": "b"}),
        Endpoint("p3", "10.0.2.3", 8000, {"gpu": "a10"}),
    ]
    r = s.schedule(SchedulingRequest("r", "m", token_ids=[1]), eps)
    assert {e.name for e in eps if e.id in r.candidates} == expected


@pytest.mark.parametrize(
    "expr",
    [
        {"key": "zone", "operator": "In"},
        {"key": "zone", "operator": "Exists", "values": ["a"]},
        {"key": "zone", "operator": "Gt", "values": ["1"]},
    ],
)
def test_label_selector_rejects_bad_expressions(expr: dict[str, Any]) -> None:
    """Malformed matchExpressions are configuration errors."""
    from kvaware_scorer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"plugins\[0\]\.parameters\.matchExpressions"):
        build([{"type": "label-selector-filter", "parameters": {"matchExpressions": [expr]}}])


# -- approximate prefix scorer ------------------------------------------------------------------------


def test_approximate_scorer_follows_routing_history() -> None:
    """prefix-cache-scorer scores a pod by the consecutive blocks previously routed to it."""
    s = build(
        [{"type": "prefix-cache-scorer", "parameters": {"blockSizeTokens": 4}}],
        [{"name": "p", "plugins": [{"pluginRef": "prefix-cache-scorer"}]}],
        seed=0,
    )
    eps = endpoints(3)
    prompt = list(range(40))  # 10 blocks
    first = s.schedule(SchedulingRequest("a", "m", token_ids=prompt), eps)
    winner = first.targets[0]
    half = prompt[:20] + [999] * 20
    r = s.schedule(SchedulingRequest("b", "m", token_ids=half), eps)
    assert r.scores["prefix-cache-scorer"][winner.id] == pytest.approx(0.5)
    assert r.targets == [winner]
    other = s.schedule(SchedulingRequest("c", "other-model", token_ids=prompt), eps)
    assert set(other.scores["prefix-cache-scorer"].values()) == {0.0}


def test_approximate_scorer_lru_evicts_tail_first() -> None:
    """The per-pod LRU is bounded and drops a prompt's tail before its head."""
    s = build(
        [
            {
                "type": "prefix-cache-scorer",
                "parameters": {"blockSizeTokens": 4, "lruCapacityPerServer": 6},
            }
        ],
        seed=0,
    )
    ep = endpoints(1)
    scorer = s.plugin("prefix-cache-scorer")
    prompt = list(range(40))
    s.schedule(SchedulingRequest("a", "m", token_ids=prompt), ep)
    assert scorer.history.size(ep[0].id) == 6
    r = s.schedule(SchedulingRequest("b", "m", token_ids=prompt), ep)
    assert r.scores["prefix-cache-scorer"][ep[0].id] == pytest.approx(0.6)


def test_approximate_scorer_estimates_text_prompts() -> None:
    """Without token ids or a tokenizer, text prompts are keyed by a character estimate."""
    s = build([{"type": "prefix-cache-scorer", "parameters": {"blockSizeTokens": 8}}], seed=0)
    eps = endpoints(4)
    system = "You are a helpful assistant. " * 20
    a = s.schedule(SchedulingRequest("a", "m", prompt=system + "What is 2+2?"), eps)
    b = s.schedule(SchedulingRequest("b", "m", prompt=system + "Name a colour."), eps)
    assert b.targets == a.targets
    assert b.scores["prefix-cache-scorer"][a.targets[0].id] > 0.8
    chat = s.schedule(
        SchedulingRequest(
            "c",
            "m",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
        ),
        eps,
    )
    chat2 = s.schedule(
        SchedulingRequest(
            "d",
            "m",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": "yo"}],
        ),
        eps,
    )
    assert chat2.scores["prefix-cache-scorer"][chat.targets[0].id] > 0.8


def test_approximate_scorer_autotunes_capacity_from_metrics() -> None:
    """autoTune sizes a pod's LRU from num_gpu_blocks x block_size / blockSizeTokens."""
    s = build([{"type": "prefix-cache-scorer", "parameters": {"blockSizeTokens": 16}}])
    ep = with_metrics(endpoints(1)[0], cache_num_blocks=3, cache_block_size=32)
    scorer = s.plugin("prefix-cache-scorer")
    assert scorer.capacity(s.context(), ep) == 6
    s.schedule(SchedulingRequest("a", "m", token_ids=list(range(16 * 20))), [ep])
    assert scorer.history.size(ep.id) == 6


# -- precise prefix scorer -----------------------------------------------------------------------------


def precise(clock: FakeClock, **params: Any) -> Scheduler:
    return build(
        [
            {
                "type": "precise-prefix-cache-scorer",
                "parameters": {"tokenProcessorConfig": {"blockSize": 4}, **params},
            }
        ],
        [{"name": "p", "plugins": [{"pluginRef": "precise-prefix-cache-scorer"}]}],
        clock=clock,
        seed=0,
    )


def test_precise_scores_through_the_index_restricted_to_candidates() -> None:
    """The precise scorer reports the indexer's consecutive-block scores for the candidates only."""
    clock = FakeClock()
    s = precise(clock, speculativeIndexing=False)
    plugin = s.plugin("precise-prefix-cache-scorer")
    indexer = plugin.indexer
    eps = endpoints(3)
    prompt = list(range(32))  # 8 blocks
    keys = indexer.block_keys(prompt, "m")
    indexer.index.add(eps[0].id, keys[:6])
    indexer.index.add(eps[1].id, keys[:2])
    indexer.index.add("10.9.9.9:8000", keys)  # not a candidate
    r = s.schedule(SchedulingRequest("r", "m", token_ids=prompt), eps)
    assert r.scores["precise-prefix-cache-scorer"] == {
        eps[0].id: 0.75,
        eps[1].id: 0.25,
        eps[2].id: 0.0,
    }
    assert r.targets == [eps[0]]
    assert s.event_sinks == [plugin]


def test_speculative_entries_appear_and_expire() -> None:
    """After a pick the request's blocks count for the chosen pod until speculativeTTL passes."""
    clock = FakeClock()
    s = precise(clock, speculativeTTL="2s")
    eps = endpoints(4)
    prompt = list(range(64))
    first = s.schedule(SchedulingRequest("a", "m", token_ids=prompt), eps)
    chosen = first.targets[0]
    clock.advance(1.0)
    burst = [
        s.schedule(SchedulingRequest(f"b{i}", "m", token_ids=prompt + [i]), eps) for i in range(5)
    ]
    assert all(r.targets == [chosen] for r in burst)
    assert burst[0].scores["precise-prefix-cache-scorer"][chosen.id] == 1.0
    # picks that already match do not refresh the entries: they expire TTL after the first
    clock.advance(1.01)
    r = s.schedule(
        SchedulingRequest("c", "m", token_ids=prompt),
        [e for e in eps if e is not chosen] + [chosen],
    )
    assert r.scores["precise-prefix-cache-scorer"][chosen.id] == 0.0


def test_speculative_indexing_can_be_turned_off() -> None:
    """With speculativeIndexing false a pick leaves no trace in the index."""
    clock = FakeClock()
    s = precise(clock, speculativeIndexing=False)
    eps = endpoints(2)
    prompt = list(range(64))
    s.schedule(SchedulingRequest("a", "m", token_ids=prompt), eps)
    r = s.schedule(SchedulingRequest("b", "m", token_ids=prompt), eps)
    assert set(r.scores["precise-prefix-cache-scorer"].values()) == {0.0}


def test_precise_untokenizable_request_scores_zero_not_fails() -> None:
    """A text prompt with no tokenizer available scores 0 and is still placed by the others."""
    clock = FakeClock()
    s = build(
        [{"type": "precise-prefix-cache-scorer"}, {"type": "queue-scorer"}],
        clock=clock,
        seed=0,
    )
    eps = [with_metrics(e, waiting_queue_size=q) for e, q in zip(endpoints(2), (3, 0), strict=True)]
    r = s.schedule(SchedulingRequest("r", "no-such-model", prompt="hello there"), eps)
    assert r.targets == [eps[1]]
    assert set(r.scores["precise-prefix-cache-scorer"].values()) == {0.0}


def test_removed_endpoints_are_purged_from_every_index() -> None:
    """set_endpoints purges pods that left the pool from the precise index and the routing history."""
    clock = FakeClock()
    s = build(
        [
            {
                "type": "precise-prefix-cache-scorer",
                "parameters": {
                    "tokenProcessorConfig": {"blockSize": 4},
                    "speculativeIndexing": False,
                },
            },
            {"type": "prefix-cache-scorer", "parameters": {"blockSizeTokens": 4}},
        ],
        clock=clock,
        seed=0,
    )
    eps = endpoints(3)
    s.set_endpoints(eps)
    precise_plugin = s.plugin("precise-prefix-cache-scorer")
    approx = s.plugin("prefix-cache-scorer")
    keys = precise_plugin.indexer.block_keys(list(range(32)), "m")
    for e in eps:
        precise_plugin.indexer.index.add(e.id, keys)
    r = s.schedule(SchedulingRequest("r", "m", token_ids=list(range(32))))
    gone = r.targets[0]
    assert approx.history.size(gone.id) > 0
    s.set_endpoints([e for e in eps if e is not gone])
    assert gone.id not in precise_plugin.indexer.index.pods()
    assert approx.history.size(gone.id) == 0
    assert precise_plugin.indexer.metrics.purges.labels("endpoint-removed")._value.get() == 1


def test_precise_shuffled_candidates_same_scores() -> None:
    """Scores do not depend on the candidates' order."""
    clock = FakeClock()
    s = precise(clock, speculativeIndexing=False)
    indexer = s.plugin("precise-prefix-cache-scorer").indexer
    eps = endpoints(6)
    prompt = list(range(48))
    keys = indexer.block_keys(prompt, "m")
    for i, e in enumerate(eps):
        indexer.index.add(e.id, keys[: i * 2])
    base = s.schedule(SchedulingRequest("r", "m", token_ids=prompt), eps).scores
    shuffled = eps[:]
    random.Random(1).shuffle(shuffled)
    assert s.schedule(SchedulingRequest("r", "m", token_ids=prompt), shuffled).scores == base


def test_active_request_released_by_request_id() -> None:
    """post_response with an equal request (same id, new object) releases the count."""
    s = build([{"type": "active-request-scorer"}])
    ep = endpoints(1)
    res = s.schedule(SchedulingRequest("same-id", "m", token_ids=[1]), ep)
    scorer = s.plugin("active-request-scorer")
    assert scorer.count(ep[0].id) == 1
    s.post_response(SchedulingRequest("same-id", "m", token_ids=[1]), res, ResponseInfo())
    assert scorer.count(ep[0].id) == 0


def test_speculative_affinity_does_not_outlive_missing_events() -> None:
    """A pod whose KV events never arrive loses its speculative affinity TTL after the first pick, however many picks follow."""
    clock = FakeClock()
    s = precise(clock, speculativeTTL=2)
    eps = endpoints(3)
    prompt = list(range(64))
    chosen = s.schedule(SchedulingRequest("a", "m", token_ids=prompt), eps).targets[0]
    for i in range(19):
        clock.advance(0.1)
        r = s.schedule(SchedulingRequest(f"b{i}", "m", token_ids=prompt), eps)
        assert r.targets == [chosen]
    clock.advance(0.11)  # 2.01 s after the first pick
    r = s.schedule(SchedulingRequest("c", "m", token_ids=prompt), eps)
    assert r.scores["precise-prefix-cache-scorer"][chosen.id] == 0.0


def test_speculative_extends_a_partial_match() -> None:
    """A longer prompt records its new blocks beyond what the pod already matched."""
    clock = FakeClock()
    s = precise(clock, speculativeTTL=2)
    eps = endpoints(3)
    base = list(range(32))
    chosen = s.schedule(SchedulingRequest("a", "m", token_ids=base), eps).targets[0]
    longer = base + list(range(100, 132))
    s.schedule(SchedulingRequest("b", "m", token_ids=longer), eps)
    r = s.schedule(SchedulingRequest("c", "m", token_ids=longer), eps)
    assert r.scores["precise-prefix-cache-scorer"][chosen.id] == 1.0


@pytest.mark.parametrize(
    ("index", "blocking"),
    [({}, False), ({"redisConfig": {"address": "redis://127.0.0.1:1"}}, True)],
)
def test_precise_on_a_remote_index_declares_blocking_io(
    index: dict[str, Any], blocking: bool
) -> None:
    """The precise scorer on Redis asks the scheduler to keep its lookups off the event loop."""
    s = build(
        [{"type": "precise-prefix-cache-scorer", "parameters": {"kvBlockIndexConfig": index}}]
    )
    assert s.plugin("precise-prefix-cache-scorer").blocking_io is blocking
    s.close()


def test_approximate_pre_request_records_every_profile_pick() -> None:
    """Under P/D the prefill profile's pick is recorded too, not only the primary target."""
    from kvaware_scorer.scheduler import ProfileResult, SchedulingResult

    s = build([{"type": "prefix-cache-scorer", "parameters": {"blockSizeTokens": 4}}], seed=0)
    eps = endpoints(3)
    prompt = list(range(16))
    req = SchedulingRequest("a", "m", token_ids=prompt)
    decode = ProfileResult("decode", [eps[0]], [e.id for e in eps], {}, {}, {})
    prefill = ProfileResult("prefill", [eps[1]], [e.id for e in eps], {}, {}, {})
    result = SchedulingResult(
        [eps[0]], "decode", decode.candidates, {}, {}, {}, {"decode": decode, "prefill": prefill}
    )
    plugin = s.plugin("prefix-cache-scorer")
    plugin.pre_request(s.context(), req, result)
    after = plugin.score(s.context(), SchedulingRequest("b", "m", token_ids=prompt), eps)
    assert [after.get(e.id, 0.0) for e in eps] == [1.0, 1.0, 0.0]
