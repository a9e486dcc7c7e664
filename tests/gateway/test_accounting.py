"""Per-request accounting shared by the gateway and the EPP, and the gateway's SSE framing."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from kvaware_scorer.gateway.accounting import (
    decide_shielded,
    record_usage,
    usage_of_events,
    usage_of_json,
)
from kvaware_scorer.gateway.sse import MAX_HELD, SSEFramer, ends_stream, sse_error
from kvaware_scorer.scheduler import (
    Endpoint,
    ResponseInfo,
    Scheduler,
    SchedulingRequest,
    SchedulingResult,
    make_plugin_manager,
)

from .conftest import Recorder, RecorderPlugin, scheduler_config


def _scheduler(recorder: Recorder) -> Scheduler:
    sched = Scheduler.from_config(
        scheduler_config("load.yaml"),
        plugin_manager=make_plugin_manager(use_env=False, plugins=[RecorderPlugin(recorder)]),
        seed=0,
    )
    sched.set_endpoints(
        [Endpoint(name=f"pod-{i}", address="127.0.0.1", port=9000 + i) for i in range(3)]
    )
    return sched


def _event(data: object) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


def test_usage_readers_take_the_last_usage_and_skip_garbage() -> None:
    """The JSON reader returns the top-level usage or None; the SSE reader returns the last usage
    of complete ``data:`` lines, skipping unreadable lines and other fields."""
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "prompt_tokens_details": None}
    assert usage_of_json(msgspec.json.encode({"usage": usage})) is not None
    assert usage_of_json(b"{not json") is None
    assert usage_of_json(b'{"choices": []}') is None
    events = (
        _event({"usage": {"prompt_tokens": 1}})
        + b'data: {"usage": broken\n\n'
        + b': comment "usage"\n\n'
        + _event({"usage": {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}}})
        + _event({"choices": [{"text": "x"}]})
    )
    found = usage_of_events(events)
    assert found is not None and found.prompt_tokens == 5
    assert found.prompt_tokens_details is not None
    assert found.prompt_tokens_details.cached_tokens == 4
    assert usage_of_events(_event({"choices": []})) is None


def test_record_usage_sets_only_what_was_reported() -> None:
    """Reported counts are copied onto the ResponseInfo; fields the pod left out keep their
    defaults."""
    info = ResponseInfo(status=200)
    found = usage_of_json(b'{"usage": {"completion_tokens": 9}}')
    assert found is not None
    record_usage(info, found)
    assert (info.prompt_tokens, info.completion_tokens, info.cached_tokens) == (0, 9, None)
    found = usage_of_json(
        b'{"usage": {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}}}'
    )
    assert found is not None
    record_usage(info, found)
    assert (info.prompt_tokens, info.completion_tokens, info.cached_tokens) == (3, 9, 2)


async def test_decision_of_a_cancelled_caller_is_released_once() -> None:
    """A caller cancelled while its decision is made gets CancelledError; the decision still
    completes and is handed to on_abandoned exactly once, which releases it."""
    recorder = Recorder()
    sched = _scheduler(recorder)
    released: list[tuple[SchedulingRequest, SchedulingResult]] = []

    def on_abandoned(sreq: SchedulingRequest, result: SchedulingResult) -> None:
        released.append((sreq, result))
        sched.post_response(sreq, result, ResponseInfo(status=499, error="gone"))

    sreq = SchedulingRequest(request_id="r-1", model="m", prompt="hello")
    caller = asyncio.ensure_future(decide_shielded(sched, sreq, sched.endpoints, on_abandoned))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    for _ in range(200):
        if released:
            break
        await asyncio.sleep(0.01)
    assert [s.request_id for s, _ in released] == ["r-1"]
    assert recorder.per_request() == {"r-1": 1}
    assert [rid for rid, _ in recorder.scheduled] == ["r-1"]
    assert recorder.calls[0][2].status == 499


async def test_decision_of_a_waiting_caller_is_returned() -> None:
    """A caller that waits gets the decision, and on_abandoned is never called."""
    recorder = Recorder()
    sched = _scheduler(recorder)
    called: list[str] = []
    sreq = SchedulingRequest(request_id="r-2", model="m", prompt="hello")
    result = await decide_shielded(
        sched, sreq, sched.endpoints, lambda s, r: called.append(s.request_id)
    )
    assert result.targets[0] in sched.endpoints
    await asyncio.sleep(0.05)
    assert called == []
    assert recorder.per_request() == {}


def test_framer_holds_an_incomplete_event_until_it_ends() -> None:
    """Only complete events are relayed; the tail of an event waits for its end; [DONE] and
    usage are seen once relayed."""
    framer = SSEFramer()
    first = _event({"choices": [{"text": "a"}]})
    usage = _event({"usage": {"prompt_tokens": 11}})
    assert framer.feed(first + usage[:10]) == first
    assert framer.usage is None and not framer.done
    assert framer.feed(usage[10:]) == usage
    assert framer.usage is not None and framer.usage.prompt_tokens == 11
    assert framer.feed(b"data: [DO") == b""
    assert framer.finish() == b""  # an unfinished event is dropped at the end
    assert framer.feed(b"NE]\n\n") == b"data: [DONE]\n\n"
    assert framer.done and not framer.torn


def test_framer_end_of_stream_and_oversized_events() -> None:
    """A held [DONE] without its blank line is relayed at the end; CRLF boundaries count; an
    event larger than MAX_HELD is relayed as it is and marks the stream torn."""
    framer = SSEFramer()
    assert framer.feed(b"data: [DONE]") == b""
    assert framer.finish() == b"data: [DONE]" and framer.done
    framer = SSEFramer()
    assert framer.feed(b"data: x\r\n\r\ndata: y") == b"data: x\r\n\r\n"
    big = b"data: " + b"z" * (MAX_HELD + 1)
    framer = SSEFramer()
    assert framer.feed(big) == big and framer.torn


def test_done_sentinel_only_on_its_own_line() -> None:
    """``[DONE]`` inside generated text does not end the stream; the final error event closes a
    torn event first and ends with ``[DONE]``."""
    assert not ends_stream(_event({"text": "data: [DONE]"}))
    assert ends_stream(b"data:[DONE]\n\n")
    err = sse_error("cut", 502, True)
    assert err.startswith(b"\n\ndata: ") and err.endswith(b"data: [DONE]\n\n")
    assert not sse_error("cut", 502, False).startswith(b"\n")
