"""The official `openai` Python client, unchanged, against the gateway."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from kvaware_scorer.gateway import Gateway

from .conftest import MODEL, Recorder, start_gateway
from .pods import FakePod

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def gateway(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> AsyncIterator[Gateway]:
    gw = await start_gateway(tmp_path, pods, recorder=recorder)
    yield gw
    await gw.stop()


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="sk-test", max_retries=0)
    yield c
    await c.close()


async def test_completions(
    client: openai.AsyncOpenAI, pods: list[FakePod], recorder: Recorder
) -> None:
    """completions.create works through the gateway, extra_body included."""
    out = await client.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=3, extra_body={"test_pod": {"chunks": 3}}
    )
    assert out.choices[0].text == "t0 t1 t2 "
    assert out.usage is not None and out.usage.completion_tokens == 3
    pod = next(p for p in pods if p.requests)
    assert pod.requests[0]["body"]["test_pod"] == {"chunks": 3}
    assert pod.requests[0]["headers"]["Authorization"] == "Bearer sk-test"
    assert out.system_fingerprint == pod.name
    assert [info.status for _, _, info in recorder.calls] == [200]


async def test_chat(client: openai.AsyncOpenAI, recorder: Recorder) -> None:
    """chat.completions.create works through the gateway and reports cached tokens."""
    out = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert out.choices[0].message.content == "t0 t1 t2 "
    assert out.usage is not None
    ((req, _, info),) = recorder.calls
    assert req.messages == [{"role": "user", "content": "Hi"}]
    assert info.cached_tokens == out.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]


async def test_streaming_completions(client: openai.AsyncOpenAI) -> None:
    """A streamed completion arrives token by token, as the pod produces it."""
    stream = await client.completions.create(
        model=MODEL,
        prompt=[1, 2, 3, 4],
        stream=True,
        extra_body={"test_pod": {"chunks": 4, "delay": 0.15}},
    )
    seen: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    async for chunk in stream:
        seen.append((time.perf_counter() - t0, chunk.choices[0].text))
    assert [t for _, t in seen] == ["t0 ", "t1 ", "t2 ", "t3 "]
    assert seen[-1][0] - seen[0][0] > 0.35
    assert all(b - a > 0.08 for (a, _), (b, _) in itertools.pairwise(seen))


async def test_streaming_chat_with_usage(client: openai.AsyncOpenAI, recorder: Recorder) -> None:
    """A streamed chat with include_usage yields the deltas and the final usage chunk."""
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"test_pod": {"chunks": 3, "delay": 0.05}},
    )
    text = ""
    usage = None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == "t0 t1 t2 "
    assert usage is not None and usage.completion_tokens == 3
    ((_, _, info),) = recorder.calls
    assert info.completion_tokens == 3


async def test_client_errors(client: openai.AsyncOpenAI) -> None:
    """Gateway errors map onto the client's typed exceptions with the gateway's message."""
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await client.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.BadRequestError, match="prompt"):
        await client.completions.create(model=MODEL, prompt=[1, -5])


async def test_mid_stream_failure(client: openai.AsyncOpenAI) -> None:
    """A pod dying mid-stream surfaces as an APIError from the client's stream iterator, after
    the tokens sent before it."""
    stream = await client.completions.create(
        model=MODEL,
        prompt="x",
        stream=True,
        extra_body={"test_pod": {"chunks": 5, "die_after": 2}},
    )
    got: list[str] = []
    with pytest.raises(openai.APIError, match="failed during the stream"):
        async for chunk in stream:
            got.append(chunk.choices[0].text)
    assert got == ["t0 ", "t1 "]
