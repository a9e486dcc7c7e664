"""The wire side of the Endpoint Picker Protocol: header and metadata names, Envoy's message
shapes (answers built once where they never change), header and metadata access, and reading the
``usage`` of an OpenAI answer from its JSON body or its SSE chunks as they pass by.
"""

from __future__ import annotations

from typing import Any

import msgspec
from envoy.config.core.v3 import base_pb2 as core
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2

from kvaware_scorer.gateway.accounting import Usage, usage_of_events, usage_of_json
from kvaware_scorer.gateway.protocol import error_body
from kvaware_scorer.scheduler import Endpoint

__all__ = [
    "AS_IT_COMES",
    "DESTINATION",
    "DROPPED_REASON",
    "PREFILL_HEADER",
    "ROUTING_HEADERS",
    "SERVED",
    "SUBSET_HINT",
    "SUBSET_KEY",
    "SYSTEM_HEADERS",
    "Usage",
    "UsageReader",
    "endpoint_id",
    "format_endpoint",
    "headers_of",
    "immediate_response",
    "metadata_value",
    "set_header",
    "streamed_request_body",
    "streamed_response_body",
]

#: Request header and ``envoy.lb`` metadata key naming the chosen endpoint(s) (``ip:port[,…]``).
DESTINATION = "x-gateway-destination-endpoint"
#: ``envoy.lb`` metadata key written by the load balancer: the endpoint that served.
SERVED = "x-gateway-destination-endpoint-served"
#: ``envoy.lb`` metadata key with the primary profile's totals (``--emit-endpoint-scores``).
SCORES = "x-gateway-destination-endpoint-scores"
#: Metadata namespace and key of the endpoint subset hint.
SUBSET_HINT = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
#: Response header naming why the EPP answered a request itself.
DROPPED_REASON = "x-llm-d-request-dropped-reason"
#: Header telling a decode pod's sidecar where the prefill pod is (P/D disaggregation).
PREFILL_HEADER = "x-prefiller-host-port"
#: Model rewrite request headers (current name first, then GIE's deprecated one).
REWRITE_HEADERS = ("x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite")
#: The scheduler's routing headers (P/D prefill pick, E/P/D encoders, data-parallel target).
ROUTING_HEADERS = (PREFILL_HEADER, "x-encoder-hosts-ports", "x-data-parallel-host-port")
#: Headers only the EPP may set: a client's copies are removed before the request goes on.
SYSTEM_HEADERS = (DESTINATION, SERVED, DESTINATION + "-fallback", *ROUTING_HEADERS)
#: Conformance test hooks (GIE ``pkg/lwepp``).
TEST_SELECTION = "test-epp-endpoint-selection"
TEST_SERVED = "x-conformance-test-served-endpoint"
#: Response header naming the serving endpoint (`EppConfig.endpoint_header`).
ENDPOINT_HEADER = "x-kvaware-endpoint"
#: The profile whose pick is the prefill pod (upstream's P/D handlers name it so).
PREFILL_PROFILE = "prefill"

FULL_DUPLEX = pm.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = (pm.ProcessingMode.BUFFERED, pm.ProcessingMode.BUFFERED_PARTIAL)
#: Response body modes in which the EPP sees an answer's chunks as the pod sends them.
AS_IT_COMES = (pm.ProcessingMode.STREAMED, pm.ProcessingMode.FULL_DUPLEX_STREAMED)
OVERWRITE = core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
CONTINUE = ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=ep.CommonResponse()))
DROP_LENGTH = ep.ProcessingResponse(
    request_headers=ep.HeadersResponse(
        response=ep.CommonResponse(
            header_mutation=ep.HeaderMutation(remove_headers=["content-length"])
        )
    )
)
EMPTY_REQUEST_BODY = ep.ProcessingResponse(
    request_body=ep.BodyResponse(response=ep.CommonResponse())
)
EMPTY_RESPONSE_BODY = ep.ProcessingResponse(
    response_body=ep.BodyResponse(response=ep.CommonResponse())
)
REQUEST_TRAILERS = ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
RESPONSE_TRAILERS = ep.ProcessingResponse(response_trailers=ep.TrailersResponse())


def headers_of(msg: ep.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        # NOTE: Envoy sends values as raw_value (bytes); value is the legacy string field.
        out[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def set_header(key: str, value: str) -> core.HeaderValueOption:
    return core.HeaderValueOption(
        header=core.HeaderValue(key=key, raw_value=value.encode()), append_action=OVERWRITE
    )


def metadata_value(md: Any, namespace: str, key: str) -> Any:
    """A value of the forwarded metadata (``metadata_context.filter_metadata``), or None."""
    fm = md.filter_metadata
    if namespace not in fm:
        return None
    fields = fm[namespace].fields
    if key not in fields:
        return None
    v = fields[key]
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "list_value":
        return [
            x.string_value for x in v.list_value.values if x.WhichOneof("kind") == "string_value"
        ]
    return None


def endpoint_id(value: str) -> str:
    """``ip:port`` of a destination string (IPv6 brackets dropped)."""
    host, _, port = value.strip().rpartition(":")
    return f"{host.strip('[]')}:{port}"


def format_endpoint(e: Endpoint) -> str:
    """``ip:port`` as the protocol writes it (IPv6 bracketed)."""
    return f"[{e.address}]:{e.port}" if ":" in e.address else f"{e.address}:{e.port}"


def streamed_request_body(data: bytes, eos: bool) -> ep.ProcessingResponse:
    """A request-body answer sending `data` on as a ``streamed_response`` chunk."""
    return ep.ProcessingResponse(
        request_body=ep.BodyResponse(
            response=ep.CommonResponse(
                body_mutation=ep.BodyMutation(
                    streamed_response=ep.StreamedBodyResponse(body=data, end_of_stream=eos)
                )
            )
        )
    )


def streamed_response_body(data: bytes, eos: bool) -> ep.ProcessingResponse:
    """A response-body answer echoing `data` as a ``streamed_response`` chunk (FULL_DUPLEX)."""
    return ep.ProcessingResponse(
        response_body=ep.BodyResponse(
            response=ep.CommonResponse(
                body_mutation=ep.BodyMutation(
                    streamed_response=ep.StreamedBodyResponse(body=data, end_of_stream=eos)
                )
            )
        )
    )


def immediate_response(
    status: int, reason: str, message: str, code: str | None
) -> ep.ProcessingResponse:
    """An ``ImmediateResponse``: `status`, the OpenAI error body and upstream's dropped-reason
    header."""
    typ = "invalid_request_error" if status < 500 else "server_error"
    body = msgspec.json.encode(error_body(message, typ, None, code))
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=ep.HeaderMutation(
                set_headers=[
                    set_header("content-type", "application/json"),
                    set_header(DROPPED_REASON, reason),
                ]
            ),
            body=body,
            details=reason,
        )
    )


class UsageReader:
    """Finds the ``usage`` of an answer in its body as it passes, chunk by chunk.

    SSE: complete ``data:`` lines naming ``usage`` are decoded (an incomplete last line is held,
    at most `limit` bytes). JSON: the last `limit` bytes are kept; usage is a top-level field at
    the end of vLLM's answers, so the object from its key on decodes by itself.

    Args:
        limit: Bytes kept (`EppConfig.max_usage_bytes`).
    """

    __slots__ = ("_pending", "_tail", "limit", "sse", "usage")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sse = False
        self.usage: Usage | None = None
        self._pending = b""
        self._tail = b""

    def feed(self, data: bytes) -> None:
        """Read one chunk of the answer."""
        limit = self.limit
        if self.sse:
            chunk = self._pending + data if self._pending else data
            cut = chunk.rfind(b"\n")
            self._pending = chunk[cut + 1 :][-limit:]
            if cut >= 0 and b'"usage"' in chunk:
                usage = usage_of_events(chunk[:cut])
                if usage is not None:
                    self.usage = usage
        else:
            tail = self._tail + data
            self._tail = tail[-limit:] if len(tail) > limit else tail

    def close(self) -> Usage | None:
        """The usage found, once the answer has ended."""
        if self.sse:
            if self._pending and b'"usage"' in self._pending:
                self.feed(b"\n")
            return self.usage
        tail = self._tail
        if not tail or b'"usage"' not in tail:
            return self.usage
        candidates = [tail] if tail.lstrip().startswith(b"{") else []
        at = tail.rfind(b'"usage"')
        candidates.append(b"{" + tail[at:])
        for raw in candidates:
            usage = usage_of_json(raw)
            if usage is not None:
                self.usage = usage
                break
        return self.usage
