"""Prometheus metrics of the Endpoint Picker, under the Go EPP's names where they exist.

Upstream names (``inference_objective_*``, ``inference_pool_*``) keep existing dashboards working
when kvaware replaces the Go EPP; kvaware's own additions are prefixed ``kvaware_epp_``. The
``model_name`` label comes from requests, so its values are bounded (`MAX_MODEL_LABELS`); later
models are counted under ``other`` (and ``kvaware_epp_model_labels_overflow_total``).
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["MAX_MODEL_LABELS", "EppMetrics", "ModelMetrics"]

#: Distinct ``model_name`` / ``target_model_name`` label values kept; later ones become "other".
MAX_MODEL_LABELS = 64

_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_DURATION = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1200)


class ModelMetrics:
    """The label children of one (model, target model) pair, resolved once (hot path)."""

    __slots__ = ("duration", "input_tokens", "output_tokens", "requests", "running")

    def __init__(self, m: EppMetrics, model: str, target: str) -> None:
        self.requests = m.requests.labels(model, target)
        self.running = m.running.labels(model)
        self.duration = m.duration.labels(model, target)
        self.input_tokens = m.input_tokens.labels(model, target)
        self.output_tokens = m.output_tokens.labels(model, target)


class EppMetrics:
    """Metrics of one Endpoint Picker, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Long by nature: one flat declaration per metric (upstream's names), read as a table.
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "inference_objective_request_total",
            "Requests routed, by requested and target model",
            ["model_name", "target_model_name"],
            registry=r,
        )
        self.request_errors = Counter(
            "inference_objective_request_error_total",
            "Requests answered by the EPP with an error, by error code",
            ["model_name", "target_model_name", "error_code"],
            registry=r,
        )
        self.running = Gauge(
            "inference_objective_running_requests",
            "Requests routed whose response has not ended",
            ["model_name"],
            registry=r,
        )
        self.duration = Histogram(
            "inference_objective_request_duration_seconds",
            "From the request headers to the end of the response",
            ["model_name", "target_model_name"],
            buckets=_DURATION,
            registry=r,
        )
        self.input_tokens = Histogram(
            "inference_objective_input_tokens",
            "Prompt tokens reported by the model server",
            ["model_name", "target_model_name"],
            buckets=_TOKENS,
            registry=r,
        )
        self.output_tokens = Histogram(
            "inference_objective_output_tokens",
            "Completion tokens reported by the model server",
            ["model_name", "target_model_name"],
            buckets=_TOKENS,
            registry=r,
        )
        self.ready_pods = Gauge(
            "inference_pool_ready_pods",
            "Endpoints in the pool",
            ["name"],
            registry=r,
        )
        self.streams = Counter(
            "kvaware_epp_streams_total",
            "ext_proc streams by outcome (routed, immediate, aborted, unrouted)",
            ["outcome"],
            registry=r,
        )
        self.immediate = Counter(
            "kvaware_epp_immediate_responses_total",
            "Requests answered by the EPP itself, by status and dropped reason",
            ["code", "reason"],
            registry=r,
        )
        self.route_latency = Histogram(
            "kvaware_epp_route_latency_seconds",
            "From the end of the request body to the routing answer (parse + schedule)",
            buckets=_LATENCY,
            registry=r,
        )
        self.served_elsewhere = Counter(
            "kvaware_epp_served_elsewhere_total",
            "Responses served by another endpoint than the primary pick (fallback)",
            registry=r,
        )
        self.model_overflow = Counter(
            "kvaware_epp_model_labels_overflow_total",
            f"Requests whose model was counted as 'other' (over {MAX_MODEL_LABELS} label values)",
            registry=r,
        )
        self._models: set[str] = set()
        self._lock = threading.Lock()
        # NOTE: bounded by MAX_MODEL_LABELS squared (plus "other"), as the labels are.
        self._children: dict[tuple[str, str], ModelMetrics] = {}
        self.routed = self.streams.labels("routed")
        self.aborted = self.streams.labels("aborted")

    def for_model(self, model: str, target: str) -> ModelMetrics:
        """The children of (model, target) label values (already bounded by `model_label`)."""
        key = (model, target)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = ModelMetrics(self, model, target)
        return found

    def model_label(self, model: str) -> str:
        """`model` as a label value, or ``other`` once `MAX_MODEL_LABELS` values are in use."""
        if model in self._models:
            return model
        with self._lock:
            if len(self._models) < MAX_MODEL_LABELS:
                self._models.add(model)
                return model
        self.model_overflow.inc()
        return "other"
