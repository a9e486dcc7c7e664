"""The pipeline: filters in order, clamped weighted scores, pickers, request hooks, determinism."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from kvaware_scorer.errors import NoEndpointError
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    ResponseInfo,
    Scheduler,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
    hookimpl,
    make_plugin_manager,
)

from .conftest import FakeClock, config, endpoints


class FixedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scores: dict[str, float] = {}
    fail: bool = False


class FixedScorer:
    """Returns the configured scores (by endpoint name) as they are (even out of range)."""

    def __init__(self, params: FixedParams, ctx: PluginContext) -> None:
        self.scores = params.scores
        self.fail = params.fail

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        if self.fail:
            raise RuntimeError("scorer bug")
        return {e.id: self.scores[e.name] for e in endpoints if e.name in self.scores}


class DropParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    drop: list[str] = []


class DropFilter:
    def __init__(self, params: DropParams, ctx: PluginContext) -> None:
        self.drop = set(params.drop)

    def filter(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        return [e for e in endpoints if e.name not in self.drop]


class Recorder:
    """Pre-request and post-response hook recording what it saw."""

    def __init__(self, params: Any, ctx: PluginContext) -> None:
        self.pre: list[str] = []
        self.post: list[tuple[str, int]] = []

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        self.pre.append(result.targets[0].name)

    def post_response(
        self, request: SchedulingRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        self.post.append((result.targets[0].name, response.status))


class TestPlugins:
    @hookimpl
    def kvaware_register_plugins(self, registry: PluginRegistry) -> None:
        registry.register("fixed-scorer", FixedScorer, params=FixedParams)
        registry.register("drop-filter", DropFilter, params=DropParams)
        registry.register("recorder", Recorder, kinds=("pre-request", "post-response"))


def sched(data: dict[str, Any], **kw: Any) -> Scheduler:
    pm = make_plugin_manager(use_env=False, plugins=[TestPlugins()])
    return Scheduler.from_config(data, plugin_manager=pm, **kw)


def req(i: int = 0, tokens: list[int] | None = None) -> SchedulingRequest:
    return SchedulingRequest(f"r{i}", "m", token_ids=tokens if tokens is not None else [1, 2, 3])


def test_weighted_sum_of_clamped_scores_not_normalised() -> None:
    """total = sum(weight x clamp(score)); out-of-range and NaN scores clamp; missing endpoints score 0."""
    s = sched(
        config(
            [
                {
                    "type": "fixed-scorer",
                    "name": "a",
                    "parameters": {"scores": {"pod-0": 0.5, "pod-1": 1.7, "pod-2": -3}},
                },
                {
                    "type": "fixed-scorer",
                    "name": "b",
                    "parameters": {"scores": {"pod-0": 0.25, "pod-1": math.nan}},
                },
            ],
            [
                {
                    "name": "p",
                    "plugins": [{"pluginRef": "a", "weight": 2}, {"pluginRef": "b", "weight": 3}],
                }
            ],
        )
    )
    eps = endpoints(4)
    r = s.schedule(req(), eps)
    ids = [e.id for e in eps]
    assert r.scores["a"] == {ids[0]: 0.5, ids[1]: 1.0, ids[2]: 0.0, ids[3]: 0.0}
    assert r.scores["b"] == {ids[0]: 0.25, ids[1]: 0.0, ids[2]: 0.0, ids[3]: 0.0}
    assert r.weights == {"a": 2.0, "b": 3.0}
    assert r.totals == {ids[0]: 1.75, ids[1]: 2.0, ids[2]: 0.0, ids[3]: 0.0}
    assert r.targets == [eps[1]]
    assert r.candidates == ids
    assert r.profile == "p"


def test_failing_scorer_scores_zero_and_is_counted() -> None:
    """A scorer that raises contributes 0 and the decision still happens."""
    s = sched(
        config(
            [
                {"type": "fixed-scorer", "name": "bad", "parameters": {"fail": True}},
                {"type": "fixed-scorer", "name": "good", "parameters": {"scores": {"pod-2": 1.0}}},
            ]
        )
    )
    eps = endpoints(3)
    r = s.schedule(req(), eps)
    assert r.targets == [eps[2]]
    assert set(r.scores["bad"].values()) == {0.0}
    value = s.metrics_registry.get_sample_value(
        "kvaware_plugin_errors_total", {"plugin": "bad", "call": "score"}
    )
    assert value == 1.0


def test_filters_run_in_order_and_empty_result_names_the_filter() -> None:
    """Filters narrow in order; the one that leaves nothing is named in the NoEndpointError."""
    s = sched(
        config(
            [
                {"type": "drop-filter", "name": "f1", "parameters": {"drop": ["pod-0"]}},
                {"type": "drop-filter", "name": "f2", "parameters": {"drop": ["pod-1"]}},
                {"type": "fixed-scorer", "parameters": {"scores": {"pod-0": 1.0}}},
            ]
        )
    )
    eps = endpoints(3)
    r = s.schedule(req(), eps)
    assert r.candidates == [eps[2].id]
    with pytest.raises(NoEndpointError, match=r"filter 'f2' of profile 'default' \(1 endpoint"):
        s.schedule(req(), eps[:2])
    with pytest.raises(NoEndpointError, match="no endpoints"):
        s.schedule(req(), [])


def test_duplicate_endpoint_ids_rejected() -> None:
    """Two endpoints with one address:port are refused rather than merged silently."""
    s = sched(config([{"type": "random-picker"}]))
    eps = endpoints(2) + [Endpoint("again", "10.0.0.0", 8000)]
    with pytest.raises(ValueError, match="share an id"):
        s.schedule(req(), eps)


def test_request_hooks_run_after_pick_and_after_response() -> None:
    """Pre-request hooks see the decision; post_response runs the post-response hooks."""
    s = sched(
        config(
            [
                {"type": "fixed-scorer", "parameters": {"scores": {"pod-1": 1.0}}},
                {"type": "recorder"},
            ]
        )
    )
    eps = endpoints(3)
    r = s.schedule(req(), eps)
    rec = s.plugin("recorder")
    assert rec.pre == ["pod-1"]
    s.post_response(req(), r, ResponseInfo(status=503))
    assert rec.post == [("pod-1", 503)]


def test_max_score_ties_are_fair() -> None:
    """Among equal top totals every endpoint wins about equally often, whatever its position."""
    s = sched(config([{"type": "fixed-scorer", "parameters": {"scores": {"pod-0": 0.2}}}]), seed=7)
    eps = endpoints(5)[1:]  # four endpoints, all scoring 0: a four-way tie
    n = 4000
    wins = Counter(s.schedule(req(i), eps).targets[0].name for i in range(n))
    # chi-square against uniform, 3 degrees of freedom: p = 0.001 at 16.27
    expected = n / 4
    chi2 = sum((wins[e.name] - expected) ** 2 / expected for e in eps)
    assert chi2 < 16.27, wins
    # reversed order: the first endpoint is not favoured either
    wins_rev = Counter(s.schedule(req(i), eps[::-1]).targets[0].name for i in range(n))
    chi2_rev = sum((wins_rev[e.name] - expected) ** 2 / expected for e in eps)
    assert chi2_rev < 16.27, wins_rev


def test_ties_only_among_the_top() -> None:
    """A strictly better endpoint always wins; ties never draw from lower totals."""
    s = sched(
        config(
            [
                {
                    "type": "fixed-scorer",
                    "parameters": {"scores": {"pod-0": 0.5, "pod-1": 0.5, "pod-2": 0.4999}},
                }
            ]
        ),
        seed=1,
    )
    eps = endpoints(3)
    names = {s.schedule(req(i), eps).targets[0].name for i in range(300)}
    assert names == {"pod-0", "pod-1"}


def test_round_robin_tie_break_takes_turns() -> None:
    """tieBreak round-robin gives each tied endpoint exactly its share."""
    s = sched(
        config(
            [
                {"type": "fixed-scorer", "parameters": {"scores": {}}},
                {"type": "max-score-picker", "parameters": {"tieBreak": "round-robin"}},
            ]
        )
    )
    eps = endpoints(3)
    wins = Counter(
        s.schedule(req(i), eps[::-1] if i % 2 else eps).targets[0].name for i in range(300)
    )
    assert wins == {"pod-0": 100, "pod-1": 100, "pod-2": 100}


def test_same_seed_same_decisions() -> None:
    """With a seed, random choices repeat exactly; plugin order does not shift another plugin's stream."""
    data = config([{"type": "random-picker"}])
    eps = endpoints(8)
    s1, s2 = sched(data, seed=3), sched(data, seed=3)
    a = [s1.schedule(req(i), eps).targets[0].name for i in range(50)]
    b = [s2.schedule(req(i), eps).targets[0].name for i in range(50)]
    assert a == b
    c = [sched(data, seed=4).schedule(req(i), eps).targets[0].name for i in range(50)]
    assert a != c


def test_max_num_of_endpoints_returns_best_first() -> None:
    """maxNumOfEndpoints returns that many targets in descending total."""
    s = sched(
        config(
            [
                {
                    "type": "fixed-scorer",
                    "parameters": {
                        "scores": {"pod-0": 0.1, "pod-1": 0.9, "pod-2": 0.5, "pod-3": 0.7}
                    },
                },
                {"type": "max-score-picker", "parameters": {"maxNumOfEndpoints": 3}},
            ]
        )
    )
    eps = endpoints(4)
    assert [e.name for e in s.schedule(req(), eps).targets] == ["pod-1", "pod-3", "pod-2"]


def test_weighted_random_picker_is_proportional() -> None:
    """weighted-random-picker picks with probability proportional to the total; zero never wins."""
    s = sched(
        config(
            [
                {
                    "type": "fixed-scorer",
                    "parameters": {"scores": {"pod-0": 0.6, "pod-1": 0.3, "pod-2": 0.1}},
                },
                {"type": "weighted-random-picker"},
            ]
        ),
        seed=11,
    )
    eps = endpoints(4)
    n = 6000
    wins = Counter(s.schedule(req(i), eps).targets[0].name for i in range(n))
    assert wins["pod-3"] == 0
    for name, p in (("pod-0", 0.6), ("pod-1", 0.3), ("pod-2", 0.1)):
        sd = math.sqrt(n * p * (1 - p))
        assert abs(wins[name] - n * p) < 4 * sd, wins


def test_weighted_random_all_zero_is_uniform() -> None:
    """With every total at 0 the weighted picker still picks (uniformly), never fails closed."""
    s = sched(
        config(
            [
                {"type": "fixed-scorer", "parameters": {"scores": {}}},
                {"type": "weighted-random-picker"},
            ]
        ),
        seed=2,
    )
    eps = endpoints(3)
    wins = Counter(s.schedule(req(i), eps).targets[0].name for i in range(900))
    assert set(wins) == {"pod-0", "pod-1", "pod-2"}
    assert min(wins.values()) > 200


def test_random_picker_ignores_scores() -> None:
    """random-picker picks every endpoint, whatever the scores."""
    s = sched(
        config(
            [
                {"type": "fixed-scorer", "parameters": {"scores": {"pod-0": 1.0}}},
                {"type": "random-picker"},
            ]
        ),
        seed=5,
    )
    eps = endpoints(3)
    wins = Counter(s.schedule(req(i), eps).targets[0].name for i in range(900))
    assert min(wins.values()) > 200


def test_aschedule_matches_schedule() -> None:
    """aschedule gives the same decision as schedule on the event loop."""
    s = sched(config([{"type": "fixed-scorer", "parameters": {"scores": {"pod-2": 1.0}}}]))
    eps = endpoints(3)
    r = asyncio.run(s.aschedule(req(), eps))
    assert r.targets == [eps[2]]


def test_default_pool_from_set_endpoints() -> None:
    """schedule() without endpoints uses the pool given to set_endpoints."""
    s = sched(config([{"type": "random-picker"}]), seed=0)
    eps = endpoints(2)
    s.set_endpoints(eps)
    assert s.schedule(req()).targets[0] in eps
    assert s.endpoints == eps


def test_decisions_and_latency_are_metered() -> None:
    """Each decision counts against its endpoint and observes the latency histogram."""
    s = sched(config([{"type": "fixed-scorer", "parameters": {"scores": {"pod-1": 1.0}}}]))
    eps = endpoints(2)
    for i in range(3):
        s.schedule(req(i), eps)
    reg = s.metrics_registry
    assert reg.get_sample_value("kvaware_decisions_total", {"endpoint": eps[1].id}) == 3
    assert reg.get_sample_value("kvaware_schedule_latency_seconds_count") == 3


def test_clock_is_injected_into_the_context() -> None:
    """Plugins see the scheduler's injected clock as ctx.now."""
    seen: list[float] = []

    class Probe:
        def __init__(self, params: Any, ctx: PluginContext) -> None:
            pass

        def score(
            self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
        ) -> Mapping[str, float]:
            seen.append(ctx.now)
            return {}

    class P:
        @hookimpl
        def kvaware_register_plugins(self, registry: PluginRegistry) -> None:
            registry.register("probe", Probe)

    clock = FakeClock(42.0)
    s = Scheduler.from_config(
        config([{"type": "probe"}]),
        plugin_manager=make_plugin_manager(use_env=False, plugins=[P()]),
        clock=clock,
    )
    s.schedule(req(), endpoints(1))
    clock.advance(1.5)
    s.schedule(req(), endpoints(1))
    assert seen == [42.0, 43.5]


def test_aschedule_prepares_off_the_event_loop() -> None:
    """aschedule runs request preparation (tokenization) in a worker thread, then schedules."""
    import threading

    seen: list[str] = []

    class Tokenizing:
        def __init__(self, params: Any, ctx: PluginContext) -> None:
            pass

        def prepare(self, request: SchedulingRequest) -> None:
            request.tokens(lambda: seen.append(threading.current_thread().name) or [7, 8, 9])

        def score(
            self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
        ) -> Mapping[str, float]:
            toks = request.tokens(lambda: [0])
            return {endpoints[len(toks) % len(endpoints)].id: 1.0}

    class P:
        @hookimpl
        def kvaware_register_plugins(self, registry: PluginRegistry) -> None:
            registry.register("tokenizing", Tokenizing)

    s = Scheduler.from_config(
        config([{"type": "tokenizing"}]),
        plugin_manager=make_plugin_manager(use_env=False, plugins=[P()]),
    )
    eps = endpoints(2)

    async def go() -> tuple[SchedulingResult, str]:
        r = await s.aschedule(SchedulingRequest("r", "m", prompt="text"), eps)
        return r, threading.current_thread().name

    r, loop_thread = asyncio.run(go())
    assert r.targets == [eps[1]]  # 3 tokens from prepare(), not the fallback
    assert len(seen) == 1 and seen[0] != loop_thread and seen[0].startswith("kvaware-prepare")
    s.close()


@pytest.mark.parametrize("blocking", [True, False])
def test_aschedule_runs_blocking_io_scorers_off_the_event_loop(blocking: bool) -> None:
    """A plugin declaring blocking_io (a remote index) is scored and hooked in a worker thread;
    others stay on the event loop."""
    import threading

    seen: list[str] = []

    class Remote:
        def __init__(self, params: Any, ctx: PluginContext) -> None:
            self.blocking_io = blocking

        def score(
            self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
        ) -> Mapping[str, float]:
            seen.append(threading.current_thread().name)
            return {endpoints[0].id: 1.0}

        def pre_request(
            self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
        ) -> None:
            seen.append(threading.current_thread().name)

    class P:
        @hookimpl
        def kvaware_register_plugins(self, registry: PluginRegistry) -> None:
            registry.register("remote", Remote)

    s = Scheduler.from_config(
        config([{"type": "remote"}]),
        plugin_manager=make_plugin_manager(use_env=False, plugins=[P()]),
    )
    eps = endpoints(2)

    async def go() -> tuple[SchedulingResult, SchedulingResult, str]:
        r = await s.aschedule(SchedulingRequest("r", "m", token_ids=[1]), eps)
        d = await s.aschedule(SchedulingRequest("d", "m", token_ids=[1]), eps, dry_run=True)
        return r, d, threading.current_thread().name

    r, d, loop_thread = asyncio.run(go())
    assert r.targets == [eps[0]] and d.dry_run
    assert len(seen) == 3  # score, pre_request, and the dry run's score only
    assert all((name != loop_thread) is blocking for name in seen)
    s.close()
