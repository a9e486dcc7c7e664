"""Usage limit policies of upstream llm-d flow control (``flowControl.usageLimitPolicyPluginRef``,
role ``usage-limit-policy``): per priority band, the pool saturation at and above which the band
is not served, so lower bands are held back first as the pool fills.

The flow controller (`kvaware_scorer.scheduler.flowcontrol`) asks for the ceilings with the
active bands highest first and stops at the first band the saturation reaches, as upstream's
dispatch cycle does:

* ``static-usage-limit-policy``: one ``threshold`` for every band (default 1.0: no gating, the
  controller's behaviour without a policy).
* ``priority-holdback-policy``: ceilings spread linearly from ``maxCeiling`` (highest band) to
  ``minCeiling`` (lowest), by rank (``domain: rank``) or by priority value (``domain: value``).
* ``soft-reflective-ceiling-policy`` (no parameters): band ``i`` of ``N`` is open while the
  saturation is below ``1 - i * saturation / (N - 1)``; past it, every gated band opens on one
  call in ``round(saturation / (1 - saturation))`` (one shared tick), so a held band's dispatch
  rate falls continuously as the pool saturates; at saturation 1.0 every band is held.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler import PluginContext, PluginRegistry

__all__ = [
    "PriorityHoldbackParams",
    "PriorityHoldbackPolicy",
    "SoftReflectiveCeilingPolicy",
    "SoftReflectiveParams",
    "StaticUsageLimitParams",
    "StaticUsageLimitPolicy",
    "register",
]


class StaticUsageLimitParams(ConfigModel):
    """Parameters of ``static-usage-limit-policy`` (upstream's).

    Attributes:
        threshold: The ceiling of every band (1.0: never gates below saturation).
    """

    threshold: float = 1.0


class StaticUsageLimitPolicy:
    """``static-usage-limit-policy``: the same ceiling for every band."""

    def __init__(self, params: StaticUsageLimitParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.threshold = params.threshold

    def compute_limit(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        return [self.threshold] * len(priorities)


class PriorityHoldbackParams(ConfigModel):
    """Parameters of ``priority-holdback-policy`` (upstream's).

    Attributes:
        shape: Interpolation between the ceilings (only ``linear``).
        domain: ``rank``: equal steps by band order; ``value``: proportional to the priority
            values between the lowest and the highest active one.
        min_ceiling: Ceiling of the lowest band, in [0, 1) (required: how hard low-priority
            traffic is held back has no safe default).
        max_ceiling: Ceiling of the highest band, in (0, 1], above ``minCeiling``.
    """

    shape: Literal["linear"] = "linear"
    domain: Literal["rank", "value"] = "rank"
    min_ceiling: float = Field(ge=0.0, lt=1.0)
    max_ceiling: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> PriorityHoldbackParams:
        if self.min_ceiling >= self.max_ceiling:
            raise ValueError(
                f"minCeiling ({self.min_ceiling:g}) must be below maxCeiling ({self.max_ceiling:g})"
            )
        return self


class PriorityHoldbackPolicy:
    """``priority-holdback-policy``: stepped ceilings, lower bands held back first."""

    def __init__(self, params: PriorityHoldbackParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.low = params.min_ceiling
        self.high = params.max_ceiling
        self.by_value = params.domain == "value"

    def compute_limit(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        n = len(priorities)
        if n <= 1:
            return [self.high] * n
        spread = self.high - self.low
        if not self.by_value:
            return [self.high - i * spread / (n - 1) for i in range(n)]
        top, bottom = priorities[0], priorities[-1]
        if top == bottom:
            return [self.high] * n
        return [self.low + (p - bottom) / (top - bottom) * spread for p in priorities]


class SoftReflectiveParams(ConfigModel):
    """``soft-reflective-ceiling-policy`` takes no parameters; unlike most parameterless types
    it rejects any it is given, as upstream's factory does."""


class SoftReflectiveCeilingPolicy:
    """``soft-reflective-ceiling-policy``: graduated ceilings that tighten with saturation and
    alternate open and closed past them (see the module docstring).

    State: one call counter (bounded: an integer), shared by every gated band so that on any
    call either all of them open or none does (the controller stops at the first gated band).
    """

    def __init__(self, params: SoftReflectiveParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self._ticks = itertools.count(1)
        self._lock = threading.Lock()

    def compute_limit(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        n = len(priorities)
        if n <= 1:
            return [1.0] * n
        alternating = 1.0 - saturation <= saturation < 1.0
        opened = False
        if alternating:
            period = max(1, round(saturation / (1.0 - saturation + 1e-9)))
            with self._lock:
                opened = next(self._ticks) % period == 0
        out = [1.0]
        for i in range(1, n):
            reflective = 1.0 - i * saturation / (n - 1)
            if saturation < reflective:
                out.append(1.0)
            elif saturation >= 1.0:
                out.append(0.0)
            else:
                out.append(1.0 if opened else 0.0)
        return out


def register(registry: PluginRegistry) -> None:
    """Register the usage limit policies."""
    registry.register(
        "static-usage-limit-policy",
        StaticUsageLimitPolicy,
        params=StaticUsageLimitParams,
        kinds=("usage-limit-policy",),
        description="one saturation ceiling for every priority band",
    )
    registry.register(
        "priority-holdback-policy",
        PriorityHoldbackPolicy,
        params=PriorityHoldbackParams,
        kinds=("usage-limit-policy",),
        description="saturation ceilings stepping down from the highest band to the lowest",
    )
    registry.register(
        "soft-reflective-ceiling-policy",
        SoftReflectiveCeilingPolicy,
        params=SoftReflectiveParams,
        kinds=("usage-limit-policy",),
        description="ceilings that tighten with saturation, held bands alternating open",
    )
