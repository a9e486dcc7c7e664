"""Per-request accounting shared by both front doors (the `Gateway` and the EPP's streams).

A routed request is accounted for once: its decision is made shielded from the request's
cancellation (a decision that completes after its request is gone is released through the
post-response hooks all the same, see `decide_shielded`), and the usage the pod reported
(``usage`` of an OpenAI answer, JSON or SSE) is read with one schema and written onto the
`ResponseInfo` the post-response hooks receive (`record_usage`).

No HTTP library is imported here: the EPP (gRPC, no aiohttp) uses it as much as the gateway.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Annotated

import msgspec

from kvaware_scorer.scheduler import (
    Endpoint,
    ResponseInfo,
    Scheduler,
    SchedulingRequest,
    SchedulingResult,
)

__all__ = [
    "Usage",
    "UsageDetails",
    "decide_shielded",
    "record_usage",
    "usage_of_events",
    "usage_of_json",
]


#: A token count as read from a pod's answer: a usage object with a negative count or one
#: beyond 2**53 (a float's exact range; metrics and hooks take it as a float) is unreadable.
TokenCount = Annotated[int, msgspec.Meta(ge=0, le=2**53)]


class UsageDetails(msgspec.Struct):
    """``usage.prompt_tokens_details`` (prefix-cache hits reported by vLLM)."""

    cached_tokens: TokenCount | None = None


class Usage(msgspec.Struct):
    """The ``usage`` object of an OpenAI answer (the fields routing accounts for)."""

    prompt_tokens: TokenCount | None = None
    completion_tokens: TokenCount | None = None
    total_tokens: TokenCount | None = None
    prompt_tokens_details: UsageDetails | None = None


class _Envelope(msgspec.Struct):
    usage: Usage | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_UNREADABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def usage_of_json(data: bytes) -> Usage | None:
    """The top-level ``usage`` of a JSON document, or None (absent or unreadable)."""
    try:
        env = _ENVELOPE.decode(data)
    except _UNREADABLE:
        return None
    return env.usage


def usage_of_events(events: bytes) -> Usage | None:
    """The last ``usage`` carried by the complete SSE ``data:`` lines of `events`, or None."""
    found: Usage | None = None
    for line in events.split(b"\n"):
        if line.startswith(b"data:") and b'"usage"' in line:
            usage = usage_of_json(line[5:])
            if usage is not None:
                found = usage
    return found


def record_usage(info: ResponseInfo, usage: Usage) -> None:
    """Copy the token counts `usage` reports onto `info` (fields it leaves out stay unset)."""
    if usage.prompt_tokens is not None:
        info.prompt_tokens = usage.prompt_tokens
    if usage.completion_tokens is not None:
        info.completion_tokens = usage.completion_tokens
    if usage.total_tokens is not None:
        info.total_tokens = usage.total_tokens
    details = usage.prompt_tokens_details
    if details is not None and details.cached_tokens is not None:
        info.cached_tokens = details.cached_tokens


async def decide_shielded(
    scheduler: Scheduler,
    sreq: SchedulingRequest,
    candidates: Sequence[Endpoint],
    on_abandoned: Callable[[SchedulingRequest, SchedulingResult], None],
) -> SchedulingResult:
    """`Scheduler.aschedule`, shielded from the caller's cancellation.

    NOTE: with a blocking-I/O plugin the decision runs in a worker thread that cancellation
    cannot stop, and its pre-request hooks (in-flight count, speculative entries) would then
    never be released. So the decision runs on; when the caller is cancelled first, a decision
    that still completes is handed to `on_abandoned` (which calls `Scheduler.post_response`).

    Raises:
        asyncio.CancelledError: The caller was cancelled (the decision goes on).
        Exception: What `Scheduler.aschedule` raised.
    """
    decision = asyncio.ensure_future(scheduler.aschedule(sreq, candidates))
    try:
        return await asyncio.shield(decision)
    except asyncio.CancelledError:
        decision.add_done_callback(functools.partial(_release, sreq, on_abandoned))
        raise


def _release(
    sreq: SchedulingRequest,
    on_abandoned: Callable[[SchedulingRequest, SchedulingResult], None],
    decision: asyncio.Future[SchedulingResult],
) -> None:
    if decision.cancelled() or decision.exception() is not None:
        return
    on_abandoned(sreq, decision.result())
