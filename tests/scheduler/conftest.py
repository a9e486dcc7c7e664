"""Shared helpers for scheduler tests: a fresh plugin manager per test and endpoint factories."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pluggy
import pytest

from kvaware_scorer.scheduler import (
    Endpoint,
    EndpointMetrics,
    PluginRegistry,
    Scheduler,
    make_plugin_manager,
)


class FakeClock:
    """A settable monotonic clock (the emulator's virtual clock stand-in)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def pm() -> Iterator[pluggy.PluginManager]:
    """A fresh plugin manager with the installed plugins (built-ins included)."""
    yield make_plugin_manager(use_env=False)


@pytest.fixture
def registry(pm: pluggy.PluginManager) -> PluginRegistry:
    """A registry filled by the installed plugins."""
    reg = PluginRegistry()
    pm.hook.kvaware_register_plugins(registry=reg)
    return reg


@pytest.fixture
def clock() -> FakeClock:
    """A virtual clock."""
    return FakeClock()


def endpoints(n: int, **labels: str) -> list[Endpoint]:
    """`n` endpoints 10.0.0.i:8000 with fresh-by-default metrics (update_time 0)."""
    return [Endpoint(f"pod-{i}", f"10.0.0.{i}", 8000, dict(labels)) for i in range(n)]


def with_metrics(ep: Endpoint, t: float = 0.0, **fields: Any) -> Endpoint:
    """Set `ep`'s metrics (update_time `t`)."""
    ep.metrics = EndpointMetrics(update_time=t, **fields)
    return ep


def config(
    plugins: list[dict[str, Any]], profiles: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An EndpointPickerConfig mapping."""
    data: dict[str, Any] = {
        "apiVersion": "llm-d.ai/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": plugins,
    }
    if profiles is not None:
        data["schedulingProfiles"] = profiles
    return data


def build(
    data: dict[str, Any] | str, pm: pluggy.PluginManager | None = None, **kw: Any
) -> Scheduler:
    """A scheduler from `data` with a fresh manager."""
    return Scheduler.from_config(
        data, plugin_manager=pm or make_plugin_manager(use_env=False), **kw
    )
