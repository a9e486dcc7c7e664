"""The scheduler's own Prometheus metrics, registered next to the indexer's (one registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["SchedulerMetrics"]

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class SchedulerMetrics:
    """Scheduling, plugin-failure, endpoint and scrape metrics in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.schedule_latency = Histogram(
            "kvaware_schedule_latency_seconds",
            "Scheduler.schedule latency (filters, scorers, picker, pre-request hooks)",
            buckets=_BUCKETS,
            registry=r,
        )
        self.no_endpoint = Counter(
            "kvaware_schedule_no_endpoint",
            "Scheduling calls that found no endpoint, by stage",
            ["stage"],
            registry=r,
        )
        self.plugin_errors = Counter(
            "kvaware_plugin_errors",
            "Exceptions raised by plugins (scored as 0 or skipped), by plugin and call",
            ["plugin", "call"],
            registry=r,
        )
        self.endpoints = Gauge("kvaware_endpoints", "Endpoints in the pool", registry=r)
        self.endpoint_reloads = Counter(
            "kvaware_endpoint_reloads", "Endpoints-file reloads, by result", ["result"], registry=r
        )
        self.scrapes = Counter(
            "kvaware_metrics_scrapes", "Pod /metrics scrapes, by result", ["result"], registry=r
        )
        self.scrape_latency = Histogram(
            "kvaware_metrics_scrape_latency_seconds",
            "Fetch + parse time of one pod's /metrics",
            buckets=_BUCKETS,
            registry=r,
        )
        self.stale_endpoints = Gauge(
            "kvaware_stale_endpoints",
            "Endpoints whose metrics are unknown (stale or never scraped) at the last scrape",
            registry=r,
        )
