"""The gateway's own settings (`GatewayConfig`): listening address, limits, timeouts, retries.

Routing itself (scorers, weights, KV-event ingestion, the index backend) is configured in the
scheduler's EndpointPickerConfig; this model holds only what the HTTP proxy needs. It loads from
YAML with the same conventions as every kvaware config (camelCase keys, unknown keys refused)::

    host: 0.0.0.0
    port: 8080
    maxBodyBytes: 33554432
    connectTimeout: 2s
    maxAttempts: 3
    drainTimeout: 30s
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from kvaware_scorer.config import ConfigModel, load_model
from kvaware_scorer.configio import load_yaml, parse_duration
from kvaware_scorer.errors import ConfigError

__all__ = ["GatewayConfig", "load_gateway_config"]


class GatewayConfig(ConfigModel):
    """Settings of the routing proxy.

    Durations accept seconds or strings such as ``"500ms"``, ``"2s"``, ``"1m"``.

    Attributes:
        host: Address to listen on.
        port: Port to listen on.
        max_body_bytes: Largest accepted request body; larger ones get 413.
        body_timeout: Seconds a client may take to send its request body; a slower one gets
            408 with ``Connection: close`` (a client that stalls mid-body must not hold a
            handler until shutdown).
        connect_timeout: Seconds to open a connection to a pod before trying the next one.
        read_timeout: Seconds a pod may stay silent (between response bytes) before the request
            fails with 504; 0 = no limit (a long prefill or a long non-streamed generation
            legitimately sends nothing for minutes).
        max_attempts: Pods tried per request when connecting fails (the first pick included).
        unhealthy_cooldown: Seconds a pod that refused a connection is left out of the candidates
            (unless no other candidate remains); 0 = never left out.
        drain_timeout: Seconds graceful shutdown waits for in-flight requests before cancelling
            them.
        upstream_keepalive: Seconds an idle pooled connection to a pod is kept. Below uvicorn's
            default keep-alive (5 s, vLLM's server) so the gateway never reuses a connection the
            pod is closing.
        max_connections: Cap on open connections to all pods together (0 = no cap).
        max_connections_per_endpoint: Cap per pod (0 = no cap).
        models_refresh_interval: Seconds between polls of every pod's ``GET /v1/models``.
        models_timeout: HTTP timeout of one ``/v1/models`` poll.
        endpoint_header: Add ``x-kvaware-endpoint: <address:port>`` to responses (debugging and
            tests; off by default because it reveals pod addresses to clients).
        first_byte_timeout: Seconds a pod may take to start answering a *streamed* request
            (its response headers); then the pod is left out for ``unhealthyCooldown`` and the
            request is tried on another candidate (vLLM starts a stream as soon as it accepts
            the request, so only a hung pod is this slow).
        response_timeout: Seconds a pod may take to answer a *non-streamed* request (vLLM sends
            nothing until the whole generation is done, so this bounds the generation); then
            504 ``upstream_timeout``.
        stream_idle_timeout: Seconds a streamed answer may stay silent between chunks; then the
            stream ends with an SSE error event and ``[DONE]``.
        header_timeout: Seconds a new client connection may take to send its first complete
            request head; then it gets 408 and is closed.
        keepalive_timeout: Seconds an idle client connection is kept open between requests (the
            next request head must also be complete within it).
        max_client_connections: Open client connections at most; one more is answered 503 and
            closed at once. Lowered at start to fit the process's open-file limit.
        max_prompt_chars: Longest text prompt (completions) or total message text (chat) that
            is tokenized; longer gets 413 before any tokenization.
        max_prompt_tokens: Most prompt tokens (given as ids, or after tokenization); more gets
            413.
        trust_request_chat_template: Render a request's own ``chat_template`` (vLLM's
            ``--trust-request-chat-template``). Off: such a request gets 400. On: it is rendered
            in a separate, killable process within the tokenizer pool's render budget.
        api_key_file: File of API keys (one per line; blank lines and ``#`` comments skipped)
            accepted as ``Authorization: Bearer <key>`` on the inference routes.
        api_key_env: Environment variable holding API keys (separated by commas or spaces).
        admin_key_file: File of admin keys: required for ``/v1/score`` and ``/metrics`` (and
            accepted on the inference routes).
        admin_key_env: Environment variable holding admin keys.
        error_log_interval: Seconds between two log lines of the same repeated error (the
            later one says how many were suppressed).
    """

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    body_timeout: float = Field(30.0, gt=0)
    connect_timeout: float = Field(2.0, gt=0)
    read_timeout: float = Field(0.0, ge=0)
    max_attempts: int = Field(3, ge=1, le=16)
    unhealthy_cooldown: float = Field(2.0, ge=0)
    drain_timeout: float = Field(30.0, ge=0)
    upstream_keepalive: float = Field(4.0, gt=0)
    max_connections: int = Field(0, ge=0)
    max_connections_per_endpoint: int = Field(0, ge=0)
    models_refresh_interval: float = Field(10.0, gt=0)
    models_timeout: float = Field(2.0, gt=0)
    endpoint_header: bool = False
    first_byte_timeout: float = Field(60.0, gt=0)
    response_timeout: float = Field(300.0, gt=0)
    stream_idle_timeout: float = Field(120.0, gt=0)
    header_timeout: float = Field(10.0, gt=0)
    keepalive_timeout: float = Field(75.0, gt=0)
    max_client_connections: int = Field(4096, ge=1)
    max_prompt_chars: int = Field(1 << 20, ge=1)
    max_prompt_tokens: int = Field(1 << 18, ge=1)
    trust_request_chat_template: bool = False
    api_key_file: Path | None = None
    api_key_env: str | None = None
    admin_key_file: Path | None = None
    admin_key_env: str | None = None
    error_log_interval: float = Field(10.0, ge=0)

    @field_validator(
        "body_timeout",
        "first_byte_timeout",
        "response_timeout",
        "stream_idle_timeout",
        "header_timeout",
        "keepalive_timeout",
        "error_log_interval",
        "connect_timeout",
        "read_timeout",
        "unhealthy_cooldown",
        "drain_timeout",
        "upstream_keepalive",
        "models_refresh_interval",
        "models_timeout",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)


def load_gateway_config(path: str | Path | None, **overrides: Any) -> GatewayConfig:
    """A `GatewayConfig` from a YAML file (or defaults), with non-None `overrides` applied.

    Args:
        path: YAML file, or None for the defaults.
        overrides: Field values (snake_case) that replace the file's, e.g. from CLI flags.

    Raises:
        ConfigError: Unreadable or invalid file or override: every problem, each naming its
            key (with the file and line for the file's keys).
    """
    model = GatewayConfig()
    if path is not None:
        doc = load_yaml(Path(path))
        raw = {} if doc.data is None else doc.data
        if not isinstance(raw, dict):
            raise ConfigError("the gateway config must be a mapping", source=doc.source, line=1)
        try:
            model = load_model(GatewayConfig, raw)
        except ConfigError as exc:
            raise doc.locate(exc) from None
    updates = {k: v for k, v in overrides.items() if v is not None}
    if updates:
        merged = model.model_dump(by_alias=False)
        merged.update(updates)
        model = load_model(GatewayConfig, merged)
    return model
