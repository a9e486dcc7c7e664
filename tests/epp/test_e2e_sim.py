"""End to end as an operator runs it: ``kvaware sim serve`` pods, the ``kvaware epp`` command
(precise config, TLS by default, pool from the pods' endpoints file) and a real Envoy in front."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvaware_scorer.demo import scheduler_config
from kvaware_scorer.epp import EnvoyProcess, bootstrap, write_bootstrap
from kvaware_scorer.scheduler import load_endpoints
from tests.conftest import free_port

from .conftest import ROOT, Command

pytestmark = pytest.mark.slow

MODEL = "kvaware/epp-e2e"


class Stack:
    def __init__(self, envoy_url: str, epp_ports: dict[str, int], pods: list[str]) -> None:
        self.url = envoy_url
        self.ports = epp_ports
        self.pods = pods


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Three sim pods, ``kvaware epp`` (TLS) and Envoy; stopped at the end of the module."""
    tmp = tmp_path_factory.mktemp("epp-e2e")
    root = tmp / "tokenizers"
    endpoints = tmp / "endpoints.yaml"
    sim = Command(
        [
            "sim", "serve", "--pods", "3", "--speedup", "20", "--model", MODEL,
            "--build-tokenizer", str(root), "--num-gpu-blocks", "400",
            "--endpoints-out", str(endpoints), "--stop-on-eof",
        ],
        tmp / "sim.log",
    )  # fmt: skip
    procs: list[Any] = [sim]
    try:
        sim.wait_line("pods ready")
        config = tmp / "precise.yaml"
        config.write_text(yaml.safe_dump(scheduler_config(ROOT / "config" / "precise.yaml", root)))
        ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
        epp = Command(
            [
                "epp", "--config", str(config), "--endpoints", str(endpoints),
                "--grpc-port", str(ports["grpc"]), "--grpc-health-port", str(ports["health"]),
                "--metrics-port", str(ports["metrics"]), "--host", "127.0.0.1",
                "--endpoint-header", "--drain-timeout", "5s",
            ],
            tmp / "epp.log",
        )  # fmt: skip
        procs.append(epp)
        line = epp.wait_line("serving ext_proc")
        assert "(TLS)" in line
        pool = load_endpoints(endpoints)
        listen, admin = free_port(), free_port()
        cfg = write_bootstrap(
            tmp / "envoy.yaml",
            bootstrap(
                listen_port=listen,
                admin_port=admin,
                epp_port=ports["grpc"],
                endpoints=pool,
                epp_tls=True,
                access_log=True,
            ),
        )
        envoy = EnvoyProcess(cfg, admin, tmp / "envoy.log")
        envoy.start()
        procs.append(envoy)
        envoy.wait_ready(30)
        yield Stack(f"http://127.0.0.1:{listen}", ports, [e.id for e in pool])
    finally:
        for proc in reversed(procs):
            proc.stop()


def _words(n: int, seed: int) -> str:
    from kvaware_scorer.tokenization import builtin_corpus

    vocab = sorted({w.strip(".,;:!?").lower() for line in builtin_corpus() for w in line.split()})
    vocab = [w for w in vocab if w.isalpha() and w.isascii()]
    rng = random.Random(seed)
    return " ".join(rng.choice(vocab) for _ in range(n))


async def _post(url: str, path: str, body: dict[str, Any]) -> tuple[int, Any, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s,
        s.post(url + path, json=body) as r,
    ):
        return r.status, r.headers, await r.text()


async def test_completions_and_chat_streamed_and_not(stack: Stack) -> None:
    """All four request kinds come back complete, served by a pod of the pool."""
    for stream in (False, True):
        for path, body in (
            ("/v1/completions", {"prompt": "tell me about envoy"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}),
        ):
            req: dict[str, Any] = {"model": MODEL, "max_tokens": 8, **body}
            if stream:
                req |= {"stream": True, "stream_options": {"include_usage": True}}
            status, headers, text = await _post(stack.url, path, req)
            assert status == 200, text
            assert headers["x-kvaware-endpoint"] in stack.pods
            if stream:
                events = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
                assert events[-1] == "[DONE]"
                assert json.loads(events[-2])["usage"]["completion_tokens"] == 8
            else:
                assert json.loads(text)["usage"]["completion_tokens"] == 8


async def test_shared_prefix_lands_on_the_pod_that_holds_it(stack: Stack) -> None:
    """Requests sharing a long system prompt follow the pod whose KV cache holds it (the
    precise scorer fed by the pods' KV events), for text prompts and chat alike."""
    for group in range(3):
        system = _words(300, 100 + group)
        first: str | None = None
        for q in range(5):
            body = {
                "model": MODEL,
                "max_tokens": 4,
                "prompt": f"{system}\n\nquestion {q}: {_words(8, 1000 * group + q)}",
            }
            status, headers, text = await _post(stack.url, "/v1/completions", body)
            assert status == 200, text
            pod = headers["x-kvaware-endpoint"]
            if first is None:
                first = pod
                await asyncio.sleep(0.3)  # the pod's KV events reach the EPP's index
            else:
                assert pod == first, f"group {group} question {q} left its pod"


async def test_the_openai_client_through_envoy(stack: Stack) -> None:
    """The official openai client works through Envoy + kvaware epp, streamed and not."""
    import openai

    client = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
    try:
        out = await client.completions.create(model=MODEL, prompt="hello", max_tokens=5)
        assert out.usage is not None and out.usage.completion_tokens == 5
        chunks = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        async for chunk in chunks:
            usage = chunk.usage or usage
        assert usage is not None and usage.completion_tokens == 5
    finally:
        await client.close()


async def test_health_services_and_metrics(stack: Stack) -> None:
    """gRPC health answers liveness, readiness and the ext_proc service (SERVING) and an unknown
    service with SERVICE_UNKNOWN; /metrics carries the Go EPP's metric names and the index's."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['health']}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
        resp = await stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{stack.ports['metrics']}/metrics") as r,
    ):
        text = await r.text()
    assert f'inference_objective_request_total{{model_name="{MODEL}"' in text
    assert 'inference_pool_ready_pods{name="kvaware"} 3.0' in text
    assert "kvaware_epp_route_latency_seconds_count" in text
    assert "kvaware_index_" in text or "kvaware_events_" in text
