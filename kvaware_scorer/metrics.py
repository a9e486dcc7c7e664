"""Prometheus metrics (prefix ``kvaware_``), held by an object with its own registry.

No module-level collectors: each `Metrics` owns a `CollectorRegistry`, so several indexers (and
tests) never collide. The gateway serves ``metrics.registry``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (
    0.00005,
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
    1.0,
)


class Metrics:
    """Every kvaware metric, registered in `registry` (a new one when not given).

    The metrics are created by part of the package (index, read path, write path, scheduling),
    in the order the exposition lists them.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._index_metrics(r)
        self._read_path_metrics(r)
        self._event_metrics(r)
        self._stream_metrics(r)
        self._scheduling_metrics(r)

    def _index_metrics(self, r: CollectorRegistry) -> None:
        """The index: its size and its capacity evictions."""
        self.index_entries = Gauge(
            "kvaware_index_entries", "(block, pod) entries in the index", registry=r
        )
        self.index_blocks = Gauge(
            "kvaware_index_blocks", "Distinct block keys in the index", registry=r
        )
        self.index_pods = Gauge("kvaware_index_pods", "Pods with entries in the index", registry=r)
        self.index_evictions = Gauge(
            "kvaware_index_evictions",
            "Blocks evicted by the index's capacity bound (cumulative)",
            registry=r,
        )

    def _read_path_metrics(self, r: CollectorRegistry) -> None:
        """The read path: lookups, scoring, tokenization and their errors."""
        self.lookups = Counter("kvaware_lookups", "Prompt lookups against the index", registry=r)
        self.lookup_blocks = Counter("kvaware_lookup_blocks", "Prompt blocks looked up", registry=r)
        self.hit_blocks = Counter(
            "kvaware_hit_blocks",
            "Blocks of looked-up prompts held by the best candidate",
            registry=r,
        )
        self.score_latency = Histogram(
            "kvaware_score_latency_seconds",
            "Indexer.score latency (keys + lookup + scoring)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenization_latency = Histogram(
            "kvaware_tokenization_latency_seconds",
            "Text -> token ids latency",
            ["source"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenizer_loads = Counter(
            "kvaware_tokenizer_loads",
            "Tokenizer loads, by result (loaded, not_found)",
            ["result"],
            registry=r,
        )
        self.prefix_store_lookups = Counter(
            "kvaware_prefix_store_lookups",
            "Prefix-store lookups, by result (hit, partial: too little cached, miss)",
            ["result"],
            registry=r,
        )
        self.chat_renders = Counter(
            "kvaware_chat_renders",
            "Renders of request-supplied chat templates, by result (ok, error, timeout, size, "
            "busy, worker, again: refused again from memory)",
            ["result"],
            registry=r,
        )
        self.prefix_store_entries = Gauge(
            "kvaware_prefix_store_entries", "Text chunks held by the prefix store", registry=r
        )
        self.score_errors = Counter(
            "kvaware_score_errors",
            "Score calls that degraded to zeros, by reason",
            ["reason"],
            registry=r,
        )
        self.backend_errors = Counter(
            "kvaware_backend_errors", "Index backend failures, by operation", ["op"], registry=r
        )

    def _event_metrics(self, r: CollectorRegistry) -> None:
        """The write path: KV events applied and what was dropped from them."""
        self.events = Counter("kvaware_events", "KV events applied, by type", ["type"], registry=r)
        self.blocks_stored = Counter(
            "kvaware_blocks_stored", "Blocks stored by KV events", registry=r
        )
        self.blocks_removed = Counter(
            "kvaware_blocks_removed", "Blocks removed by KV events", registry=r
        )
        self.dropped = Counter(
            "kvaware_dropped_messages",
            "Messages or events dropped, by reason",
            ["reason"],
            registry=r,
        )
        self.orphaned_blocks = Counter(
            "kvaware_orphaned_blocks",
            "Stored blocks whose parent was unknown (not indexed)",
            registry=r,
        )

    def _stream_metrics(self, r: CollectorRegistry) -> None:
        """The write path: per-pod streams (gaps, replays, purges) and event lag."""
        self.seq_gaps = Counter(
            "kvaware_seq_gaps", "Sequence gaps detected in pod streams", registry=r
        )
        self.lost_batches = Counter(
            "kvaware_lost_batches",
            "Event batches known lost (gaps not recovered by replay)",
            registry=r,
        )
        self.replays = Counter(
            "kvaware_replays", "Replay requests, by result", ["result"], registry=r
        )
        self.purges = Counter("kvaware_purges", "Pod purges, by reason", ["reason"], registry=r)
        self.event_batches = Counter(
            "kvaware_event_batches",
            "KV-event batches (payload frames) applied, by source (live, replay, unsequenced)",
            ["source"],
            registry=r,
        )
        self.blocks_skipped = Counter(
            "kvaware_blocks_skipped",
            "Blocks in valid events deliberately not applied, by reason",
            ["reason"],
            registry=r,
        )
        self.replayed_batches = Counter(
            "kvaware_replayed_batches",
            "Batches recovered from a pod's replay buffer, by reason (gap, join)",
            ["reason"],
            registry=r,
        )
        self.event_lag = Histogram(
            "kvaware_event_lag_seconds",
            "Time from a batch's publisher timestamp to its application (needs synced clocks)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=r,
        )

    def _scheduling_metrics(self, r: CollectorRegistry) -> None:
        """Scheduling decisions."""
        self.decisions = Counter(
            "kvaware_decisions",
            "Scheduling decisions, by chosen endpoint",
            ["endpoint"],
            registry=r,
        )
