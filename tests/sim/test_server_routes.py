"""Live pods' tokenizer routes (vLLM's /tokenize, /detokenize, render) and max_tokens bounds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvaware_scorer.sim.live import LivePod
from kvaware_scorer.tokenization import install_local_tokenizer

from .live_pods import FleetFactory, live_fleets, metric_samples, post

pytestmark = pytest.mark.timeout(60)

MODEL = "kvaware/routes-model"
CHAT = [
    {"role": "system", "content": "You are a terse assistant for the routing tests."},
    {"role": "user", "content": "Name three prime numbers."},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_local_tokenizer(tmp_path_factory.mktemp("tok"), MODEL)


@pytest.fixture
async def make_fleet(tokenizer_dir: Path) -> AsyncIterator[FleetFactory]:
    async with live_fleets(
        num_pods=1, speedup=50.0, model=MODEL, tokenizer=str(tokenizer_dir), num_gpu_blocks=64
    ) as make:
        yield make


async def counters(session: aiohttp.ClientSession, pod: LivePod) -> dict[str, float]:
    samples = await metric_samples(session, pod)
    return {name: s.value for name, s in samples.items() if name.endswith("_total")}


def assert_error(status: int, data: Any, want: int) -> None:
    assert status == want, data
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["code"] == want


async def test_tokenize_gives_the_ids_the_completion_runs_on(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """/tokenize of a text prompt returns the completion's prompt ids, count and context length."""
    pod = (await make_fleet()).pods[0]
    prompt = "The quick brown fox jumps over the lazy dog, twice."
    status, tok = await post(session, pod, "/tokenize", {"model": MODEL, "prompt": prompt})
    assert status == 200
    assert tok["count"] == len(tok["tokens"]) > 5
    assert pod.engine is not None and tok["max_model_len"] == pod.engine.max_model_len
    assert tok["token_strs"] is None
    status, done = await post(
        session,
        pod,
        "/v1/completions",
        {"prompt": prompt, "max_tokens": 2, "return_token_ids": True},
    )
    assert status == 200
    assert done["choices"][0]["prompt_token_ids"] == tok["tokens"]
    status, strs = await post(
        session, pod, "/tokenize", {"prompt": prompt, "return_token_strs": True}
    )
    assert status == 200 and len(strs["token_strs"]) == tok["count"]
    assert all(isinstance(s, str) and s for s in strs["token_strs"])


async def test_detokenize_inverts_tokenize(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """/detokenize returns the text of ids, and refuses ids outside the vocabulary."""
    pod = (await make_fleet()).pods[0]
    prompt = "routing tests decode what they encode"
    _, tok = await post(session, pod, "/tokenize", {"prompt": prompt, "add_special_tokens": False})
    status, back = await post(
        session, pod, "/detokenize", {"model": MODEL, "tokens": tok["tokens"]}
    )
    assert status == 200
    assert back["prompt"].strip() == prompt
    status, empty = await post(session, pod, "/detokenize", {"tokens": []})
    assert status == 200 and empty == {"prompt": ""}
    status, data = await post(session, pod, "/detokenize", {"tokens": [10**9]})
    assert_error(status, data, 400)
    status, data = await post(session, pod, "/detokenize", {"tokens": "abc"})
    assert_error(status, data, 400)


async def test_chat_tokenize_and_render_match_the_chat_completion(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """Chat /tokenize and /v1/chat/completions/render give the chat completion's prompt ids."""
    pod = (await make_fleet()).pods[0]
    status, done = await post(
        session,
        pod,
        "/v1/chat/completions",
        {"messages": CHAT, "max_tokens": 2, "return_token_ids": True},
    )
    assert status == 200
    want = done["prompt_token_ids"]
    status, tok = await post(session, pod, "/tokenize", {"model": MODEL, "messages": CHAT})
    assert status == 200 and tok["tokens"] == want and tok["count"] == len(want)
    status, no_gen = await post(
        session, pod, "/tokenize", {"messages": CHAT, "add_generation_prompt": False}
    )
    assert status == 200 and no_gen["tokens"] != want
    status, rendered = await post(
        session,
        pod,
        "/v1/chat/completions/render",
        {"model": MODEL, "messages": CHAT, "max_tokens": 7, "temperature": 0.5, "stream": True},
    )
    assert status == 200
    assert isinstance(rendered, dict)
    assert rendered["token_ids"] == want
    assert rendered["request_id"].startswith("chatcmpl-")
    assert rendered["model"] == MODEL and rendered["stream"] is True
    assert rendered["sampling_params"] == {"temperature": 0.5, "max_tokens": 7}


async def test_completion_render_lists_one_request_per_prompt_and_generates_nothing(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """/v1/completions/render answers a list (one per prompt) and runs nothing on the engine."""
    pod = (await make_fleet()).pods[0]
    before = await counters(session, pod)
    prompts = ["first prompt of the batch", [5, 6, 7, 8]]
    status, rendered = await post(
        session,
        pod,
        "/v1/completions/render",
        {"model": MODEL, "prompt": prompts, "cache_salt": "tenant-a"},
    )
    assert status == 200
    assert isinstance(rendered, list) and len(rendered) == 2
    _, tok = await post(session, pod, "/tokenize", {"prompt": prompts[0]})
    assert rendered[0]["token_ids"] == tok["tokens"]
    assert rendered[1]["token_ids"] == [5, 6, 7, 8]
    for item in rendered:
        assert item["request_id"].startswith("cmpl-")
        assert item["model"] == MODEL and item["cache_salt"] == "tenant-a"
        assert item["sampling_params"] == {"max_tokens": None}
    after = await counters(session, pod)
    assert after["vllm:prompt_tokens_total"] == before["vllm:prompt_tokens_total"] == 0
    assert pod.engine is not None and not pod.engine.has_work()


async def test_tokenizer_routes_refuse_bad_requests_in_vllm_shape(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """Another model is a 404, a malformed body a 400, each in vLLM's error shape."""
    pod = (await make_fleet()).pods[0]
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("/tokenize", {"model": "other", "prompt": "x"}, 404),
        ("/tokenize", {"prompt": 5}, 400),
        ("/tokenize", {"messages": [{"content": "no role"}]}, 400),
        ("/detokenize", {"model": "other", "tokens": [1]}, 404),
        ("/v1/completions/render", {"model": "other", "prompt": "x"}, 404),
        ("/v1/completions/render", {"prompt": {"a": 1}}, 400),
        ("/v1/chat/completions/render", {"model": "other", "messages": CHAT}, 404),
        ("/v1/chat/completions/render", {"messages": []}, 400),
        ("/v1/chat/completions/render", {"messages": CHAT, "max_tokens": 0}, 400),
    ]
    for path, body, want in cases:
        status, data = await post(session, pod, path, body)
        assert_error(status, data, want)


async def test_huge_max_tokens_is_refused_at_once_against_the_context_length(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """max_tokens beyond the model's context length is a fast 400, and the pod keeps serving."""
    fleet = await make_fleet(num_pods=2, max_model_len=256)
    pod, other = fleet.pods
    prompt = list(range(100, 140))  # 40 tokens
    huge: list[tuple[str, dict[str, Any]]] = [
        ("/v1/completions", {"prompt": prompt, "max_tokens": 10**12}),
        ("/v1/completions", {"prompt": "hello", "max_tokens": 4 * 10**8, "stream": True}),
        ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 10**12}),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4 * 10**8}),
        ("/v1/completions/render", {"prompt": prompt, "max_tokens": 10**12}),
        ("/v1/completions", {"prompt": prompt, "max_tokens": 256 - 40 + 1}),
    ]
    for path, body in huge:
        t0 = time.perf_counter()
        status, data = await post(session, pod, path, body)
        elapsed = time.perf_counter() - t0
        assert_error(status, data, 400)
        assert "maximum context length is 256 tokens" in data["error"]["message"], data
        assert elapsed < 2.0, (body, elapsed)
    # The bound is the context length, not less: a request that exactly fills it is served.
    status, done = await post(
        session, pod, "/v1/completions", {"prompt": prompt, "max_tokens": 256 - 40}
    )
    assert status == 200 and done["usage"]["completion_tokens"] == 256 - 40

    # A flood of oversized requests never stalls the other pods of the process.
    async def flood() -> list[int]:
        body = {"prompt": prompt, "max_tokens": 4 * 10**8}
        results = await asyncio.gather(
            *(post(session, pod, "/v1/completions", body) for _ in range(8))
        )
        return [s for s, _ in results]

    t0 = time.perf_counter()
    statuses, (status, _) = await asyncio.gather(
        flood(), post(session, other, "/v1/completions", {"prompt": prompt, "max_tokens": 4})
    )
    assert statuses == [400] * 8 and status == 200
    assert time.perf_counter() - t0 < 5.0
    assert pod.engine is not None and not pod.engine.has_work()
