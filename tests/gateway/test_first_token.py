"""The gateway reports a stream's first token to the scheduler (the end of the prefill)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp

from kvaware_scorer.scheduler import ResponseInfo, SchedulingRequest, SchedulingResult

from .conftest import MODEL, Recorder, start_gateway
from .pods import FakePod


class FirstTokenRecorder(Recorder):
    """Also records `first_token` calls (a FirstTokenListener) with the wall time."""

    def __init__(self) -> None:
        super().__init__()
        self.first: list[tuple[str, float]] = []
        self.ends: list[float] = []

    def first_token(self, now: float, request: SchedulingRequest, result: SchedulingResult) -> None:
        self.first.append((request.request_id, time.perf_counter()))

    def post_response(
        self, request: SchedulingRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        self.ends.append(time.perf_counter())
        super().post_response(request, result, response)


async def _post(url: str, body: dict[str, Any]) -> int:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as resp:
        await resp.read()
        return resp.status


async def test_stream_first_chunk_reports_first_token_once(
    tmp_path: Path, pods: list[FakePod]
) -> None:
    """A streamed response reports its first token once, when its first event is relayed
    (well before the end); a non-streamed response reports none (post_response ends it), and
    is scheduled as not streamed."""
    rec = FirstTokenRecorder()
    gw = await start_gateway(tmp_path, pods, recorder=rec)
    try:
        status = await _post(
            gw.url + "/v1/completions",
            {
                "model": MODEL,
                "prompt": "hello",
                "stream": True,
                "test_pod": {"chunks": 4, "delay": 0.15},
            },
        )
        assert status == 200
        assert len(rec.first) == 1 and len(rec.ends) == 1
        assert rec.ends[0] - rec.first[0][1] > 0.3
        status = await _post(gw.url + "/v1/completions", {"model": MODEL, "prompt": "hi"})
        assert status == 200
        assert len(rec.first) == 1 and len(rec.ends) == 2
        # NOTE: the scheduler is told which answers will report a first token.
        assert list(rec.streaming.values()) == [True, False]
    finally:
        await gw.stop()
