"""vLLM fleet emulator: discrete-event mode (`FleetSimulator`) and live HTTP + ZMQ pods (`LiveFleet`).

Public API::

    from kvaware_scorer.sim import FleetConfig, FleetSimulator, SharedPrefixWorkload, get_profile
    sim = FleetSimulator(FleetConfig(get_profile("qwen3-32b-2xh100"), num_pods=8))
    result = sim.run(SharedPrefixWorkload(), make_router("builtin:random", clock=sim.clock,
                                                         seed=0, model=sim.config.model_name))
    print(format_run(summarize(result)))
"""

from __future__ import annotations

from kvaware_scorer.sim.bench import run_bench, run_config
from kvaware_scorer.sim.blocks import BlockPool
from kvaware_scorer.sim.engine import Engine, EngineRequest, StepOutput
from kvaware_scorer.sim.fleet import FleetConfig, FleetSimulator, RequestRecord, RunResult
from kvaware_scorer.sim.live import LiveFleet, LivePod, LivePodsConfig
from kvaware_scorer.sim.profiles import PROFILES, EngineProfile, get_profile
from kvaware_scorer.sim.report import format_run, format_summary, plot_runs, summarize
from kvaware_scorer.sim.request import RequestOutcome, SimRequest
from kvaware_scorer.sim.routing import (
    KVEventSink,
    PrefixOracleRouter,
    RandomRouter,
    RoundRobinRouter,
    Router,
    SchedulerRouter,
    SimEndpoint,
    make_router,
)
from kvaware_scorer.sim.workloads import (
    LoadStage,
    MultiTurnWorkload,
    SharedPrefixWorkload,
    TraceWorkload,
    Workload,
)

__all__ = [
    "PROFILES",
    "BlockPool",
    "Engine",
    "EngineProfile",
    "EngineRequest",
    "FleetConfig",
    "FleetSimulator",
    "KVEventSink",
    "LiveFleet",
    "LivePod",
    "LivePodsConfig",
    "LoadStage",
    "MultiTurnWorkload",
    "PrefixOracleRouter",
    "RandomRouter",
    "RequestOutcome",
    "RequestRecord",
    "RoundRobinRouter",
    "Router",
    "RunResult",
    "SchedulerRouter",
    "SharedPrefixWorkload",
    "SimEndpoint",
    "SimRequest",
    "StepOutput",
    "TraceWorkload",
    "Workload",
    "format_run",
    "format_summary",
    "get_profile",
    "make_router",
    "plot_runs",
    "run_bench",
    "run_config",
    "summarize",
]
