"""Moved to `kvaware_scorer.tours.demo`; this name is kept so existing imports still work."""

from __future__ import annotations

from kvaware_scorer.tours.demo import (
    DemoRequest,
    DemoSettings,
    PodProcess,
    build_workload,
    default_num_gpu_blocks,
    register,
    run,
    run_demo,
    scheduler_config,
)

__all__ = [
    "DemoRequest",
    "DemoSettings",
    "PodProcess",
    "build_workload",
    "default_num_gpu_blocks",
    "register",
    "run",
    "run_demo",
    "scheduler_config",
]
