"""``program-aware-fairness``: upstream's least-attained-service fairness between programs
(ported in spirit from upstream's plugin, strategy and program-metrics tables): parameters and
their checks, decayed token service, head-wait weighting, idle eviction, the table's cap, and a
heavy program yielding to a light one through flow control."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Mapping, Sequence
from typing import Any, cast

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import (
    PluginRegistry,
    ResponseInfo,
    SchedulingRequest,
    SchedulingResult,
    load_config,
)
from kvaware_scorer.scheduler.flowcontrol import QueuedRequest

from .conftest import FakeClock, build, config, endpoints

FAIRNESS = "x-llm-d-inference-fairness-id"
_seq = itertools.count()


def policy(params: dict[str, Any] | None = None, clock: FakeClock | None = None) -> Any:
    entry: dict[str, Any] = {"type": "program-aware-fairness"}
    if params is not None:
        entry["parameters"] = params
    s = build(config([entry, {"type": "queue-scorer"}]), seed=0, clock=clock or FakeClock())
    return s.plugin("program-aware-fairness")


def req(rid: str, program: str | None = None, **kw: Any) -> SchedulingRequest:
    headers = {FAIRNESS: program} if program else {}
    return SchedulingRequest(rid, "m", token_ids=list(range(8)), headers=headers, **kw)


def queued(program: str, arrived: float) -> QueuedRequest:
    # NOTE: the turn future is flow control's business; pick_flow never touches it.
    return QueuedRequest(
        req(f"{program}-{arrived}", program), program, 0, arrived, next(_seq), cast(Any, None)
    )


class Fcfs:
    def order_key(self, item: QueuedRequest) -> Any:
        return (item.arrived, item.seq)


def pick(p: Any, heads: Mapping[str, float]) -> str:
    """The program `p` serves among `heads` (program -> head arrival)."""
    flows: dict[str, Sequence[QueuedRequest]] = {f: [queued(f, t)] for f, t in heads.items()}
    chosen: str = p.pick_flow(flows, Fcfs())
    return chosen


def serve(p: Any, program: str, prompt: int, completion: int) -> SchedulingRequest:
    """One request of `program` dispatched and completed with these token counts."""
    r = req(f"{program}-{next(_seq)}", program)
    result = cast(SchedulingResult, None)
    p.pre_request(None, r, result)
    p.post_response(
        r, result, ResponseInfo(200, prompt_tokens=prompt, completion_tokens=completion)
    )
    return r


# -- parameters ------------------------------------------------------------------------------------


def test_defaults_are_upstreams() -> None:
    """strategy las, weights 0.8 / 0.2, half-life 60 s, TTL 3600 s, sweep every 300 s."""
    p = policy()
    assert (p.strategy, p.weight_service, p.weight_head_wait) == ("las", 0.8, 0.2)
    assert (p.half_life, p.ttl, p.sweep_interval) == (60.0, 3600.0, 300.0)


def test_accepted_edge_values() -> None:
    """An empty strategy is las; zero weights, half-life and TTL are allowed (as upstream)."""
    params = {
        "strategy": "",
        "lasWeightService": 0,
        "lasWeightHeadWait": 0,
        "lasHalfLifeSeconds": 0,
        "evictionTtlSeconds": 0,
        "evictionSweepSeconds": 0.5,
    }
    p = policy(params)
    assert (p.strategy, p.half_life, p.ttl, p.sweep_interval) == ("las", 0.0, 0.0, 0.5)


@pytest.mark.parametrize(
    ("params", "key", "message"),
    [
        (
            {"strategy": "wfq"},
            "strategy",
            'unknown scoring strategy "wfq": only "las" is supported',
        ),
        ({"evictionTtlSeconds": -1}, "evictionTtlSeconds", "must be >= 0, got -1"),
        ({"evictionSweepSeconds": 0}, "evictionSweepSeconds", "must be > 0, got 0"),
        ({"lasWeightService": -0.1}, "lasWeightService", "must be >= 0, got -0.1"),
        ({"lasWeightHeadWait": -1}, "lasWeightHeadWait", "must be >= 0, got -1"),
        ({"lasHalfLifeSeconds": -1}, "lasHalfLifeSeconds", "must be >= 0, got -1"),
        ({"lasHalfLifeSeconds": "soon"}, "lasHalfLifeSeconds", "valid number"),
        ({"lasDecayFactor": 0.99997}, "lasDecayFactor", "unknown key"),  # removed upstream
    ],
)
def test_invalid_parameters_name_their_path(
    registry: PluginRegistry, params: dict[str, Any], key: str, message: str
) -> None:
    """Upstream's refusals, each reported at its YAML path."""
    data = config(
        [{"type": "queue-scorer"}, {"type": "program-aware-fairness", "parameters": params}]
    )
    with pytest.raises(ConfigError) as info:
        load_config(data, registry)
    assert info.value.path == f"plugins[1].parameters.{key}"
    assert message in info.value.message


# -- attained service --------------------------------------------------------------------------------


def test_least_attained_service_is_served_first() -> None:
    """Service is prompt + 2 x completion tokens; the program with less of it goes first even
    when the other's request waited longer."""
    clock = FakeClock()
    p = policy(clock=clock)
    serve(p, "heavy", 1000, 500)
    serve(p, "light", 100, 50)
    assert p.service("heavy") == 2000 and p.service("light") == 200
    assert pick(p, {"heavy": clock.now - 5, "light": clock.now}) == "light"
    assert pick(p, {"light": clock.now, "heavy": clock.now - 5}) == "light"


def test_service_decays_with_the_half_life() -> None:
    """Service halves every lasHalfLifeSeconds, also while nobody looks; decay is folded in
    before a completion adds its cost; a half-life of 0 keeps service for good."""
    clock = FakeClock()
    p = policy({"lasHalfLifeSeconds": 10}, clock)
    serve(p, "a", 100, 0)
    clock.advance(10)
    assert p.service("a") == pytest.approx(50)
    clock.advance(10)
    serve(p, "a", 10, 0)
    assert p.service("a") == pytest.approx(35)  # 50 -> 25, then + 10

    flat = policy({"lasHalfLifeSeconds": 0}, clock)
    serve(flat, "a", 100, 0)
    clock.advance(3600)
    assert flat.service("a") == 100


def test_idle_heavy_program_decays_below_a_fresh_light_one() -> None:
    """A program that served 1000 tokens and then idled 10 half-lives (never looked at) ranks
    before one that just served 10."""
    clock = FakeClock()
    p = policy({"lasWeightService": 1, "lasWeightHeadWait": 0, "lasHalfLifeSeconds": 1}, clock)
    serve(p, "heavy", 1000, 0)
    clock.advance(10)
    serve(p, "light", 10, 0)
    assert pick(p, {"light": clock.now, "heavy": clock.now}) == "heavy"
    assert p.service("heavy") == pytest.approx(1000 / 1024)


# -- head wait ---------------------------------------------------------------------------------------


def test_head_wait_breaks_a_cold_start_tie() -> None:
    """With equal service the program whose first request waited longer goes first."""
    clock = FakeClock()
    p = policy(clock=clock)
    assert pick(p, {"a": clock.now - 0.05, "b": clock.now - 0.5}) == "b"
    assert pick(p, {"a": clock.now - 0.5, "b": clock.now - 0.05}) == "a"


def test_head_wait_weight_can_outrank_service() -> None:
    """The score is lasWeightService x (1 - service) + lasWeightHeadWait x wait, both
    normalized over the candidates: a heavy program whose request waited longest wins once
    the wait weighs more, and a middling program can beat both extremes."""
    clock = FakeClock()
    heads = {"heavy": clock.now - 10, "light": clock.now}
    by_service = policy(clock=clock)
    by_wait = policy({"lasWeightService": 0.3, "lasWeightHeadWait": 0.7}, clock)
    for p in (by_service, by_wait):
        serve(p, "heavy", 1000, 0)
        serve(p, "light", 10, 0)
    assert pick(by_service, heads) == "light"
    assert pick(by_wait, heads) == "heavy"

    mixed = policy({"lasWeightService": 0.5, "lasWeightHeadWait": 0.5}, clock)
    serve(mixed, "b", 100, 0)
    serve(mixed, "c", 40, 0)
    # a: 0.5 x 1 + 0.5 x 0 = 0.5, b: 0 + 0.5 x 1 = 0.5, c: 0.5 x 0.6 + 0.5 x 0.8 = 0.7
    assert pick(mixed, {"a": clock.now, "b": clock.now - 10, "c": clock.now - 8}) == "c"


def test_queue_wait_is_recorded_at_dispatch() -> None:
    """The pick remembers the request's enqueue time; its dispatch records the wait, and Jain's
    index over the programs' mean waits falls when they differ."""
    clock = FakeClock()
    p = policy(clock=clock)
    assert p.fairness_index() == 1.0
    for program, waited in (("a", 1.0), ("b", 1.0)):
        item = queued(program, clock.now - waited)
        assert p.pick_flow({program: [item]}, Fcfs()) == program
        p.pre_request(None, item.request, cast(SchedulingResult, None))
    assert p.fairness_index() == pytest.approx(1.0)
    item = queued("c", clock.now - 10)
    p.pick_flow({"c": [item]}, Fcfs())
    p.pre_request(None, item.request, cast(SchedulingResult, None))
    assert p.fairness_index() == pytest.approx(144 / (3 * 102))
    assert p.snapshot() == {  # aggregates only: program ids come from clients
        "totalPrograms": 3,
        "totalInFlight": 3,
        "fairnessIndex": pytest.approx(144 / (3 * 102)),
    }


def test_program_is_the_flow_control_fairness_id() -> None:
    """Header, else the agent-identity attribute, else default-flow (as flow control)."""
    p = policy()
    serve(p, "tenant", 1, 0)
    r = req("x")
    r.state["attribute:agent-identity"] = "agent-7"
    p.pre_request(None, r, cast(SchedulingResult, None))
    p.pre_request(None, req("y"), cast(SchedulingResult, None))
    assert sorted(p.programs()) == ["agent-7", "default-flow", "tenant"]


# -- bounded state -----------------------------------------------------------------------------------


def test_idle_programs_are_evicted_after_the_ttl() -> None:
    """The sweep (every evictionSweepSeconds) forgets programs with nothing in flight and no
    completion for evictionTtlSeconds, also one that queued but never completed; a program
    with a request in flight stays. Forgotten service starts again from 0."""
    clock = FakeClock()
    p = policy({"evictionTtlSeconds": 10, "evictionSweepSeconds": 5}, clock)
    serve(p, "done", 500, 0)
    p.pre_request(None, req("busy", "busy"), cast(SchedulingResult, None))
    pick(p, {"queued": clock.now})
    clock.advance(4)
    serve(p, "recent", 1, 0)
    clock.advance(7)  # 11 s since the first three were seen, 7 s since "recent"
    assert "done" in p.programs()  # not swept until something calls in
    pick(p, {"recent": clock.now})
    assert sorted(p.programs()) == ["busy", "recent"]
    assert p.service("done") == 0


def test_sweep_runs_at_its_interval_and_ttl_zero_keeps_all() -> None:
    """Nothing is forgotten before the sweep is due; a TTL of 0 turns eviction off."""
    clock = FakeClock()
    p = policy({"evictionTtlSeconds": 1, "evictionSweepSeconds": 100}, clock)
    keep = policy({"evictionTtlSeconds": 0, "evictionSweepSeconds": 1}, clock)
    for q in (p, keep):
        serve(q, "a", 1, 0)
    clock.advance(50)
    serve(p, "b", 1, 0)
    assert p.programs() == ["a", "b"]
    clock.advance(51)
    serve(p, "c", 1, 0)
    serve(keep, "c", 1, 0)
    assert p.programs() == ["c"]
    assert keep.programs() == ["a", "c"]


def test_program_table_is_capped() -> None:
    """A fresh fairness id per request never grows the table past MAX_PROGRAMS; the least
    recently seen idle program goes first, one with a request in flight only when all have."""
    from kvaware_scorer.plugins.fairness_program import MAX_PROGRAMS

    p = policy({"evictionTtlSeconds": 0})
    for i in range(MAX_PROGRAMS + 50):
        serve(p, f"id-{i}", 1, 1)
    programs = p.programs()
    assert len(programs) == MAX_PROGRAMS
    assert programs[0] == "id-50" and programs[-1] == f"id-{MAX_PROGRAMS + 49}"

    small = policy()
    small.max_programs = 3
    busy = req("busy", "busy")
    small.pre_request(None, busy, cast(SchedulingResult, None))
    serve(small, "b", 1, 0)
    serve(small, "c", 1, 0)
    serve(small, "d", 1, 0)
    assert small.programs() == ["busy", "c", "d"]
    for name in ("c", "d"):
        small.pre_request(None, req(name, name), cast(SchedulingResult, None))
    small.pre_request(None, req("e", "e"), cast(SchedulingResult, None))
    assert small.programs() == ["c", "d", "e"]


def test_hooks_and_picks_from_several_threads() -> None:
    """Dispatch on one thread, hooks on others: the table stays consistent and capped."""
    clock = FakeClock()
    p = policy(clock=clock)
    p.max_programs = 64
    errors: list[BaseException] = []

    def hooks(worker: int) -> None:
        try:
            for i in range(500):
                serve(p, f"w{worker}-{i % 100}", 10, 5)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hooks, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for _ in range(500):
        pick(p, {"x": clock.now, "y": clock.now - 1})
    for t in threads:
        t.join()
    assert not errors
    assert len(p.programs()) <= 64
    assert p.snapshot()["totalInFlight"] == 0


# -- end to end --------------------------------------------------------------------------------------


class Turns:
    """A saturation detector that lets through the turns the test grants, one per look that
    finds the pool open (flow control hands out one turn per such look)."""

    def __init__(self) -> None:
        self.free = 0

    def saturated(self, ctx: Any, endpoints: Any) -> float:
        if self.free > 0:
            self.free -= 1
            return 0.0
        return 1.0


@pytest.mark.parametrize(
    ("fairness", "expected"),
    [
        ("program-aware-fairness", ["light", "heavy"]),
        ("global-strict-fairness-policy", ["heavy", "light"]),
    ],
)
async def test_heavy_program_yields_to_a_light_one(fairness: str, expected: list[str]) -> None:
    """Through the scheduler's flow control (upstream's sample shape: the policy named by
    defaultPriorityBand): a program whose completed requests consumed many tokens waits behind
    a light one that arrived later; FCFS across flows would serve it first."""
    data = config([{"type": fairness}, {"type": "queue-scorer"}])
    data["featureGates"] = ["flowControl"]
    data["flowControl"] = {"defaultPriorityBand": {"fairnessPolicyRef": fairness}}
    s = build(data, seed=0)
    s.set_endpoints(endpoints(1))
    assert s.flow is not None
    turns = Turns()
    s.flow.detector = turns
    for program, prompt, completion in (("heavy", 4000, 1000), ("light", 20, 5)):
        turns.free = 1
        r = req(f"{program}-0", program)
        s.post_response(r, await s.aschedule(r), ResponseInfo(200, prompt, None, completion))
    if fairness == "program-aware-fairness":
        policy_ = s.plugin(fairness)
        assert (policy_.service("heavy"), policy_.service("light")) == pytest.approx(
            (6000, 30), rel=1e-3
        )
    served: list[str] = []

    async def one(program: str) -> None:
        await s.aschedule(req(f"{program}-1", program))
        served.append(program)

    heavy = asyncio.create_task(one("heavy"))
    await asyncio.sleep(0.02)
    light = asyncio.create_task(one("light"))
    await asyncio.sleep(0.05)
    assert served == [] and s.flow.waiting() == 2
    turns.free = 1
    await asyncio.sleep(0.1)
    assert served == expected[:1] and s.flow.waiting() == 1
    turns.free = 1
    await asyncio.wait_for(asyncio.gather(heavy, light), 2)
    assert served == expected
