"""Latency prediction (upstream llm-d's ``predictedlatency`` family), with an in-process model.

``predicted-latency-producer`` learns a request's latency online from the requests it saw
(upstream trains XGBoost / Bayesian-ridge models in a sidecar; here a Bayesian ridge regression
updated in closed form after every response). Its features are upstream's: the prompt's tokens
and the part of them the pod does not hold (prefix match info), the pod's waiting and running
requests, KV-cache usage, and the requests this scheduler dispatched to it and has not seen
finish. It predicts TTFT per candidate (in the default, non-streaming mode the request's
end-to-end latency, as upstream; with ``streamingMode`` the time to the first token the front
door reports) and leaves TPOT neutral (no per-token timing reaches the scheduler). Headroom is
``SLO x sloBufferFactor - predicted`` with the SLOs from the request headers
``x-llm-d-slo-ttft-ms`` / ``x-llm-d-slo-tpot-ms`` (or ``x-slo-ttft-ms`` / ``x-slo-tpot-ms``);
without an SLO it is ``-predicted``.

``latency-scorer`` ranks candidates by headroom (upstream's buckets, strategies and composite
fallback), ``slo-headroom-tier-filter`` keeps the tier that meets the SLOs (exploring the other
with a small probability), ``latency-slo-admitter`` sheds sheddable requests no pod can serve
within their SLOs.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.errors import ConfigError, KVAwareError
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    ResponseInfo,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
    parse_duration,
    per_call,
)
from kvaware_scorer.scheduler.matchinfo import MatchInfoProducer, find_prefix_source
from kvaware_scorer.scheduler.registry import MATCH_INFO_CONSUMER

__all__ = [
    "LatencyInfo",
    "LatencySLOAdmitter",
    "LatencyScorer",
    "OnlineRidge",
    "PredictedLatencyProducer",
    "SLOHeadroomTierFilter",
    "register",
]

logger = logging.getLogger(__name__)

TTFT_SLO_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
TPOT_SLO_HEADERS = ("x-llm-d-slo-tpot-ms", "x-slo-tpot-ms")
DEFAULT_PRODUCER = "predicted-latency-producer"
#: Observations before the model predicts (fewer: no predictions, scorers fall back).
MIN_SAMPLES = 8
_N_FEATURES = 7


@dataclass(frozen=True, slots=True)
class LatencyInfo:
    """One candidate's prediction (upstream's ``LatencyPredictionInfo``)."""

    ttft_ms: float
    tpot_ms: float
    ttft_headroom: float
    tpot_headroom: float
    dispatched: int
    valid: bool


class OnlineRidge:
    """Bayesian ridge regression updated one observation at a time (closed form: the
    precision matrix and the right-hand side accumulate; O(features^2) memory, fixed)."""

    def __init__(self, n: int, alpha: float = 1.0) -> None:
        self.n = n
        self.a = [[alpha if i == j else 0.0 for j in range(n)] for i in range(n)]
        self.b = [0.0] * n
        self.samples = 0
        self._w: list[float] | None = None

    def add(self, x: Sequence[float], y: float) -> None:
        """Learn `y` at features `x`."""
        for i in range(self.n):
            xi = x[i]
            row = self.a[i]
            for j in range(self.n):
                row[j] += xi * x[j]
            self.b[i] += xi * y
        self.samples += 1
        self._w = None

    def weights(self) -> list[float]:
        """Posterior mean weights (Gaussian elimination on the small normal equations)."""
        if self._w is None:
            n = self.n
            m = [row[:] + [self.b[i]] for i, row in enumerate(self.a)]
            for c in range(n):
                p = max(range(c, n), key=lambda r: abs(m[r][c]))
                m[c], m[p] = m[p], m[c]
                piv = m[c][c] or 1e-12
                for r in range(n):
                    if r != c and m[r][c]:
                        f = m[r][c] / piv
                        for k in range(c, n + 1):
                            m[r][k] -= f * m[c][k]
            self._w = [m[i][n] / (m[i][i] or 1e-12) for i in range(n)]
        return self._w

    def predict(self, x: Sequence[float]) -> float:
        """The prediction at `x`."""
        return sum(w * xi for w, xi in zip(self.weights(), x, strict=True))


def _header_ms(request: SchedulingRequest, names: Sequence[str]) -> float:
    for name in names:
        raw = request.headers.get(name)
        if raw:
            try:
                value = float(raw)
            except ValueError:
                return 0.0
            return value if math.isfinite(value) and value > 0 else 0.0
    return 0.0


class PredictedLatencyParams(ConfigModel):
    """Parameters of ``predicted-latency-producer`` (upstream's names).

    Attributes:
        sampling_mean: Accepted (upstream samples decode tokens for TPOT training).
        max_decode_token_samples_for_prediction: Accepted (as above).
        slo_buffer_factor: SLOs are multiplied by this before the headroom is computed.
        context_ttl: A dispatched request never seen finishing stops counting after this.
        streaming_mode: True: TTFT is learned at each streamed answer's first token (whole-body
            answers teach nothing); False: from the whole request (end-to-end latency).
        endpoint_role_label: Pods whose label says ``prefill`` get a neutral TPOT.
        predict_in_produce: False: learn only, never predict (training-only mode).
        prefix_match_info_producer_name: The prefix plugin giving each pod's cached prefix.
        in_flight_load_producer_name: Accepted (in-flight requests are counted here).
        use_encoder_cache_features: Accepted (no multimodal encoder cache here).
        encoder_cache_match_info_producer_name: Accepted.
        max_in_flight: Dispatched requests remembered at most (oldest dropped).
    """

    sampling_mean: float = Field(1000.0, gt=0)
    max_decode_token_samples_for_prediction: int = Field(0, ge=0)
    slo_buffer_factor: float = Field(1.0, gt=0)
    context_ttl: float = Field(300.0, alias="contextTTL")
    streaming_mode: bool = False
    endpoint_role_label: str = ""
    predict_in_produce: bool = True
    prefix_match_info_producer_name: str | None = None
    in_flight_load_producer_name: str | None = None
    use_encoder_cache_features: bool = False
    encoder_cache_match_info_producer_name: str | None = None
    max_in_flight: int = Field(100_000, ge=1)

    @field_validator("context_ttl", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)


class PredictedLatencyProducer:
    """``predicted-latency-producer`` (see the module docstring)."""

    def __init__(self, params: PredictedLatencyParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.params = params
        self._scheduler = ctx.scheduler
        self._clock = ctx.clock
        self._lock = threading.Lock()
        self._model = OnlineRidge(_N_FEATURES)
        # id -> (pod, t0, x); x is None once the request was learned from (streamingMode:
        # at its first token), while it still counts as in flight until its end.
        self._inflight: dict[str, tuple[str, float, list[float] | None]] = {}
        self._source: MatchInfoProducer | None = None
        self._resolved = False

    # -- features ------------------------------------------------------------------------------

    def _prefix(self, ctx: SchedulingContext) -> MatchInfoProducer | None:
        if not self._resolved:
            self._resolved = True
            sched = ctx.scheduler or self._scheduler
            name = self.params.prefix_match_info_producer_name
            if sched is not None:
                self._source = find_prefix_source(sched.plugins, sched.config, name, self.name)
        return self._source

    def dispatched(self, endpoint_id: str) -> int:
        """Requests sent to the pod and not seen finishing (within ``contextTTL``)."""
        with self._lock:
            return sum(1 for pod, _, _ in self._inflight.values() if pod == endpoint_id)

    def features(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> dict[str, list[float]]:
        """Per candidate: [1, prompt k-tokens, uncached k-tokens, waiting, running, KV usage,
        dispatched]."""
        source = self._prefix(ctx)
        matched: Mapping[str, float] = {}
        tokens = len(request.tokens(list)) if request.has_tokens else 0
        block_size = 0
        if source is not None:
            try:
                matched, total, block_size = source.match_info(ctx, request, endpoints)
                tokens = tokens or total * block_size
            except KVAwareError:
                matched = {}
        self._expire()
        with self._lock:
            counts: dict[str, int] = {}
            for pod, _, _ in self._inflight.values():
                counts[pod] = counts.get(pod, 0) + 1
        out: dict[str, list[float]] = {}
        for e in endpoints:
            m = ctx.metrics(e)
            cached = min(tokens, matched.get(e.id, 0.0) * block_size)
            out[e.id] = [
                1.0,
                tokens / 1000.0,
                (tokens - cached) / 1000.0,
                float(m.waiting_queue_size) if m else 0.0,
                float(m.running_requests_size) if m else 0.0,
                m.kv_cache_usage_percent if m else 0.0,
                float(counts.get(e.id, 0)),
            ]
        return out

    # -- predictions ---------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether the model has seen enough requests to predict."""
        with self._lock:
            return self._model.samples >= MIN_SAMPLES and self.params.predict_in_produce

    def predictions(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> dict[str, LatencyInfo]:
        """Per candidate predictions (empty while the model is not ready); memoized per call."""
        return per_call(
            request,
            self.name + ":predictions",
            ctx,
            endpoints,
            lambda: self._predict(ctx, request, endpoints),
        )

    def _predict(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> dict[str, LatencyInfo]:
        feats = self.features(ctx, request, endpoints)
        request.state[self.name + ":features"] = feats
        if not self.ready():
            return {}
        factor = self.params.slo_buffer_factor
        ttft_slo = _header_ms(request, TTFT_SLO_HEADERS) * factor
        tpot_slo = _header_ms(request, TPOT_SLO_HEADERS) * factor
        out: dict[str, LatencyInfo] = {}
        with self._lock:
            model = self._model
            for e in endpoints:
                x = feats[e.id]
                ttft = max(0.0, model.predict(x))
                prefill = (
                    self.params.endpoint_role_label
                    and e.labels.get(self.params.endpoint_role_label) == "prefill"
                )
                tpot_headroom = 0.0 if prefill or not tpot_slo else tpot_slo
                out[e.id] = LatencyInfo(
                    ttft_ms=ttft,
                    tpot_ms=0.0,
                    ttft_headroom=ttft_slo - ttft,
                    tpot_headroom=tpot_headroom,
                    dispatched=int(x[6]),
                    valid=(not ttft_slo or ttft <= ttft_slo),
                )
        return out

    # -- training ------------------------------------------------------------------------------

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """Count the request against its pick and remember its features for training."""
        target = result.targets[0]
        feats = request.state.get(self.name + ":features")
        x = feats.get(target.id) if isinstance(feats, dict) else None
        if x is None:
            x = self.features(ctx, request, [target])[target.id]
        with self._lock:
            self._inflight[request.request_id] = (target.id, self._clock(), list(x))
            while len(self._inflight) > self.params.max_in_flight:
                del self._inflight[next(iter(self._inflight))]

    def first_token(self, now: float, request: SchedulingRequest, result: SchedulingResult) -> None:
        """``streamingMode``: learn the request's TTFT at its first token (as upstream trains on
        streamed first chunks)."""
        if not self.params.streaming_mode:
            return
        with self._lock:
            entry = self._inflight.get(request.request_id)
            if entry is None:
                return
            pod, t0, x = entry
            if x is None:
                return
            self._model.add(x, (now - t0) * 1000.0)
            self._inflight[request.request_id] = (pod, t0, None)

    def post_response(
        self, request: SchedulingRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        """Learn the request's end-to-end latency (successful responses only; with
        ``streamingMode`` nothing here: its TTFT was learned at its first token, and an
        answer that never reported one teaches nothing)."""
        with self._lock:
            entry = self._inflight.pop(request.request_id, None)
            if entry is None or response.error or not 200 <= response.status < 300:
                return
            _, t0, x = entry
            if x is not None and not self.params.streaming_mode:
                self._model.add(x, (self._clock() - t0) * 1000.0)

    def _expire(self) -> None:
        ttl = self.params.context_ttl
        if not ttl:
            return
        now = self._clock()
        with self._lock:
            for rid in [r for r, (_, t0, _) in self._inflight.items() if now - t0 > ttl]:
                del self._inflight[rid]

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        gone = {e.id for e in removed}
        with self._lock:
            for rid in [r for r, (pod, _, _) in self._inflight.items() if pod in gone]:
                del self._inflight[rid]


def _producer_of(
    ctx: SchedulingContext, fallback: Any, name: str | None, consumer: str
) -> PredictedLatencyProducer | None:
    sched = ctx.scheduler or fallback
    if sched is None:
        return None
    obj = sched.plugins.get(name or DEFAULT_PRODUCER)
    if obj is None and not name:
        found = [p for p in sched.plugins.values() if isinstance(p, PredictedLatencyProducer)]
        obj = found[0] if len(found) == 1 else None
    if obj is not None and not isinstance(obj, PredictedLatencyProducer):
        raise ConfigError(f"{consumer}: {name!r} is not a predicted-latency-producer")
    return obj


class _Consumer:
    """Finds the latency producer (named, else the one configured)."""

    producer_name: str | None = None

    def __init__(self, ctx: PluginContext) -> None:
        self.name = ctx.name
        self._scheduler = ctx.scheduler

    def infos(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> dict[str, LatencyInfo]:
        prod = _producer_of(ctx, self._scheduler, self.producer_name, self.name)
        return {} if prod is None else prod.predictions(ctx, request, endpoints)


# -- latency-scorer ------------------------------------------------------------------------------

_W_MAX = 100
_EPS = 1e-9


class LatencyScorerParams(ConfigModel):
    """Parameters of ``latency-scorer`` (upstream's)."""

    ttft_weight: float = Field(0.8, ge=0)
    tpot_weight: float = Field(0.2, ge=0)
    headroom_selection_strategy: Literal["least", "most"] = "least"
    composite_kv_weight: float = Field(1.0, ge=0, alias="compositeKVWeight")
    composite_queue_weight: float = Field(1.0, ge=0)
    composite_prefix_weight: float = Field(1.0, ge=0)
    latency_prediction_info_producer_name: str | None = None
    prefix_match_info_producer_name: str | None = None


class LatencyScorer(_Consumer):
    """``latency-scorer`` (see the module docstring and docs/plugins.md)."""

    def __init__(self, params: LatencyScorerParams, ctx: PluginContext) -> None:
        super().__init__(ctx)
        self.params = params
        self.producer_name = params.latency_prediction_info_producer_name
        self._prefix: MatchInfoProducer | None = None
        self._prefix_resolved = False

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        infos = self.infos(ctx, request, endpoints)
        if not infos:
            return self._composite(ctx, request, endpoints)
        scores = dict.fromkeys((e.id for e in endpoints), 0.0)
        data = [(e.id, infos.get(e.id)) for e in endpoints]
        positive = [
            (eid, i)
            for eid, i in data
            if i is None or (i.ttft_headroom >= 0 and i.tpot_headroom >= 0)
        ]
        if positive:
            self._bucket(positive, scores, force_least=False)
            return scores
        idle = [(eid, i) for eid, i in data if i is not None and i.dispatched == 0]
        if idle:
            self._bucket(idle, scores, force_least=True)
            return scores
        tpot_only = [(eid, i) for eid, i in data if i and i.ttft_headroom >= 0 > i.tpot_headroom]
        ttft_only = [(eid, i) for eid, i in data if i and i.tpot_headroom >= 0 > i.ttft_headroom]
        both = [(eid, i) for eid, i in data if (eid, i) not in tpot_only + ttft_only]
        for bucket in (tpot_only, ttft_only, both):
            if bucket:
                self._bucket(bucket, scores, force_least=True)
                break
        return scores

    def _bucket(
        self,
        data: Sequence[tuple[str, LatencyInfo | None]],
        scores: dict[str, float],
        force_least: bool,
    ) -> None:
        a, b = self.params.ttft_weight, self.params.tpot_weight
        alpha, beta = (a / (a + b), b / (a + b)) if a + b > 0 else (1.0, 0.0)
        ttft = [abs(i.ttft_headroom) if i else 0.0 for _, i in data]
        tpot = [abs(i.tpot_headroom) if i else 0.0 for _, i in data]
        r_ttft, r_tpot = max(ttft) - min(ttft), max(tpot) - min(tpot)
        if r_ttft <= _EPS < r_tpot:
            alpha, beta = 0.0, 1.0
        elif r_tpot <= _EPS < r_ttft:
            alpha, beta = 1.0, 0.0
        most = self.params.headroom_selection_strategy == "most" and not force_least
        for k, (eid, _) in enumerate(data):
            n_ttft = (ttft[k] - min(ttft)) / r_ttft if r_ttft > _EPS else 0.5
            n_tpot = (tpot[k] - min(tpot)) / r_tpot if r_tpot > _EPS else 0.5
            combined = alpha * n_ttft + beta * n_tpot
            w = int((combined if most else 1.0 - combined) * _W_MAX) + 1
            scores[eid] = min(1.0, w / _W_MAX)

    def _composite(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> dict[str, float]:
        p = self.params
        wkv, wq, wp = p.composite_kv_weight, p.composite_queue_weight, p.composite_prefix_weight
        total = wkv + wq + wp
        wkv, wq, wp = (wkv / total, wq / total, wp / total) if total > 0 else (1.0, 0.0, 0.0)
        metrics = {e.id: ctx.metrics(e) for e in endpoints}
        max_q = max((m.waiting_queue_size for m in metrics.values() if m), default=0)
        prefix = self._prefix_scores(ctx, request, endpoints) if wp else {}
        out: dict[str, float] = {}
        for e in endpoints:
            m = metrics[e.id]
            q = m.waiting_queue_size if m else 0
            rel_q = (max_q - q) / max_q if max_q > 0 else 1.0
            kv_free = 1.0 - (m.kv_cache_usage_percent if m else 0.0)
            composite = wkv * kv_free + wq * rel_q + wp * prefix.get(e.id, 0.0)
            out[e.id] = round(_W_MAX * composite) / _W_MAX
        return out

    def _prefix_scores(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> dict[str, float]:
        if not self._prefix_resolved:
            self._prefix_resolved = True
            sched = ctx.scheduler or self._scheduler
            name = self.params.prefix_match_info_producer_name
            if sched is not None:
                self._prefix = find_prefix_source(sched.plugins, sched.config, name, self.name)
        if self._prefix is None:
            return {}
        try:
            matched, total, _ = self._prefix.match_info(ctx, request, endpoints)
        except KVAwareError:
            return {}
        return {eid: n / total for eid, n in matched.items()} if total else {}


# -- slo-headroom-tier-filter ----------------------------------------------------------------------


class SLOTierParams(ConfigModel):
    """Parameters of ``slo-headroom-tier-filter``."""

    epsilon_explore_neg: float = Field(0.01, ge=0, le=1)
    latency_prediction_info_producer_name: str | None = None


class SLOHeadroomTierFilter(_Consumer):
    """``slo-headroom-tier-filter``: keeps the pods meeting both SLOs; with probability
    ``epsilonExploreNeg`` the others instead (so recovering pods get re-evaluated)."""

    def __init__(self, params: SLOTierParams, ctx: PluginContext) -> None:
        super().__init__(ctx)
        self.epsilon = params.epsilon_explore_neg
        self.producer_name = params.latency_prediction_info_producer_name
        self.rng = ctx.rng

    def filter(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        infos = self.infos(ctx, request, endpoints)
        if not infos:
            return endpoints
        positive: list[Endpoint] = []
        negative: list[Endpoint] = []
        for e in endpoints:
            i = infos.get(e.id)
            ok = i is not None and i.ttft_headroom >= 0 and i.tpot_headroom >= 0
            (positive if ok else negative).append(e)
        if positive and negative:
            return negative if self.rng.random() < self.epsilon else positive
        return positive or negative


# -- latency-slo-admitter ----------------------------------------------------------------------------


class LatencyAdmitterParams(ConfigModel):
    """Parameters of ``latency-slo-admitter``."""

    latency_prediction_info_producer_name: str | None = None


class LatencySLOAdmitter(_Consumer):
    """``latency-slo-admitter``: sheds a sheddable request (priority < 0) with SLO headers when
    no candidate has a valid prediction, none is idle (no running request) and none is cold
    (KV-cache usage < 2 %). Without predictions or SLOs it admits."""

    def __init__(self, params: LatencyAdmitterParams, ctx: PluginContext) -> None:
        super().__init__(ctx)
        self.producer_name = params.latency_prediction_info_producer_name

    def admit(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> str | None:
        """None to admit, else the reason for shedding."""
        if request.priority >= 0:
            return None
        if not (_header_ms(request, TTFT_SLO_HEADERS) or _header_ms(request, TPOT_SLO_HEADERS)):
            return None
        infos = self.infos(ctx, request, endpoints)
        if not infos:
            return None
        for e in endpoints:
            m = ctx.metrics(e)
            info = infos.get(e.id)
            if (info is not None and info.valid) or (
                m is not None and (m.running_requests_size == 0 or m.kv_cache_usage_percent < 0.02)
            ):
                return None
        return "no endpoint can serve the request within its latency SLO"


def register(registry: PluginRegistry) -> None:
    """Register the latency producer, scorer, tier filter and admitter."""
    registry.register(
        "predicted-latency-producer",
        PredictedLatencyProducer,
        params=PredictedLatencyParams,
        kinds=("pre-request", "post-response"),
        description="learns request latency online and predicts it per candidate",
    )
    registry.register(
        "latency-scorer",
        LatencyScorer,
        params=LatencyScorerParams,
        description="ranks candidates by predicted SLO headroom",
        refs={"latencyPredictionInfoProducerName": "pre-request"},
        capabilities=(MATCH_INFO_CONSUMER,),
    )
    registry.register(
        "slo-headroom-tier-filter",
        SLOHeadroomTierFilter,
        params=SLOTierParams,
        description="keeps the candidates predicted to meet the request's SLOs",
        refs={"latencyPredictionInfoProducerName": "pre-request"},
    )
    registry.register(
        "latency-slo-admitter",
        LatencySLOAdmitter,
        params=LatencyAdmitterParams,
        kinds=("admitter",),
        description="sheds sheddable requests no pod can serve within their SLOs",
        refs={"latencyPredictionInfoProducerName": "pre-request"},
    )
