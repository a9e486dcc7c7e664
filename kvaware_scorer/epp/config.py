"""The Endpoint Picker's own settings (`EppConfig`): ports, TLS, limits, drain, picking options.

Routing itself (scorers, weights, KV-event ingestion, the index backend) is configured in the
scheduler's EndpointPickerConfig, exactly as for ``kvaware serve``; this model holds what the
ext_proc server needs. The CLI flags of ``kvaware epp`` (named as the Go EPP's) fill it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler.config import parse_duration

__all__ = ["EppConfig"]


class EppConfig(ConfigModel):
    """Settings of the ext_proc Endpoint Picker.

    Attributes:
        host: Address the gRPC, health and metrics servers listen on.
        grpc_port: ext_proc port (0 = a free port).
        grpc_health_port: gRPC health port (``liveness``, ``readiness`` and the ext_proc service
            name); 0 = a free port.
        metrics_port: Prometheus ``/metrics`` HTTP port; 0 = a free port, None = no server.
        secure_serving: Serve ext_proc over TLS (a self-signed certificate unless `cert_path`).
        cert_path: Directory holding ``tls.crt`` and ``tls.key`` (a Kubernetes TLS secret).
        drain_timeout: Seconds in-flight streams may take to finish after SIGTERM.
        grpc_max_recv_msg_size: Largest gRPC message accepted, bytes.
        max_body_bytes: Largest request body buffered for routing; a larger one is answered
            with 413 (the body of a streamed request is held until its end arrives, so this
            bounds the memory of one stream).
        max_streams: Streams processed at once; a request over it is answered with 429
            ``rejected-saturated`` (bounds per-stream state; 0 = no limit).
        max_usage_bytes: Bytes of a non-streamed response body kept to read its ``usage``
            (the last bytes; usage is at the end of vLLM's answers).
        body_chunk_bytes: Size of the ``streamed_response`` chunks a (rewritten) request body
            is sent back in.
        subset_filter: Honour the ``envoy.lb.subset_hint`` endpoint subset.
        emit_endpoint_scores: Add ``envoy.lb/x-gateway-destination-endpoint-scores`` (the
            primary profile's totals) to the dynamic metadata.
        endpoint_header: Add ``x-kvaware-endpoint: <address:port>`` (the endpoint that served)
            to responses; off by default because it reveals pod addresses to clients.
        test_hooks: Honour the GIE conformance hooks (``test-epp-endpoint-selection`` request
            header, ``x-conformance-test-served-endpoint`` response header).
    """

    host: str = "0.0.0.0"
    grpc_port: int = Field(9002, ge=0, le=65535)
    grpc_health_port: int = Field(9003, ge=0, le=65535)
    metrics_port: int | None = Field(9090, ge=0, le=65535)
    secure_serving: bool = True
    cert_path: str | None = None
    drain_timeout: float = Field(30.0, ge=0)
    grpc_max_recv_msg_size: int = Field(4 * 1024 * 1024, ge=1024)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_streams: int = Field(4096, ge=0)
    max_usage_bytes: int = Field(64 * 1024, ge=1024)
    body_chunk_bytes: int = Field(62_000, ge=1024)
    subset_filter: bool = True
    emit_endpoint_scores: bool = False
    endpoint_header: bool = False
    test_hooks: bool = False

    @field_validator("drain_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)
