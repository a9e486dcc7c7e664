"""Hostile clients and hung pods, on real sockets: template trust and render budget, connection
cap and head timeout, compressed bodies, prompt bounds, pod timeouts, readiness, credentials; the tokenizers loaded at start and the scrape interval flag."""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from kvaware_scorer.gateway import Gateway, GatewayConfig
from kvaware_scorer.scheduler import Scheduler, make_plugin_manager
from kvaware_scorer.tokenization import install_local_tokenizer
from tests.harness import pool_scheduler

from .conftest import MODEL, ROOT, post, serve_command, start_gateway
from .pods import FakePod

#: Nested loops of 10^10 iterations: a render that never ends on its own.
RUNAWAY = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
CHAT = [{"role": "user", "content": "Which pod should serve this request?"}]


@pytest.fixture(scope="module")
def tokenizer_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local tokenizer for ``test-model`` (found by auto-discovery)."""
    root = tmp_path_factory.mktemp("tokenizers")
    install_local_tokenizer(root, MODEL)
    return root


def precise_config(tokenizer_root: Path, **pool: Any) -> dict[str, Any]:
    """The shipped precise profile, tokenizing with the local tokenizer."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "config" / "precise.yaml").read_text())
    for plugin in data["plugins"]:
        if plugin["type"] == "precise-prefix-cache-scorer":
            plugin["parameters"]["tokenizersPoolConfig"] = {
                "local": {"autoDiscoveryDir": str(tokenizer_root)},
                **pool,
            }
    return data


async def start_precise(
    tmp_path: Path, pods: list[FakePod], tokenizer_root: Path, pool: dict[str, Any], **settings: Any
) -> Gateway:
    scheduler = pool_scheduler(tmp_path, pods, precise_config(tokenizer_root, **pool), [])
    settings.setdefault("endpoint_header", True)
    settings.setdefault("drain_timeout", 2.0)
    gateway = Gateway(scheduler, GatewayConfig(port=0, **settings), own_scheduler=True)
    await gateway.start()
    return gateway


# -- 1. chat templates from the request -----------------------------------------------------------


async def test_request_chat_template_is_refused_unless_trusted(
    tmp_path: Path, pod: FakePod
) -> None:
    """A request's own chat_template (or one hidden in chat_template_kwargs) gets 400 in the
    OpenAI shape and never reaches a pod, unless the operator trusts request templates."""
    gw = await start_gateway(tmp_path, [pod])
    bodies = [
        {"model": MODEL, "messages": CHAT, "chat_template": RUNAWAY},
        {"model": MODEL, "messages": CHAT, "chat_template_kwargs": {"chat_template": RUNAWAY}},
    ]
    try:
        async with aiohttp.ClientSession() as s:
            for body in bodies:
                for path in ("/v1/chat/completions", "/v1/score"):
                    status, data, _ = await post(s, gw.url + path, body)
                    assert status == 400, (path, data)
                    assert data["error"]["code"] == "untrusted_chat_template"
                    assert data["error"]["type"] == "invalid_request_error"
                    assert data["error"]["param"] == "chat_template"
    finally:
        await gw.stop()
    assert pod.requests == []


async def test_runaway_render_is_stopped_and_others_keep_their_workers(
    tmp_path: Path, pod: FakePod, tokenizer_root: Path
) -> None:
    """With trusted request templates, six runaway renders are stopped within the render
    budget, text and chat requests meanwhile are answered at once, and the renders burn no CPU
    after their requests are gone."""
    gw = await start_precise(
        tmp_path,
        [pod],
        tokenizer_root,
        {"renderTimeout": 1.0, "renderWorkers": 2},
        trust_request_chat_template=True,
    )
    try:
        async with aiohttp.ClientSession() as s:
            # Warm up: load the tokenizer and both render workers (a cold worker's start is
            # not part of the render budget).
            ok = {"model": MODEL, "messages": CHAT, "chat_template": "{{ messages[0].content }}"}
            warm = await asyncio.gather(
                post(s, gw.url + "/v1/chat/completions", ok),
                post(s, gw.url + "/v1/chat/completions", {**ok, "messages": CHAT * 2}),
            )
            assert [w[0] for w in warm] == [200, 200]
            t0 = time.monotonic()
            evil = [
                asyncio.ensure_future(
                    post(
                        s,
                        gw.url + "/v1/chat/completions",
                        {
                            "model": MODEL,
                            "messages": [{"role": "user", "content": f"attack {i}"}],
                            "chat_template": RUNAWAY,
                        },
                    )
                )
                for i in range(6)
            ]
            await asyncio.sleep(0.3)
            # Others are served while the runaway renders are under way.
            others = []
            for i in range(4):
                t1 = time.monotonic()
                status, _, _ = await post(
                    s, gw.url + "/v1/completions", {"model": MODEL, "prompt": f"text {i} " * 50}
                )
                assert status == 200
                status, _, _ = await post(
                    s,
                    gw.url + "/v1/chat/completions",
                    {"model": MODEL, "messages": [{"role": "user", "content": f"chat {i}"}]},
                )
                assert status == 200
                others.append(time.monotonic() - t1)
            results = await asyncio.wait_for(asyncio.gather(*evil), 20)
            evil_time = time.monotonic() - t0
        # The runaway requests are still routed (by load) and answered by the pod.
        assert [r[0] for r in results] == [200] * 6
        assert max(others) < 1.0, others
        assert evil_time < 6.0
        metrics = gw.scheduler.metrics_registry
        renders = {
            s.labels["result"]: s.value
            for m in metrics.collect()
            if m.name == "kvaware_chat_renders"
            for s in m.samples
            if s.name.endswith("_total")
        }
        assert renders.get("timeout", 0) >= 1 and renders.get("ok") == 2, renders
        # No render process is left burning CPU once every request is answered.
        await asyncio.sleep(0.2)
        assert _render_workers_busy() == 0
    finally:
        await gw.stop()


def _render_workers_busy() -> int:
    """Render worker processes of this process using CPU now (state R)."""
    import os

    busy = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and b"render_worker" in cmd and fields[0] == "R":
            busy += 1
    return busy


async def test_rendered_text_over_the_size_budget_is_refused(
    tmp_path: Path, pod: FakePod, tokenizer_root: Path
) -> None:
    """A trusted request template rendering more than renderMaxChars is refused (counted as
    ``size``), and the request is routed by load alone."""
    gw = await start_precise(
        tmp_path,
        [pod],
        tokenizer_root,
        {"renderMaxChars": 10_000},
        trust_request_chat_template=True,
    )
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "messages": CHAT, "chat_template": "{{ 'x' * 20000 }}"}
            status, _, _ = await post(s, gw.url + "/v1/chat/completions", body)
            assert status == 200
            status, data, _ = await post(s, gw.url + "/v1/score", body)
            assert status == 200
        assert data["prompt_tokens"] is None
        samples = [
            s
            for m in gw.scheduler.metrics_registry.collect()
            if m.name == "kvaware_chat_renders"
            for s in m.samples
            if s.name.endswith("_total") and s.labels["result"] == "size"
        ]
        assert samples and samples[0].value >= 1
    finally:
        await gw.stop()


# -- 1. connections --------------------------------------------------------------------------------


async def _read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


async def test_connections_over_the_cap_are_refused_fast(tmp_path: Path, pod: FakePod) -> None:
    """Beyond maxClientConnections a new connection is answered 503 and closed at once; once
    connections close, requests are served again."""
    gw = await start_gateway(tmp_path, [pod], max_client_connections=5)
    assert gw.port is not None
    held = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(5)]
    try:
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        answer = await _read_all(reader, 2.0)
        took = time.monotonic() - t0
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer[:80]
        assert b"too_many_connections" in answer
        assert took < 0.5
    finally:
        for _, w in held:
            w.close()
    await asyncio.sleep(0.2)
    try:
        async with aiohttp.ClientSession() as s, s.get(gw.url + "/health") as resp:
            assert resp.status == 200
        value = gw.metrics.rejected_connections.labels("limit")._value.get()
        assert value == 1
    finally:
        await gw.stop()


async def test_slow_request_heads_are_cut_off(tmp_path: Path, pod: FakePod) -> None:
    """A client sending its request head one line at a time gets 408 and is disconnected after
    headerTimeout, while /health answers other clients at once."""
    gw = await start_gateway(tmp_path, [pod], header_timeout=0.5)
    assert gw.port is not None
    try:
        conns = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(20)]
        for _, w in conns:
            w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        stalls = []
        async with aiohttp.ClientSession() as s:
            for i in range(6):
                if i < 2:  # one more header line every 0.2 s, within the head timeout
                    for _, w in conns:
                        w.write(f"X-Slow-{i}: 1\r\n".encode())
                t1 = time.monotonic()
                async with s.get(gw.url + "/health") as resp:
                    assert resp.status == 200
                stalls.append(time.monotonic() - t1)
                await asyncio.sleep(0.2)
        answers = [await _read_all(r, 3.0) for r, _ in conns]
        took = time.monotonic() - t0
        for _, w in conns:
            w.close()
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0][:80]
        assert took < 3.0
        assert max(stalls) < 0.5
        assert gw.metrics.rejected_connections.labels("header_timeout")._value.get() == 20
    finally:
        await gw.stop()


async def test_repeated_errors_are_logged_at_a_bounded_rate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fifty requests to a pod that refuses connections log one warning (then a count), and the
    event loop's repeated errors (as accept() failing at the open-file limit) one traceback."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there: connections are refused
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(
        yaml.safe_dump(
            {"endpoints": [{"name": "dead", "address": "127.0.0.1", "port": port, "model": MODEL}]}
        )
    )
    gw = Gateway.from_files(
        ROOT / "config" / "load.yaml",
        endpoints,
        GatewayConfig(port=0, unhealthy_cooldown=0, error_log_interval=60),
        scrape=False,
    )
    await gw.start()
    try:
        with caplog.at_level(logging.WARNING):
            async with aiohttp.ClientSession() as s:
                for _ in range(50):
                    status, _, _ = await post(
                        s, gw.url + "/v1/completions", {"model": MODEL, "prompt": "x"}
                    )
                    assert status == 502
            loop = asyncio.get_running_loop()
            for _ in range(500):
                loop.call_exception_handler(
                    {"message": "socket.accept() out of system resource", "exception": OSError(24)}
                )
    finally:
        await gw.stop()
    failed = [r for r in caplog.records if "failed (connect)" in r.getMessage()]
    accept = [r for r in caplog.records if "socket.accept()" in r.getMessage()]
    assert len(failed) == 1
    assert len(accept) == 1


def test_log_limiter_counts_what_it_suppressed() -> None:
    """A line of a kind is let through once per interval, carrying the count suppressed since."""
    from kvaware_scorer.gateway.guard import LogLimiter

    now = [0.0]
    limiter = LogLimiter(10.0, clock=lambda: now[0])
    assert limiter.allow("a") == 0
    assert [limiter.allow("a") for _ in range(5)] == [None] * 5
    assert limiter.allow("b") == 0
    now[0] = 10.5
    assert limiter.allow("a") == 5


# -- 1. compressed bodies and prompt size ---------------------------------------------------------


def _bomb(inflated: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    parts = [c.compress(zeros) for _ in range(inflated >> 20)]
    return b"".join(parts) + c.flush()


async def test_compressed_bodies_stop_at_the_cap(tmp_path: Path, pod: FakePod) -> None:
    """A gzip body inflating past maxBodyBytes gets 413 having inflated at most the cap, one
    inflating to exactly the cap is read, and an invalid gzip body is a 400, not a 500."""
    limit = 1 << 20
    gw = await start_gateway(tmp_path, [pod], max_body_bytes=limit)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    prefix = b'{"model": "test-model", "prompt": "'
    exact = prefix + b"a" * (limit - len(prefix) - 2) + b'"}'
    try:
        async with aiohttp.ClientSession() as s:
            bomb = _bomb(256 << 20)
            t0 = time.monotonic()
            async with s.post(gw.url + "/v1/completions", data=bomb, headers=headers) as resp:
                assert resp.status == 413
                assert (await resp.json())["error"]["code"] == "request_too_large"
            assert time.monotonic() - t0 < 2.0
            async with s.post(
                gw.url + "/v1/completions", data=gzip.compress(exact), headers=headers
            ) as resp:
                assert resp.status == 200
            async with s.post(
                gw.url + "/v1/completions", data=gzip.compress(exact + b" "), headers=headers
            ) as resp:
                assert resp.status == 413
            for bad in (b"\x1f\x8b\x08\x00garbage-not-deflate", gzip.compress(exact)[:-20]):
                async with s.post(gw.url + "/v1/completions", data=bad, headers=headers) as resp:
                    assert resp.status == 400
                    data = await resp.json()
                    assert data["error"]["code"] == "invalid_encoding"
                    assert data["error"]["type"] == "invalid_request_error"
    finally:
        await gw.stop()
    assert len(pod.requests) == 1
    assert pod.requests[0]["body"]["prompt"] == "a" * (limit - len(prefix) - 2)


async def test_prompt_size_is_bounded_before_and_after_tokenizing(
    tmp_path: Path, pod: FakePod, tokenizer_root: Path
) -> None:
    """Prompts over maxPromptChars (text or chat) or maxPromptTokens (given ids, or tokens once
    tokenized) get 413 ``prompt_too_large`` and never reach a pod."""
    gw = await start_precise(
        tmp_path, [pod], tokenizer_root, {}, max_prompt_chars=1000, max_prompt_tokens=100
    )
    cases = [
        ("/v1/completions", {"model": MODEL, "prompt": "x" * 1001}),
        ("/v1/completions", {"model": MODEL, "prompt": ["y" * 1001, "z"]}),
        ("/v1/completions", {"model": MODEL, "prompt": list(range(101))}),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x" * 1001}]},
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "w" * 1001}]}],
            },
        ),
        # Under the character bound, over the token bound once tokenized.
        ("/v1/completions", {"model": MODEL, "prompt": "a b c d e f g h " * 60}),
        ("/v1/score", {"model": MODEL, "prompt": "x" * 1001}),
        ("/v1/score", {"model": MODEL, "prompt": "a b c d e f g h " * 60}),
    ]
    try:
        async with aiohttp.ClientSession() as s:
            for path, body in cases:
                status, data, _ = await post(s, gw.url + path, body)
                assert status == 413, (path, str(body)[:60], data)
                assert data["error"]["code"] == "prompt_too_large"
            status, _, _ = await post(
                s, gw.url + "/v1/completions", {"model": MODEL, "prompt": "a b " * 10}
            )
            assert status == 200
    finally:
        await gw.stop()
    assert len(pod.requests) == 1


# -- 1. hung pods and readiness ---------------------------------------------------------------------


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A port whose kernel accepts connections that nobody ever reads (like a SIGSTOPped pod)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


async def test_hung_pod_first_byte_and_idle_timeouts(
    tmp_path: Path, pod: FakePod, hung_port: int
) -> None:
    """Against a pod that accepts and never answers, streamed requests move to another pod after
    firstByteTimeout, non-streamed ones fail cleanly with 504 after responseTimeout, and a stream
    that goes silent ends with an SSE error and [DONE] after streamIdleTimeout."""
    endpoints = tmp_path / "endpoints.yaml"
    entries = [
        {"name": "hung", "address": "127.0.0.1", "port": hung_port, "model": MODEL},
        {"name": pod.name, "address": "127.0.0.1", "port": pod.port, "model": MODEL},
    ]
    endpoints.write_text(yaml.safe_dump({"endpoints": entries}))
    gw = Gateway.from_files(
        ROOT / "config" / "random.yaml",
        endpoints,
        GatewayConfig(
            port=0,
            first_byte_timeout=0.5,
            response_timeout=0.5,
            stream_idle_timeout=0.5,
            unhealthy_cooldown=0,
            models_timeout=0.3,
        ),
        scrape=False,
        seed=3,
    )
    await gw.start()
    statuses: list[int] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            t0 = time.monotonic()
            for i in range(8):
                body = {"model": MODEL, "prompt": f"p{i}", "stream": True}
                async with s.post(gw.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    text = await resp.text()
                assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text
            streamed = time.monotonic() - t0
            for i in range(8):
                status, data, _ = await post(
                    s, gw.url + "/v1/completions", {"model": MODEL, "prompt": f"q{i}"}
                )
                statuses.append(status)
                if status != 200:
                    assert status == 504 and data["error"]["code"] == "upstream_timeout"
            body = {
                "model": MODEL,
                "prompt": "slow",
                "stream": True,
                "test_pod": {"chunks": 3, "delay": 3.0},
            }
            t1 = time.monotonic()
            for _ in range(4):  # the random picker reaches the slow pod within a few tries
                async with s.post(gw.url + "/v1/completions", json=body) as resp:
                    text = await resp.text()
                if '"error"' in text:
                    break
            idle = time.monotonic() - t1
    finally:
        await gw.stop()
    assert streamed < 8 * 0.5 + 2.0
    assert 504 in statuses and 200 in statuses
    assert '"error"' in text and text.rstrip().endswith("data: [DONE]")
    assert idle < 4 * 0.5 + 3.0
    assert gw.metrics.retries._value.get() >= 1


async def test_readiness_is_truthful_and_liveness_separate(tmp_path: Path) -> None:
    """/health and /health/ready answer 503 once no endpoint is reachable and 200 again when
    one is back; /health/live stays 200."""
    pods = [FakePod(f"pod-{i}", MODEL) for i in range(2)]
    for p in pods:
        await p.start()
    ports = [p.port for p in pods]
    gw = await start_gateway(tmp_path, pods, with_model=True, models_refresh_interval=0.1)

    async def health(s: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
        async with s.get(gw.url + path) as resp:
            return resp.status, await resp.json()

    try:
        async with aiohttp.ClientSession() as s:
            assert (await health(s, "/health"))[0] == 200
            for p in pods:
                await p.stop()
            deadline = time.monotonic() + 5
            while (await health(s, "/health"))[0] != 503:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            status, data = await health(s, "/health/ready")
            assert status == 503 and data["status"] == "unavailable" and data["usable"] == 0
            assert (await health(s, "/health/live")) == (200, {"status": "ok"})
            await pods[0].start(ports[0])
            deadline = time.monotonic() + 5
            while (await health(s, "/health"))[0] != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert (await health(s, "/health/ready"))[1]["usable"] == 1
    finally:
        await gw.stop()
        await pods[0].stop()


# -- 2. credentials --------------------------------------------------------------------------------


async def test_api_and_admin_keys(
    tmp_path: Path,
    pod: FakePod,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Inference routes need an API key (from a file or an environment variable) or the admin
    key; /v1/score and /metrics need the admin key; keys never appear in logs or reprs."""
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nsk-file-one\n\nsk-file-two  # second\n")
    admin = tmp_path / "admin.txt"
    admin.write_text("sk-admin-secret\n")
    monkeypatch.setenv("KV_TEST_KEYS", "sk-env-one, sk-env-two")
    every = ["sk-file-one", "sk-file-two", "sk-env-one", "sk-env-two", "sk-admin-secret"]
    chat = {"model": MODEL, "messages": CHAT}

    def bearer(key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    with caplog.at_level(logging.DEBUG):
        gw = await start_gateway(
            tmp_path,
            [pod],
            api_key_file=keys,
            api_key_env="KV_TEST_KEYS",
            admin_key_file=admin,
        )
        try:
            async with aiohttp.ClientSession() as s:
                for key in (None, "sk-wrong", "sk-file-on", "sk-file-one2"):
                    status, data, resp = await post(
                        s, gw.url + "/v1/chat/completions", chat, headers=bearer(key)
                    )
                    assert status == 401 and data["error"]["code"] == "invalid_api_key"
                    assert resp.headers["WWW-Authenticate"] == "Bearer"
                async with s.get(gw.url + "/v1/models") as resp:
                    assert resp.status == 401
                status, _, _ = await post(
                    s, gw.url + "/v1/chat/completions", chat, headers={"Authorization": "Basic x"}
                )
                assert status == 401
                for key in every:
                    status, _, _ = await post(
                        s, gw.url + "/v1/chat/completions", chat, headers=bearer(key)
                    )
                    assert status == 200, key
                async with s.get(gw.url + "/v1/models", headers=bearer("sk-env-two")) as resp:
                    assert resp.status == 200
                # Admin routes: the admin key only.
                for path in ("/v1/score", "/metrics"):
                    for key, want in (
                        (None, 401),
                        ("sk-wrong", 401),
                        ("sk-file-one", 403),
                        ("sk-admin-secret", 200),
                    ):
                        if path == "/metrics":
                            async with s.get(gw.url + path, headers=bearer(key)) as resp:
                                status = resp.status
                        else:
                            status, _, _ = await post(s, gw.url + path, chat, headers=bearer(key))
                        assert status == want, (path, key)
                async with s.get(gw.url + "/health") as resp:
                    assert resp.status == 200  # probes need no key
            text = repr(gw.config) + repr(gw.credentials) + gw.config.model_dump_json()
        finally:
            await gw.stop()
    logged = "\n".join(r.getMessage() + str(r.args) for r in caplog.records) + text
    for key in every:
        assert key not in logged
    # The pod sees the client's own header (pods started with --api-key can share the key).
    assert pod.requests[0]["headers"]["Authorization"] == "Bearer sk-file-one"


async def test_score_without_admin_key_is_loopback_only(tmp_path: Path, pod: FakePod) -> None:
    """With no admin key configured /v1/score answers loopback clients and refuses others; a
    key source that is missing is a configuration error that names it, not the keys."""
    gw = await start_gateway(tmp_path, [pod])
    try:
        async with aiohttp.ClientSession() as s:
            status, _, _ = await post(s, gw.url + "/v1/score", {"model": MODEL, "prompt": "x"})
            assert status == 200
    finally:
        await gw.stop()
    from kvaware_scorer.gateway.auth import Access, Credentials

    creds = Credentials.from_keys(api=["k"])
    assert creds.check_admin(None, "127.0.0.1") is Access.OK
    assert creds.check_admin(None, "::1") is Access.OK
    assert creds.check_admin("Bearer k", "10.1.2.3") is Access.FORBIDDEN
    assert creds.check_admin(None, "192.168.0.9") is Access.FORBIDDEN
    from kvaware_scorer.errors import ConfigError

    with pytest.raises(ConfigError, match="KV_UNSET_VAR"):
        Credentials.load(None, "KV_UNSET_VAR", None, None, environ={})
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no key"):
        Credentials.load(empty, None, None, None)


# -- warm-up and the scrape interval flag -------------------------------------------------------


def _tokenizers_loaded(scheduler: Scheduler) -> list[str]:
    scorer = scheduler.plugins["precise-prefix-cache-scorer"]
    return scorer.indexer.tokenization.registry.cached_models()


async def test_start_loads_the_pools_tokenizers(
    tmp_path: Path, pod: FakePod, tokenizer_root: Path
) -> None:
    gateway = await start_precise(tmp_path, [pod], tokenizer_root, {})
    try:
        assert _tokenizers_loaded(gateway.scheduler) == [MODEL]
        assert pod.requests == []  # loaded without any request
    finally:
        await gateway.stop()


def test_warm_skips_a_model_without_tokenizer(tmp_path: Path, tokenizer_root: Path) -> None:
    scheduler = Scheduler.from_config(
        precise_config(tokenizer_root, hf={"enabled": False}),
        plugin_manager=make_plugin_manager(use_env=False),
    )
    try:
        scheduler.warm(["no-such-model", MODEL])  # the missing one is only logged
        assert _tokenizers_loaded(scheduler) == [MODEL]
    finally:
        scheduler.close()


def test_warm_renders_the_chat_template_once(tokenizer_root: Path) -> None:
    """The first chat request does not pay for compiling the model's chat template."""
    scheduler = Scheduler.from_config(
        precise_config(tokenizer_root, hf={"enabled": False}),
        plugin_manager=make_plugin_manager(use_env=False),
    )
    try:
        scorer = scheduler.plugins["precise-prefix-cache-scorer"]
        tok = scorer.indexer.tokenization.registry.get(MODEL)
        assert len(tok.templates._facts) == 0
        scheduler.warm([MODEL])
        assert len(tok.templates._facts) == 1
    finally:
        scheduler.close()


def test_serve_refuses_a_bad_refresh_metrics_interval(tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: [{address: 127.0.0.1, port: 9}]\n")
    for bad, why in (("soon", "not a duration"), ("0s", "must be > 0")):
        cmd = serve_command(Path("random"), endpoints, "--refresh-metrics-interval", bad)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out
        assert "--refresh-metrics-interval" in out.stderr and why in out.stderr, out.stderr
