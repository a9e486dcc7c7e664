"""Built-in plugins, installed as ``kvaware_scorer.plugins`` and found through the
``kvaware_scorer.plugins`` entry-point group (name ``builtins``) like any third-party plugin.

Each module registers its own types (``register(registry)``); the modules are imported when
the hook runs, never at import time. Block them all with ``KVAWARE_BLOCK_PLUGINS=builtins``.
"""

from __future__ import annotations

import importlib

from kvaware_scorer.scheduler import PluginRegistry, Scheduler, SchedulerConfig, hookimpl
from kvaware_scorer.scheduler.matchinfo import check_references

__all__ = [
    "BUILTIN_MODULES",
    "kvaware_config_resolved",
    "kvaware_register_plugins",
    "kvaware_scheduler_created",
]

#: Modules of this package that register plugin types.
BUILTIN_MODULES = (
    "precise",
    "approximate",
    "nohitlru",
    "load",
    "pickers",
    "profile",
    "filters",
    "compat",
    "disagg",
    "affinity",
    "latency",
    "flowcontrol",
    "parsers",
    "burst",
    "predicted_ttft",
    "prefix_affinity",
    "discovery",
    "dataparallel",
    "headerprofile",
    "session_filter",
    "fairness_program",
    "usagelimit",
    "topology",
    "mmcache",
    "attributes",
    "dcgm",
)


@hookimpl(trylast=True)
def kvaware_register_plugins(registry: PluginRegistry) -> None:
    """Register every built-in type and the upstream aliases of renamed ones."""
    for name in BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(registry)


@hookimpl(trylast=True)
def kvaware_config_resolved(config: SchedulerConfig) -> None:
    """Check cross-plugin references of the built-ins (prefixMatchInfoProducerName)."""
    check_references(config)


@hookimpl(trylast=True)
def kvaware_scheduler_created(scheduler: Scheduler) -> None:
    """Give a ``file-discovery`` plugin's endpoints file to the scheduler as its pool."""
    importlib.import_module(f"{__name__}.discovery").attach(scheduler)
