"""The pluggy hook specifications of the ``kvaware_scorer`` project, grouped by lifecycle phase.

Hooks are for wiring, never for per-request work: a plugin distribution registers factories for
its YAML plugin types in `kvaware_register_plugins`, and the scheduler then calls the plugin
objects directly through the role Protocols of `kvaware_scorer.scheduler.types`.

A plugin is any module or object with functions marked ``@hookimpl`` (see
`kvaware_scorer.scheduler.hookimpl`), published under the entry-point group
``kvaware_scorer.plugins``. Hooks only ever gain arguments; pluggy lets an implementation
accept any subset of a hook's arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kvaware_scorer.scheduler.registry import PluginRegistry
    from kvaware_scorer.scheduler.resolved import SchedulerConfig
    from kvaware_scorer.scheduler.types import Endpoint, SchedulerView

__all__ = ["PROJECT", "hookimpl", "hookspec"]

#: The pluggy project name (markers and the plugin manager share it).
PROJECT = "kvaware_scorer"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- registration: once per scheduler (and per `kvaware validate`) -------------------------------


@hookspec
def kvaware_register_plugins(registry: PluginRegistry) -> None:
    """Register plugin factories keyed by their YAML ``type``.

    Fires once per plugin manager use, before any configuration is read (also for
    ``kvaware validate``). Call ``registry.register(type, factory, params=Model)`` for each type
    the distribution provides, and ``registry.register_alias(old, new)`` for renamed types.
    Built-ins implement this hook with ``trylast=True``, so installed plugins register first.
    The result is ignored.

    Args:
        registry: The registry the configuration is resolved against.
    """


# -- configuration -------------------------------------------------------------------------------


@hookspec
def kvaware_config_resolved(config: SchedulerConfig) -> None:
    """Inspect a resolved configuration before any plugin object is built.

    Fires once per `Scheduler` construction, after the EndpointPickerConfig YAML has been
    validated and defaults applied (names, weights, injected handler and picker). Raise
    `kvaware_scorer.errors.ConfigError` to reject the configuration; the result is ignored.

    Args:
        config: The resolved configuration (plugins with validated parameters, profiles).
    """


# -- scheduler lifecycle ---------------------------------------------------------------------------


@hookspec
def kvaware_scheduler_created(scheduler: SchedulerView) -> None:
    """A `Scheduler` has been built and its plugin objects exist.

    Fires once per scheduler, at the end of its construction, before any request. Use it to
    attach extra collectors to ``scheduler.metrics_registry`` or to reach plugin objects with
    ``scheduler.plugin(name)``. The result is ignored.

    Args:
        scheduler: The new scheduler.
    """


@hookspec
def kvaware_scheduler_started(scheduler: SchedulerView) -> None:
    """`Scheduler.start` has started the plugins' background work.

    Fires once per successful ``start()`` (not again while running). The result is ignored.

    Args:
        scheduler: The scheduler that started.
    """


@hookspec
def kvaware_scheduler_stopped(scheduler: SchedulerView) -> None:
    """`Scheduler.stop` has stopped the plugins' background work.

    Fires once per ``stop()`` of a running scheduler, after the plugins stopped. The result is
    ignored.

    Args:
        scheduler: The scheduler that stopped.
    """


# -- endpoint pool -----------------------------------------------------------------------------------


@hookspec
def kvaware_endpoints_changed(
    scheduler: SchedulerView, added: Sequence[Endpoint], removed: Sequence[Endpoint]
) -> None:
    """The endpoint pool changed (`Scheduler.set_endpoints`, e.g. an endpoints-file reload).

    Fires after the scheduler's own plugins were told (removed pods are already purged from
    every index by then), only when something was added or removed. The result is ignored.

    Args:
        scheduler: The scheduler whose pool changed.
        added: Endpoints that joined the pool.
        removed: Endpoints that left it.
    """
