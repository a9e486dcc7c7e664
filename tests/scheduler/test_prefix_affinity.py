"""prefix-cache-affinity-filter and token-load-scorer: upstream's tables, ported in spirit."""

from __future__ import annotations

from typing import Any

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import Endpoint, ResponseInfo, Scheduler, SchedulingRequest

from .conftest import FakeClock, build, config, endpoints

BS = 16  # routing-history block size of these tests
PROMPT = list(range(100 * BS))  # 100 blocks


def _filter_scheduler(clock: FakeClock, **params: Any) -> Scheduler:
    """History producer + the filter + a queue-blind picker (the filter's output is visible in
    the result's candidates)."""
    return build(
        config(
            [
                {"type": "approx-prefix-cache-producer", "parameters": {"blockSizeTokens": BS}},
                {"type": "prefix-cache-affinity-filter", "parameters": params},
                {"type": "random-picker"},
            ],
            [
                {
                    "name": "d",
                    "plugins": [
                        {"pluginRef": "prefix-cache-affinity-filter"},
                        {"pluginRef": "random-picker"},
                    ],
                }
            ],
        ),
        clock=clock,
        seed=0,
    )


def _place(s: Scheduler, ep: Endpoint, blocks: int, rid: str, tokens_in_flight: int = 0) -> None:
    """Record `blocks` blocks of PROMPT on `ep` (and keep `tokens_in_flight` tokens in flight
    there, with a prompt sharing nothing)."""
    if blocks:
        req = SchedulingRequest(rid, "m", token_ids=PROMPT[: blocks * BS])
        s.post_response(req, s.schedule(req, [ep]), ResponseInfo())
    if tokens_in_flight:
        other = list(
            range(10**6 * (ep.port + len(rid)), 10**6 * (ep.port + len(rid)) + tokens_in_flight)
        )
        s.schedule(SchedulingRequest(rid + "-load", "m", token_ids=other), [ep])


def _kept(s: Scheduler, eps: list[Endpoint]) -> set[str]:
    res = s.schedule(SchedulingRequest("probe", "m", token_ids=PROMPT), eps, dry_run=True)
    return {e.name for e in eps if e.id in res.candidates}


@pytest.mark.parametrize(
    ("params", "matches", "loads", "kept"),
    [
        # upstream TestFilter_AffinityThresholdDisabled
        ({"affinityThreshold": 0}, [0, 90], [0, 0], {"pod-0", "pod-1"}),
        # TestFilter_NoStickyEndpoints
        ({"affinityThreshold": 0.8}, [10, 20, 50], [0, 0, 0], {"pod-0", "pod-1", "pod-2"}),
        # TestFilter_NarrowToSticky
        ({"affinityThreshold": 0.8}, [90, 85, 10], [0, 0, 0], {"pod-0", "pod-1"}),
        # TestFilter_ThroughputTTFTBreaksStickiness: 500 vs 50 in-flight tokens at 1,000/s
        (
            {"maxTTFTPenaltyMs": 100, "peakPrefillThroughput": 1000},
            [90, 10],
            [500, 50],
            {"pod-0", "pod-1"},
        ),
        # TestFilter_ThroughputTTFTWithinThreshold
        ({"maxTTFTPenaltyMs": 1000, "peakPrefillThroughput": 1000}, [90, 10], [500, 50], {"pod-0"}),
        # TestFilter_TTFTPenaltyDisabled
        ({"maxTTFTPenaltyMs": 0, "peakPrefillThroughput": 1000}, [90, 10], [5000, 50], {"pod-0"}),
        # TestFilter_ExplorationProbability
        ({"explorationProbability": 1.0}, [90, 10], [0, 0], {"pod-0", "pod-1"}),
    ],
)
def test_affinity_filter_table(
    clock: FakeClock,
    params: dict[str, Any],
    matches: list[int],
    loads: list[int],
    kept: set[str],
) -> None:
    """Sticky pods (match >= threshold) are kept alone unless the gate opens (no sticky pod,
    threshold 0, exploration, or the best sticky pod's TTFT trails by more than the penalty)."""
    s = _filter_scheduler(clock, **params)
    eps = endpoints(len(matches))
    for i, (ep, m, load) in enumerate(zip(eps, matches, loads, strict=True)):
        _place(s, ep, m, f"w{i}", load)
    assert _kept(s, eps) == kept


def test_affinity_filter_single_endpoint_passes(clock: FakeClock) -> None:
    """One candidate is always kept."""
    s = _filter_scheduler(clock)
    (a,) = endpoints(1)
    assert _kept(s, [a]) == {"pod-0"}


def test_affinity_filter_load_releases_when_responses_end(clock: FakeClock) -> None:
    """In-flight tokens leave the TTFT estimate when the response ends: stickiness returns."""
    s = _filter_scheduler(clock, maxTTFTPenaltyMs=100, peakPrefillThroughput=1000)
    a, b = endpoints(2)
    _place(s, a, 100, "w")
    req = SchedulingRequest("load", "m", token_ids=list(range(10**7, 10**7 + 5000)))
    res = s.schedule(req, [a])
    assert _kept(s, [a, b]) == {"pod-0", "pod-1"}
    s.post_response(req, res, ResponseInfo())
    assert _kept(s, [a, b]) == {"pod-0"}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"affinityThreshold": 1.5}, "affinityThreshold"),
        ({"explorationProbability": -0.1}, "explorationProbability"),
        ({"peakPrefillThroughput": -1}, "peakPrefillThroughput"),
        ({"ttftSource": "bogus"}, "ttftSource"),
        ({"ttftSource": "prefillThroughput", "peakPrefillThroughput": 0}, "peakPrefillThroughput"),
    ],
)
def test_affinity_filter_rejects_bad_parameters(params: dict[str, Any], message: str) -> None:
    """Invalid parameters are configuration errors naming the parameter."""
    with pytest.raises(ConfigError, match=message):
        build(config([{"type": "prefix-cache-affinity-filter", "parameters": params}]))


def test_affinity_filter_accepts_unused_zero_rate() -> None:
    """peakPrefillThroughput 0 is fine when the throughput estimate is not used."""
    build(
        config(
            [
                {
                    "type": "prefix-cache-affinity-filter",
                    "parameters": {"maxTTFTPenaltyMs": 0, "peakPrefillThroughput": 0},
                }
            ]
        )
    )


def test_affinity_filter_reads_a_latency_predictor(clock: FakeClock) -> None:
    """ttftSource latencyPredictor takes each pod's TTFT from a predicted-ttft-scorer."""
    s = build(
        config(
            [
                {"type": "approx-prefix-cache-producer", "parameters": {"blockSizeTokens": BS}},
                {
                    "type": "prefix-cache-affinity-filter",
                    "parameters": {"ttftSource": "latencyPredictor", "maxTTFTPenaltyMs": 1000},
                },
                {
                    "type": "predicted-ttft-scorer",
                    "parameters": {
                        "prefixMatchInfoProducerName": "approx-prefix-cache-producer",
                        "prefillTokensPerSecond": 1000,
                        "learningHalfLife": 0,
                        "metricsInterval": 0,
                    },
                },
                {"type": "random-picker"},
            ]
        ),
        clock=clock,
        seed=0,
    )
    a, b = endpoints(2)
    _place(s, a, 100, "w")
    assert _kept(s, [a, b]) == {"pod-0"}
    # 3,000 tokens queued on the sticky pod: 3 s there against 1.6 s of prefill elsewhere
    s.schedule(SchedulingRequest("q", "m", token_ids=list(range(10**7, 10**7 + 3000))), [a])
    assert _kept(s, [a, b]) == {"pod-0", "pod-1"}


def test_token_load_scorer_table(clock: FakeClock) -> None:
    """Upstream's table: (in flight + this request's tokens) / threshold, 1 - that, floor 0."""
    s = build(
        config([{"type": "token-load-scorer", "parameters": {"queueThresholdTokens": 1000}}]),
        clock=clock,
        seed=0,
    )
    a, b, c = endpoints(3)
    s.schedule(SchedulingRequest("l1", "m", token_ids=list(range(10**6, 10**6 + 250))), [b])
    s.schedule(SchedulingRequest("l2", "m", token_ids=list(range(2 * 10**6, 2 * 10**6 + 750))), [c])
    res = s.schedule(
        SchedulingRequest("r", "m", token_ids=list(range(250))), [a, b, c], dry_run=True
    )
    sc = res.scores["token-load-scorer"]
    assert sc[a.id] == pytest.approx(0.75)
    assert sc[b.id] == pytest.approx(0.5)
    assert sc[c.id] == pytest.approx(0.0)


def test_token_load_scorer_discounts_cached_tokens_and_defaults(clock: FakeClock) -> None:
    """A pod holding the prompt is charged only its uncached tokens; a threshold <= 0 means
    upstream's default (4,194,304 tokens)."""
    s = build(
        config(
            [
                {"type": "prefix-cache-scorer", "parameters": {"blockSizeTokens": BS}},
                {"type": "token-load-scorer", "parameters": {"queueThresholdTokens": 0}},
            ],
            [{"name": "d", "plugins": [{"pluginRef": "token-load-scorer"}]}],
        ),
        clock=clock,
        seed=0,
    )
    a, b = endpoints(2)
    assert s.plugin("token-load-scorer").threshold == 4_194_304
    req = SchedulingRequest("w", "m", token_ids=PROMPT)
    s.post_response(req, s.schedule(req, [a]), ResponseInfo())
    res = s.schedule(SchedulingRequest("r", "m", token_ids=PROMPT), [a, b], dry_run=True)
    sc = res.scores["token-load-scorer"]
    assert sc[a.id] > sc[b.id]
    assert 1 - sc[b.id] == pytest.approx(len(PROMPT) / 4_194_304)


# -- lmetric-scorer (upstream's LMetric cost: uncached tokens x (in-flight requests + 1)) ---------


def _lmetric_scheduler(clock: FakeClock) -> Scheduler:
    return build(
        config(
            [
                {"type": "approx-prefix-cache-producer", "parameters": {"blockSizeTokens": BS}},
                {"type": "lmetric-scorer"},
                {"type": "max-score-picker"},
            ],
            [{"name": "d", "plugins": [{"pluginRef": "lmetric-scorer"}]}],
        ),
        clock=clock,
        seed=0,
    )


def _busy(s: Scheduler, ep: Endpoint, n: int, rid: str) -> None:
    """Keep `n` requests (sharing nothing with PROMPT) in flight on `ep`."""
    for i in range(n):
        base = 10**7 * (i + 1) + 10**5 * ep.port
        s.schedule(
            SchedulingRequest(f"{rid}-{i}", "m", token_ids=list(range(base, base + BS))), [ep]
        )


@pytest.mark.parametrize(
    ("matches", "busy", "want"),
    [
        # costs (100 - match) x 16 x (busy + 1): 1600, 800, 160 -> normalized
        ([0, 50, 90], [0, 0, 0], [0.0, 800 / 1440, 1.0]),
        # the pod holding 90 % serves 9 requests: cost 160 x 10 = 1600, the empty pod 1600
        ([0, 90], [0, 9], [1.0, 1.0]),
        # load breaks the tie in favour of the idle pod
        ([50, 50], [3, 0], [0.0, 1.0]),
        # equal costs: every candidate scores 1
        ([20, 20, 20], [1, 1, 1], [1.0, 1.0, 1.0]),
    ],
)
def test_lmetric_scorer_table(
    clock: FakeClock, matches: list[int], busy: list[int], want: list[float]
) -> None:
    s = _lmetric_scheduler(clock)
    eps = endpoints(len(matches))
    for i, ep in enumerate(eps):
        _place(s, ep, matches[i], f"m{i}")
        _busy(s, ep, busy[i], f"b{i}")
    res = s.schedule(SchedulingRequest("probe", "m", token_ids=PROMPT), eps, dry_run=True)
    got = [res.scores["lmetric-scorer"][e.id] for e in eps]
    assert got == pytest.approx(want)
    s.close()


def test_lmetric_scorer_counts_requests_until_they_end(clock: FakeClock) -> None:
    """Its in-flight count is the scheduler's: a request counts from its pick to its end."""
    s = _lmetric_scheduler(clock)
    eps = endpoints(2)
    req = SchedulingRequest("a", "m", token_ids=PROMPT)
    first = s.schedule(req, [eps[0]])
    probe = SchedulingRequest("probe", "m", token_ids=list(range(5 * 10**8, 5 * 10**8 + 64)))
    res = s.schedule(probe, eps, dry_run=True)
    assert res.scores["lmetric-scorer"] == {eps[0].id: 0.0, eps[1].id: 1.0}
    s.post_response(req, first, ResponseInfo())
    res = s.schedule(probe, eps, dry_run=True)
    assert res.scores["lmetric-scorer"] == {eps[0].id: 1.0, eps[1].id: 1.0}
    s.close()


def test_lmetric_scorer_without_match_info_scores_zero(clock: FakeClock) -> None:
    """No match info (an empty prompt here): every candidate scores 0, as upstream."""
    s = _lmetric_scheduler(clock)
    eps = endpoints(2)
    res = s.schedule(SchedulingRequest("e", "m", token_ids=[]), eps, dry_run=True)
    assert res.scores["lmetric-scorer"] == {eps[0].id: 0.0, eps[1].id: 0.0}
    s.close()


def test_lmetric_guide_config_loads() -> None:
    """llm-d's precise-prefix-cache-routing LMetric guide config (the producer named, upstream's
    in-flight producer accepted) builds and scores."""
    from pathlib import Path

    path = Path(__file__).parent / "upstream_corpus" / "lmetric.yaml"
    s = build(path.read_text())
    prof = s.config.profiles["default"]
    assert [(r.name, r.weight) for r in prof.scorers] == [("lmetric-scorer", 1.0)]
    eps = endpoints(2)
    res = s.schedule(SchedulingRequest("r", "m", token_ids=list(range(256))), eps)
    assert res.scores["lmetric-scorer"] == {eps[0].id: 1.0, eps[1].id: 1.0}
    s.close()
