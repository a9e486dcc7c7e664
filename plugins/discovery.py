"""``file-discovery``: upstream's file-based endpoint discovery, for deployments without
Kubernetes. The plugin names an endpoints file; once the scheduler is built it becomes the
scheduler's pool (`Scheduler.use_endpoints_file`: loaded now, so a bad file fails the start;
reloaded on change with ``watchFile: true``; pod metrics scraped)::

    plugins:
      - type: file-discovery
        parameters:
          path: /etc/epp/endpoints.yaml
          watchFile: true
    dataLayer:
      discovery:
        pluginRef: file-discovery

The file is upstream's (``endpoints: [{name, namespace?, address, port, labels?}]``, ports as
strings or numbers) or kvaware's endpoints file, which adds optional fields. An endpoints file
given to the front door (``--endpoints``) takes precedence over the plugin.
"""

from __future__ import annotations

from pydantic import Field

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler import PluginContext, PluginRegistry, Scheduler

__all__ = ["FileDiscovery", "FileDiscoveryParams", "attach", "register"]

#: Seconds between checks of a watched file.
WATCH_INTERVAL = 1.0
#: NOTE: without watchFile the file is read once; the watcher still runs (it also drives the
#: metrics scraper's pool) but checks only once a day.
UNWATCHED_INTERVAL = 86400.0


class FileDiscoveryParams(ConfigModel):
    """Parameters of ``file-discovery``.

    Attributes:
        path: The endpoints file.
        watch_file: Reload the file when it changes.
    """

    path: str = Field(min_length=1)
    watch_file: bool = False


class FileDiscovery:
    """Names the endpoints file that becomes the scheduler's pool (see `attach`)."""

    def __init__(self, params: FileDiscoveryParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.path = params.path
        self.watch_file = params.watch_file


def attach(scheduler: Scheduler) -> None:
    """Make the first ``file-discovery`` plugin's file the scheduler's pool.

    Raises:
        ConfigError: The file is missing or invalid (the path names the entry).
    """
    for obj in scheduler.plugins.values():
        if isinstance(obj, FileDiscovery):
            scheduler.use_endpoints_file(
                obj.path, poll_interval=WATCH_INTERVAL if obj.watch_file else UNWATCHED_INTERVAL
            )
            return


def register(registry: PluginRegistry) -> None:
    """Register ``file-discovery``."""
    registry.register(
        "file-discovery",
        FileDiscovery,
        params=FileDiscoveryParams,
        kinds=(),
        description="endpoints from a file (upstream's file discovery; watchFile reloads it)",
    )
