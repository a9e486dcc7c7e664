"""Affinity scorers and attribute filters of upstream llm-d: ``lora-affinity-scorer``,
``session-affinity-scorer``, ``context-length-aware``, ``header-label-affinity-scorer``,
``endpoint-attribute-filter`` and ``endpoint-attribute-scorer``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from pydantic import Field, field_validator, model_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
)
from kvaware_scorer.scheduler.sessions import (
    SESSION_ID_HEADER,
    SESSION_TOKEN_HEADER,
    EncodedEndpointHeaderConfig,
    SessionBindings,
    decode_token,
    encode_token,
    session_id_of,
)

__all__ = [
    "ContextLengthAware",
    "EndpointAttributeFilter",
    "EndpointAttributeScorer",
    "HeaderLabelAffinityScorer",
    "LoraAffinityScorer",
    "SessionAffinityScorer",
    "endpoint_attribute",
    "register",
]

#: Default label of ``context-length-aware``: ``"<min>-<max>"`` tokens a pod is meant for.
CONTEXT_LENGTH_LABEL = "llm-d.ai/context-length-range"

#: Endpoint attributes read from `EndpointMetrics` fields (upstream's core metric names).
_METRIC_ATTRIBUTES = {
    "WaitingQueueSize": "waiting_queue_size",
    "RunningRequestsSize": "running_requests_size",
    "KVCacheUsagePercent": "kv_cache_usage_percent",
    "CacheBlockSize": "cache_block_size",
    "CacheNumBlocks": "cache_num_blocks",
    "MaxActiveModels": "max_active_models",
}


class _AttributeSource:
    """Where an endpoint-attribute plugin reads its attribute: the plugin the ``producer``
    names (by name, else the one configured plugin of that type, as upstream keys attributes
    by producer type) when it publishes attributes (``endpoint_attribute(endpoint, name)``,
    e.g. ``dcgm-extractor``), else the endpoints' metrics (`endpoint_attribute`)."""

    def __init__(self, producer: str | None, ctx: PluginContext) -> None:
        self.producer = producer
        self._scheduler = ctx.scheduler
        self._resolved = False
        self._read: Callable[[Endpoint, str], float | None] | None = None

    def value(self, ctx: SchedulingContext, endpoint: Endpoint, name: str) -> float | None:
        if not self._resolved:
            sched = ctx.scheduler or self._scheduler
            if self.producer and sched is not None:
                # NOTE: upstream keys attributes by the producer's type; a plugin of that name
                # is taken first, else the one configured plugin of that type.
                obj = sched.plugins.get(self.producer)
                if getattr(obj, "endpoint_attribute", None) is None:
                    named = [
                        n for n, pc in sched.config.plugins.items() if pc.type == self.producer
                    ]
                    obj = sched.plugins.get(named[0]) if len(named) == 1 else None
                self._read = getattr(obj, "endpoint_attribute", None)
            self._resolved = True
        if self._read is not None:
            v = self._read(endpoint, name)
            return v if v is not None and math.isfinite(v) else None
        return endpoint_attribute(ctx, endpoint, name)


def endpoint_attribute(ctx: SchedulingContext, endpoint: Endpoint, name: str) -> float | None:
    """A scalar attribute of `endpoint`: its metrics' ``attributes[name]``, else the core metric
    of that name (``WaitingQueueSize``, ``KVCacheUsagePercent``...); None when unknown or stale."""
    m = ctx.metrics(endpoint)
    if m is None:
        return None
    value = m.attributes.get(name)
    if value is None:
        field_name = _METRIC_ATTRIBUTES.get(name)
        raw = getattr(m, field_name) if field_name else None
        value = float(raw) if isinstance(raw, int | float) else None
    return value if value is not None and math.isfinite(value) else None


def _prompt_tokens(request: SchedulingRequest) -> int:
    """Prompt length in tokens when known (token ids given or already tokenized), else 0."""
    return len(request.tokens(list)) if request.has_tokens else 0


# -- lora-affinity-scorer -----------------------------------------------------------------------


class LoraAffinityScorer:
    """``lora-affinity-scorer``: 1.0 where the request's adapter is running, 0.8 where a slot is
    free to load it, 0.6 where it is waiting, else 0 (unknown metrics: 0)."""

    def __init__(self, params: object, ctx: PluginContext) -> None:
        self.name = ctx.name

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        model = request.lora_name or request.model
        out: dict[str, float] = {}
        for e in endpoints:
            m = ctx.metrics(e)
            if m is None:
                out[e.id] = 0.0
            elif model in m.active_models:
                out[e.id] = 1.0
            elif len(m.active_models) + len(m.waiting_models) < m.max_active_models:
                out[e.id] = 0.8
            elif model in m.waiting_models:
                out[e.id] = 0.6
            else:
                out[e.id] = 0.0
        return out


# -- session-affinity-scorer ---------------------------------------------------------------------


class SessionIDSource(ConfigModel):
    """One place a session id is read from: a request header or a request attribute."""

    header: str | None = None
    attribute: str | None = None
    producer: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SessionIDSource:
        if bool(self.header) == bool(self.attribute):
            raise ValueError("exactly one of header or attribute must be set")
        return self


class SessionIDConfig(ConfigModel):
    """``sessionIdConfig`` (``session_id`` strategy).

    Attributes:
        sources: Where the session id is read, first found wins (default: ``x-session-id``).
        eviction_ttl_seconds: A binding unused this long is forgotten.
        eviction_sweep_seconds: Accepted for upstream configs (expiry is checked on use here).
        max_sessions: Bindings kept at most (least recently used dropped first).
    """

    sources: list[SessionIDSource] = Field(
        default_factory=lambda: [SessionIDSource(header=SESSION_ID_HEADER)]
    )
    eviction_ttl_seconds: float = Field(300.0, gt=0)
    eviction_sweep_seconds: float = Field(10.0, gt=0)
    max_sessions: int = Field(100_000, ge=1)

    @field_validator("sources")
    @classmethod
    def _default_sources(cls, value: list[SessionIDSource]) -> list[SessionIDSource]:
        return value or [SessionIDSource(header=SESSION_ID_HEADER)]


class SessionAffinityParams(ConfigModel):
    """Parameters of ``session-affinity-scorer``.

    Attributes:
        strategy: ``encoded_endpoint_header`` (the client sends back the token the gateway
            returned) or ``session_id`` (requests of one session id stick to one pod).
        encoded_endpoint_header_config: The token header.
        session_id_config: Session id sources and eviction.
        profile_name: The profile whose pick the session binds to (default: the primary).
    """

    strategy: Literal["encoded_endpoint_header", "session_id"] = "encoded_endpoint_header"
    encoded_endpoint_header_config: EncodedEndpointHeaderConfig = Field(
        default_factory=EncodedEndpointHeaderConfig
    )
    session_id_config: SessionIDConfig = Field(
        default_factory=SessionIDConfig, alias="sessionIdConfig"
    )
    profile_name: str = ""


class SessionAffinityScorer:
    """``session-affinity-scorer``: 1.0 for the pod the request's session is bound to, else 0.

    ``encoded_endpoint_header``: the pod is the base64-decoded id in the token header, and the
    chosen pod's token is returned to the client (`SchedulingResult.response_headers`).
    ``session_id``: the first pick of a session id binds it; later requests of the session
    score that pod 1.0 while it is a candidate; when it is not, the new pick re-binds the
    session. Bindings expire after ``evictionTtlSeconds`` and are bounded by ``maxSessions``.
    """

    def __init__(self, params: SessionAffinityParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.strategy = params.strategy
        self.header = params.encoded_endpoint_header_config.header.strip().lower()
        self.header = self.header or SESSION_TOKEN_HEADER
        sid = params.session_id_config
        self.sources = [
            (s.header.strip().lower(), "") if s.header else ("", s.attribute or "")
            for s in sid.sources
        ]
        self.profile = params.profile_name
        self.bindings = SessionBindings(sid.eviction_ttl_seconds, sid.max_sessions, ctx.clock)

    def session_id(self, request: SchedulingRequest) -> str:
        """The request's session id from the first source that has one."""
        return session_id_of(request, self.sources)

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        out = {e.id: 0.0 for e in endpoints}
        if self.strategy == "encoded_endpoint_header":
            token = request.headers.get(self.header, "")
            pod = decode_token(token) if isinstance(token, str) else ""
            if pod in out:
                out[pod] = 1.0
            return out
        sid = self.session_id(request)
        bound = self.bindings.bound(sid) if sid else None
        if bound is not None:
            request.state[self.name] = bound in out  # whether the bound pod was a candidate
            if bound in out:
                out[bound] = 1.0
        return out

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """Return the session token (header strategy) or bind the session to the pick."""
        pick = result.pick_of(self.profile)
        if pick is None:
            return
        if self.strategy == "encoded_endpoint_header":
            result.response_headers[self.header] = encode_token(pick.id)
            return
        sid = self.session_id(request)
        if not sid:
            return
        present = request.state.pop(self.name, None)
        self.bindings.bind(sid, pick.id, present)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """Forget sessions bound to pods that left the pool."""
        self.bindings.forget_endpoints(e.id for e in removed)


# -- context-length-aware ------------------------------------------------------------------------


class ContextLengthParams(ConfigModel):
    """Parameters of ``context-length-aware``.

    Attributes:
        label: Pod label holding the ``"<min>-<max>"`` token range it serves.
        enable_filtering: Also drop pods whose range excludes the prompt (unlabeled pods pass,
            malformed labels are dropped).
    """

    label: str = Field(CONTEXT_LENGTH_LABEL, min_length=1)
    enable_filtering: bool = False


def parse_range(text: str) -> tuple[int, int] | None:
    """``"min-max"`` -> (min, max), None when malformed or min > max."""
    parts = text.split("-")
    if len(parts) != 2:
        return None
    try:
        lo, hi = int(parts[0].strip()), int(parts[1].strip())
    except ValueError:
        return None
    return (lo, hi) if lo <= hi else None


def range_score(length: int, lo: int, hi: int) -> float:
    """Upstream's range score: inside a range, narrower ranges and more headroom score higher
    (0.3 + 0.7 * (0.7 * width score + 0.3 * headroom)); outside, 0.3 decaying with distance."""
    fallback = 0.3
    if lo <= length <= hi:
        width = hi - lo
        if width == 0:
            return 1.0
        width_score = 1.0 / (1.0 + width / 10000.0)
        headroom = (hi - length) / width
        return fallback + (0.7 * width_score + 0.3 * headroom) * (1.0 - fallback)
    distance = length - hi if length > hi else lo - length
    return fallback / (1.0 + distance / 1000.0)


class ContextLengthAware:
    """``context-length-aware``: scores (and optionally filters) pods by the token range in
    their label; unlabeled pods score 0.5, malformed labels 0."""

    def __init__(self, params: ContextLengthParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.label = params.label
        self.enable_filtering = params.enable_filtering

    def filter(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        if not self.enable_filtering:
            return endpoints
        n = _prompt_tokens(request)
        out: list[Endpoint] = []
        for e in endpoints:
            text = e.labels.get(self.label)
            if text is None:
                out.append(e)
                continue
            r = parse_range(text)
            if r is not None and r[0] <= n <= r[1]:
                out.append(e)
        return out

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        n = _prompt_tokens(request)
        out: dict[str, float] = {}
        for e in endpoints:
            text = e.labels.get(self.label)
            if text is None:
                out[e.id] = 0.5
                continue
            r = parse_range(text)
            out[e.id] = 0.0 if r is None else range_score(n, *r)
        return out


# -- header-label-affinity-scorer ------------------------------------------------------------------


class HeaderLabelParams(ConfigModel):
    """Parameters of ``header-label-affinity-scorer`` (both required)."""

    header_name: str = Field(min_length=1)
    label_key: str = Field(min_length=1)


class HeaderLabelAffinityScorer:
    """``header-label-affinity-scorer``: 1.0 for pods whose ``labelKey`` label equals the
    request's ``headerName`` header, else 0 (no header: 0 everywhere)."""

    def __init__(self, params: HeaderLabelParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.header = params.header_name.lower()
        self.label = params.label_key

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        wanted = request.headers.get(self.header, "")
        return {e.id: float(bool(wanted) and e.labels.get(self.label) == wanted) for e in endpoints}


# -- endpoint-attribute-filter / -scorer ------------------------------------------------------------

_OPS: dict[str, Callable[[float, float], bool]] = {
    "LessThan": lambda v, t: v < t,
    "LessThanOrEqual": lambda v, t: v <= t,
    "GreaterThan": lambda v, t: v > t,
    "GreaterThanOrEqual": lambda v, t: v >= t,
    "Equal": lambda v, t: v == t,
    "NotEqual": lambda v, t: v != t,
}


def _check_attribute(name: str, producer: str | None) -> None:
    if producer is None and "/" in name:
        head, _, tail = name.rpartition("/")
        raise ValueError(
            f"attribute {name!r} contains '/' but no producer is set; split it into attribute "
            f"{head!r} and producer {tail!r}"
        )


class Threshold(ConfigModel):
    """``algorithm.threshold``: keep endpoints whose value `operator` `value` holds."""

    operator: Literal[
        "LessThan", "LessThanOrEqual", "GreaterThan", "GreaterThanOrEqual", "Equal", "NotEqual"
    ]
    value: float


class FilterAlgorithm(ConfigModel):
    """``algorithm`` of ``endpoint-attribute-filter`` (``threshold`` only, as upstream)."""

    type: Literal["threshold"]
    threshold: Threshold


class EndpointAttributeFilterParams(ConfigModel):
    """Parameters of ``endpoint-attribute-filter``.

    Attributes:
        attribute: The endpoint attribute (see `endpoint_attribute`).
        producer: The plugin producing the attribute: a configured plugin that publishes
            attributes (``dcgm-extractor``) is read; otherwise attributes are read by name from
            the endpoints' metrics (upstream's core metrics extractor).
        on_missing: ``Pass`` (default) or ``Fail`` for endpoints without the attribute.
        fallback_on_empty: Keep every endpoint when none passes.
        algorithm: ``{type: threshold, threshold: {operator, value}}``.
    """

    attribute: str = Field(min_length=1)
    producer: str | None = None
    on_missing: Literal["Pass", "Fail"] = "Pass"
    fallback_on_empty: bool = False
    algorithm: FilterAlgorithm

    @model_validator(mode="after")
    def _split_attribute(self) -> EndpointAttributeFilterParams:
        _check_attribute(self.attribute, self.producer)
        return self


class EndpointAttributeFilter:
    """``endpoint-attribute-filter``: keeps endpoints whose attribute passes the threshold."""

    def __init__(self, params: EndpointAttributeFilterParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.attribute = params.attribute
        self.pass_missing = params.on_missing == "Pass"
        self.fallback = params.fallback_on_empty
        self.op = _OPS[params.algorithm.threshold.operator]
        self.value = params.algorithm.threshold.value
        self.source = _AttributeSource(params.producer, ctx)

    def filter(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        out: list[Endpoint] = []
        for e in endpoints:
            v = self.source.value(ctx, e, self.attribute)
            if (v is None and self.pass_missing) or (v is not None and self.op(v, self.value)):
                out.append(e)
        return endpoints if not out and self.fallback else out


class FixedRange(ConfigModel):
    """``normalization.fixedRange``: values are mapped from [min, max] (clamped)."""

    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> FixedRange:
        if self.min >= self.max:
            raise ValueError(f"fixedRange requires min < max, got min {self.min}, max {self.max}")
        return self


class AdaptiveRange(ConfigModel):
    """``normalization.adaptiveRange``: min-max over the candidates (the default)."""


class Normalization(ConfigModel):
    """At most one of ``fixedRange`` / ``adaptiveRange``."""

    fixed_range: FixedRange | None = None
    adaptive_range: AdaptiveRange | None = None

    @model_validator(mode="after")
    def _one(self) -> Normalization:
        if self.fixed_range is not None and self.adaptive_range is not None:
            raise ValueError("at most one normalization: fixedRange or adaptiveRange")
        return self


class ScorerAlgorithm(ConfigModel):
    """``algorithm`` of ``endpoint-attribute-scorer``."""

    type: Literal["linear_lower_is_better", "linear_higher_is_better"]
    normalization: Normalization = Field(default_factory=Normalization)


class EndpointAttributeScorerParams(ConfigModel):
    """Parameters of ``endpoint-attribute-scorer``.

    Attributes:
        attribute_key: The endpoint attribute (see `endpoint_attribute`).
        producer: The plugin producing the attribute (as for ``endpoint-attribute-filter``).
        algorithm: ``linear_lower_is_better`` / ``linear_higher_is_better`` and normalization.
    """

    attribute_key: str = Field(min_length=1)
    producer: str | None = None
    algorithm: ScorerAlgorithm

    @model_validator(mode="after")
    def _split_attribute(self) -> EndpointAttributeScorerParams:
        _check_attribute(self.attribute_key, self.producer)
        return self


class EndpointAttributeScorer:
    """``endpoint-attribute-scorer``: a linear score of an endpoint attribute, normalized over a
    fixed range or min-max over the candidates (all equal: 1.0); missing values score 0."""

    def __init__(self, params: EndpointAttributeScorerParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.attribute = params.attribute_key
        self.lower_is_better = params.algorithm.type == "linear_lower_is_better"
        self.fixed = params.algorithm.normalization.fixed_range
        self.source = _AttributeSource(params.producer, ctx)

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        values = {e.id: self.source.value(ctx, e, self.attribute) for e in endpoints}
        known = [v for v in values.values() if v is not None]
        out: dict[str, float] = {}
        if self.fixed is not None:
            lo, hi = self.fixed.min, self.fixed.max
        elif known:
            lo, hi = min(known), max(known)
        for eid, v in values.items():
            if v is None:
                out[eid] = 0.0
            elif self.fixed is None and hi == lo:
                out[eid] = 1.0
            else:
                x = min(1.0, max(0.0, (v - lo) / (hi - lo)))
                out[eid] = 1.0 - x if self.lower_is_better else x
        return out


def register(registry: PluginRegistry) -> None:
    """Register the affinity scorers and the endpoint-attribute plugins."""
    registry.register(
        "lora-affinity-scorer",
        LoraAffinityScorer,
        description="prefers pods running the request's LoRA adapter, then free adapter slots",
    )
    registry.register(
        "session-affinity-scorer",
        SessionAffinityScorer,
        params=SessionAffinityParams,
        kinds=("scorer", "pre-request"),
        description="keeps a session on the pod it was sent to",
    )
    registry.register(
        "context-length-aware",
        ContextLengthAware,
        params=ContextLengthParams,
        description="prefers (or keeps only) pods whose token-range label fits the prompt",
    )
    registry.register(
        "header-label-affinity-scorer",
        HeaderLabelAffinityScorer,
        params=HeaderLabelParams,
        description="prefers pods whose label equals a request header",
    )
    registry.register(
        "endpoint-attribute-filter",
        EndpointAttributeFilter,
        params=EndpointAttributeFilterParams,
        description="keeps endpoints whose attribute passes a threshold",
    )
    registry.register(
        "endpoint-attribute-scorer",
        EndpointAttributeScorer,
        params=EndpointAttributeScorerParams,
        description="linear score of an endpoint attribute",
    )
