"""Data-parallel routing through a pod's primary port (upstream llm-d's ``dataparallel`` plugin).

``data-parallel-profile-handler`` runs the one configured profile. Its pick is one data-parallel
rank of a vLLM pod (an endpoint ``podIP:rankPort``); the request is then sent to the pod's
``primaryPort`` and ``x-data-parallel-host-port: podIP:rankPort`` tells the pod's sidecar which
rank to hand it to. Upstream deprecated the handler: Istio >= 1.28.1 routes to a rank's own port,
so ``single-profile-handler`` does the same job there; a warning says so.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import Field, StrictInt, field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.errors import NoEndpointError
from kvaware_scorer.scheduler import (
    DATA_PARALLEL_HEADER,
    Endpoint,
    PluginContext,
    PluginRegistry,
    ProfileResult,
    ProfileView,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
)
from kvaware_scorer.scheduler.profiles import single_result

__all__ = [
    "DATA_PARALLEL_HEADER",
    "DEFAULT_PRIMARY_PORT",
    "DataParallelProfileHandler",
    "DataParallelProfileHandlerParams",
    "register",
]

logger = logging.getLogger(__name__)

#: The port a data-parallel pod's sidecar listens on when ``primaryPort`` is not given.
DEFAULT_PRIMARY_PORT = 8000


def _host_port(e: Endpoint) -> str:
    return f"[{e.address}]:{e.port}" if ":" in e.address else f"{e.address}:{e.port}"


class DataParallelProfileHandlerParams(ConfigModel):
    """Parameters of ``data-parallel-profile-handler``.

    Attributes:
        primary_port: The port requests are sent to on the picked pod (its sidecar's), 1-65535.
            0 is accepted as upstream accepts it; upstream then sends to port 0, here the
            request keeps the rank's own port (only the header is set).
    """

    # NOTE: strict, as upstream's JSON decoding refuses "8000" and true for an int.
    primary_port: StrictInt = Field(DEFAULT_PRIMARY_PORT)

    @field_validator("primary_port")
    @classmethod
    def _port_range(cls, value: int) -> int:
        if value != 0 and not 1 <= value <= 65535:
            raise ValueError(f"invalid primaryPort: must be between 1 and 65535, got {value}")
        return value


class DataParallelProfileHandler:
    """``data-parallel-profile-handler`` (see the module docstring).

    Exactly one scheduling profile must be configured; with more (or none) no profile runs
    and scheduling fails with `NoEndpointError`, as upstream's handler picks none then.

    The rank pick stays the endpoint of every plugin's accounting: upstream keys in-flight and
    prefix state on the pod's identity, which its port rewrite keeps, while here an endpoint's
    id is its ``address:port``. So the rewrite is done by this handler's pre-request hook, not
    when the primary profile is chosen: hooks that run before it (YAML order) record the rank;
    a warning names any plugin with a pre-request hook listed after it. An explained decision
    (a dry run, which runs no pre-request hook) shows the rank and no header.

    Args:
        params: The validated parameters.
        ctx: The plugin context (its scheduler gives the YAML order of the plugins).
    """

    def __init__(self, params: DataParallelProfileHandlerParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.primary_port = params.primary_port
        self._warn_about_later_hooks(ctx)

    def _warn_about_later_hooks(self, ctx: PluginContext) -> None:
        if ctx.scheduler is None or not self.primary_port:
            return
        config = ctx.scheduler.config
        names = list(config.plugins)
        if self.name not in names:
            return
        later = [
            n
            for n in names[names.index(self.name) + 1 :]
            if "pre-request" in config.plugins[n].kinds
        ]
        if later:
            msg = (
                f"{self.name}: plugins with pre-request hooks listed after it ({', '.join(later)}) "
                f"see the pick at primaryPort {self.primary_port}, not the rank; list them first"
            )
            logger.warning("%s", msg)
            if msg not in config.warnings:
                config.warnings.append(msg)

    def pick_profiles(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        profiles: Mapping[str, ProfileView],
        results: Mapping[str, ProfileResult],
    ) -> list[str]:
        """The one configured profile on the first call; nothing once it ran.

        Raises:
            NoEndpointError: Not exactly one profile is configured.
        """
        if len(profiles) == len(results):
            return []
        if len(profiles) != 1:
            raise NoEndpointError(
                f"{self.name}: data-parallel-profile-handler requires exactly one scheduling "
                f"profile, {len(profiles)} configured"
            )
        return list(profiles)

    def process_results(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        results: Mapping[str, ProfileResult],
    ) -> str:
        """The single profile that ran is primary (`NoEndpointError` when more ran)."""
        return single_result(self.name, results)

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """Name the rank pick in ``x-data-parallel-host-port`` and send every target to
        ``primaryPort`` (the primary profile's result is rewritten the same way)."""
        if not result.targets:
            return
        result.headers[DATA_PARALLEL_HEADER] = _host_port(result.targets[0])
        if not self.primary_port:
            return
        targets = [self._at_primary(e) for e in result.targets]
        result.targets = targets
        primary = result.profile_results.get(result.profile)
        if primary is not None:
            result.profile_results[result.profile] = dataclasses.replace(
                primary, targets=list(targets)
            )

    def _at_primary(self, e: Endpoint) -> Endpoint:
        """`e` at ``primaryPort`` (a copy; the pool's endpoint is never changed)."""
        if e.port == self.primary_port:
            return e
        return dataclasses.replace(e, port=self.primary_port)


def _deprecated(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    return params, [
        "data-parallel-profile-handler is deprecated upstream; use single-profile-handler "
        "with Istio >= 1.28.1"
    ]


def register(registry: PluginRegistry) -> None:
    """Register ``data-parallel-profile-handler``."""
    registry.register(
        "data-parallel-profile-handler",
        DataParallelProfileHandler,
        params=DataParallelProfileHandlerParams,
        kinds=("profile-handler", "pre-request"),
        description="one profile; the rank pick is sent to primaryPort with its ip:port in a "
        "header (deprecated upstream)",
        transform=_deprecated,
    )
