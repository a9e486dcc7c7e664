"""SchedulerRouter: the bench drives the real Scheduler with the project's config YAMLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvaware_scorer.sim.bench import run_config
from kvaware_scorer.sim.fleet import FleetConfig
from kvaware_scorer.sim.routing import SchedulerRouter
from kvaware_scorer.sim.workloads import LoadStage, SharedPrefixWorkload

from .helpers import small_profile

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["random", "load", "estimated", "precise", "kvaware"]


def _workload() -> SharedPrefixWorkload:
    return SharedPrefixWorkload(
        num_groups=24,
        num_prompts_per_group=3,
        system_prompt_len=1500,
        question_len=200,
        output_len=30,
        load=[LoadStage(10, 4), LoadStage(20, 6)],
        vocab_size=32000,
        seed=5,
    )


def _fleet() -> FleetConfig:
    return FleetConfig(small_profile(16), num_pods=4, num_gpu_blocks=800)


@pytest.mark.parametrize("name", CONFIGS)
def test_each_config_routes_the_whole_workload(name: str) -> None:
    """Every config YAML schedules every request onto a fleet pod and sees each completion."""
    summary, result = run_config(str(ROOT / "config" / f"{name}.yaml"), _workload, _fleet())
    assert summary["config"] == name
    assert summary["completed"] == summary["requests"] > 0
    assert set(summary["per_pod_requests"]) == set(result.pods)
    assert result.sink_errors == 0


def test_precise_ingests_events_and_beats_random_on_hits() -> None:
    """The precise config receives the pods' KV events and hits far more prefix than random."""
    precise, _ = run_config(str(ROOT / "config" / "precise.yaml"), _workload, _fleet())
    random_, _ = run_config(str(ROOT / "config" / "random.yaml"), _workload, _fleet())
    assert precise["prefix_hit_rate"] > random_["prefix_hit_rate"]
    assert precise["prefix_hit_rate"] >= 0.8 * precise["ideal_hit_rate"]


def test_first_tokens_reach_the_predicted_ttft_scorer() -> None:
    """kvaware.yaml learns from the emulator's first-token reports: every prefill leaves the
    queue at its first token, every request is released, and TTFTs were observed."""
    from kvaware_scorer.sim.fleet import FleetSimulator

    sim = FleetSimulator(_fleet())
    router = SchedulerRouter(
        ROOT / "config" / "kvaware.yaml", clock=sim.clock, seed=0, model=_fleet().model_name
    )
    result = sim.run(_workload(), router)
    scorer = router.scheduler.plugin("predicted-ttft-scorer")
    assert len(result.records) > 0
    assert len(scorer.ledger) == 0
    assert all(scorer.ledger.load(p).requests == 0 for p in result.pods)
    assert 0.5 * len(result.records) <= scorer.model.observations() <= len(result.records)


def test_adapter_exposes_the_scheduler_event_sinks() -> None:
    """The precise config's sinks are the scheduler's (its Indexer), fed in process."""
    router = SchedulerRouter(
        ROOT / "config" / "precise.yaml", clock=lambda: 1000.0, seed=0, model="m"
    )
    try:
        assert list(router.event_sinks) == list(router.scheduler.event_sinks)
        assert router.event_sinks
    finally:
        router.close()


def test_scheduler_replicas_share_traffic_and_all_ingest_events() -> None:
    """With two replicas, arrivals alternate between them and each one's index sees every event."""
    summary, result = run_config(
        str(ROOT / "config" / "precise.yaml"), _workload, _fleet(), replicas=2
    )
    assert summary["config"] == "precise x2"
    assert summary["completed"] == summary["requests"] > 0
    assert result.sink_errors == 0


def test_replicas_indexes_agree() -> None:
    """Every replica's precise indexer holds the same entries after the same events."""
    holder: dict[str, SchedulerRouter] = {}

    def factory(sim: object) -> SchedulerRouter:
        router = SchedulerRouter(
            ROOT / "config" / "precise.yaml",
            clock=sim.clock,  # type: ignore[attr-defined]
            seed=0,
            model="m",
            replicas=3,
        )
        holder["r"] = router
        return router

    run_config("precise", _workload, _fleet(), router_factory=factory)
    router = holder["r"]
    stats = [s.event_sinks[0].indexer.stats() for s in router.schedulers]
    assert stats[0].entries > 0
    assert {st.entries for st in stats} == {stats[0].entries}
    assert {st.blocks for st in stats} == {stats[0].blocks}
