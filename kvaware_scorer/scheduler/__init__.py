"""The scheduler host: pluggy hooks, EndpointPickerConfig loading, the filter -> scorers -> picker
pipeline, endpoints and their metrics.

Public API::

    from kvaware_scorer.scheduler import Scheduler, SchedulingRequest, Endpoint
    scheduler = Scheduler.from_yaml("config/precise.yaml", seed=0)
    result = scheduler.schedule(SchedulingRequest("r1", "m", token_ids=[...]), endpoints)
"""

from __future__ import annotations

from kvaware_scorer.scheduler.config import (
    API_VERSION,
    DEPRECATED_API_VERSION,
    ConfigErrorGroup,
    PluginConfig,
    ProfileConfig,
    SchedulerConfig,
    ScorerRef,
    load_config,
    parse_duration,
)
from kvaware_scorer.scheduler.endpoints import EndpointsWatcher, load_endpoints, parse_endpoints
from kvaware_scorer.scheduler.hookspecs import hookimpl, hookspec
from kvaware_scorer.scheduler.manager import (
    BLOCK_ENV,
    ENTRY_POINT_GROUP,
    Hooks,
    make_plugin_manager,
)
from kvaware_scorer.scheduler.matchinfo import MatchInfo, MatchInfoProducer, per_call
from kvaware_scorer.scheduler.pipeline import DEFAULT_METRICS_STALENESS, Scheduler
from kvaware_scorer.scheduler.registry import (
    KINDS,
    NoParameters,
    PluginContext,
    PluginRegistry,
    PluginSpec,
)
from kvaware_scorer.scheduler.scrape import (
    DEFAULT_SCRAPE_INTERVAL,
    MetricsScraper,
    parse_vllm_metrics,
)
from kvaware_scorer.scheduler.types import (
    DATA_PARALLEL_HEADER,
    ENCODER_HEADER,
    PEER_ENDPOINT_KEY,
    PREFILL_HEADER,
    ROUTING_HEADERS,
    ConfiguredPlugin,
    Endpoint,
    EndpointMetrics,
    EndpointsListener,
    Filter,
    FirstTokenListener,
    KVEventSink,
    Lifecycle,
    Picker,
    PostResponse,
    PreRequest,
    ProfileHandler,
    ProfileResult,
    ProfileView,
    RequestPreparer,
    ResolvedConfig,
    ResponseInfo,
    SchedulerView,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
    ScoredEndpoint,
    Scorer,
)

__all__ = [
    "API_VERSION",
    "BLOCK_ENV",
    "DATA_PARALLEL_HEADER",
    "DEFAULT_METRICS_STALENESS",
    "DEFAULT_SCRAPE_INTERVAL",
    "DEPRECATED_API_VERSION",
    "ENCODER_HEADER",
    "ENTRY_POINT_GROUP",
    "KINDS",
    "PEER_ENDPOINT_KEY",
    "PREFILL_HEADER",
    "ROUTING_HEADERS",
    "ConfigErrorGroup",
    "ConfiguredPlugin",
    "Endpoint",
    "EndpointMetrics",
    "EndpointsListener",
    "EndpointsWatcher",
    "Filter",
    "FirstTokenListener",
    "Hooks",
    "KVEventSink",
    "Lifecycle",
    "MatchInfo",
    "MatchInfoProducer",
    "MetricsScraper",
    "NoParameters",
    "Picker",
    "PluginConfig",
    "PluginContext",
    "PluginRegistry",
    "PluginSpec",
    "PostResponse",
    "PreRequest",
    "ProfileConfig",
    "ProfileHandler",
    "ProfileResult",
    "ProfileView",
    "RequestPreparer",
    "ResolvedConfig",
    "ResponseInfo",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerView",
    "SchedulingContext",
    "SchedulingRequest",
    "SchedulingResult",
    "ScoredEndpoint",
    "Scorer",
    "ScorerRef",
    "hookimpl",
    "hookspec",
    "load_config",
    "load_endpoints",
    "make_plugin_manager",
    "parse_duration",
    "parse_endpoints",
    "parse_vllm_metrics",
    "per_call",
]
