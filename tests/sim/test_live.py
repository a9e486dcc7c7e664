"""Live emulated pods on their own: vLLM's HTTP API, metrics, KV-event frames, replay, timing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml
import zmq

from kvaware_scorer.events.decode import AllBlocksCleared, BlockStored, EventDecoder
from kvaware_scorer.events.publisher import END_SEQ
from kvaware_scorer.sim.live import LiveFleet, LivePod, LivePodsConfig, OutputText
from kvaware_scorer.tokenization import install_local_tokenizer

from .live_pods import FleetFactory, live_fleets, metric_samples, post

pytestmark = pytest.mark.timeout(60)

MODEL = "kvaware/live-model"
BLOCK = 16


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_local_tokenizer(tmp_path_factory.mktemp("tok"), MODEL)


@pytest.fixture
async def make_fleet(tokenizer_dir: Path) -> AsyncIterator[FleetFactory]:
    async with live_fleets(
        num_pods=1, speedup=20.0, model=MODEL, tokenizer=str(tokenizer_dir)
    ) as make:
        yield make


async def stream(
    session: aiohttp.ClientSession, pod: LivePod, path: str, body: dict[str, Any]
) -> list[tuple[float, Any]]:
    """Every SSE event of a streamed request with its arrival time (``[DONE]`` as a string)."""
    import json

    out: list[tuple[float, Any]] = []
    t0 = time.perf_counter()
    async with session.post(pod.url + path, json={**body, "stream": True}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: "):
                raw = line[6:].strip()
                out.append(
                    (time.perf_counter() - t0, "[DONE]" if raw == b"[DONE]" else json.loads(raw))
                )
    return out


class Subscriber:
    """A raw SUB socket on a pod's publisher, as a router in connect mode would open it."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.decoder = EventDecoder()

    async def frames(self, n: int, timeout: float = 5.0) -> list[list[bytes]]:
        out: list[list[bytes]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            if self.sock.poll(0):
                out.append(self.sock.recv_multipart())
            else:
                await asyncio.sleep(0.005)
        assert len(out) == n, f"got {len(out)} of {n} frames"
        return out

    async def joined(self, pod: LivePod, timeout: float = 5.0) -> bool:
        """Wait until `pod`'s publisher has this subscription.

        NOTE: libzmq resends a SUB's subscriptions after a reconnect only when the socket's
        owner thread processes its commands (any call on the socket), so keep touching it.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.getsockopt(zmq.EVENTS)
            if await pod.wait_for_subscriber(0):
                return True
            await asyncio.sleep(0.01)
        return False

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


async def test_completion_usage_reports_the_prefix_cache_hit(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """cached_tokens is the emulated hit: full blocks only, capped at prompt length - 1."""
    pod = (await make_fleet()).pods[0]
    prompt = list(range(1, 101))  # 6 full blocks + 4 tokens
    status, first = await post(session, pod, "/v1/completions", {"prompt": prompt, "max_tokens": 3})
    assert status == 200
    assert first["usage"] == {
        "prompt_tokens": 100,
        "total_tokens": 103,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert first["object"] == "text_completion" and first["model"] == MODEL
    assert first["choices"][0]["finish_reason"] == "length"
    _, again = await post(session, pod, "/v1/completions", {"prompt": prompt, "max_tokens": 3})
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    exact = list(range(500, 596))  # exactly 6 blocks: a resend recomputes its last block
    await post(session, pod, "/v1/completions", {"prompt": exact, "max_tokens": 1})
    _, resend = await post(session, pod, "/v1/completions", {"prompt": exact, "max_tokens": 1})
    assert resend["usage"]["prompt_tokens_details"]["cached_tokens"] == 80
    # A long prompt (hashed off the event loop) is cached as well.
    long = [1 + i % 997 for i in range(3000)]
    await post(session, pod, "/v1/completions", {"prompt": long, "max_tokens": 1})
    _, hit = await post(session, pod, "/v1/completions", {"prompt": long, "max_tokens": 1})
    assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] == 2992
    # A salted request lives in its own namespace (vLLM hashes the salt into block 0).
    _, salted = await post(
        session, pod, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "cache_salt": "t1"}
    )
    assert salted["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_streaming_honours_max_tokens_and_matches_the_plain_answer(
    make_fleet: FleetFactory, session: aiohttp.ClientSession, tokenizer_dir: Path
) -> None:
    """A stream sends one chunk per generated token, then usage and [DONE]; its text equals the
    non-streamed text, which is the tokenizer's decoding of the generated ids."""
    from tokenizers import Tokenizer

    pod = (await make_fleet()).pods[0]
    body = {"prompt": "The quick brown fox jumps over the lazy dog.", "max_tokens": 7}
    events = await stream(
        session, pod, "/v1/completions", {**body, "stream_options": {"include_usage": True}}
    )
    assert events[-1][1] == "[DONE]"
    usage = events[-2][1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 7
    tokens = [e for _, e in events[:-2]]
    assert len(tokens) == 7
    assert [t["choices"][0]["finish_reason"] for t in tokens] == [None] * 6 + ["length"]
    text = "".join(t["choices"][0]["text"] for t in tokens)
    status, plain = await post(session, pod, "/v1/completions", {**body, "return_token_ids": True})
    assert status == 200
    choice = plain["choices"][0]
    assert choice["text"] == text and len(choice["token_ids"]) == 7
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert tok.decode(choice["token_ids"]) == text
    assert choice["prompt_token_ids"] == tok.encode(body["prompt"]).ids

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3}
    chunks = await stream(session, pod, "/v1/chat/completions", chat)
    assert chunks[0][1]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0][1]["object"] == "chat.completion.chunk"
    deltas = [c["choices"][0]["delta"]["content"] for _, c in chunks[1:-1]]
    assert len(deltas) == 3 and chunks[-1][1] == "[DONE]"
    _, answer = await post(session, pod, "/v1/chat/completions", chat)
    assert answer["choices"][0]["message"]["content"] == "".join(deltas)
    assert answer["object"] == "chat.completion"


async def test_batch_prompts_get_one_choice_each(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """A batch of prompts (text and ids) is served as one choice per prompt, usage summed."""
    pod = (await make_fleet()).pods[0]
    status, data = await post(
        session,
        pod,
        "/v1/completions",
        {"prompt": ["hello there", "general kenobi"], "max_tokens": 2},
    )
    assert status == 200
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert data["usage"]["completion_tokens"] == 4
    events = await stream(
        session, pod, "/v1/completions", {"prompt": [[1, 2, 3], [4, 5, 6, 7]], "max_tokens": 2}
    )
    indexes = sorted(e["choices"][0]["index"] for _, e in events[:-1])
    assert indexes == [0, 0, 1, 1]


async def test_kv_events_carry_vllm_frames_topic_and_seq(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """The publisher sends [topic, 8-byte seq from 0, payload]; stores are chained like vLLM's."""
    pod = (await make_fleet()).pods[0]
    assert pod.kv_endpoint is not None
    sub = Subscriber(pod.kv_endpoint)
    try:
        assert await sub.joined(pod)
        prompt = list(range(100, 140))  # 2 full blocks + 8 tokens
        await post(session, pod, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        longer = prompt + list(range(300, 330))  # shares 2 blocks, adds 2 more full ones
        await post(session, pod, "/v1/completions", {"prompt": longer, "max_tokens": 1})
        frames = await sub.frames(2)
        assert [f[0] for f in frames] == [f"kv@{pod.id}@{MODEL}".encode()] * 2
        assert [int.from_bytes(f[1], "big") for f in frames] == [0, 1]
        assert all(len(f) == 3 and len(f[1]) == 8 for f in frames)
        first = sub.decoder.decode(frames[0][2])
        second = sub.decoder.decode(frames[1][2])
        assert first.data_parallel_rank == 0
        (a,) = first.events
        (b,) = second.events
        assert isinstance(a, BlockStored) and isinstance(b, BlockStored)
        assert a.parent_block_hash is None and a.token_ids == prompt[:32]
        assert a.block_size == BLOCK and a.medium == "GPU" and len(a.block_hashes) == 2
        assert b.parent_block_hash == a.block_hashes[-1]  # hits are not re-announced
        assert b.token_ids == longer[32:64]
    finally:
        sub.close()


async def test_replay_router_answers_vllm_replay_requests(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """A DEALER asking the replay ROUTER from seq 1 gets [b"", topic, seq, payload] frames, then
    the ff*8 end marker."""
    pod = (await make_fleet()).pods[0]
    for i in range(3):
        prompt = list(range(100 * i + 1, 100 * i + 33))
        await post(session, pod, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert pod.replay_endpoint is not None and pod.publisher is not None
    assert pod.publisher.next_seq == 3
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    try:
        dealer.connect(pod.replay_endpoint)
        dealer.send_multipart([b"", (1).to_bytes(8, "big")])
        got: list[list[bytes]] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if dealer.poll(10):
                frames = dealer.recv_multipart()
                got.append(frames)
                if frames[2] == END_SEQ:
                    break
            await asyncio.sleep(0)
        assert [int.from_bytes(f[2], "big") for f in got[:-1]] == [1, 2]
        assert all(f[0] == b"" and f[1] == pod.topic.encode() for f in got[:-1])
        assert got[-1] == [b"", b"", END_SEQ, b""]
    finally:
        dealer.close(0)
        ctx.term()


async def test_empty_topic_and_event_sources(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """``kvTopic: ""`` sends vLLM's default empty topic; /kv_event_sources says where to listen."""
    pod = (await make_fleet(kv_topic="")).pods[0]
    async with session.get(pod.url + "/kv_event_sources") as resp:
        sources = await resp.json()
    assert sources == {
        "0": {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": pod.kv_endpoint,
            "replay_endpoint": pod.replay_endpoint,
            "buffer_steps": 10_000,
            "hwm": 100_000,
            "max_queue_size": 100_000,
            "topic": "",
        }
    }
    sub = Subscriber(sources["0"]["endpoint"])
    try:
        assert await sub.joined(pod)
        await post(session, pod, "/v1/completions", {"prompt": list(range(1, 40)), "max_tokens": 1})
        (frame,) = await sub.frames(1)
        assert frame[0] == b""
    finally:
        sub.close()


async def test_models_health_and_metrics_use_vllm_names(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """/v1/models, /health and /metrics answer like vLLM (names, labels, counter suffixes)."""
    fleet = await make_fleet(num_gpu_blocks=64, speedup=1.0)
    pod = fleet.pods[0]
    async with session.get(pod.url + "/v1/models") as resp:
        models = await resp.json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 63 * BLOCK
    async with session.get(pod.url + "/health") as resp:
        assert resp.status == 200
    prompt = list(range(1, 201))
    task = asyncio.create_task(
        post(session, pod, "/v1/completions", {"prompt": prompt, "max_tokens": 30})
    )
    await asyncio.sleep(0.05)  # mid-generation (30 decode steps of ~7.6 ms)

    async def scrape() -> dict[str, Any]:
        return await metric_samples(session, pod)

    during = await scrape()
    assert during["vllm:num_requests_running"].value == 1
    assert during["vllm:num_requests_waiting"].value == 0
    assert 0 < during["vllm:kv_cache_usage_perc"].value <= 1
    assert during["vllm:num_requests_running"].labels == {"model_name": MODEL, "engine": "0"}
    await task
    _, again = await post(session, pod, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    after = await scrape()
    assert after["vllm:kv_cache_usage_perc"].value == 0
    assert after["vllm:prefix_cache_queries_total"].value == 400
    assert (
        after["vllm:prefix_cache_hits_total"].value
        == again["usage"]["prompt_tokens_details"]["cached_tokens"]
        == after["vllm:prompt_tokens_cached_total"].value
        == 192
    )
    assert after["vllm:prompt_tokens_total"].value == 400
    info = after["vllm:cache_config_info"]
    assert info.value == 1
    assert info.labels["block_size"] == "16" and info.labels["num_gpu_blocks"] == "64"
    assert info.labels["prefix_caching_hash_algo"] == "sha256"
    assert info.labels["enable_prefix_caching"] == "True" and info.labels["engine"] == "0"


async def test_client_disconnect_aborts_and_frees_blocks(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """A client that goes away mid-stream aborts its request: it stops running and its blocks
    are freed (cached blocks stay cached, as in vLLM)."""
    pod = (await make_fleet(speedup=1.0)).pods[0]
    engine = pod.engine
    assert engine is not None
    body = {"prompt": list(range(1, 65)), "max_tokens": 1000, "stream": True}
    async with session.post(pod.url + "/v1/completions", json=body) as resp:
        seen = 0
        async for line in resp.content:
            seen += line.startswith(b"data: ")
            if seen == 3:
                break
        assert engine.num_running == 1 and engine.kv_usage() > 0
        resp.close()

    async def idle() -> bool:
        return engine.num_running == 0 and engine.kv_usage() == 0

    deadline = time.monotonic() + 5
    while not await idle():
        assert time.monotonic() < deadline, "the aborted request is still running"
        await asyncio.sleep(0.01)
    assert pod.requests_aborted == 1
    _, again = await post(
        session, pod, "/v1/completions", {"prompt": body["prompt"], "max_tokens": 1}
    )
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 48  # still cached, capped


async def test_speedup_paces_the_steps(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """Tokens stream at the emulated step time divided by the speed-up factor."""
    fleet = await make_fleet(speedup=0.25)
    pod = fleet.pods[0]
    body = {"prompt": [1 + i % 900 for i in range(1024)], "max_tokens": 8}
    events = await stream(session, pod, "/v1/completions", body)
    times = [t for t, e in events if e != "[DONE]"]
    gaps = np.diff(times)
    expected = fleet.profile.decode_step_time(1, 1030) / 0.25  # ~30 ms
    assert 0.7 * expected < float(np.median(gaps)) < 1.6 * expected


async def test_restart_resets_the_cache_and_the_seq(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """A restarted pod (same ports) has an empty cache and publishes from seq 0 again."""
    pod = (await make_fleet()).pods[0]
    assert pod.kv_endpoint is not None
    url, endpoint = pod.url, pod.kv_endpoint
    sub = Subscriber(endpoint)
    try:
        assert await sub.joined(pod)
        prompt = list(range(1, 70))
        for _ in range(2):
            await post(session, pod, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        frames = await sub.frames(1)
        assert int.from_bytes(frames[0][1], "big") == 0
        await pod.restart()
        assert (pod.url, pod.kv_endpoint, pod.starts) == (url, endpoint, 2)
        assert await sub.joined(pod)
        _, answer = await post(session, pod, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        (frame,) = await sub.frames(1)
        assert int.from_bytes(frame[1], "big") == 0
    finally:
        sub.close()


async def test_reset_prefix_cache_clears_when_idle(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """/reset_prefix_cache fails while blocks are in use, else publishes AllBlocksCleared."""
    pod = (await make_fleet(speedup=1.0)).pods[0]
    assert pod.kv_endpoint is not None
    sub = Subscriber(pod.kv_endpoint)
    try:
        assert await sub.joined(pod)
        prompt = list(range(1, 50))
        busy = asyncio.create_task(
            post(session, pod, "/v1/completions", {"prompt": prompt, "max_tokens": 20})
        )
        await asyncio.sleep(0.03)
        status, data = await post(session, pod, "/reset_prefix_cache", {})
        assert status == 409 and data["error"]["message"]
        await busy
        status, data = await post(session, pod, "/reset_prefix_cache", {})
        assert status == 200 and data == {"success": True}
        frames = await sub.frames(3)  # the store, a decode block, the clear
        assert isinstance(sub.decoder.decode(frames[-1][2]).events[0], AllBlocksCleared)
        _, again = await post(session, pod, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        sub.close()


async def test_bad_requests_get_vllm_errors(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """Invalid requests get 4xx in vLLM's error shape and leave nothing queued."""
    fleet = await make_fleet(num_gpu_blocks=32)
    pod = fleet.pods[0]
    async with session.post(
        pod.url + "/v1/completions", data=b"{oops", headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "BadRequestError"
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("/v1/completions", {"model": "other", "prompt": "x"}, 404),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
        ("/v1/completions", {"prompt": "x", "n": 3}, 400),
        ("/v1/completions", {"prompt": list(range(600))}, 400),  # > max_model_len (31 blocks)
        ("/v1/completions", {"prompt": [10**9]}, 400),  # out of vocabulary
        ("/v1/completions", {"max_tokens": 3}, 400),
        ("/v1/completions", {"prompt": {"a": 1}}, 400),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400),
        ("/v1/chat/completions", {"messages": []}, 400),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": "a"},
            400,
        ),
    ]
    for path, body, want in cases:
        status, data = await post(session, pod, path, body)
        assert status == want, (body, data)
        assert set(data["error"]) == {"message", "type", "param", "code"}
        assert data["error"]["code"] == want
    assert pod.engine is not None and not pod.engine.has_work()


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "\xff\xfe", "max_tokens": 1}',
        b'{"prompt": ["ok", "\xc3("]}',
        b'{"\xff": 1}',
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["prompt-not-utf8", "batch-not-utf8", "key-not-utf8", "too-deep"],
)
async def test_unreadable_bodies_get_a_400(
    make_fleet: FleetFactory, session: aiohttp.ClientSession, body: bytes
) -> None:
    """Bodies that are not UTF-8 or nest deeper than the decoder recurses get vLLM's 400."""
    pod = (await make_fleet(num_gpu_blocks=32)).pods[0]
    async with session.post(
        pod.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
        data = await resp.json()
    assert data["error"]["type"] == "BadRequestError" and data["error"]["code"] == 400
    assert data["error"]["message"].startswith("Invalid JSON body: ")


async def test_token_prompts_work_without_a_tokenizer(
    make_fleet: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """Without a tokenizer, token-id prompts are served and text prompts get a clear 400."""
    pod = (await make_fleet(tokenizer=None, engine_hash="xxh3")).pods[0]
    status, data = await post(
        session, pod, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2}
    )
    assert status == 200 and data["choices"][0]["text"].startswith(" t")
    status, data = await post(session, pod, "/v1/completions", {"prompt": "text"})
    assert status == 400 and "tokenizer" in data["error"]["message"]


def test_output_text_is_deterministic_and_decodable(tokenizer_dir: Path) -> None:
    """Output tokens depend only on the prompt, and their pieces concatenate to the decoding."""
    from tokenizers import Tokenizer

    text = OutputText(tokenizer_dir)
    prompt = np.arange(50, dtype=np.int32)
    a, b = text.tokens(prompt, 40), text.tokens(prompt, 40)
    assert a.tolist() == b.tolist()
    assert text.tokens(prompt + 1, 40).tolist() != a.tolist()
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert tok.decode(a.tolist()) == text.text(a)
    assert OutputText(None).text([1001, 1002]) == " t1001 t1002"


def test_sim_serve_command_runs_pods_until_stdin_closes(tmp_path: Path) -> None:
    """``kvaware sim serve`` starts N pods, writes an endpoints file and stops when told."""
    import json
    import urllib.request

    endpoints = tmp_path / "endpoints.yaml"
    cmd = [
        sys.executable, "-m", "kvaware_scorer.cli", "sim", "serve", "--pods", "2",
        "--speedup", "50", "--model", "org/served", "--build-tokenizer", str(tmp_path / "tok"),
        "--num-gpu-blocks", "128", "--endpoints-out", str(endpoints), "--stop-on-eof",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            assert line, "the command exited early"
            lines.append(line)
            if "pods ready" in line:
                break
        assert "2 pods ready" in lines[-1] and "128 KV blocks" in lines[-1]
        entries = yaml.safe_load(endpoints.read_text())["endpoints"]
        assert [e["name"] for e in entries] == ["sim-0", "sim-1"]
        assert all(e["model"] == "org/served" and e["kvEvents"] for e in entries)
        for e in entries:
            req = urllib.request.Request(
                f"http://{e['address']}:{e['port']}/v1/chat/completions",
                data=json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                answer = json.loads(resp.read())
            assert answer["usage"]["completion_tokens"] == 16  # the default max_tokens
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def test_a_failed_start_leaves_no_socket_behind() -> None:
    """A pod whose publisher port is taken fails to start, and the fleet still shuts its ZMQ
    context down at once (a socket left open would block that forever)."""
    import socket
    import threading

    errors: list[BaseException] = []

    def attempt(port: int) -> None:
        async def main() -> None:
            fleet = LiveFleet(LivePodsConfig(num_pods=1, model=MODEL, kv_events_base_port=port))
            try:
                await fleet.start()
            except zmq.ZMQError as exc:
                errors.append(exc)

        asyncio.run(main())

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        worker = threading.Thread(target=attempt, args=(taken.getsockname()[1],), daemon=True)
        worker.start()
        worker.join(10.0)
    assert not worker.is_alive(), "LiveFleet.start hung after a failed pod start"
    assert len(errors) == 1


async def test_aborts_pending_at_a_kill_log_no_error(
    make_fleet: FleetFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An abort still queued when the pod is killed is dropped quietly (asyncio reports no
    'exception was never retrieved' for it)."""
    import gc

    pod = (await make_fleet(speedup=1.0)).pods[0]
    job = pod.submit([pod.new_request(list(range(1, 200)), 500)])
    pod.abort(job)
    await pod.stop()
    del job
    gc.collect()
    await asyncio.sleep(0)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
