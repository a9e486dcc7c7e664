"""Profile handlers: ``single-profile-handler`` (one profile, which is the primary)."""

from __future__ import annotations

from collections.abc import Mapping

from kvaware_scorer.scheduler import (
    PluginContext,
    PluginRegistry,
    ProfileResult,
    ProfileView,
    SchedulingContext,
    SchedulingRequest,
)

__all__ = [
    "SingleProfileHandler",
    "register",
]


class SingleProfileHandler:
    """``single-profile-handler``: runs the one configured profile; its result is primary."""

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.name = ctx.name

    def pick_profiles(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        profiles: Mapping[str, ProfileView],
        results: Mapping[str, ProfileResult],
    ) -> list[str]:
        if results:
            return []
        return list(profiles)[:1]

    def process_results(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        results: Mapping[str, ProfileResult],
    ) -> str:
        return next(iter(results))


def register(registry: PluginRegistry) -> None:
    """Register ``single-profile-handler``."""
    registry.register(
        "single-profile-handler",
        SingleProfileHandler,
        kinds=("profile-handler",),
        description="runs the one profile",
    )
