"""The answer that carries a routing decision to Envoy, in the shape of each body mode.

Built from the decision alone (`routing_answer`): the destination header and ``envoy.lb``
dynamic metadata, the routing headers for the target pod's sidecar (P/D prefill pick), a
client's copies of the system headers removed, and the request body sent back where the mode
needs it. `kvaware_scorer.epp.stream` decides when to answer; names and fixed message shapes
live in `kvaware_scorer.epp.wire`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from kvaware_scorer.epp.wire import (
    BUFFERED,
    DESTINATION,
    FULL_DUPLEX,
    PREFILL_HEADER,
    PREFILL_PROFILE,
    SCORES,
    SYSTEM_HEADERS,
    format_endpoint,
    set_header,
    streamed_request_body,
)
from kvaware_scorer.scheduler import SchedulingResult

if TYPE_CHECKING:
    from kvaware_scorer.epp.config import EppConfig

__all__ = ["routing_answer"]


def routing_answer(
    msg: ep.ProcessingRequest,
    result: SchedulingResult,
    body: bytes,
    *,
    req_mode: int,
    trailers: bool,
    client_headers: Mapping[str, str],
    request_id: str | None,
    rewritten: bool,
    config: EppConfig,
) -> list[Any]:
    """The messages answering `msg` with `result`.

    Args:
        msg: The message the decision answers (request headers, body or trailers).
        result: The decision.
        body: The request body as it goes on (rewritten when `rewritten`).
        req_mode: The stream's request body mode.
        trailers: Whether request trailers follow (the streamed body then does not end).
        client_headers: The request's headers as the client sent them.
        request_id: An ``x-request-id`` to set (Envoy's request had none), else None.
        rewritten: Whether the body was rewritten (its length changed).
        config: The EPP's settings.
    """
    value = ",".join(format_endpoint(e) for e in result.targets)
    mutation = _routing_mutation(result, value, client_headers, request_id)
    md = _routing_metadata(result, value, config.emit_endpoint_scores)
    kind = msg.WhichOneof("request")
    if kind == "request_headers" and msg.request_headers.end_of_stream:
        return [_headers_answer(mutation, md)]
    if req_mode in BUFFERED:
        common = ep.CommonResponse(header_mutation=mutation, clear_route_cache=True)
        if rewritten:
            common.body_mutation.body = body
        return [
            ep.ProcessingResponse(
                request_body=ep.BodyResponse(response=common), dynamic_metadata=md
            )
        ]
    if req_mode != FULL_DUPLEX:
        return [_headers_answer(mutation, md)]
    if rewritten:
        mutation.remove_headers.append("content-length")
    return [
        _headers_answer(mutation, md),
        *_streamed_body(body, eos=not trailers, step=config.body_chunk_bytes),
    ]


def _routing_headers(result: SchedulingResult) -> dict[str, str]:
    """Routing headers for the target pod.

    Those the pre-request hooks put on the result (``headers``, where the scheduler has it) go
    as they are; otherwise a ``prefill`` profile's pick is named for the decode pod's sidecar,
    as upstream's P/D handlers do.
    """
    routing: dict[str, str] = dict(getattr(result, "headers", None) or {})
    prefill = result.profile_results.get(PREFILL_PROFILE)
    if (
        PREFILL_HEADER not in routing
        and prefill is not None
        and result.profile != PREFILL_PROFILE
        and prefill.targets
    ):
        routing[PREFILL_HEADER] = format_endpoint(prefill.targets[0])
    return routing


def _headers_answer(mutation: ep.HeaderMutation, md: struct_pb2.Struct) -> ep.ProcessingResponse:
    """A request-headers answer carrying the routing mutation and the ``envoy.lb`` metadata."""
    common = ep.CommonResponse(header_mutation=mutation, clear_route_cache=True)
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(response=common), dynamic_metadata=md
    )


def _routing_mutation(
    result: SchedulingResult,
    value: str,
    client_headers: Mapping[str, str],
    request_id: str | None,
) -> ep.HeaderMutation:
    """The destination and routing headers, minus a client's copies of the system headers."""
    mutation = ep.HeaderMutation(set_headers=[set_header(DESTINATION, value)])
    routing = _routing_headers(result)
    for key, val in routing.items():
        mutation.set_headers.append(set_header(key, val))
    # A client's copies of the system headers go (those set above are overwritten).
    mutation.remove_headers.extend(
        h for h in SYSTEM_HEADERS[1:] if h in client_headers and h not in routing
    )
    if request_id is not None:
        mutation.set_headers.append(set_header("x-request-id", request_id))
    return mutation


def _routing_metadata(result: SchedulingResult, value: str, scores: bool) -> struct_pb2.Struct:
    """The ``envoy.lb`` dynamic metadata: the destination and, if `scores`, the totals."""
    md = struct_pb2.Struct()
    lb = md.fields["envoy.lb"].struct_value.fields
    lb[DESTINATION].string_value = value
    if scores:
        lb[SCORES].string_value = ",".join(f"{k}:{v:.4f}" for k, v in sorted(result.totals.items()))
    return md


def _streamed_body(body: bytes, *, eos: bool, step: int) -> list[Any]:
    """The body sent back as ``streamed_response`` chunks of `step` bytes."""
    if len(body) <= step:
        return [streamed_request_body(body, eos)]
    last = (len(body) - 1) // step
    return [
        streamed_request_body(body[i * step : (i + 1) * step], eos and i == last)
        for i in range(last + 1)
    ]
