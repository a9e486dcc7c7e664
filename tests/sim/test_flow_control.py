"""Flow control in the emulator: a config's ``flowControl`` holds arrivals in virtual time."""

from __future__ import annotations

from pathlib import Path

from kvaware_scorer.sim.fleet import FleetConfig, FleetSimulator
from kvaware_scorer.sim.routing import SchedulerRouter
from kvaware_scorer.sim.workloads import LoadStage, MultiTurnWorkload

from .helpers import small_profile

ROOT = Path(__file__).resolve().parents[2]


def _workload() -> MultiTurnWorkload:
    return MultiTurnWorkload(
        load=[LoadStage(6, 4)],
        num_system_prompts=2,
        system_prompt_len=600,
        turns=3,
        user_message_len=200,
        answer_len=60,
        think_time_s=0.5,
        vocab_size=32000,
        seed=3,
    )


def _fleet() -> FleetConfig:
    # NOTE: a KV cache of a few sessions per pod: the fleet saturates and flow control holds.
    return FleetConfig(small_profile(16), num_pods=2, num_gpu_blocks=240)


def _run(config: Path, text: str | None = None) -> tuple[SchedulerRouter, list[int]]:
    if text is not None:
        config.write_text(text)
    sim = FleetSimulator(_fleet())
    router = SchedulerRouter(config, clock=sim.clock, seed=0, model=_fleet().model_name)
    result = sim.run(_workload(), router)
    return router, [r.status for r in result.records]


def test_saturated_fleet_holds_arrivals_and_serves_them_all() -> None:
    """kvaware.yaml holds arrivals while every pod is full, routes each later, and every
    request completes with the scorer's ledger empty at the end."""
    router, statuses = _run(ROOT / "config" / "kvaware.yaml")
    assert router.holds > 0 and router.held() == 0
    assert statuses and all(s == 200 for s in statuses)
    scorer = router.scheduler.plugin("predicted-ttft-scorer")
    assert len(scorer.ledger) == 0


def test_config_without_flow_control_never_holds() -> None:
    """precise.yaml has no ``flowControl``: every arrival is routed when it arrives."""
    router, statuses = _run(ROOT / "config" / "precise.yaml")
    assert router.scheduler.flow is None and router.holds == 0
    assert all(s == 200 for s in statuses)


def test_requests_held_beyond_the_ttl_are_shed_with_429(tmp_path: Path) -> None:
    """A held request older than ``defaultRequestTTL`` is shed with 429, as live; its session
    ends there."""
    text = (
        (ROOT / "config" / "kvaware.yaml")
        .read_text()
        .replace("flowControl:\n", "flowControl:\n  defaultRequestTTL: 1ms\n")
    )
    router, statuses = _run(tmp_path / "ttl.yaml", text)
    assert router.holds > 0 and router.held() == 0
    assert 429 in statuses and set(statuses) <= {200, 429}
