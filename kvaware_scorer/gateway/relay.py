"""Relaying a pod's answer to the client: the headers passed on in each direction, non-streamed
bodies, SSE streams event by event (stream-idle timeout, final error event and ``[DONE]`` when
a stream breaks off, the first token reported to the scheduler) and the usage the answer
reports, written onto the request's `ResponseInfo` and the gateway's token counters.

Which pod answers, and retrying another one, is `kvaware_scorer.gateway.forward`'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from kvaware_scorer.gateway.accounting import Usage, record_usage, usage_of_json
from kvaware_scorer.gateway.answers import JSON, json_response
from kvaware_scorer.gateway.config import GatewayConfig
from kvaware_scorer.gateway.guard import LogLimiter
from kvaware_scorer.gateway.metrics import GatewayMetrics
from kvaware_scorer.gateway.podstream import MAX_BODY, PodResponse
from kvaware_scorer.gateway.protocol import error_body
from kvaware_scorer.gateway.sse import SSEFramer, sse_error
from kvaware_scorer.scheduler import Endpoint, ResponseInfo, SchedulingRequest, SchedulingResult

__all__ = ["Attempt", "Relay"]

logger = logging.getLogger(__name__)

#: Hop-by-hop headers (RFC 9110 §7.6.1) and framing: never passed on in either direction.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
#: Request headers never forwarded: hop-by-hop ones, those the client library sets itself,
#: Accept-Encoding (pods answer uncompressed so usage can be read and SSE is never held back by
#: a compressor), Content-Type (the body was parsed as JSON, so it is sent as
#: application/json whatever the client declared, e.g. curl's form default) and
#: Content-Encoding (the server decodes a compressed body before the gateway reads it, and the
#: decoded body is what is forwarded).
_DROP_REQUEST = _HOP_BY_HOP | {
    "host",
    "proxy-authorization",
    "accept-encoding",
    "content-type",
    "content-encoding",
    "expect",
}
#: Response headers never relayed: hop-by-hop ones, the encoding (pods are asked for none;
#: an answer with one is refused where its head is read, `PodStreamPool`) and those the gateway's server sets itself.
_DROP_RESPONSE = _HOP_BY_HOP | {"content-encoding", "date", "server"}
#: Bytes waiting for a client above which the pod's stream is paused, and below which it goes
#: on (`Relay.stream`); checked every `_DRAIN_POLL` seconds while paused.
_CLIENT_HIGH_WATER = 256 * 1024
_CLIENT_LOW_WATER = 64 * 1024
_DRAIN_POLL = 0.005


class Attempt:
    """The current decision of a request (it changes when a retry schedules it again)."""

    __slots__ = ("failures", "first_token", "request", "result", "started")

    def __init__(self, result: SchedulingResult, request: SchedulingRequest) -> None:
        self.result = result
        self.request = request
        self.started = False  # response headers sent to the client
        self.first_token = False  # reported to the scheduler
        self.failures = 0  # targets that failed so far (bounded by maxAttempts)


class _IdleWatch:
    """``streamIdleTimeout`` of one relayed stream: cancels the relaying task when one read
    from the pod has waited that long.

    NOTE: one timer per stream, re-armed only when it fires, instead of an `asyncio.timeout`
    around every read: a stream of N tokens arrives as ~N reads, and creating, arming and
    cancelling a timer per read was a tenth of the gateway's CPU on streamed answers. A
    client that is slow to take the answer (the write waits) does not count as idle, as with
    the timeout around the read alone.
    """

    __slots__ = ("fired", "handle", "last", "loop", "reading", "seconds", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self.loop = loop
        self.seconds = seconds
        self.task = asyncio.current_task()
        self.last = loop.time()
        self.reading = False
        self.fired = False
        self.handle = loop.call_at(self.last + seconds, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        due = self.last + self.seconds
        if self.reading and now >= due and self.task is not None:
            self.fired = True
            self.task.cancel()
            return
        # NOTE: a read that started late (the previous write waited on the client) is due
        # later; between reads, look again a quarter of the timeout on.
        self.handle = self.loop.call_at(
            due if self.reading else max(due, now + self.seconds / 4), self._check
        )

    def expired(self) -> bool:
        """On a `CancelledError`: whether it is this timeout's (and the only cancellation)."""
        if not self.fired or self.task is None:
            return False
        self.fired = False
        return self.task.uncancel() == 0

    def close(self) -> None:
        self.handle.cancel()


class _PodPump:
    """What `Relay._pump`'s callbacks and its task share."""

    __slots__ = ("error", "finished", "gone", "kick", "paused", "stopped")

    def __init__(self) -> None:
        self.finished = False  # the pod's answer ended (error: how, None = complete)
        self.error: BaseException | None = None
        self.gone: str | None = None  # the client went away
        self.paused = False  # the pod's reads are paused for a slow client
        self.stopped = False  # the task is done with the stream: later data is ignored
        self.kick: asyncio.Future[None] | None = None

    def wake(self) -> None:
        """Wake the task waiting in `Relay._pump`."""
        if self.kick is not None and not self.kick.done():
            self.kick.set_result(None)


class Relay:
    """Passes headers, bodies and SSE streams between the client and the pod that answers.

    Args:
        config: Gateway settings (``streamIdleTimeout``, ``endpointHeader``).
        metrics: The gateway's metrics (upstream errors, disconnects, token counters).
        log_limiter: Rate limit of repeated warnings.
        first_token: Called once per attempt when its stream's first event went out
            (`Scheduler.first_token`).
        draining: Whether the gateway is shutting down.
    """

    def __init__(
        self,
        config: GatewayConfig,
        metrics: GatewayMetrics,
        log_limiter: LogLimiter,
        first_token: Callable[[SchedulingRequest, SchedulingResult], None],
        draining: Callable[[], bool],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.log_limiter = log_limiter
        self.first_token = first_token
        self.draining = draining

    # -- headers ----------------------------------------------------------------------------------

    @staticmethod
    def forward_headers(request: web.Request, sreq: SchedulingRequest) -> dict[str, str]:
        """The client's headers as sent on to the pod (hop-by-hop ones dropped)."""
        src = sreq.headers
        drop: frozenset[str] | set[str] = _DROP_REQUEST
        conn = src.get("connection")
        if conn:
            # NOTE: headers named in Connection are hop-by-hop too (RFC 9110 §7.6.1).
            drop = _DROP_REQUEST | {t.strip().lower() for t in conn.split(",")}
        out = {k: v for k, v in src.items() if k not in drop}
        remote = request.remote
        if remote:
            prior = src.get("x-forwarded-for")
            out["x-forwarded-for"] = f"{prior}, {remote}" if prior else remote
        out["content-type"] = JSON
        out.setdefault("x-request-id", sreq.request_id)
        return out

    def response_headers(
        self,
        resp: PodResponse,
        target: Endpoint,
        extra: Mapping[str, str] | None = None,
    ) -> CIMultiDict[str]:
        """The pod's headers as relayed to the client, with the gateway's own added."""
        out: CIMultiDict[str] = CIMultiDict()
        drop: frozenset[str] | set[str] = _DROP_RESPONSE
        conn = resp.headers.get("connection")
        if conn:
            drop = _DROP_RESPONSE | {t.strip().lower() for t in conn.split(",")}
        for k, v in resp.headers.items():
            if k.lower() not in drop:
                out.add(k, v)
        if self.config.endpoint_header:
            out["x-kvaware-endpoint"] = target.id
        # NOTE: headers the scheduler's plugins set for the client (a session token).
        for k, v in (extra or {}).items():
            out[k] = v
        return out

    # -- usage --------------------------------------------------------------------------------------

    def record_usage(self, info: ResponseInfo, usage: Usage) -> None:
        """Account `usage` on `info` and on the gateway's token counters."""
        record_usage(info, usage)
        m = self.metrics
        if usage.prompt_tokens is not None:
            m.prompt_tokens.inc(usage.prompt_tokens)
        if usage.completion_tokens is not None:
            m.completion_tokens.inc(usage.completion_tokens)
        details = usage.prompt_tokens_details
        if details is not None and details.cached_tokens is not None:
            m.cached_tokens.inc(details.cached_tokens)

    # -- bodies -----------------------------------------------------------------------------------

    async def body(
        self,
        resp: PodResponse,
        target: Endpoint,
        info: ResponseInfo,
        extra: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        """Relay a whole answer (at most `MAX_BODY` bytes; 502 when it breaks off or stalls
        ``streamIdleTimeout``)."""
        try:
            async with asyncio.timeout(self.config.stream_idle_timeout):
                data = await resp.read(MAX_BODY)
        except asyncio.CancelledError:
            resp.close()
            raise
        except (OSError, ValueError, TimeoutError) as exc:
            resp.close()
            kind = "timeout" if isinstance(exc, TimeoutError) else "disconnect"
            self.metrics.upstream_errors.labels(target.id, kind).inc()
            info.status, info.error = 502, f"{target.id}: {exc!r}"
            logger.warning("answer from %s broke off: %r", target.id, exc)
            return json_response(
                error_body(
                    "The endpoint failed while answering.",
                    "server_error",
                    None,
                    "upstream_error",
                ),
                502,
            )
        resp.release()
        return self._whole(resp, data, target, info, extra)

    def _whole(
        self,
        resp: PodResponse,
        data: bytes,
        target: Endpoint,
        info: ResponseInfo,
        extra: Mapping[str, str] | None,
    ) -> web.Response:
        if resp.status >= 400:
            info.error = data[:512].decode("utf-8", errors="replace")
        elif b'"usage"' in data:
            usage = usage_of_json(data)
            if usage is not None:
                self.record_usage(info, usage)
        return web.Response(
            body=data, status=resp.status, headers=self.response_headers(resp, target, extra)
        )

    # -- streams ----------------------------------------------------------------------------------

    async def stream(
        self,
        request: web.Request,
        resp: PodResponse,
        target: Endpoint,
        info: ResponseInfo,
        attempt: Attempt,
    ) -> web.StreamResponse:
        """Relay an SSE answer as its events arrive: each piece of the body is framed and
        written to the client from the pod connection's callback (`PodStreamPool`), no task
        wake-up per event; this task waits for the end. A stream that breaks off (or stalls
        past ``streamIdleTimeout``) ends with an SSE error event and ``[DONE]``."""
        out = web.StreamResponse(
            status=resp.status,
            headers=self.response_headers(resp, target, attempt.result.response_headers),
        )
        if request.version >= (1, 1):
            # NOTE: the events are framed here (`_pump_pod` writes the chunks), so the
            # encoding is set, not left to aiohttp's choice; HTTP/1.0 ends with the connection.
            out.enable_chunked_encoding()
        framer = SSEFramer()
        failure: str | None = None
        ended = False
        try:
            await out.prepare(request)
            # NOTE: aiohttp holds a prepared response's head back until its first body write;
            # the empty write sends it, so the events written below follow it.
            await out.write(b"")
            attempt.started = True
            failure = await self._pump(request, resp, out, target, framer, attempt)
            ended = True
            if failure is not None:
                await self._broke_off(out, target, info, failure, framer.torn)
            await out.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
            resp.close()
            self.metrics.client_disconnects.inc()
            info.status, info.error = 499, f"client disconnected: {exc}"
            return out
        except asyncio.CancelledError:
            resp.close()
            if self.draining() and out.prepared:
                await self._cut_short(out, framer.torn)
            raise
        finally:
            if framer.usage is not None:
                self.record_usage(info, framer.usage)
            if failure is not None or not ended:
                resp.close()
            else:
                resp.release()
        return out

    async def _pump(
        self,
        request: web.Request,
        resp: PodResponse,
        out: web.StreamResponse,
        target: Endpoint,
        framer: SSEFramer,
        attempt: Attempt,
    ) -> str | None:
        """Relay the answer from the pod connection's callback until it ends; why it broke
        off, or None when it ended with ``[DONE]``."""
        loop = asyncio.get_running_loop()
        client = request.transport
        if client is None or client.is_closing():
            raise ConnectionResetError("the client connection is closed")
        chunked = out.chunked
        # NOTE: ``readTimeout``, when shorter, bounds the silence inside a stream too.
        silence = self.config.stream_idle_timeout
        if self.config.read_timeout:
            silence = min(silence, self.config.read_timeout)
        idle = _IdleWatch(loop, silence)
        idle.reading = True
        state = _PodPump()

        def write(events: bytes) -> None:
            if client.is_closing():
                raise ConnectionResetError("the client went away")
            if chunked:
                client.write(b"%x\r\n%s\r\n" % (len(events), events))
            else:
                client.write(events)

        def sink(data: bytes) -> None:
            if state.stopped:
                return
            idle.last = loop.time()
            events = framer.feed(data)
            if not events:
                return
            try:
                write(events)
            except ConnectionResetError as exc:
                state.gone = str(exc)
                state.stopped = True
                resp.close()
                state.wake()
                return
            if not attempt.first_token:
                # NOTE: a stream's first event carries the first token: the prefill is
                # over (predicted-ttft-scorer stops counting it as queued and learns from it).
                attempt.first_token = True
                self.first_token(attempt.request, attempt.result)
            if not state.paused and client.get_write_buffer_size() > _CLIENT_HIGH_WATER:
                state.paused = True
                resp.pause()
                state.wake()

        def end(exc: BaseException | None) -> None:
            if not state.finished:
                state.finished, state.error = True, exc
                state.wake()

        try:
            resp.start(sink, end)
            while not state.finished and state.gone is None:
                if state.paused:
                    # NOTE: the client is slow to take the answer: the pod's reads pause, and
                    # the wait does not count as idle.
                    idle.reading = False
                    await asyncio.sleep(_DRAIN_POLL)
                    if client.is_closing():
                        state.gone = "the client went away"
                        resp.close()
                    elif client.get_write_buffer_size() <= _CLIENT_LOW_WATER:
                        state.paused = False
                        idle.last = loop.time()
                        idle.reading = True
                        resp.resume()
                    continue
                state.kick = loop.create_future()
                await state.kick
        except asyncio.CancelledError:
            if not idle.expired():
                raise
            self.metrics.upstream_errors.labels(target.id, "timeout").inc()
            return f"no data for {silence:g}s"
        finally:
            state.stopped = True
            idle.close()
        if state.gone is not None:
            raise ConnectionResetError(state.gone)
        if state.error is None:
            last = framer.finish()
            if last:
                write(last)
            if framer.done:
                return None
            self.metrics.upstream_errors.labels(target.id, "mid_stream").inc()
            return "the stream ended without [DONE]"
        self.metrics.upstream_errors.labels(target.id, "mid_stream").inc()
        return repr(state.error)

    async def _broke_off(
        self,
        out: web.StreamResponse,
        target: Endpoint,
        info: ResponseInfo,
        failure: str,
        torn: bool,
    ) -> None:
        info.error = f"{target.id}: {failure}"
        self.log_limiter.log(
            logger,
            logging.WARNING,
            f"stream:{target.id}",
            "stream from %s broke off: %s",
            target.id,
            failure,
        )
        await out.write(
            sse_error(
                "The endpoint failed during the stream; the response is incomplete.", 502, torn
            )
        )

    @staticmethod
    async def _cut_short(out: web.StreamResponse, torn: bool) -> None:
        # NOTE: the drain timed out: a last error event tells the client the response is cut
        # short (a bare broken connection looks like a network fault).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                out.write(
                    sse_error(
                        "The gateway shut down during the stream; the response is incomplete.",
                        503,
                        torn,
                    )
                ),
                0.5,
            )
