"""Pickers: ``max-score-picker`` (fair ties), ``random-picker``, ``weighted-random-picker``.

Every picker takes ``maxNumOfEndpoints`` (default 1; values <= 0 mean 1) and draws its
randomness from the plugin's seeded generator, so a run is reproducible for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    SchedulingContext,
    SchedulingRequest,
    ScoredEndpoint,
)

__all__ = [
    "MaxScorePicker",
    "MaxScorePickerParams",
    "PickerParams",
    "RandomPicker",
    "WeightedRandomPicker",
    "register",
]

#: Totals closer than this (relative) are a tie: floating-point sums of equal scores taken in
#: a different order may differ in the last bits.
TIE_TOLERANCE = 1e-9


class PickerParams(ConfigModel):
    """Parameters shared by every picker.

    Attributes:
        max_num_of_endpoints: How many endpoints to return, best first (<= 0 means 1).
    """

    max_num_of_endpoints: int = 1

    @field_validator("max_num_of_endpoints")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        return max(1, value)


class MaxScorePickerParams(PickerParams):
    """Parameters of ``max-score-picker``.

    Attributes:
        tie_break: ``random`` (uniform among the tied endpoints, as upstream's shuffle) or
            ``round-robin`` (tied endpoints take turns, in id order; spreads bursts that see
            the same stale scores evenly).
    """

    tie_break: Literal["random", "round-robin"] = "random"


class MaxScorePicker:
    """``max-score-picker``: the highest total wins; ties are broken fairly (no endpoint is
    favoured by its position in the candidate list)."""

    def __init__(self, params: MaxScorePickerParams, ctx: PluginContext) -> None:
        self.k = params.max_num_of_endpoints
        self.round_robin = params.tie_break == "round-robin"
        self.rng = ctx.rng
        self._turn = 0

    def pick(
        self, ctx: SchedulingContext, request: SchedulingRequest, scored: Sequence[ScoredEndpoint]
    ) -> list[Endpoint]:
        if not scored:
            return []
        if self.k == 1:
            best = max(s.score for s in scored)
            floor = best - TIE_TOLERANCE * max(1.0, abs(best))
            top = [s.endpoint for s in scored if s.score >= floor]
            if len(top) == 1:
                return top
            if self.round_robin:
                top.sort(key=lambda e: e.id)
                self._turn += 1
                return [top[self._turn % len(top)]]
            return [top[self.rng.randrange(len(top))]]
        items = list(scored)
        self.rng.shuffle(items)
        # NOTE: stable sort after a shuffle = random order within equal (rounded) totals.
        items.sort(key=lambda s: -round(s.score, 9))
        return [s.endpoint for s in items[: self.k]]


class RandomPicker:
    """``random-picker``: uniformly random endpoint(s), ignoring scores."""

    def __init__(self, params: PickerParams, ctx: PluginContext) -> None:
        self.k = params.max_num_of_endpoints
        self.rng = ctx.rng

    def pick(
        self, ctx: SchedulingContext, request: SchedulingRequest, scored: Sequence[ScoredEndpoint]
    ) -> list[Endpoint]:
        k = min(self.k, len(scored))
        return [s.endpoint for s in self.rng.sample(list(scored), k)]


class WeightedRandomPicker(RandomPicker):
    """``weighted-random-picker``: picks with probability proportional to the total (A-Res:
    key ``u ** (1 / total)``, top-k keys); totals <= 0 are never picked while positive ones
    remain; all zero -> uniformly random."""

    def pick(
        self, ctx: SchedulingContext, request: SchedulingRequest, scored: Sequence[ScoredEndpoint]
    ) -> list[Endpoint]:
        if not any(s.score > 0 for s in scored):
            return super().pick(ctx, request, scored)
        rng = self.rng
        keyed: list[tuple[float, float, Endpoint]] = []
        for s in scored:
            if s.score > 0 and math.isfinite(s.score):
                u = 1.0 - rng.random()  # in (0, 1]
                key = u ** (1.0 / s.score)
            else:
                key = 0.0
            keyed.append((key, rng.random(), s.endpoint))
        keyed.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return [e for _, _, e in keyed[: self.k]]


def register(registry: PluginRegistry) -> None:
    """Register the pickers."""
    registry.register(
        "max-score-picker",
        MaxScorePicker,
        params=MaxScorePickerParams,
        description="highest total, fair tie-breaking",
    )
    registry.register(
        "random-picker", RandomPicker, params=PickerParams, description="uniformly random"
    )
    registry.register(
        "weighted-random-picker",
        WeightedRandomPicker,
        params=PickerParams,
        description="random, proportional to the total (A-Res)",
    )
