"""``no-hit-lru-scorer``: spreads requests that hit no cache over the least recently used pods.

A request is *cold* when no candidate holds any of its prefix blocks (by the match info of a
prefix plugin; without one every request is cold). Cold requests create new KV blocks wherever
they go, so they are spread: pods that never served a cold request come first, then the others
from the least recently used. Warm requests score 0.5 everywhere (neutral: cache affinity
decides). Only cold picks update the LRU.

With N candidates, of which the first U (in candidate order) never served a cold request:
never-used pod i scores ``1 - i / (N - 1)``; a used pod of rank r among the candidates in LRU
order (oldest first) scores ``1 - (U + r) / (N - 1)``; a single candidate scores 1.0. Upstream
ranks used pods over its whole LRU, which also counts pods the filters removed and can push
every candidate to 0; ranks among the candidates keep the spread.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.errors import ConfigError, KVAwareError
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
)
from kvaware_scorer.scheduler.matchinfo import MatchInfoProducer, default_source, producer
from kvaware_scorer.scheduler.registry import MATCH_INFO_CONSUMER

__all__ = ["NEUTRAL", "NoHitLRUParams", "NoHitLRUScorer", "register"]

logger = logging.getLogger(__name__)

#: Score of every candidate for a request that hits some cache.
NEUTRAL = 0.5
#: Upstream's profile whose pick is also recorded (disaggregated prefill).
_PREFILL_PROFILE = "prefill"


class NoHitLRUParams(ConfigModel):
    """Parameters of ``no-hit-lru-scorer``.

    Attributes:
        lru_size: Pods remembered in the LRU (<= 0 means the default, 1024).
        prefix_match_info_producer_name: The plugin whose match info says whether a request
            hits (a prefix-cache scorer or producer); empty = the one prefix plugin configured.
        prefill_profile: The profile whose pick is also recorded (disaggregated prefill; older
            upstream releases had this parameter, newer ones fix it to ``prefill``).
    """

    lru_size: int = 1024
    prefix_match_info_producer_name: str | None = None
    prefill_profile: str = _PREFILL_PROFILE

    @field_validator("lru_size")
    @classmethod
    def _default_when_not_positive(cls, value: int) -> int:
        return value if value > 0 else 1024


def _legacy(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Drop upstream's unused ``prefixPluginType`` (with a warning)."""
    if "prefixPluginType" not in params:
        return params, []
    out = {k: v for k, v in params.items() if k != "prefixPluginType"}
    return out, ["parameter 'prefixPluginType' is deprecated and ignored"]


class NoHitLRUScorer:
    """``no-hit-lru-scorer`` (see the module docstring)."""

    def __init__(self, params: NoHitLRUParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.size = params.lru_size
        self.producer_name = params.prefix_match_info_producer_name
        self.prefill_profile = params.prefill_profile
        self._scheduler = ctx.scheduler
        self._source: MatchInfoProducer | None = None
        self._resolved = False
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, None] = OrderedDict()  # endpoint id, oldest first

    def _producer(self, ctx: SchedulingContext) -> MatchInfoProducer | None:
        if not self._resolved:
            sched = ctx.scheduler or self._scheduler
            if sched is not None:
                name = self.producer_name or default_source(sched.config, self.name)
                if name is not None:
                    self._source = producer(sched.plugins, name, self.name)
            elif self.producer_name:
                raise ConfigError(
                    "no scheduler to find the producer in", "prefixMatchInfoProducerName"
                )
            self._resolved = True
        return self._source

    def cold(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> bool:
        """Whether no candidate holds any block of the request's prefix."""
        source = self._producer(ctx)
        if source is None:
            return True
        try:
            matched, _, _ = source.match_info(ctx, request, endpoints)
        except KVAwareError:
            return True  # an untokenizable request can hit nothing we know of
        return not any(v > 0 for v in matched.values())

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        cold = self.cold(ctx, request, endpoints)
        request.state[self.name] = cold
        if not cold:
            return {e.id: NEUTRAL for e in endpoints}
        n = len(endpoints)
        if n == 1:
            return {endpoints[0].id: 1.0}
        with self._lock:
            order = {eid: i for i, eid in enumerate(self._lru)}
        never = [e.id for e in endpoints if e.id not in order]
        used = sorted((e.id for e in endpoints if e.id in order), key=order.__getitem__)
        span = n - 1
        out = {eid: 1.0 - i / span for i, eid in enumerate(never)}
        offset = len(never)
        for rank, eid in enumerate(used):
            out[eid] = 1.0 - (offset + rank) / span
        return out

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """Move the chosen pod (and the prefill pick, if any) to most recently used, for cold
        requests only."""
        if not request.state.pop(self.name, False):
            return
        picks = [result.targets[0].id]
        prefill = result.profile_results.get(self.prefill_profile)
        if prefill is not None and prefill.targets and result.profile != self.prefill_profile:
            picks.append(prefill.targets[0].id)
        with self._lock:
            lru = self._lru
            for eid in picks:
                lru[eid] = None
                lru.move_to_end(eid)
            while len(lru) > self.size:
                lru.popitem(last=False)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """Forget pods that left the pool."""
        with self._lock:
            for e in removed:
                self._lru.pop(e.id, None)

    def recent(self) -> list[str]:
        """Endpoint ids in LRU order, least recently used first."""
        with self._lock:
            return list(self._lru)


def register(registry: PluginRegistry) -> None:
    """Register ``no-hit-lru-scorer``."""
    registry.register(
        "no-hit-lru-scorer",
        NoHitLRUScorer,
        params=NoHitLRUParams,
        kinds=("scorer", "pre-request"),
        description="spreads cache-missing requests over the least recently used pods",
        param_aliases={"prefixPluginName": "prefixMatchInfoProducerName"},
        transform=_legacy,
        capabilities=(MATCH_INFO_CONSUMER,),
    )
