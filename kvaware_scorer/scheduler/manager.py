"""The plugin manager factory and the typed facade over ``pm.hook``.

`make_plugin_manager` is the one loading path: it adds the hook specs, blocks the plugins named
in ``KVAWARE_BLOCK_PLUGINS`` (comma-separated) and in its `block` argument, loads every
entry point of the ``kvaware_scorer.plugins`` group (the built-ins are one of them, named
``builtins``), registers any extra plugin objects, and checks that every hook implementation
matches a spec. Nothing happens at import time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import pluggy

import kvaware_scorer.scheduler.hookspecs as hookspecs
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler.hookspecs import PROJECT, hookimpl

if TYPE_CHECKING:
    from kvaware_scorer.scheduler.config import SchedulerConfig
    from kvaware_scorer.scheduler.registry import PluginRegistry
    from kvaware_scorer.scheduler.types import Endpoint
    from kvaware_scorer.scheduler.types import SchedulerView as Scheduler

__all__ = [
    "BLOCK_ENV",
    "ENTRY_POINT_GROUP",
    "Hooks",
    "PoolListener",
    "blocked_from_env",
    "make_plugin_manager",
]

logger = logging.getLogger(__name__)

#: Entry-point group plugin distributions publish under.
ENTRY_POINT_GROUP = "kvaware_scorer.plugins"
#: Environment variable naming plugins (entry-point names) not to load, comma-separated.
BLOCK_ENV = "KVAWARE_BLOCK_PLUGINS"


class PoolListener:
    """Hook implementation calling ``on_change(added, removed)`` when `scheduler`'s pool changes
    (register it on the scheduler's plugin manager; changes of other schedulers are ignored).
    """

    def __init__(
        self, scheduler: Scheduler, on_change: Callable[[list[Endpoint], list[Endpoint]], None]
    ) -> None:
        self.scheduler = scheduler
        self.on_change = on_change

    @hookimpl
    def kvaware_endpoints_changed(
        self, scheduler: Scheduler, added: Sequence[Endpoint], removed: Sequence[Endpoint]
    ) -> None:
        if scheduler is self.scheduler:
            self.on_change(list(added), list(removed))


def blocked_from_env(environ: os._Environ[str] | dict[str, str] | None = None) -> list[str]:
    """Plugin names listed in ``KVAWARE_BLOCK_PLUGINS`` (comma- or space-separated)."""
    env = os.environ if environ is None else environ
    raw = env.get(BLOCK_ENV, "")
    return [n for n in raw.replace(",", " ").split() if n]


def make_plugin_manager(
    *,
    block: Iterable[str] = (),
    entry_points: bool = True,
    plugins: Sequence[object] = (),
    use_env: bool = True,
) -> pluggy.PluginManager:
    """A new plugin manager with the ``kvaware_`` hooks and the installed plugins.

    Args:
        block: Plugin names (entry-point names, e.g. ``builtins``) not to load.
        entry_points: Load the ``kvaware_scorer.plugins`` entry points (False: only
            `plugins`; useful in tests).
        plugins: Extra plugin objects (modules or instances with ``@hookimpl`` functions).
        use_env: Also honour ``KVAWARE_BLOCK_PLUGINS``.

    Returns:
        The manager; wrap it in `Hooks` for typed calls.

    Raises:
        ConfigError: A plugin failed to load or implements a hook that does not exist.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    names = list(block) + (blocked_from_env() if use_env else [])
    for name in names:
        pm.set_blocked(name)
    if entry_points:
        try:
            n = pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:
            raise ConfigError(
                f"loading a {ENTRY_POINT_GROUP!r} entry point failed: {exc!r}"
            ) from exc
        logger.debug("loaded %d plugin(s) from entry points; blocked: %s", n, names)
    for plugin in plugins:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc
    return pm


class Hooks:
    """Typed calls of every ``kvaware_`` hook (so mypy checks each call site).

    Args:
        pm: A manager from `make_plugin_manager`.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm

    def plugin_names(self) -> list[str]:
        """Names of the loaded plugins (entry-point names for installed ones), not blocked ones."""
        # NOTE: pluggy lists blocked names too, with a None plugin.
        return sorted(
            name
            for name, plugin in self.pm.list_name_plugin()
            if name is not None and plugin is not None
        )

    def register_plugins(self, registry: PluginRegistry) -> None:
        """Call `kvaware_register_plugins`."""
        self.pm.hook.kvaware_register_plugins(registry=registry)

    def config_resolved(self, config: SchedulerConfig) -> None:
        """Call `kvaware_config_resolved`."""
        self.pm.hook.kvaware_config_resolved(config=config)

    def scheduler_created(self, scheduler: Scheduler) -> None:
        """Call `kvaware_scheduler_created`."""
        self.pm.hook.kvaware_scheduler_created(scheduler=scheduler)

    def scheduler_started(self, scheduler: Scheduler) -> None:
        """Call `kvaware_scheduler_started`."""
        self.pm.hook.kvaware_scheduler_started(scheduler=scheduler)

    def scheduler_stopped(self, scheduler: Scheduler) -> None:
        """Call `kvaware_scheduler_stopped`."""
        self.pm.hook.kvaware_scheduler_stopped(scheduler=scheduler)

    def endpoints_changed(
        self, scheduler: Scheduler, added: Sequence[Endpoint], removed: Sequence[Endpoint]
    ) -> None:
        """Call `kvaware_endpoints_changed`."""
        self.pm.hook.kvaware_endpoints_changed(scheduler=scheduler, added=added, removed=removed)
