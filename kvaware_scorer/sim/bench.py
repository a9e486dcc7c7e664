"""The routing benchmark: every config through the same emulated fleet and workload.

Each config gets a fresh fleet, a fresh workload built from the same seed (so every config sees
the very same requests at the very same times) and its own router; nothing else differs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from kvaware_scorer.sim.fleet import FleetConfig, FleetSimulator, RunResult
from kvaware_scorer.sim.report import summarize
from kvaware_scorer.sim.routing import Router, make_router
from kvaware_scorer.sim.workloads import Workload

__all__ = ["run_bench", "run_config"]

logger = logging.getLogger(__name__)


def run_config(
    spec: str,
    workload_factory: Callable[[], Workload],
    fleet: FleetConfig,
    *,
    seed: int = 0,
    progress: bool = False,
    router_factory: Callable[[FleetSimulator], Router] | None = None,
    replicas: int = 1,
) -> tuple[dict[str, Any], RunResult]:
    """Run one config; returns its summary and the raw result.

    Args:
        spec: ``builtin:<name>`` or a scheduler YAML path.
        workload_factory: Builds the workload (called once per config).
        fleet: The fleet.
        seed: Seed for the router's randomness.
        progress: Show a progress bar on stderr.
        router_factory: Build the router from the simulator instead of from `spec`.
        replicas: Scheduler replicas sharing the traffic (scheduler YAMLs only).
    """
    sim = FleetSimulator(fleet)
    router = (
        router_factory(sim)
        if router_factory is not None
        else make_router(
            spec, clock=sim.clock, seed=seed, model=fleet.model_name, replicas=replicas
        )
    )
    try:
        result = sim.run(workload_factory(), router, progress=progress, progress_desc=router.name)
    finally:
        router.close()
    return summarize(result), result


def run_bench(
    specs: Sequence[str],
    workload_factory: Callable[[], Workload],
    fleet: FleetConfig,
    *,
    seed: int = 0,
    progress: bool = False,
    replicas: int = 1,
) -> list[dict[str, Any]]:
    """Run every config of `specs` in turn; returns their summaries in order."""
    out: list[dict[str, Any]] = []
    for spec in specs:
        summary, _result = run_config(
            spec, workload_factory, fleet, seed=seed, progress=progress, replicas=replicas
        )
        logger.info("%s done in %.1f s", summary["config"], summary["wall_time_s"])
        out.append(summary)
    return out
