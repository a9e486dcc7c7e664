"""Gateway + 3 live pods + ZMQ KV events: affinity, tokenization parity, failures, purges."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from .conftest import MODEL, PRECISE, HarnessFactory, wait_for, words

pytestmark = pytest.mark.timeout(60)

BLOCK = 16


def _blocks(n_tokens: int) -> int:
    return n_tokens // BLOCK


@pytest.mark.parametrize("mode", ["bind", "connect"])
async def test_shared_prefix_follows_the_pod_that_holds_it(
    harness_factory: HarnessFactory, mode: str
) -> None:
    """Once a pod's KV events arrive, requests sharing its prefix are routed to it and hit."""
    h = await harness_factory(mode)
    system = words(500, seed=1)
    first_pod, first = await h.complete({"prompt": system + "\n\nfirst question", "max_tokens": 4})
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    held = _blocks(first["usage"]["prompt_tokens"])
    # Speculative indexing is off here: the affinity can only come from the pod's own events.
    await wait_for(lambda: h.entries(first_pod) >= held, what="the first request's KV events")
    others = [p.id for p in h.fleet.pods if p.id != first_pod]
    assert all(h.entries(p) == 0 for p in others)
    for i in range(4):
        pod, answer = await h.complete(
            {"prompt": system + f"\n\nanother question number {i}", "max_tokens": 4}
        )
        assert pod == first_pod
        cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= (held - 1) * BLOCK


async def test_text_and_chat_are_tokenized_like_the_pods(
    harness_factory: HarnessFactory, tokenization: object
) -> None:
    """The gateway's blocks for text and chat prompts are the pods' blocks: its match predicts
    the pod's prefix-cache hit exactly."""
    h = await harness_factory("connect")
    prompt = words(300, seed=2) + " ✓ naïve café 12345"
    chat = {
        "messages": [
            {"role": "system", "content": words(300, seed=3)},
            {"role": "user", "content": "hello, how are you?"},
        ]
    }
    for body, is_chat in (({"prompt": prompt}, False), (chat, True)):
        # NOTE: the chat may land on the text prompt's pod: wait for its own blocks, not for
        # a count the earlier request's entries already reach.
        before = {p.id: h.entries(p) for p in h.fleet.pods}
        pod, answer = await h.complete({**body, "max_tokens": 3, "return_token_ids": True}, is_chat)
        ids = answer["prompt_token_ids"] if is_chat else answer["choices"][0]["prompt_token_ids"]
        expected = tokenization.tokenize(MODEL, **body)  # type: ignore[attr-defined]
        assert ids == expected
        n = answer["usage"]["prompt_tokens"]
        assert n == len(ids)
        target = before[pod] + _blocks(n)
        await wait_for(lambda pod=pod, t=target: h.entries(pod) >= t, what="KV events")
        scores = await h.score(body)
        assert scores[pod] == pytest.approx(1.0)
        assert all(v == 0 for p, v in scores.items() if p != pod)
        # The exact resend hits every block the gateway matched, capped at n - 1 like vLLM.
        again_pod, again = await h.complete({**body, "max_tokens": 3}, is_chat)
        assert again_pod == pod
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == min(_blocks(n), (n - 1) // BLOCK) * BLOCK > 0


async def test_streaming_chunks_arrive_incrementally(harness_factory: HarnessFactory) -> None:
    """A streamed completion through the gateway arrives token by token at the pods' pace."""
    # Slow motion: a ~7.6 ms decode step takes ~76 ms of wall time at speedup 0.1.
    h = await harness_factory("connect", speedup=0.1)
    body = {"model": MODEL, "prompt": words(40, seed=4), "max_tokens": 6, "stream": True}
    arrivals: list[tuple[float, bytes]] = []
    t0 = time.perf_counter()
    async with h.session.post(h.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.startswith(b"data: "):
                arrivals.append((time.perf_counter() - t0, line))
    assert arrivals[-1][1].strip() == b"data: [DONE]"
    token_times = [t for t, line in arrivals if b'"text"' in line]
    assert len(token_times) == 6
    gaps = [b - a for a, b in itertools.pairwise(token_times)]
    assert all(g > 0.03 for g in gaps), gaps
    assert token_times[-1] - token_times[0] > 0.25


async def test_official_openai_client_works_unchanged(harness_factory: HarnessFactory) -> None:
    """The openai client's completions, chat and streaming work against the gateway."""
    import openai

    h = await harness_factory("connect")
    client = openai.AsyncOpenAI(base_url=h.url + "/v1", api_key="sk-e2e", max_retries=0)
    try:
        prompt = words(120, seed=5)
        out = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
        assert out.usage is not None and out.usage.completion_tokens == 5
        assert out.choices[0].finish_reason == "length" and out.choices[0].text
        stream = await client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            pieces += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(pieces) == out.choices[0].text  # deterministic per prompt
        assert usage is not None and usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens > 0  # the resend hit its own blocks

        messages = [
            {"role": "system", "content": words(100, seed=6)},
            {"role": "user", "content": "Say something."},
        ]
        chat = await client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=4,
        )
        assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
        chat_stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=4,
            stream=True,
        )
        content = [c.choices[0].delta.content or "" async for c in chat_stream if c.choices]
        assert "".join(content) == chat.choices[0].message.content
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
    finally:
        await client.close()


async def test_killed_pod_then_removed_from_the_pool(harness_factory: HarnessFactory) -> None:
    """A pod killed mid-run: its stream ends with an error event, requests keep succeeding on
    the others, and removing it from the endpoints file purges it from the index."""
    h = await harness_factory("connect", speedup=1.0)
    system = words(400, seed=7)
    victim_id, _ = await h.complete({"prompt": system + "\n\nq0", "max_tokens": 2})
    await wait_for(lambda: h.entries(victim_id) > 0, what="the victim's KV events")
    victim = h.fleet.pod(victim_id)

    # A long stream on the victim (the prefix pulls it there), killed once it is flowing.
    body = {"model": MODEL, "prompt": system + "\n\nlong", "max_tokens": 400, "stream": True}
    lines: list[bytes] = []
    async with h.session.post(h.url + "/v1/completions", json=body) as resp:
        assert resp.headers["x-kvaware-endpoint"] == victim_id
        async for line in resp.content:
            if line.startswith(b"data: "):
                lines.append(line)
            if len(lines) == 3:
                await victim.stop()
    assert b'"error"' in lines[-2] and lines[-1].strip() == b"data: [DONE]"

    results = await asyncio.gather(
        *(h.complete({"prompt": system + f"\n\nafter {i}", "max_tokens": 2}) for i in range(8))
    )
    assert {pod for pod, _ in results} <= {p.id for p in h.fleet.pods if p is not victim}
    assert h.entries(victim_id) > 0  # a dead pod's blocks stay until it leaves the pool

    h.write_endpoints([p for p in h.fleet.pods if p is not victim])
    await wait_for(lambda: h.entries(victim_id) == 0, what="the purge of the removed pod")
    assert victim_id not in h.indexer.index.pods()
    scores = await h.score({"prompt": system + "\n\nq0"})
    assert victim_id not in scores


async def test_restarted_pod_is_purged_by_its_seq_restart(harness_factory: HarnessFactory) -> None:
    """A pod restarted (empty cache, event seq back at 0) loses its stale blocks in the index
    as soon as its first new batch arrives."""
    h = await harness_factory("connect")
    pod = h.fleet.pods[0]
    pod_id = pod.id
    old = words(300, seed=8)
    for i in range(4):  # straight to the pod: several batches, seq well above 0
        prompt = old + " " + words(40, seed=80 + i) if i else old
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
        status, _, _ = await h.post("/v1/completions", body, base=pod.url)
        assert status == 200
    assert pod.publisher is not None and pod.publisher.next_seq >= 4
    await wait_for(lambda: h.entries(pod_id) >= _blocks(300), what="KV events")
    assert (await h.score({"prompt": old}))[pod_id] == pytest.approx(1.0)

    await pod.restart()
    assert pod.publisher is not None and pod.publisher.next_seq == 0
    assert await pod.wait_for_subscriber(5.0)
    new = words(200, seed=9)
    status, _, answer = await h.post(
        "/v1/completions", {"model": MODEL, "prompt": new}, base=pod.url
    )
    assert status == 200
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # empty cache

    async def fresh() -> bool:
        s = await h.score({"prompt": new})
        return s.get(pod_id, 0) > 0

    await wait_for(fresh, what="the restarted pod's first events")
    assert (await h.score({"prompt": old})).get(pod_id, 0) == 0
    # Only the new request's blocks: prompt and output, whose last token is never computed.
    assert h.entries(pod_id) == _blocks(answer["usage"]["total_tokens"] - 1)


async def test_reset_prefix_cache_purges_the_pod(harness_factory: HarnessFactory) -> None:
    """``POST /reset_prefix_cache`` on a pod -> AllBlocksCleared -> the index drops that pod."""
    h = await harness_factory("bind")
    prompt = words(300, seed=10)
    pod_id, _ = await h.complete({"prompt": prompt, "max_tokens": 2})
    other, _ = await h.complete({"prompt": words(300, seed=11), "max_tokens": 2})
    await wait_for(lambda: h.entries(pod_id) > 0 and h.entries(other) > 0, what="KV events")
    before_other = h.entries(other)
    status, _, data = await h.post("/reset_prefix_cache", {}, base=h.fleet.pod(pod_id).url)
    assert status == 200 and data == {"success": True}
    await wait_for(lambda: h.entries(pod_id) == 0, what="the purge after AllBlocksCleared")
    if other != pod_id:
        assert h.entries(other) == before_other
    assert (await h.score({"prompt": prompt})).get(pod_id, 0) == 0
    _, again = await h.complete({"prompt": prompt, "max_tokens": 2})
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_bad_requests_get_the_right_4xx(harness_factory: HarnessFactory) -> None:
    """Bad requests are refused by the gateway or relayed from the pod with the right 4xx."""
    h = await harness_factory("connect")

    async def raw(path: str, data: bytes) -> tuple[int, dict[str, object]]:
        async with h.session.post(
            h.url + path, data=data, headers={"Content-Type": "application/json"}
        ) as resp:
            return resp.status, await resp.json(content_type=None)

    status, body = await raw("/v1/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"  # type: ignore[index]
    cases = [
        ("/v1/completions", {"prompt": "hi"}, 400, "model"),
        ("/v1/completions", {"model": "no/such-model", "prompt": "hi"}, 404, None),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, -2]}, 400, "prompt"),
    ]
    for path, req, want, param in cases:
        status, _, data = await h.post(path, req)
        assert status == want, (req, data)
        assert data["error"]["message"]
        if param is not None:
            assert data["error"]["param"] == param
    status, body = await raw(
        "/v1/completions", b'{"model": "x", "prompt": "' + b"a" * (1 << 20) + b'"}'
    )
    assert status == 413
    # Refused by the pod (vLLM's checks), relayed as they are.
    pod_cases = [
        {"model": MODEL, "prompt": "hello", "max_tokens": 0},
        {"model": MODEL, "prompt": "hello", "n": 2},
        {"model": MODEL, "prompt": [5] * 200_000},
        {"model": MODEL, "prompt": "hello", "stream_options": {"include_usage": True}},
    ]
    for req in pod_cases:
        status, _, data = await h.post("/v1/completions", req)
        assert status == 400, (req, data)
        assert data["error"]["type"] == "BadRequestError"
    status, _, data = await h.post(
        "/v1/chat/completions", {"model": MODEL, "messages": [{"content": "no role"}]}
    )
    assert status == 400, data
    # Nothing was left running or holding blocks on any pod.
    for pod in h.fleet.pods:
        assert pod.engine is not None and not pod.engine.has_work()


async def test_precise_scores_come_from_the_gateway_index(harness_factory: HarnessFactory) -> None:
    """``/v1/score`` explains a pick: the precise scorer ranks the holding pod first."""
    h = await harness_factory("bind")
    system = words(250, seed=12)
    pod_id, _ = await h.complete({"prompt": system + " a", "max_tokens": 2})
    await wait_for(lambda: h.entries(pod_id) > 0, what="KV events")
    status, _, data = await h.post("/v1/score", {"model": MODEL, "prompt": system + " b"})
    assert status == 200
    assert data["pick"]["endpoint"] == pod_id
    assert data["scores"][PRECISE][pod_id] > 0.9
    assert data["ranking"][0]["endpoint"] == pod_id


async def test_young_pod_restarted_while_undialed_is_purged(
    harness_factory: HarnessFactory,
) -> None:
    """A pod restarted after a short downtime, whose new batches outnumber its old ones
    before the router re-dials it, still loses its stale blocks in the index."""
    h = await harness_factory("connect")
    pod = h.fleet.pods[0]
    old = words(300, seed=13)
    status, _, _ = await h.post("/v1/completions", {"model": MODEL, "prompt": old}, base=pod.url)
    assert status == 200
    await wait_for(lambda: h.entries(pod.id) > 0, what="KV events")
    assert pod.publisher is not None and pod.publisher.next_seq <= 2
    await pod.stop()
    await asyncio.sleep(0.8)  # the router's re-dial backoff grows past the downtime
    await pod.start()
    for i in range(4):  # published before the router re-dials: lost, as ZMQ PUB drops them
        body = {"model": MODEL, "prompt": words(100, seed=20 + i), "max_tokens": 1}
        await h.post("/v1/completions", body, base=pod.url)
    assert await pod.wait_for_subscriber(8.0)
    body = {"model": MODEL, "prompt": words(100, seed=30), "max_tokens": 1}
    await h.post("/v1/completions", body, base=pod.url)

    async def purged() -> bool:
        return (await h.score({"prompt": old})).get(pod.id, 0) == 0

    await wait_for(purged, timeout=3.0, what="the stale blocks of the restarted pod to go")
