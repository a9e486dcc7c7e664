"""Upstream's prefix-and-load routing tools: ``prefix-cache-affinity-filter`` and
``token-load-scorer`` (llm-d's "sticky until saturated" optimized baseline), and
``lmetric-scorer`` (llm-d's precise-routing cost).

* ``prefix-cache-affinity-filter`` keeps only the *sticky* candidates, those holding at least
  ``affinityThreshold`` of the prompt's blocks (a prefix producer's match info), unless the best
  sticky one is overloaded: when its TTFT exceeds the best other candidate's by more than
  ``maxTTFTPenaltyMs`` every candidate is kept. TTFT is ``in-flight tokens /
  peakPrefillThroughput`` (``ttftSource: prefillThroughput``) or a latency predictor's
  prediction (``ttftSource: latencyPredictor``: a configured ``predicted-ttft-scorer``).
* ``token-load-scorer``: ``1 - min(1, (in-flight tokens + this request's uncached tokens) /
  queueThresholdTokens)``; 1.0 when the sum is 0.
* ``lmetric-scorer``: the cost ``uncached prompt tokens x (requests in flight + 1)`` (the
  prefill this request needs there, times the batch it would join), with uncached tokens at
  block granularity as upstream (``(total blocks - matched blocks) x block size``); scores are
  ``(max cost - cost) / (max cost - min cost)`` over the candidates, 1.0 for every candidate
  when the costs are equal, 0 for every candidate when there is no match info (no producer,
  an untokenizable or empty prompt).

In-flight tokens are the uncached prompt tokens of the requests each plugin saw scheduled and
not yet answered (its own `InFlightLedger`: upstream's ``inflight-load-producer`` is accepted
as a no-op, see ``compat.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    ResponseInfo,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
)
from kvaware_scorer.scheduler.inflight import (
    InFlight,
    InFlightLedger,
    read_match_info,
    uncached_tokens,
)
from kvaware_scorer.scheduler.matchinfo import (
    MatchInfo,
    MatchInfoProducer,
    default_source,
    producer,
)
from kvaware_scorer.scheduler.registry import MATCH_INFO_CONSUMER, MATCH_INFO_PRODUCER

__all__ = [
    "AffinityFilterParams",
    "LMetricParams",
    "LMetricScorer",
    "PrefixCacheAffinityFilter",
    "TokenLoadParams",
    "TokenLoadScorer",
    "register",
]

logger = logging.getLogger(__name__)

#: Upstream's default normalisation of ``token-load-scorer``: 128 requests of 32k tokens.
DEFAULT_QUEUE_THRESHOLD_TOKENS = 4_194_304
#: Upstream's default peak prefill rate (Qwen3-32B on 2 x H100, TP=2).
DEFAULT_PEAK_PREFILL_THROUGHPUT = 15928.0


class _Tracked:
    """Shared part: an own in-flight ledger fed by the request lifecycle, and the prefix
    producer whose match info says which prompt tokens a candidate holds."""

    name: str

    def _setup(self, ctx: PluginContext, producer_name: str | None) -> None:
        if producer_name and ctx.scheduler is not None:
            pc = ctx.scheduler.config.plugins.get(producer_name)
            if pc is None or MATCH_INFO_PRODUCER not in pc.capabilities:
                raise ConfigError(
                    f"{producer_name!r} is not a configured prefix match-info producer",
                    "prefixMatchInfoProducerName",
                )
        self.name = ctx.name
        self._scheduler = ctx.scheduler
        self._producer_name = producer_name
        self._source: MatchInfoProducer | None = None
        self._resolved = False
        self._lock = threading.Lock()
        self.ledger = InFlightLedger()
        self._key = ctx.name + ":inflight"

    def _producer(self, ctx: SchedulingContext) -> MatchInfoProducer | None:
        if not self._resolved:
            with self._lock:
                sched = ctx.scheduler or self._scheduler
                if sched is not None:
                    name = self._producer_name
                    if name is None:
                        try:
                            name = default_source(sched.config, self.name)
                        except ConfigError:
                            logger.warning(
                                "%s: several prefix producers; name one with "
                                "prefixMatchInfoProducerName (counting every prompt token)",
                                self.name,
                            )
                    if name is not None:
                        self._source = producer(sched.plugins, name, self.name)
                elif self._producer_name:
                    raise ConfigError(
                        "no scheduler to find the producer in", "prefixMatchInfoProducerName"
                    )
                self._resolved = True
        return self._source

    def _match(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> MatchInfo | None:
        return read_match_info(self._producer(ctx), ctx, request, endpoints)

    def _uncached(
        self,
        ctx: SchedulingContext,
        request: SchedulingRequest,
        endpoints: Sequence[Endpoint],
        info: MatchInfo | None = None,
    ) -> dict[str, int]:
        """Endpoint id -> prompt tokens it would compute, kept on the request for
        `pre_request`.

        NOTE: computed while scheduling, not after the pick: by then a producer's own
        pre-request hook may already have recorded the request for its target.
        """
        if info is None:
            info = self._match(ctx, request, endpoints)
        _, uncached = uncached_tokens(request, info, endpoints)
        request.state[self._key + ":uncached"] = uncached
        return uncached

    def _expire(self, ctx: SchedulingContext) -> None:
        """Stop counting requests whose end was never reported (the ledger's timeout)."""
        if self.ledger.timeout > 0:
            self.ledger.expire(ctx.now)

    def _release(self, request: SchedulingRequest) -> None:
        """Stop counting the request (if it is counted)."""
        key = request.state.pop(self._key, None)
        if key is not None:
            self.ledger.release(key)

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """Count the request's uncached prompt tokens against its target."""
        self._release(request)  # a re-schedule moves the request
        target = result.targets[0]
        uncached = request.state.pop(self._key + ":uncached", None)
        if uncached is None or target.id not in uncached:
            uncached = self._uncached(ctx, request, [target])
        own = uncached[target.id]
        request.state[self._key] = self.ledger.admit(
            InFlight(pod=target.id, prefill=own, prompt=own, output=0, start=ctx.now)
        )

    def post_response(
        self, request: SchedulingRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        """Release the request's tokens."""
        self._release(request)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """Forget pods that left the pool."""
        if removed:
            self.ledger.forget_pods([e.id for e in removed])

    def in_flight_tokens(self, pod: str) -> int:
        """Uncached prompt tokens of the requests in flight on `pod`."""
        return self.ledger.load(pod).tokens


# -- token-load-scorer ----------------------------------------------------------------------------


class TokenLoadParams(ConfigModel):
    """Parameters of ``token-load-scorer``.

    Attributes:
        queue_threshold_tokens: In-flight tokens at which the score reaches 0 (<= 0 means the
            default, 4,194,304).
        in_flight_load_producer_name: Upstream's ``inflight-load-producer`` reference; accepted
            (this scorer keeps its own account).
        prefix_match_info_producer_name: The prefix plugin whose match info discounts cached
            tokens (upstream sets it on the in-flight producer); empty = the one configured.
    """

    queue_threshold_tokens: int = DEFAULT_QUEUE_THRESHOLD_TOKENS
    in_flight_load_producer_name: str | None = None
    # NOTE: not named prefix_match_info_producer_name: without a prefix plugin every prompt
    # token counts, which is a load-only configuration's normal case, not a miss to warn of.
    prefix_producer: str | None = Field(None, alias="prefixMatchInfoProducerName")


class TokenLoadScorer(_Tracked):
    """``token-load-scorer`` (see the module docstring)."""

    def __init__(self, params: TokenLoadParams, ctx: PluginContext) -> None:
        self._setup(ctx, params.prefix_producer)
        t = params.queue_threshold_tokens
        self.threshold = float(t if t > 0 else DEFAULT_QUEUE_THRESHOLD_TOKENS)

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        self._expire(ctx)
        uncached = self._uncached(ctx, request, endpoints)
        out: dict[str, float] = {}
        for e in endpoints:
            load = float(self.in_flight_tokens(e.id) + uncached[e.id])
            out[e.id] = 1.0 if load <= 0 else 1.0 - min(load, self.threshold) / self.threshold
        return out


# -- lmetric-scorer -------------------------------------------------------------------------------


class LMetricParams(ConfigModel):
    """Parameters of ``lmetric-scorer``.

    Attributes:
        prefix_match_info_producer_name: The prefix plugin whose match info gives the uncached
            tokens; empty = the one configured (the default producer when there is none).
        in_flight_load_producer_name: Upstream's ``inflight-load-producer`` reference; accepted
            (this scorer keeps its own account of the requests in flight).
    """

    prefix_match_info_producer_name: str | None = None
    in_flight_load_producer_name: str | None = None


class LMetricScorer(_Tracked):
    """``lmetric-scorer`` (see the module docstring)."""

    def __init__(self, params: LMetricParams, ctx: PluginContext) -> None:
        self._setup(ctx, params.prefix_match_info_producer_name)

    def costs(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> dict[str, float]:
        """Endpoint id -> LMetric cost; empty when there is no match info."""
        self._expire(ctx)
        info = self._match(ctx, request, endpoints)
        self._uncached(ctx, request, endpoints, info)  # for pre_request's in-flight account
        if info is None:
            return {}
        matched, total, block_size = info
        if total <= 0:
            return {}
        bs = block_size if block_size > 0 else 1
        out: dict[str, float] = {}
        for e in endpoints:
            # NOTE: matched blocks may be fractional here (a precise producer weighs blocks
            # held in slower tiers less); upstream's are whole blocks.
            hit = min(max(float(matched.get(e.id, 0.0)), 0.0), float(total))
            out[e.id] = (total - hit) * bs * (self.ledger.load(e.id).requests + 1)
        return out

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        costs = self.costs(ctx, request, endpoints)
        if not costs:
            return {e.id: 0.0 for e in endpoints}
        lo, hi = min(costs.values()), max(costs.values())
        if hi <= lo:
            return {eid: 1.0 for eid in costs}
        return {eid: (hi - c) / (hi - lo) for eid, c in costs.items()}


# -- prefix-cache-affinity-filter -----------------------------------------------------------------


class AffinityFilterParams(ConfigModel):
    """Parameters of ``prefix-cache-affinity-filter`` (upstream names and defaults).

    Attributes:
        affinity_threshold: Fraction of the prompt's blocks a candidate must hold to be sticky
            (0 = filter off).
        exploration_probability: Probability of keeping every candidate (skipping the gate).
        max_ttft_penalty_ms: Stickiness breaks when the best sticky candidate's TTFT exceeds
            the best other one's by more than this (0 = always stick).
        ttft_source: ``prefillThroughput`` (in-flight tokens / `peak_prefill_throughput`) or
            ``latencyPredictor`` (a configured ``predicted-ttft-scorer``'s prediction).
        peak_prefill_throughput: Prefill tokens per second for ``prefillThroughput``.
        prefix_match_info_producer_name: The prefix plugin read; empty = the one configured.
        latency_prediction_info_producer_name: The ``predicted-ttft-scorer`` read by
            ``latencyPredictor``; empty = the one configured.
        in_flight_load_producer_name: Upstream's ``inflight-load-producer`` reference;
            accepted (this filter keeps its own account).
    """

    affinity_threshold: float = Field(0.80, ge=0, le=1)
    exploration_probability: float = Field(0.0, ge=0, le=1)
    max_ttft_penalty_ms: float = Field(18000.0, ge=0, alias="maxTTFTPenaltyMs")
    ttft_source: Literal["prefillThroughput", "latencyPredictor"] = Field(
        "prefillThroughput", alias="ttftSource"
    )
    peak_prefill_throughput: float = Field(DEFAULT_PEAK_PREFILL_THROUGHPUT, ge=0)
    prefix_match_info_producer_name: str | None = None
    latency_prediction_info_producer_name: str | None = None
    in_flight_load_producer_name: str | None = None

    @model_validator(mode="after")
    def _throughput_needs_rate(self) -> AffinityFilterParams:
        if (
            self.ttft_source == "prefillThroughput"
            and self.max_ttft_penalty_ms > 0
            and self.peak_prefill_throughput <= 0
        ):
            raise ValueError(
                "peakPrefillThroughput must be > 0 when ttftSource is prefillThroughput"
            )
        return self


def _affinity_transform(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Drop upstream's calibration-file parameters (with a warning): set
    ``peakPrefillThroughput`` instead."""
    dropped = [
        k
        for k in (
            "prefillCalibrationFile",
            "prefillCalibrationFingerprint",
            "prefillCalibrationRequired",
        )
        if k in params
    ]
    if not dropped:
        return params, []
    out = {k: v for k, v in params.items() if k not in dropped}
    return out, [
        f"{', '.join(dropped)} ignored: calibration files are not read here; set "
        "peakPrefillThroughput"
    ]


class PrefixCacheAffinityFilter(_Tracked):
    """``prefix-cache-affinity-filter`` (see the module docstring)."""

    def __init__(self, params: AffinityFilterParams, ctx: PluginContext) -> None:
        self._setup(ctx, params.prefix_match_info_producer_name)
        self.params = params
        self._rng = ctx.rng
        self._predictor: Any = None
        self.decisions: dict[str, int] = {}  # outcome -> count (bounded: five outcomes)

    def _count(self, outcome: str) -> None:
        self.decisions[outcome] = self.decisions.get(outcome, 0) + 1

    def _latency(self, ctx: SchedulingContext) -> Any:
        if self._predictor is None:
            sched = ctx.scheduler or self._scheduler
            if sched is None:
                raise ConfigError("no scheduler to find the latency predictor in", "ttftSource")
            name = self.params.latency_prediction_info_producer_name
            if name is None:
                found = [
                    n
                    for n, pc in sched.config.plugins.items()
                    if pc.type == "predicted-ttft-scorer"
                ]
                if len(found) != 1:
                    raise ConfigError(
                        "ttftSource latencyPredictor needs one predicted-ttft-scorer (or name it "
                        "with latencyPredictionInfoProducerName)",
                        "latencyPredictionInfoProducerName",
                    )
                name = found[0]
            obj = sched.plugins.get(name)
            if obj is None or not callable(getattr(obj, "predict", None)):
                raise ConfigError(
                    f"{name!r} is not a configured predicted-ttft-scorer",
                    "latencyPredictionInfoProducerName",
                )
            self._predictor = obj
        return self._predictor

    def _ttft_ms(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> dict[str, float]:
        if self.params.ttft_source == "latencyPredictor":
            pred = self._latency(ctx).predict(ctx, request, endpoints)
            return {eid: v[0] * 1000.0 for eid, v in pred.items()}
        rate = self.params.peak_prefill_throughput
        return {e.id: self.in_flight_tokens(e.id) / rate * 1000.0 for e in endpoints}

    def filter(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        p = self.params
        info = self._match(ctx, request, endpoints)
        self._uncached(ctx, request, endpoints, info)
        if len(endpoints) <= 1 or p.affinity_threshold <= 0:
            self._count("not_applicable")
            return endpoints
        if p.exploration_probability > 0 and self._rng.random() < p.exploration_probability:
            self._count("exploration")
            return endpoints
        self._expire(ctx)
        matched, total = (info[0], info[1]) if info is not None else ({}, 0)
        sticky: list[Endpoint] = []
        others: list[Endpoint] = []
        for e in endpoints:
            ratio = matched.get(e.id, 0.0) / total if total > 0 else 0.0
            (sticky if ratio >= p.affinity_threshold else others).append(e)
        if not sticky:
            self._count("no_match")
            return endpoints
        if p.max_ttft_penalty_ms > 0 and others:
            ttft = self._ttft_ms(ctx, request, endpoints)
            penalty = min(ttft[e.id] for e in sticky) - min(ttft[e.id] for e in others)
            if penalty > p.max_ttft_penalty_ms:
                self._count("load_override")
                return endpoints
        self._count("sticky")
        return sticky


def register(registry: PluginRegistry) -> None:
    """Register ``token-load-scorer``, ``lmetric-scorer`` and ``prefix-cache-affinity-filter``."""
    registry.register(
        "token-load-scorer",
        TokenLoadScorer,
        params=TokenLoadParams,
        kinds=("scorer", "pre-request", "post-response"),
        description="fewer in-flight uncached prompt tokens is better (upstream token load)",
    )
    registry.register(
        "lmetric-scorer",
        LMetricScorer,
        params=LMetricParams,
        kinds=("scorer", "pre-request", "post-response"),
        description="lower uncached prompt tokens x (requests in flight + 1) is better "
        "(upstream LMetric)",
        capabilities=(MATCH_INFO_CONSUMER,),
    )
    registry.register(
        "prefix-cache-affinity-filter",
        PrefixCacheAffinityFilter,
        params=AffinityFilterParams,
        kinds=("filter", "pre-request", "post-response"),
        description="keep pods holding the prefix unless they are too loaded (sticky until "
        "saturated)",
        transform=_affinity_transform,
        capabilities=(MATCH_INFO_CONSUMER,),
    )
