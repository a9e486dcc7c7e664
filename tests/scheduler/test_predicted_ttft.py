"""predicted-ttft-scorer: in-flight ledger, learned prefill model, and routing in time units."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.plugins import predicted_ttft
from kvaware_scorer.plugins.predicted_ttft import PrefillModel
from kvaware_scorer.scheduler import (
    Endpoint,
    ResponseInfo,
    Scheduler,
    SchedulingRequest,
    SchedulingResult,
)
from kvaware_scorer.scheduler.inflight import InFlight, InFlightLedger

from .conftest import FakeClock, build, config, endpoints, with_metrics

RATE = 1000.0  # prefill tokens per second assumed (learning off unless a test turns it on)


def _ttft(**params: Any) -> dict[str, Any]:
    base = {
        "prefixMatchInfoProducerName": "prefix-cache-scorer",
        "prefillTokensPerSecond": RATE,
        "baseLatency": 0,
        "learningHalfLife": 0,
        "workWeight": 0,
        "externality": 0,
        "metricsInterval": 0,
        "reuseWeight": 0,
    }
    base.update(params)
    return {"type": "predicted-ttft-scorer", "parameters": base}


def _scheduler(clock: FakeClock, *plugins: dict[str, Any], **ttft: Any) -> Scheduler:
    history = {"type": "prefix-cache-scorer", "parameters": {"blockSizeTokens": 16}}
    return build(
        config(
            [history, *plugins, _ttft(**ttft)],
            [{"name": "default", "plugins": [{"pluginRef": "predicted-ttft-scorer"}]}],
        ),
        clock=clock,
        seed=0,
    )


def _tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def _send(
    s: Scheduler, rid: str, tokens: list[int], eps: list[Endpoint]
) -> tuple[SchedulingRequest, SchedulingResult]:
    req = SchedulingRequest(rid, "m", token_ids=tokens)
    return req, s.schedule(req, eps)


def _served(s: Scheduler, rid: str, tokens: list[int], eps: list[Endpoint]) -> None:
    """Schedule a request and run it to its end (first token, then a 200 response)."""
    req, res = _send(s, rid, tokens, eps)
    s.first_token(req, res)
    s.post_response(req, res, ResponseInfo(200, len(tokens), 0, 10))


def test_ledger_counts_prefill_until_first_token_and_tokens_until_release() -> None:
    """A request's uncached prompt is queued prefill until its first token, and held KV until
    its release."""
    led = InFlightLedger()
    k1 = led.admit(InFlight("a", prefill=800, prompt=1000, output=100, start=0.0))
    k2 = led.admit(InFlight("a", prefill=200, prompt=200, output=50, start=0.0))
    load = led.load("a")
    assert (load.requests, load.prefill_tokens, load.tokens, load.kv_tokens) == (
        2,
        1000,
        1000,
        1150,
    )
    assert led.first_token(k1) is not None
    assert led.first_token(k1) is None  # reported once
    load = led.load("a")
    assert (load.prefill_tokens, load.prefilling, load.tokens) == (200, 1, 1000)
    assert led.release(k1) is not None and led.release(k2) is not None
    assert led.load("a").requests == 0 and len(led) == 0


def test_ledger_is_bounded_and_expires() -> None:
    """Beyond its bound the oldest request is forgotten, and unreleased requests time out."""
    led = InFlightLedger(timeout=10.0, max_tracked=2)
    for t in range(3):
        led.admit(InFlight("a", prefill=10, prompt=10, output=0, start=float(t)))
    assert len(led) == 2 and led.load("a").prefill_tokens == 20 and led.dropped == 1
    assert led.expire(12.5) == 2
    assert led.load("a").requests == 0


def test_ledger_settles_unstreamed_prefills_at_their_due_time() -> None:
    """An entry with a due time leaves the prefill queue then (no first token will come), once;
    one without stays until its first token; a release before the due time is not undone."""
    led = InFlightLedger(timeout=0)
    whole = led.admit(InFlight("a", prefill=800, prompt=800, output=10, start=0.0, due=2.0))
    sse = led.admit(InFlight("a", prefill=300, prompt=300, output=10, start=0.0))
    early = led.admit(InFlight("a", prefill=50, prompt=50, output=10, start=0.0, due=1.0))
    assert led.release(early) is not None
    assert led.expire(1.5) == 0 and led.load("a").prefill_tokens == 1100
    assert led.settle(2.0) == 1
    load = led.load("a")
    assert (load.prefill_tokens, load.prefilling, load.requests) == (300, 1, 2)
    assert led.settle(100.0) == 0 and led.first_token(whole) is None
    assert led.first_token(sse) is not None and led.load("a").prefill_tokens == 0
    assert led.release(whole) is not None and led.release(sse) is not None
    assert led.load("a").requests == 0 and led.load("a").prefilling == 0


def test_ledger_due_times_stay_bounded() -> None:
    """Released entries waiting for a far due time do not pile up: the heap is rebuilt from
    the live ones past twice the tracking bound."""
    led = InFlightLedger(timeout=0, max_tracked=8)
    for i in range(1000):
        key = led.admit(InFlight("a", prefill=1, prompt=1, output=0, start=0.0, due=1e9 + i))
        led.release(key)
    assert len(led._due) <= 2 * 8 + 64
    led.admit(InFlight("a", prefill=5, prompt=5, output=0, start=0.0, due=1.0))
    assert led.settle(1.0) == 1 and led.load("a").prefill_tokens == 0


def test_an_unstreamed_answer_stops_queueing_when_its_prefill_is_predicted_done(
    clock: FakeClock,
) -> None:
    """A whole-body answer reports no first token: with the configured rate trusted (learning
    off) its prefill counts as queued until the TTFT predicted for it, then the pod counts it
    as decoding; a streamed one waits for its token."""
    s = _scheduler(clock)
    (a,) = endpoints(1)
    scorer = s.plugin("predicted-ttft-scorer")
    whole = SchedulingRequest("w", "m", token_ids=_tokens(0, 2000), streaming=False)
    s.schedule(whole, [a])
    sse = SchedulingRequest("s", "m", token_ids=_tokens(10_000, 1000), streaming=True)
    s.schedule(sse, [a])
    assert scorer.ledger.load(a.id).prefill_tokens == 3000
    clock.advance(1.9)  # predicted: 2,000 tokens at 1,000 tokens/s
    _send(s, "probe1", _tokens(50_000, 16), [a])
    assert scorer.ledger.load(a.id).prefill_tokens == 3016
    clock.advance(0.2)
    _send(s, "probe2", _tokens(60_000, 16), [a])
    load = scorer.ledger.load(a.id)
    assert load.prefill_tokens == 1000 + 16 + 16 and load.requests - load.prefilling == 1


def test_an_unstreamed_prefill_ends_early_only_once_first_tokens_calibrate_the_rate(
    clock: FakeClock,
) -> None:
    """With learning on and no first token seen yet, a whole-body answer counts as queued
    until its end (the prior rate may be far off); after `CALIBRATED_AFTER` observed first
    tokens it leaves the queue at its predicted TTFT, and is never learned from itself."""
    s = _scheduler(clock, learningHalfLife=8)
    a, b = endpoints(2)
    scorer = s.plugin("predicted-ttft-scorer")
    whole = SchedulingRequest("w0", "m", token_ids=_tokens(0, 2000), streaming=False)
    res = s.schedule(whole, [a])
    clock.advance(30.0)
    _send(s, "probe0", _tokens(90_000, 16), [b])
    assert scorer.ledger.load(a.id).prefill_tokens == 2000  # still queued: not calibrated
    s.post_response(whole, res, ResponseInfo(200, 2000, 0, 10))
    assert scorer.ledger.load(a.id).requests == 0
    for i in range(predicted_ttft.CALIBRATED_AFTER):
        size = 500 + 100 * i
        req, r = _send(s, f"c{i}", _tokens(100_000 * (i + 1), size), [b])
        clock.advance(size / 500.0)  # pod b prefills at 500 tokens/s
        s.first_token(req, r)
        s.post_response(req, r, ResponseInfo(200, size, 0, 10))
    learned = scorer.model.observations()
    assert learned == predicted_ttft.CALIBRATED_AFTER and scorer.model.calibrated()
    whole = SchedulingRequest("w1", "m", token_ids=_tokens(5_000_000, 2000), streaming=False)
    s.schedule(whole, [a])
    (entry,) = [e for e in scorer.ledger._live.values() if e.pod == a.id]
    # the learned 500 tokens/s, not the 1,000 assumed: ~4 s for 2,000 tokens
    assert entry.due == pytest.approx(clock.now + entry.predicted) and entry.predicted > 3.0
    clock.advance(entry.predicted + 0.01)
    _send(s, "probe1", _tokens(7_000_000, 16), [b])
    assert scorer.ledger.load(a.id).prefill_tokens == 0
    assert scorer.model.observations() == learned


def test_prefill_model_learns_rate_and_base() -> None:
    """TTFTs that follow base + work / rate teach the model that base and rate; a pod with a few
    odd observations stays close to its fleet."""
    model = PrefillModel(rate=10000.0, base=0.0, half_life=64)
    for i in range(400):
        work = 1000.0 + (i * 7919) % 20000
        model.observe(f"p{i % 4}", work, 0.1 + work / 20000.0)
    base, rate = model.params("p0")
    assert rate == pytest.approx(20000.0, rel=0.05)
    assert base == pytest.approx(0.1, abs=0.02)
    model.observe("odd", 1000.0, 5.0)
    model.observe("odd", 2000.0, 0.01)
    assert model.params("odd")[1] == pytest.approx(model.params("p1")[1], rel=0.3)


def test_waits_behind_short_requests_but_leaves_a_long_backlog(clock: FakeClock) -> None:
    """A session's next turn stays where its context is when only short requests queue there,
    and moves (paying the re-prefill) when the queue there costs more than the re-prefill."""
    s = _scheduler(clock)
    a, b = endpoints(2)
    session = _tokens(0, 8000)
    _served(s, "t1", session, [a])
    _send(s, "short1", _tokens(100_000, 500), [a])
    _send(s, "short2", _tokens(200_000, 500), [a])
    _, res = _send(s, "t2", [*session, *_tokens(50_000, 400)], [a, b])
    assert res.target is a
    # a: 1,000 queued + ~400 new tokens; b: the whole 8,400-token re-prefill
    assert res.scores["predicted-ttft-scorer"][b.id] < 1.0
    for i in range(3):
        _send(s, f"long{i}", _tokens(300_000 + 10_000 * i, 4000), [a])
    _, res = _send(s, "t3", [*session, *_tokens(60_000, 400)], [a, b])
    assert res.target is b
    assert res.scores["predicted-ttft-scorer"][b.id] == 1.0


def test_first_token_ends_queueing_and_teaches_the_rate(clock: FakeClock) -> None:
    """At a request's first token its prefill leaves the pod's queue, and its observed TTFT
    moves the pod's learned prefill rate."""
    s = _scheduler(clock, learningHalfLife=8)
    (a,) = endpoints(1)
    scorer = s.plugin("predicted-ttft-scorer")
    req, res = _send(s, "r1", _tokens(0, 4000), [a])
    assert scorer.ledger.load(a.id).prefill_tokens == 4000
    clock.advance(1.0)  # 4,000 tokens in 1 s: faster than the 1,000 tokens/s assumed
    s.first_token(req, res)
    assert scorer.ledger.load(a.id).prefill_tokens == 0
    assert scorer.model.params(a.id)[1] > RATE
    s.post_response(req, res, ResponseInfo(200, 4000, 0, 100))
    assert scorer.ledger.load(a.id).requests == 0
    assert scorer.expected_output() < 256  # moved toward the 100 tokens observed


def test_full_kv_cache_sends_the_request_elsewhere(clock: FakeClock) -> None:
    """When a pod's in-flight requests would fill its KV cache, a request there waits for
    memory: it goes to a pod with room although the full pod holds its prefix."""
    s = _scheduler(clock, kvCapacityTokens=10_000, expectedOutputTokens=100)
    a, b = endpoints(2)
    prefix = _tokens(0, 2000)
    _send(s, "warm", prefix, [a])
    _, res = _send(s, "r1", [*prefix, *_tokens(90_000, 100)], [a, b])
    assert res.target is a  # room on a: the cached prefix wins
    for i in range(4):
        req, r = _send(s, f"big{i}", _tokens(100_000 + 10_000 * i, 2000), [a])
        s.first_token(req, r)  # decoding: no queued prefill, but its KV is held
    _, res = _send(s, "r2", [*prefix, *_tokens(95_000, 100)], [a, b])
    assert res.target is b


def test_externality_prefers_cached_pods_under_load(clock: FakeClock) -> None:
    """A pick that re-prefills a long context also delays the requests waiting on that pod: the
    cached pod wins although its own queue is longer."""

    def run(externality: float) -> Endpoint:
        s = _scheduler(clock, externality=externality)
        a, b = endpoints(2)
        session = _tokens(0, 3000)
        req, res = _send(s, "t1", session, [a])
        s.first_token(req, res)
        for i in range(4):
            _send(s, f"qa{i}", _tokens(100_000 + 10_000 * i, 1000), [a])
        for i in range(2):
            _send(s, f"qb{i}", _tokens(200_000 + 10_000 * i, 200), [b])
        _, res = _send(s, "t2", [*session, *_tokens(50_000, 100)], [a, b])
        return res.target

    # a: 4,000 queued + 100 = 4.1 s; b: 400 queued + 3,100 = 3.5 s; with the externality the
    # 100 tokens on a delay its 4 waiting requests (0.4 s), the 3,100 on b its 2 (6.2 s)
    assert run(0.0).name == "pod-1"
    assert run(1.0).name == "pod-0"


def _churned(s: Scheduler, clock: FakeClock, pod: Endpoint, n: int, size: int, at: int) -> None:
    """Send `n` requests of `size` new tokens to `pod` and run them to their end, 1 s apart."""
    for i in range(n):
        _served(s, f"churn-{pod.name}-{at + i}", _tokens(at + i * size, size), [pod])
        clock.advance(1.0)


def test_eviction_risk_steers_a_new_context_to_the_pod_that_keeps_it(clock: FakeClock) -> None:
    """A pod that writes its KV memory over quickly evicts a new context before its next turn:
    the eviction term sends the context to a quieter pod although it queues a little there."""

    def run(weight: float) -> tuple[Endpoint, float, float]:
        s = _scheduler(
            clock,
            kvCapacityTokens=10_000,
            expectedOutputTokens=10,
            reuseInterval="20s",
            reuseWeight=weight,
        )
        a, b = endpoints(2)
        _churned(s, clock, a, 4, 2000, 1_000_000)  # a wrote 8,040 tokens in the last 4 s
        _send(s, "queued", _tokens(2_000_000, 300), [b])  # b: 0.3 s of queued prefill
        scorer = s.plugin("predicted-ttft-scorer")
        churn = scorer.churn(a.id, clock.now), scorer.churn(b.id, clock.now)
        _, res = _send(s, "new", _tokens(3_000_000, 1000), [a, b])
        return res.target, *churn

    target, churn_a, churn_b = run(0.0)
    assert target.name == "pod-0"  # without the term: no queue on a, 1.0 s against 1.3 s
    # a: ~8,000 tokens over the 30 s window (decayed by the 4 s since): 10,000 free tokens
    # last ~40 s there, so a context read again in ~20 s is gone with probability ~0.14
    assert 230 < churn_a < 270 and 0 < churn_b < 11
    # 4 x 0.14 x 1,010 tokens / 1,000 tokens/s = 0.57 s on a; b keeps it (~1,000 s)
    assert run(4.0)[0].name == "pod-1"


def test_a_session_stays_where_its_context_is_despite_the_risk(clock: FakeClock) -> None:
    """Moving a session costs its re-prefill now; the eviction term is only a chance of that
    later, so a pod holding the context keeps its session on a busier cache."""
    s = _scheduler(clock, kvCapacityTokens=10_000, expectedOutputTokens=10, reuseWeight=4)
    a, b = endpoints(2)
    session = _tokens(0, 3000)
    _served(s, "t1", session, [a])
    _churned(s, clock, a, 4, 2000, 1_000_000)
    _, res = _send(s, "t2", [*session, *_tokens(50_000, 100)], [a, b])
    # a: 0.1 s + 4 x ~0.2 x 3,110 / 1,000 (~2.5 s); b: 3.1 s, nothing at risk
    assert res.target is a


def test_churn_decays_over_its_window_and_leaves_with_the_pod(clock: FakeClock) -> None:
    s = _scheduler(clock, kvCapacityTokens=10_000, expectedOutputTokens=0, churnWindow="10s")
    a, b = endpoints(2)
    s.set_endpoints([a, b])
    scorer = s.plugin("predicted-ttft-scorer")
    _send(s, "r", _tokens(0, 1000), [a])
    assert scorer.churn(a.id, clock.now) == pytest.approx(100.0)  # 1,000 tokens / 10 s
    clock.advance(10.0)
    assert scorer.churn(a.id, clock.now) == pytest.approx(100.0 / 2.718281828, rel=1e-6)
    assert scorer.churn(b.id, clock.now) == 0.0
    s.set_endpoints([b])
    assert scorer.churn(a.id, clock.now) == 0.0 and a.id not in scorer._churn


def test_eviction_term_prices_the_whole_context_by_the_free_memory_and_the_churn(
    clock: FakeClock,
) -> None:
    """The term's value: reuseWeight x exp(-(capacity - held) / churn / reuseInterval) x
    (prompt + expected output) / rate, with the prompt's cached part counted too."""
    s = _scheduler(clock, kvCapacityTokens=10_000, expectedOutputTokens=50, reuseWeight=4)
    a, b = endpoints(2)
    first = _tokens(0, 4000)
    _send(s, "r1", first, [a])  # in flight on a: 4,000 + 50 tokens held and written
    clock.advance(2.0)
    scorer = s.plugin("predicted-ttft-scorer")
    req = SchedulingRequest("q", "m", token_ids=[*first[:1000], *_tokens(90_000, 500)])
    pred = scorer.predict(s.context(), req, [a, b])
    assert pred[a.id][1] == 1500 - 992  # 62 blocks of 16 tokens held by a
    churn = 4050 * math.exp(-2 / 30) / 30
    risk = math.exp(-(10_000 - 4050) / churn / 20)
    assert pred[a.id][4] - pred[a.id][0] == pytest.approx(4 * risk * 1550 / RATE)
    assert pred[b.id][4] == pred[b.id][0]  # b writes nothing: no risk


def test_a_full_pod_risks_the_context_even_without_writes_seen(clock: FakeClock) -> None:
    """No free KV memory (scraped full, filled by traffic this scheduler did not send): the
    context is the first to go, whatever the churn account says."""
    s = _scheduler(clock, kvCapacityTokens=10_000, expectedOutputTokens=50, reuseWeight=4)
    a, b = endpoints(2)
    for e, usage in ((a, 1.0), (b, 0.0)):
        with_metrics(
            e, clock.now, kv_cache_usage_percent=usage, cache_block_size=16, cache_num_blocks=625
        )
    scorer = s.plugin("predicted-ttft-scorer")
    req = SchedulingRequest("q", "m", token_ids=_tokens(0, 1000))
    pred = scorer.predict(s.context(), req, [a, b])
    assert pred[a.id][4] - pred[a.id][0] == pytest.approx(4 * 1050 / RATE)
    assert pred[b.id][4] == pred[b.id][0]


def test_churn_account_is_bounded_and_never_moves_back_in_time(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(predicted_ttft, "MAX_CHURN_PODS", 3)
    s = _scheduler(clock, kvCapacityTokens=10_000, expectedOutputTokens=0, churnWindow="10s")
    scorer = s.plugin("predicted-ttft-scorer")
    pods = endpoints(5)
    for e in pods:
        _send(s, f"r-{e.name}", _tokens(0, 100), [e])
        clock.advance(1.0)
    assert sorted(scorer._churn) == sorted(e.id for e in pods[2:])  # the quietest went first
    e = pods[4]
    before = scorer.churn(e.id, clock.now)
    # a late write (5 s before the last, 1 s ago) is counted as of the last one: time kept
    scorer._wrote(e.id, clock.now - 5.0, 100)
    assert scorer.churn(e.id, clock.now) == pytest.approx(before + 10.0 * math.exp(-0.1))


def test_eviction_parameters_reject_infinities() -> None:
    for key in ("reuseWeight", "reuseInterval", "churnWindow"):
        with pytest.raises(ConfigError):
            build(config([_ttft(**{key: "inf" if key == "reuseWeight" else "infs"})], []))


def test_no_eviction_term_without_a_known_capacity_or_when_turned_off(clock: FakeClock) -> None:
    for params in (
        {"reuseWeight": 4},
        {"kvCapacityTokens": 10_000, "reuseInterval": 0, "reuseWeight": 4},
    ):
        s = _scheduler(clock, expectedOutputTokens=10, **params)
        a, b = endpoints(2)
        _churned(s, clock, a, 4, 2000, 1_000_000)
        _send(s, "queued", _tokens(2_000_000, 300), [b])
        _, res = _send(s, "new", _tokens(3_000_000, 1000), [a, b])
        assert res.target is a


def test_routing_history_prior_keeps_sessions_sticky(clock: FakeClock) -> None:
    """When the exact index knows nothing of a session (no KV events yet), the routing history
    keeps its next turn where the previous one went; without the prior the pick is a tie."""

    def picks(weight: float) -> set[str]:
        plugins = [
            {
                "type": "precise-prefix-cache-producer",
                "parameters": {
                    "tokenProcessorConfig": {"blockSize": 16},
                    "speculativeIndexing": False,
                },
            },
            {"type": "approx-prefix-cache-producer", "parameters": {"blockSizeTokens": 16}},
            _ttft(
                prefixMatchInfoProducerName="precise-prefix-cache-producer",
                priorProducerName="approx-prefix-cache-producer",
                priorWeight=weight,
            ),
        ]
        s = build(
            config(plugins, [{"name": "d", "plugins": [{"pluginRef": "predicted-ttft-scorer"}]}]),
            clock=clock,
            seed=1,
        )
        a, b = endpoints(2)
        out = set()
        for i in range(12):
            session = _tokens(1_000_000 * (i + 1), 1600)
            req, res = _send(s, f"s{i}t1", session, [a])
            s.post_response(req, res, ResponseInfo(200, 1600, 0, 10))
            _, res = _send(s, f"s{i}t2", [*session, *_tokens(5, 64)], [a, b])
            out.add(res.target.name)
            s.post_response(req, res, ResponseInfo(200, 1664, 0, 10))
        return out

    assert picks(1.0) == {"pod-0"}
    assert picks(0.0) == {"pod-0", "pod-1"}


def test_scores_are_normalized_with_the_fastest_at_one(clock: FakeClock) -> None:
    """Scores lie in (0, 1]: 1 for the lowest predicted TTFT, lower for slower pods."""
    s = _scheduler(clock)
    a, b, c = endpoints(3)
    _send(s, "q", _tokens(0, 3000), [b])
    _send(s, "q2", _tokens(10_000, 6000), [c])
    _, res = _send(s, "r", _tokens(50_000, 100), [a, b, c])
    sc = res.scores["predicted-ttft-scorer"]
    assert sc[a.id] == 1.0 and 0.0 < sc[c.id] < sc[b.id] < 1.0


def test_work_weight_charges_a_re_prefill_beyond_the_own_ttft(clock: FakeClock) -> None:
    """At light load, a pod that must compute a context again is charged that work once more
    (the pod is busy longer and holds a second copy): a slightly faster TTFT elsewhere does not
    move the session, unless workWeight is 0."""

    def run(work_weight: float) -> str:
        s = _scheduler(clock, workWeight=work_weight)
        a, b = endpoints(2)
        session = _tokens(0, 500)
        _served(s, "t1", session, [a])
        _send(s, "q", _tokens(100_000, 600), [a])
        _, res = _send(s, "t2", [*session, *_tokens(50_000, 100)], [a, b])
        return res.target.name

    # a: 0.6 s queued + ~0.1 s; b: 0.6 s of re-prefill (+ 0.6 s of extra work when charged)
    assert run(0.0) == "pod-1"
    assert run(1.0) == "pod-0"


def test_ledger_counts_kv_sent_since_the_last_scrape() -> None:
    """KV tokens of requests admitted after a pod's last scrape are counted apart (the scraped
    usage already holds the earlier ones); releases of either kind keep the count right."""
    led = InFlightLedger()
    k1 = led.admit(InFlight("a", prefill=100, prompt=100, output=0, start=0.0))
    led.mark_scraped("a")
    assert led.kv_tokens_since_scrape("a") == 0
    k2 = led.admit(InFlight("a", prefill=50, prompt=50, output=10, start=0.0))
    assert led.kv_tokens_since_scrape("a") == 60
    led.release(k1)
    assert led.kv_tokens_since_scrape("a") == 60
    led.release(k2)
    assert led.kv_tokens_since_scrape("a") == 0 and led.load("a").kv_tokens == 0


def test_pods_leaving_the_pool_are_forgotten(clock: FakeClock) -> None:
    """A removed pod's in-flight requests and its own prefill fit are dropped."""
    s = _scheduler(clock, learningHalfLife=8)
    a, b = endpoints(2)
    s.set_endpoints([a, b])
    scorer = s.plugin("predicted-ttft-scorer")
    req, res = _send(s, "r", _tokens(0, 1000), [a])
    clock.advance(0.5)
    s.first_token(req, res)
    _send(s, "r2", _tokens(5000, 1000), [a])
    assert a.id in scorer.model._pods and scorer.ledger.load(a.id).requests == 2
    s.set_endpoints([b])
    assert a.id not in scorer.model._pods and scorer.ledger.load(a.id).requests == 0


def _scraped(clock: FakeClock, eps: list[Endpoint], *fill: tuple[int, float]) -> None:
    """Scrape each pod now: (requests waiting, KV usage) of a 10,000-token KV cache."""
    for e, (waiting, usage) in zip(eps, fill, strict=True):
        with_metrics(
            e,
            clock.now,
            waiting_queue_size=waiting,
            kv_cache_usage_percent=usage,
            cache_block_size=16,
            cache_num_blocks=625,
        )


def test_saturated_only_when_every_pod_would_queue(clock: FakeClock) -> None:
    """As a saturation detector the scorer reports the emptiest pod's fill: below 1.0 while
    one pod has neither a vLLM queue nor a full KV cache, 1.0 or more once none has."""
    s = _scheduler(clock)
    scorer = s.plugin("predicted-ttft-scorer")
    a, b = endpoints(2)
    _scraped(clock, [a, b], (3, 0.9), (0, 0.5))
    assert scorer.saturated(s.context(), [a, b]) == pytest.approx(0.5)
    _scraped(clock, [a, b], (3, 0.9), (1, 0.5))
    assert scorer.saturated(s.context(), [a, b]) >= 1.0
    _scraped(clock, [a, b], (0, 1.0), (0, 1.0))
    assert scorer.saturated(s.context(), [a, b]) >= 1.0


def test_saturation_counts_requests_sent_since_the_scrape(clock: FakeClock) -> None:
    """A request routed after the last scrape fills its pod at once (prompt the pod must
    compute plus expected output), so a gate releasing one request at a time sees it."""
    s = _scheduler(clock, expectedOutputTokens=1000)
    scorer = s.plugin("predicted-ttft-scorer")
    (a,) = endpoints(1)
    _scraped(clock, [a], (0, 0.5))
    assert scorer.saturated(s.context(), [a]) == pytest.approx(0.5)
    _send(s, "r", _tokens(0, 4000), [a])
    assert scorer.saturated(s.context(), [a]) == pytest.approx(1.0)


def test_unknown_metrics_never_saturate(clock: FakeClock) -> None:
    """A pod never scraped, or one whose KV capacity is unknown, counts as having room: the
    gate holds nothing it cannot judge."""
    s = _scheduler(clock)
    scorer = s.plugin("predicted-ttft-scorer")
    a, b = endpoints(2)
    _scraped(clock, [a], (5, 1.0))
    assert scorer.saturated(s.context(), [a, b]) == 0.0
    with_metrics(b, clock.now, waiting_queue_size=5, kv_cache_usage_percent=1.0)
    assert scorer.saturated(s.context(), [a, b]) == 0.0


def test_flow_control_uses_the_scorer_as_its_detector(clock: FakeClock) -> None:
    """With ``flowControl.saturationDetector.pluginRef`` naming the scorer, the scheduler's
    flow controller gates on the scorer's reading."""
    data = config(
        [
            {"type": "prefix-cache-scorer", "parameters": {"blockSizeTokens": 16}},
            _ttft(),
        ],
        [{"name": "default", "plugins": [{"pluginRef": "predicted-ttft-scorer"}]}],
    )
    data["flowControl"] = {"saturationDetector": {"pluginRef": "predicted-ttft-scorer"}}
    s = build(data, clock=clock, seed=0)
    a, b = endpoints(2)
    s.set_endpoints([a, b])
    assert s.flow is not None
    _scraped(clock, [a, b], (2, 1.0), (0, 0.25))
    assert s.flow.saturation() == pytest.approx(0.25)
    _scraped(clock, [a, b], (2, 1.0), (2, 1.0))
    assert s.flow.saturation() >= 1.0
