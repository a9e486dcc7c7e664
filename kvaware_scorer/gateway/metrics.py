"""The gateway's Prometheus metrics (prefix ``kvaware_gateway_``), in their own registry.

``GET /metrics`` serves these after the scheduler's registry (scheduler, indexer and plugin
metrics), so one scrape sees both.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["GatewayMetrics"]

_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class GatewayMetrics:
    """Request, retry, upstream-failure and token metrics of one gateway."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Long by nature: one flat declaration per metric, read as a table.
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kvaware_gateway_requests",
            "Requests answered, by route and HTTP status class (2xx, 4xx, ...)",
            ["route", "status"],
            registry=r,
        )
        self.inflight = Gauge(
            "kvaware_gateway_inflight_requests",
            "Requests forwarded to a pod and not finished yet",
            registry=r,
        )
        self.duration = Histogram(
            "kvaware_gateway_request_duration_seconds",
            "Time from request arrival to the end of the response, by route",
            ["route"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "kvaware_gateway_overhead_seconds",
            "Time from request arrival until it is sent to a pod "
            "(read, parse, schedule; connection setup and retries included)",
            buckets=_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "kvaware_gateway_rejected_requests",
            "Requests refused by the gateway itself, by reason",
            ["reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "kvaware_gateway_upstream_errors",
            "Failures talking to a pod, by endpoint and kind (connect, disconnect, timeout, "
            "mid_stream)",
            ["endpoint", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "kvaware_gateway_retries",
            "Requests sent again to another pod after a connection failure",
            registry=r,
        )
        self.client_disconnects = Counter(
            "kvaware_gateway_client_disconnects",
            "Requests whose client went away before the response ended",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kvaware_gateway_prompt_tokens",
            "Prompt tokens reported by the pods (usage.prompt_tokens)",
            registry=r,
        )
        self.cached_tokens = Counter(
            "kvaware_gateway_cached_tokens",
            "Prompt tokens the pods served from their prefix cache "
            "(usage.prompt_tokens_details.cached_tokens, when reported)",
            registry=r,
        )
        self.completion_tokens = Counter(
            "kvaware_gateway_completion_tokens",
            "Completion tokens reported by the pods (usage.completion_tokens)",
            registry=r,
        )
        self.models_polls = Counter(
            "kvaware_gateway_models_polls",
            "Polls of the pods' GET /v1/models, by result",
            ["result"],
            registry=r,
        )
        self.rejected_connections = Counter(
            "kvaware_gateway_rejected_connections",
            "Client connections refused (limit: over maxClientConnections) or closed before a "
            "complete request head (header_timeout)",
            ["reason"],
            registry=r,
        )
        self.client_connections = Gauge(
            "kvaware_gateway_client_connections",
            "Open client connections",
            registry=r,
        )
        self.lifecycle_errors = Counter(
            "kvaware_gateway_lifecycle_errors",
            "Background parts that failed to start or stop (e.g. a KV-event subscriber)",
            ["stage"],
            registry=r,
        )
