"""Usage limit policies (``flowControl.usageLimitPolicyPluginRef``): upstream's ceilings per
priority band, and the flow controller holding bands back by them (highest band first, stopping
at the first gated one)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import SchedulingRequest

from .conftest import FakeClock, build, config, endpoints


def policy(type_name: str, params: dict[str, Any] | None = None) -> Any:
    entry: dict[str, Any] = {"type": type_name}
    if params is not None:
        entry["parameters"] = params
    s = build(config([entry, {"type": "queue-scorer"}]), seed=0)
    return s.plugin(type_name)


def req(rid: str, priority: int = 0) -> SchedulingRequest:
    return SchedulingRequest(rid, "m", token_ids=list(range(32)), priority=priority)


# -- the policies ----------------------------------------------------------------------------------


def test_static_policy_gives_every_band_its_threshold() -> None:
    assert policy("static-usage-limit-policy").compute_limit(0.3, [9, 5, 0]) == [1.0] * 3
    p = policy("static-usage-limit-policy", {"threshold": 0.7})
    assert p.compute_limit(0.9, [9, 5, 0]) == [0.7, 0.7, 0.7]


@pytest.mark.parametrize(
    ("params", "priorities", "ceilings"),
    [
        ({"minCeiling": 0.4}, [9, 5, 0], [1.0, 0.7, 0.4]),  # rank: equal steps
        ({"minCeiling": 0.4, "maxCeiling": 0.9}, [9, 5, 0], [0.9, 0.65, 0.4]),
        ({"minCeiling": 0.4, "domain": "value"}, [10, 5, 0], [1.0, 0.7, 0.4]),
        ({"minCeiling": 0.2, "domain": "value"}, [10, 8, 0], [1.0, 0.84, 0.2]),  # by value
        ({"minCeiling": 0.2, "domain": "value"}, [3, 3], [1.0, 1.0]),  # one value: all max
        ({"minCeiling": 0.2, "maxCeiling": 0.8}, [7], [0.8]),  # one band: max
        ({"minCeiling": 0.2}, [], []),
    ],
)
def test_priority_holdback_ceilings(
    params: dict[str, Any], priorities: list[int], ceilings: list[float]
) -> None:
    """Linear from maxCeiling (highest band) to minCeiling (lowest), by rank or by value."""
    got = policy("priority-holdback-policy", params).compute_limit(0.5, priorities)
    assert got == pytest.approx(ceilings)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "minCeiling"),  # required
        ({"minCeiling": 1.0}, "minCeiling"),
        ({"minCeiling": -0.1}, "minCeiling"),
        ({"minCeiling": 0.2, "maxCeiling": 0.0}, "maxCeiling"),
        ({"minCeiling": 0.2, "maxCeiling": 1.5}, "maxCeiling"),
        ({"minCeiling": 0.6, "maxCeiling": 0.5}, "below maxCeiling"),
        ({"minCeiling": 0.2, "shape": "cubic"}, "shape"),
        ({"minCeiling": 0.2, "domain": "log"}, "domain"),
        ({"minCeiling": 0.2, "floor": 1}, "floor"),
    ],
)
def test_priority_holdback_rejects_what_upstream_rejects(
    params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        policy("priority-holdback-policy", params)


def test_soft_reflective_ceiling_graduates_and_alternates() -> None:
    p = policy("soft-reflective-ceiling-policy")
    # light load: every band open; one band: always open
    assert p.compute_limit(0.2, [9, 5, 0]) == [1.0, 1.0, 1.0]
    assert p.compute_limit(0.9, [3]) == [1.0]
    # 0.4 with 3 bands: band 1's ceiling 0.8 is open, band 2's 0.6 too; not yet alternating
    assert p.compute_limit(0.4, [9, 5, 0]) == [1.0, 1.0, 1.0]
    # 0.75 with 3 bands: band 1 reflects at 0.625, band 2 at 0.25: both gated, period 3:
    # open on one call in three, every gated band together, band 0 always open
    calls = [p.compute_limit(0.75, [9, 5, 0]) for _ in range(9)]
    assert all(c[0] == 1.0 for c in calls)
    opened = [c[1] == 1.0 for c in calls]
    assert sum(opened) == 3 and all(c[1] == c[2] for c in calls)
    # saturated: every band but the first held
    assert p.compute_limit(1.2, [9, 5, 0]) == [1.0, 0.0, 0.0]


def test_soft_reflective_ceiling_takes_no_parameters() -> None:
    with pytest.raises(ConfigError):
        policy("soft-reflective-ceiling-policy", {"period": 2})


# -- in the flow controller ------------------------------------------------------------------------


class Gate:
    def __init__(self, value: float) -> None:
        self.value = value

    def saturated(self, ctx: Any, endpoints: Any) -> float:
        return self.value


def controller(usage_limit: Any, value: float, bands: Any = None) -> tuple[Any, Gate]:
    from kvaware_scorer.scheduler.flowcontrol import FlowController

    s = build(config([{"type": "queue-scorer"}]), seed=0)
    eps = endpoints(2)
    gate = Gate(value)
    return FlowController(gate, lambda: eps, s.context, usage_limit=usage_limit, bands=bands), gate


async def test_held_low_band_waits_while_high_band_goes() -> None:
    """At saturation 0.6 with ceilings [1.0, 0.5]: the high band goes at once, the low band
    waits in the queue, and is served once the saturation falls below its ceiling."""
    p = policy("priority-holdback-policy", {"minCeiling": 0.5})
    fc, gate = controller(p, 0.6, bands={10: (None, None, None), 0: (None, None, None)})
    await asyncio.wait_for(fc.wait_turn(req("hi", priority=10)), 1)
    low = asyncio.create_task(fc.wait_turn(req("lo", priority=0)))
    await asyncio.sleep(0.05)
    assert not low.done() and fc.waiting() == 1
    gate.value = 0.4
    await asyncio.wait_for(low, 2)
    assert fc.waiting() == 0


async def test_gated_higher_band_stops_lower_bands() -> None:
    """The bands are looked at from the highest down and the cycle stops at the first gated
    one: a lower band never overtakes a held higher one, even with a higher ceiling."""

    class Inverted:
        def compute_limit(self, saturation: float, priorities: Any) -> list[float]:
            return [0.3, 1.0][: len(priorities)]

    fc, gate = controller(Inverted(), 0.5, bands={10: (None, None, None), 0: (None, None, None)})
    low = asyncio.create_task(fc.wait_turn(req("lo", priority=0)))
    await asyncio.sleep(0.05)
    assert not low.done()
    gate.value = 0.2
    await asyncio.wait_for(low, 2)


async def test_without_a_policy_only_saturation_gates() -> None:
    fc, _ = controller(None, 0.99)
    await asyncio.wait_for(fc.wait_turn(req("a", priority=-5)), 1)


async def test_broken_policy_gates_nothing() -> None:
    """A policy that raises or returns junk is read as no gating (logged), never a crash."""

    class Broken:
        def compute_limit(self, saturation: float, priorities: Any) -> list[float]:
            raise RuntimeError("boom")

    class Junk:
        def compute_limit(self, saturation: float, priorities: Any) -> list[float]:
            return [float("nan")]

    for p in (Broken(), Junk()):
        fc, _ = controller(p, 0.5, bands={10: (None, None, None), 0: (None, None, None)})
        await asyncio.wait_for(fc.wait_turn(req("x", priority=0)), 1)


def test_usage_limit_from_yaml_and_wrong_role() -> None:
    data = config(
        [
            {"type": "queue-scorer"},
            {"type": "priority-holdback-policy", "name": "hold", "parameters": {"minCeiling": 0.3}},
        ]
    )
    data["flowControl"] = {"usageLimitPolicyPluginRef": "hold"}
    s = build(data, seed=0, clock=FakeClock())
    assert s.flow is not None and s.flow.usage_limit is s.plugin("hold")
    assert not [w for w in s.config.warnings if "'hold'" in w]
    data["flowControl"] = {"usageLimitPolicyPluginRef": "queue-scorer"}
    with pytest.raises(ConfigError, match="usageLimitPolicyPluginRef"):
        build(data, seed=0, clock=FakeClock())
