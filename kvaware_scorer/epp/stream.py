"""One ext_proc stream (one HTTP request through Envoy): the message flow of the Endpoint Picker
Protocol under each body mode, routing through the shared `Scheduler`, and the response phase
feeding the same per-request accounting as the gateway (`kvaware_scorer.gateway.accounting`:
the shielded decision, the usage schema and how usage lands on `ResponseInfo`).

Names and message shapes of the protocol live in `kvaware_scorer.epp.wire`; the answer that
carries a decision (destination, routing headers, metadata, body per mode) is built by
`kvaware_scorer.epp.answer`.

Request phase:

* FULL_DUPLEX_STREAMED (GIE, Istio, llm-d): the request headers are not answered until the body
  has ended; then, in order, the headers answer (destination header, ``clear_route_cache``,
  ``envoy.lb`` dynamic metadata) and the body sent back as ``streamed_response`` chunks.
* BUFFERED (Envoy AI Gateway): the headers are answered at once; the routing answer rides on the
  body answer (header mutations apply there in this mode only).
* A request without a body (``end_of_stream`` on the headers) is routed on the headers.

A request that cannot be routed is answered with an ``ImmediateResponse``: 400 (unreadable
body), 413 (body over `EppConfig.max_body_bytes`), 429 ``rejected-saturated`` (over
`EppConfig.max_streams`), 503 ``rejected-no-endpoints`` (empty pool, subset hint matching
nothing, every endpoint filtered out), each with upstream's ``x-llm-d-request-dropped-reason``.

Response phase: the served endpoint (``envoy.lb`` ``x-gateway-destination-endpoint-served`` when
the load balancer reports it, else the primary pick), the status, the usage (the JSON body or
the SSE chunk carrying it) and the end of the stream; `Scheduler.post_response` runs exactly
once per routed request, whatever happened (a stream cut by Envoy counts as 499). The first
chunk of a 200 SSE answer is its first token (`Scheduler.first_token`, as the gateway reports
it), when Envoy passes the body on as it comes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from kvaware_scorer.epp.answer import routing_answer
from kvaware_scorer.epp.wire import (
    AS_IT_COMES,
    BUFFERED,
    CONTINUE,
    DROP_LENGTH,
    EMPTY_REQUEST_BODY,
    EMPTY_RESPONSE_BODY,
    ENDPOINT_HEADER,
    FULL_DUPLEX,
    REQUEST_TRAILERS,
    RESPONSE_TRAILERS,
    REWRITE_HEADERS,
    SERVED,
    SUBSET_HINT,
    SUBSET_KEY,
    TEST_SELECTION,
    TEST_SERVED,
    UsageReader,
    endpoint_id,
    headers_of,
    immediate_response,
    metadata_value,
    set_header,
    streamed_request_body,
    streamed_response_body,
)
from kvaware_scorer.errors import NoEndpointError
from kvaware_scorer.gateway.accounting import decide_shielded, record_usage
from kvaware_scorer.gateway.protocol import APIError, ParsedRequest, RequestParser
from kvaware_scorer.scheduler import (
    Endpoint,
    ResponseInfo,
    Scheduler,
    SchedulingRequest,
    SchedulingResult,
)

if TYPE_CHECKING:
    from kvaware_scorer.epp.config import EppConfig
    from kvaware_scorer.epp.metrics import EppMetrics, ModelMetrics

__all__ = ["ProcessStream", "StreamContext"]

logger = logging.getLogger(__name__)


class _Reject(Exception):
    """A request the EPP answers itself (an `ImmediateResponse`)."""

    def __init__(self, status: int, reason: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.code = code


@dataclasses.dataclass
class StreamContext:
    """What every stream of one Endpoint Picker shares.

    Attributes:
        scheduler: The scheduler (its pool is the set of endpoints the EPP may name).
        config: The EPP's settings.
        metrics: The EPP's metrics.
        parser: Request-body parser (shared decoders).
        next_id: Makes a unique request id (in-flight accounting keys on it).
        active: Streams in progress (bounded by ``config.max_streams``).
        on_done: Called when a routed request's accounting is done (drain bookkeeping).
    """

    scheduler: Scheduler
    config: EppConfig
    metrics: EppMetrics
    parser: RequestParser
    next_id: Callable[[], str]
    active: set[ProcessStream] = dataclasses.field(default_factory=set)
    on_done: Callable[[], None] | None = None


class ProcessStream:
    """The state of one ext_proc stream; `serve` turns Envoy's messages into answers."""

    __slots__ = (
        "_body",
        "_body_size",
        "_done",
        "_envoy_id",
        "_finished",
        "_first_byte",
        "_first_token",
        "_info",
        "_mm",
        "_model_bytes",
        "_reader",
        "_rewrite",
        "_routed_at",
        "_subset",
        "ctx",
        "headers",
        "req_mode",
        "request",
        "resp_mode",
        "result",
        "served",
        "started",
        "status",
    )

    def __init__(self, ctx: StreamContext) -> None:
        self.ctx = ctx
        self.req_mode = FULL_DUPLEX
        self.resp_mode = FULL_DUPLEX
        self.headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self.request: SchedulingRequest | None = None
        self.result: SchedulingResult | None = None
        self.served: str | None = None
        self.status = 0
        self.started = time.perf_counter()
        self._routed_at = 0.0
        self._first_byte = 0.0  # when the response headers arrived
        self._first_token = False  # reported to the scheduler
        self._rewrite: tuple[str, str] | None = None  # (original model, rewritten model)
        self._model_bytes: list[tuple[bytes, bytes]] = []
        self._subset: Any = None  # the subset hint sent with the request headers
        self._reader = UsageReader(ctx.config.max_usage_bytes)
        self._info = ResponseInfo(status=0)
        self._finished = False
        self._done = False
        self._mm: ModelMetrics | None = None
        self._envoy_id = ""

    # -- the stream -----------------------------------------------------------------------------

    @staticmethod
    async def serve(owner: Any, messages: Any, context: Any = None) -> AsyncIterator[Any]:
        """Answer Envoy's messages of one stream, in order; accounting is closed when the stream
        ends. `owner` has the `StreamContext` as ``context`` (the gRPC servicer, whose
        ``Process`` this is: one generator per message, not two)."""
        ctx: StreamContext = owner.context
        self = ProcessStream(ctx)
        ctx.active.add(self)
        try:
            first = True
            async for msg in messages:
                if first:
                    first = False
                    if msg.HasField("protocol_config"):
                        pc = msg.protocol_config
                        self.req_mode = pc.request_body_mode
                        self.resp_mode = pc.response_body_mode
                kind = msg.WhichOneof("request")
                if kind == "request_headers":
                    for out in await self._on_request_headers(msg):
                        yield out
                elif kind == "request_body":
                    for out in await self._on_request_body(msg):
                        yield out
                elif kind == "request_trailers":
                    if self.result is None and not self._done:
                        for out in await self._route(msg, trailers=True):
                            yield out
                    if not self._done:
                        yield REQUEST_TRAILERS
                elif kind == "response_headers":
                    yield self._on_response_headers(msg)
                elif kind == "response_body":
                    yield self._on_response_body(msg.response_body)
                elif kind == "response_trailers":
                    self._finish()
                    yield self._with_metadata(RESPONSE_TRAILERS)
                if self._done:
                    return
        finally:
            ctx.active.discard(self)
            if self.result is not None and not self._finished:
                self._info.status = 499
                self._info.error = self._info.error or "stream ended before the response did"
                self._finish(aborted=True)
            elif self.result is None and not self._done:
                ctx.metrics.streams.labels("unrouted").inc()

    # -- request phase --------------------------------------------------------------------------

    async def _on_request_headers(self, msg: ep.ProcessingRequest) -> list[Any]:
        rh = msg.request_headers
        self.headers = headers_of(rh)
        if msg.HasField("metadata_context"):
            self._subset = metadata_value(msg.metadata_context, SUBSET_HINT, SUBSET_KEY)
        self._envoy_id = self.headers.get("x-request-id", "")
        limit = self.ctx.config.max_streams
        if limit and len(self.ctx.active) > limit:
            return [
                self._immediate(
                    _Reject(
                        429,
                        "rejected-saturated",
                        f"The endpoint picker is saturated ({limit} requests in progress).",
                        "rejected_saturated",
                    )
                )
            ]
        if rh.end_of_stream:
            return await self._route(msg, trailers=False)
        if self.req_mode == FULL_DUPLEX:
            return []  # answered once the body has ended
        if self.req_mode in BUFFERED:
            if self._rewrite_target():
                # NOTE: under BUFFERED, Envoy refuses a Content-Length mutation on the body
                # answer and 500s a mutated body that does not match the length; removing the
                # header on the headers answer lets it frame the rewritten body itself.
                return [DROP_LENGTH]
            return [CONTINUE]
        # NOTE: without a body mode that lets the EPP see the whole body before answering the
        # headers (NONE, STREAMED), the request is routed on its headers alone.
        return await self._route(msg, trailers=False)

    async def _on_request_body(self, msg: ep.ProcessingRequest) -> list[Any]:
        rb = msg.request_body
        if self.result is not None or self._done:
            # Routed on the headers already: let the body through untouched.
            if self.req_mode == FULL_DUPLEX:
                return [streamed_request_body(rb.body, rb.end_of_stream)]
            return [EMPTY_REQUEST_BODY]
        if rb.body:
            self._body_size += len(rb.body)
            if self._body_size > self.ctx.config.max_body_bytes:
                return [
                    self._immediate(
                        _Reject(
                            413,
                            "request-too-large",
                            "The request body exceeds the limit of "
                            f"{self.ctx.config.max_body_bytes} bytes.",
                            "request_too_large",
                        )
                    )
                ]
            self._body.append(rb.body)
        if rb.end_of_stream or self.req_mode in BUFFERED:
            return await self._route(msg, trailers=False)
        return []

    def _parse(self, body: bytes) -> ParsedRequest | None:
        """The request's routing fields, or None for a request that is not a completion (it is
        then routed on load alone)."""
        path = self.headers.get(":path", "")
        parser = self.ctx.parser
        try:
            if path.startswith("/v1/chat/completions"):
                return parser.chat(body)
            if path.startswith("/v1/completions"):
                return parser.completion(body)
            if not body:
                return None
            return parser.chat(body) if parser.is_chat(body) else parser.completion(body)
        except APIError:
            if path.startswith(("/v1/chat/completions", "/v1/completions")):
                raise
            return None  # some other API: route it, the pod answers

    async def _route(self, msg: ep.ProcessingRequest, *, trailers: bool) -> list[Any]:
        t0 = time.perf_counter()
        body = b"".join(self._body)
        self._body = []
        try:
            parsed = self._parse_or_reject(body)
            candidates = self._candidates(msg, parsed)
            sreq = self._scheduling_request(parsed)
            body = self._apply_rewrite(parsed, sreq, body)
            result = await self._decide(sreq, candidates)
        except _Reject as rej:
            return [self._immediate(rej)]
        except Exception:
            logger.exception("%s: scheduling failed", self._envoy_id)
            return [
                self._immediate(
                    _Reject(500, "internal-error", "Scheduling failed.", "internal_error")
                )
            ]
        self._record_routed(parsed, sreq, result, t0)
        return self._routing_answer(msg, body, trailers=trailers)

    def _parse_or_reject(self, body: bytes) -> ParsedRequest | None:
        """`_parse`, with an unreadable body turned into a 400 rejection."""
        try:
            return self._parse(body)
        except APIError as err:
            raise _Reject(err.status, "bad-request", err.message, err.code) from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            # NOTE: some msgspec versions raise these past the parser's own handling.
            raise _Reject(
                400, "bad-request", f"Unreadable request body: {exc}", "invalid_json"
            ) from None

    def _apply_rewrite(
        self, parsed: ParsedRequest | None, sreq: SchedulingRequest, body: bytes
    ) -> bytes:
        """Apply a model rewrite header to the request and its body (returned)."""
        rewrite = self._rewrite_target()
        if parsed is not None and rewrite and rewrite != parsed.model:
            self._rewrite = (parsed.model, rewrite)
            sreq.model = rewrite
            body = self._rewrite_body(body, rewrite)
        return body

    async def _decide(
        self, sreq: SchedulingRequest, candidates: list[Endpoint]
    ) -> SchedulingResult:
        # NOTE: shielded, as in the gateway: when Envoy drops the stream during the
        # decision, one that completes anyway is released by `_abandoned`.
        try:
            return await decide_shielded(self.ctx.scheduler, sreq, candidates, self._abandoned)
        except NoEndpointError as exc:
            # NOTE: admission or flow control may shed a request with its own status (a
            # `status` attribute, 429 for load); other failures have no endpoint left.
            status = int(getattr(exc, "status", 503))
            if status == 429:
                raise _Reject(
                    429, "rejected-saturated", f"Request rejected: {exc}", "rejected"
                ) from None
            raise _Reject(
                status,
                "rejected-no-endpoints",
                f"No endpoint can serve this request: {exc}",
                "no_endpoint",
            ) from None

    def _record_routed(
        self,
        parsed: ParsedRequest | None,
        sreq: SchedulingRequest,
        result: SchedulingResult,
        t0: float,
    ) -> None:
        """Keep the decision for the response phase and count the routed request."""
        self.request = sreq
        self.result = result
        self._routed_at = time.perf_counter()
        m = self.ctx.metrics
        label = m.model_label(parsed.model if parsed is not None else "")
        target = m.model_label(sreq.model) if self._rewrite else label
        mm = self._mm = m.for_model(label, target)
        mm.requests.inc()
        mm.running.inc()
        m.route_latency.observe(self._routed_at - t0)

    def _abandoned(self, sreq: SchedulingRequest, result: SchedulingResult) -> None:
        """Release a decision whose stream ended while it was being made."""
        info = ResponseInfo(status=499, error="stream ended during the decision")
        self.ctx.metrics.streams.labels("aborted").inc()
        self.ctx.scheduler.post_response(sreq, result, info)

    def _candidates(
        self, msg: ep.ProcessingRequest, parsed: ParsedRequest | None
    ) -> list[Endpoint]:
        pool = self.ctx.scheduler.endpoints
        if not pool:
            raise _Reject(
                503, "rejected-no-endpoints", "No endpoints are available.", "no_endpoint"
            )
        if self.ctx.config.subset_filter:
            subset = None
            if msg.HasField("metadata_context"):
                subset = metadata_value(msg.metadata_context, SUBSET_HINT, SUBSET_KEY)
            if subset is None:
                subset = self._subset  # forwarded with the headers
            if subset is not None:
                wanted = {endpoint_id(s) for s in ([subset] if isinstance(subset, str) else subset)}
                pool = [e for e in pool if e.id in wanted]
                if not pool:
                    raise _Reject(
                        503,
                        "rejected-no-endpoints",
                        "No endpoint of the requested subset is available.",
                        "no_endpoint",
                    )
        if self.ctx.config.test_hooks:
            sel = self.headers.get(TEST_SELECTION)
            if sel:
                ids = {s.strip() for s in sel.split(",") if s.strip()}
                pool = [e for e in pool if e.address in ids or e.id in ids]
                if not pool:
                    raise _Reject(
                        503, "rejected-no-endpoints", "No selected endpoint.", "no_endpoint"
                    )
        if parsed is not None:
            # NOTE: endpoints that declare their model are matched by it; when none serves the
            # requested model the whole pool stays in (the pod answers, as behind the Go EPP).
            serving = [e for e in pool if e.model is None or e.model == parsed.model]
            if serving:
                pool = serving
        return pool

    def _scheduling_request(self, parsed: ParsedRequest | None) -> SchedulingRequest:
        rid = self.ctx.next_id()
        if parsed is None:
            return SchedulingRequest(request_id=rid, model="", headers=self.headers)
        return SchedulingRequest(
            request_id=rid,
            model=parsed.model,
            token_ids=parsed.token_ids,
            prompt=parsed.prompt,
            messages=parsed.messages,
            cache_salt=parsed.cache_salt,
            headers=self.headers,
            chat=parsed.chat,
            # NOTE: the first token is seen only when Envoy passes the body on as it comes
            # (not in a BUFFERED or NONE response body mode).
            streaming=parsed.stream and self.resp_mode in AS_IT_COMES,
        )

    def _rewrite_target(self) -> str | None:
        for name in REWRITE_HEADERS:
            value = self.headers.get(name)
            if value:
                return value
        return None

    def _rewrite_body(self, body: bytes, model: str) -> bytes:
        try:
            data = msgspec.json.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return body
        if not isinstance(data, dict):
            return body
        data["model"] = model
        assert self._rewrite is not None
        orig, new = (msgspec.json.encode(s) for s in self._rewrite)
        self._model_bytes = [
            (b'"model":' + new, b'"model":' + orig),
            (b'"model": ' + new, b'"model": ' + orig),
        ]
        return msgspec.json.encode(data)

    def _routing_answer(
        self, msg: ep.ProcessingRequest, body: bytes, *, trailers: bool
    ) -> list[Any]:
        assert self.result is not None
        request_id = None
        if not self._envoy_id:
            self._envoy_id = request_id = str(uuid.uuid4())
        return routing_answer(
            msg,
            self.result,
            body,
            req_mode=self.req_mode,
            trailers=trailers,
            client_headers=self.headers,
            request_id=request_id,
            rewritten=self._rewrite is not None,
            config=self.ctx.config,
        )

    def _immediate(self, rej: _Reject) -> ep.ProcessingResponse:
        self._done = True
        m = self.ctx.metrics
        m.immediate.labels(str(rej.status), rej.reason).inc()
        m.streams.labels("immediate").inc()
        label = m.model_label("")
        m.request_errors.labels(label, label, rej.reason).inc()
        return immediate_response(rej.status, rej.reason, rej.message, rej.code)

    # -- response phase -------------------------------------------------------------------------

    def _on_response_headers(self, msg: ep.ProcessingRequest) -> ep.ProcessingResponse:
        hdrs = headers_of(msg.response_headers)
        self._first_byte = time.perf_counter()
        try:
            self.status = int(hdrs.get(":status", "0"))
        except ValueError:
            self.status = 0
        self._info.status = self.status
        self._reader.sse = hdrs.get("content-type", "").startswith("text/event-stream")
        if msg.HasField("metadata_context"):
            served = metadata_value(msg.metadata_context, "envoy.lb", SERVED)
            if isinstance(served, str) and served:
                self.served = endpoint_id(served)
        common = ep.CommonResponse()
        if self.result is not None:
            # Headers the pre-request hooks want sent back to the client (e.g. a session token).
            for key, val in (getattr(self.result, "response_headers", None) or {}).items():
                common.header_mutation.set_headers.append(set_header(key, val))
        served_id = self.served
        if served_id is None and self.result is not None:
            served_id = self.result.targets[0].id
        if served_id is not None:
            cfg = self.ctx.config
            if cfg.endpoint_header:
                common.header_mutation.set_headers.append(set_header(ENDPOINT_HEADER, served_id))
            if cfg.test_hooks:
                common.header_mutation.set_headers.append(set_header(TEST_SERVED, served_id))
        answer = ep.ProcessingResponse(response_headers=ep.HeadersResponse(response=common))
        if msg.response_headers.end_of_stream:
            self._finish()
            return self._with_metadata(answer)
        return answer

    def _on_response_body(self, rb: ep.HttpBody) -> ep.ProcessingResponse:
        data = rb.body
        if self.result is not None and data:
            if not self._first_token and self.status == 200 and self._reader.sse:
                self._report_first_token()
            self._reader.feed(data)
            if self._model_bytes:
                for new, orig in self._model_bytes:
                    data = data.replace(new, orig)
        if self.resp_mode == FULL_DUPLEX:
            answer = streamed_response_body(data, rb.end_of_stream)
        elif data is not rb.body:
            answer = ep.ProcessingResponse(
                response_body=ep.BodyResponse(
                    response=ep.CommonResponse(body_mutation=ep.BodyMutation(body=data))
                )
            )
        else:
            answer = EMPTY_RESPONSE_BODY
        if rb.end_of_stream:
            self._finish()
            return self._with_metadata(answer)
        return answer

    def _with_metadata(self, answer: ep.ProcessingResponse) -> ep.ProcessingResponse:
        """`answer` (the one ending the response), with what the post-response hooks want the
        proxy told (``dynamic_metadata``: e.g. ``request-attribute-reporter``'s value) on a
        copy when there is any (`answer` may be a shared constant)."""
        metadata = self._info.dynamic_metadata
        if not metadata:
            return answer
        out = ep.ProcessingResponse()
        out.CopyFrom(answer)
        out.dynamic_metadata.update(metadata)
        return out

    # -- accounting -----------------------------------------------------------------------------

    def _report_first_token(self) -> None:
        """The first chunk of an SSE answer carries its first token: the prefill is over
        (``predicted-ttft-scorer`` stops counting it as queued and learns from it)."""
        self._first_token = True
        request, result = self.request, self.result
        if request is not None and result is not None and request.streaming:
            self.ctx.scheduler.first_token(request, result)

    def _finish(self, *, aborted: bool = False) -> None:
        """Close the request's accounting (once): usage, metrics, post-response hooks."""
        if self._finished or self.result is None or self.request is None:
            return
        self._finished = True
        info = self._info
        usage = self._reader.close()
        m = self.ctx.metrics
        mm = self._mm
        assert mm is not None
        if usage is not None:
            record_usage(info, usage)
            if usage.prompt_tokens is not None:
                mm.input_tokens.observe(usage.prompt_tokens)
            if usage.completion_tokens is not None:
                mm.output_tokens.observe(usage.completion_tokens)
        if info.status >= 400 and not info.error:
            info.error = f"HTTP {info.status}"
        result = self.result
        if self.served is not None and self.served != result.targets[0].id:
            m.served_elsewhere.inc()
            served = next((e for e in self.ctx.scheduler.endpoints if e.id == self.served), None)
            if served is not None:
                rest = [e for e in result.targets if e.id != served.id]
                result = dataclasses.replace(result, targets=[served, *rest])
        mm.running.dec()
        mm.duration.observe(time.perf_counter() - self.started)
        (m.aborted if aborted else m.routed).inc()
        # NOTE: ResponseInfo has no timing fields yet; the EPP's observed times ride on the
        # request's state for post-response hooks that learn latencies.
        self.request.state["epp"] = {
            "first_byte_s": self._first_byte - self._routed_at if self._first_byte else None,
            "duration_s": time.perf_counter() - self._routed_at,
            "served": result.targets[0].id,
        }
        try:
            self.ctx.scheduler.post_response(self.request, result, info)
        finally:
            if self.ctx.on_done is not None:
                self.ctx.on_done()
