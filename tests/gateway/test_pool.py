"""Pool changes under traffic: a pod process killed mid-run, endpoints removed and added."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import free_port

from .conftest import MODEL, Recorder, endpoints_yaml, start_gateway
from .pods import FakePod

pytestmark = pytest.mark.timeout(90)

PODS_SCRIPT = Path(__file__).with_name("pods.py")


class PodProcess:
    """One pod in its own process (so it can be killed)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(PODS_SCRIPT), "--model", MODEL, "--ports", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float = 20.0) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        if line.strip() != b"ready" or time.monotonic() > deadline:
            raise RuntimeError(f"pod {self.name} did not start")

    @property
    def id(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def pod_processes() -> Iterator[list[PodProcess]]:
    procs = [PodProcess(f"proc-{i}") for i in range(3)]
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.kill()


def write_pool(path: Path, procs: list[PodProcess]) -> None:
    entries = [{"name": p.name, "address": "127.0.0.1", "port": p.port} for p in procs]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"endpoints": entries}))
    os.replace(tmp, path)


async def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_pod_killed_mid_run(
    tmp_path: Path, pod_processes: list[PodProcess], recorder: Recorder
) -> None:
    """Requests keep succeeding while a pod process is SIGKILLed under load (in-flight ones are
    retried elsewhere); removing it from the endpoints file drops it from the pool and purges it
    from the index."""
    gw = await start_gateway(tmp_path, [], recorder=recorder, config="precise.yaml")
    endpoints = tmp_path / "endpoints.yaml"
    write_pool(endpoints, pod_processes)
    await wait_for(lambda: len(gw.scheduler.endpoints) == 3)
    await wait_for(lambda: all(gw.catalog.known(p.id) for p in pod_processes))
    victim = pod_processes[0]
    precise = gw.scheduler.plugin("precise-prefix-cache-scorer")
    statuses: list[int] = []
    targets: list[str] = []
    killed = asyncio.Event()

    async def client(session: aiohttp.ClientSession, worker: int) -> None:
        for i in range(15):
            # Six prompt families, so every pod gets some (and speculative entries appear).
            prompt = [1000 * ((worker + i) % 6) + t for t in range(64)]
            body = {"model": MODEL, "prompt": prompt, "test_pod": {"sleep": 0.03}}
            async with session.post(gw.url + "/v1/completions", json=body) as resp:
                await resp.read()
                statuses.append(resp.status)
                targets.append(resp.headers.get("x-kvaware-endpoint", ""))
            if worker == 0 and i == 4:
                victim.kill()
                killed.set()

    try:
        async with aiohttp.ClientSession() as s:
            await asyncio.gather(*(client(s, w) for w in range(4)))
        assert killed.is_set()
        assert statuses == [200] * 60
        assert victim.id in targets  # it served requests before it died
        # What the pod's KV events would have recorded (confirmed entries, not speculative).
        precise.indexer.index.add(victim.id, precise.indexer.block_keys(list(range(64)), MODEL))
        assert victim.id in precise.indexer.index.pods()
        write_pool(endpoints, pod_processes[1:])
        await wait_for(lambda: victim.id not in {e.id for e in gw.scheduler.endpoints})
        assert victim.id not in precise.indexer.index.pods()
        assert gw.scheduler.plugin("active-request-scorer").count(victim.id) == 0
        async with (
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/score", json={"model": MODEL, "prompt": [1] * 32}) as resp,
        ):
            explained = await resp.json()
        assert victim.id not in explained["candidates"]
        await wait_for(lambda: not gw.catalog.known(victim.id))
    finally:
        await gw.stop()
    assert all(n == 1 for n in recorder.per_request().values())
    assert len(recorder.calls) == 60


async def test_added_endpoint_becomes_routable(
    tmp_path: Path, pods: list[FakePod], recorder: Recorder
) -> None:
    """An endpoint added to the file (without a model) is polled for its models right away and
    then receives traffic; /v1/models follows the pool."""
    gw = await start_gateway(tmp_path, pods[:1], recorder=recorder, models_refresh_interval=60)
    endpoints = tmp_path / "endpoints.yaml"
    new = FakePod("new", "other-model")
    await new.start()
    try:
        endpoints.write_text(endpoints_yaml([pods[0], new]))
        await wait_for(lambda: gw.catalog.known(f"127.0.0.1:{new.port}"))
        async with aiohttp.ClientSession() as s:
            async with s.post(
                gw.url + "/v1/completions", json={"model": "other-model", "prompt": "x"}
            ) as resp:
                assert resp.status == 200
                assert resp.headers["x-kvaware-endpoint"] == f"127.0.0.1:{new.port}"
            async with s.get(gw.url + "/v1/models") as resp:
                ids = sorted(m["id"] for m in (await resp.json())["data"])
            assert ids == sorted([MODEL, "other-model"])
            endpoints.write_text(endpoints_yaml([pods[0]]))
            await wait_for(lambda: len(gw.scheduler.endpoints) == 1)
            async with s.get(gw.url + "/v1/models") as resp:
                assert [m["id"] for m in (await resp.json())["data"]] == [MODEL]
            async with s.post(
                gw.url + "/v1/completions", json={"model": "other-model", "prompt": "x"}
            ) as resp:
                assert resp.status == 404
    finally:
        await gw.stop()
        await new.stop()
    assert len(new.requests) == 1


async def test_pod_listing_its_models_late_is_polled_on_demand(
    tmp_path: Path, recorder: Recorder
) -> None:
    """A pod whose /v1/models did not answer at start (still loading) makes requests for its
    model wait-and-see: 503 model_not_ready while it is not ready, served as soon as it lists
    the model, without waiting for the periodic refresh."""
    pod = FakePod("late", MODEL)
    pod.models_available = False
    await pod.start()
    gw = await start_gateway(tmp_path, [pod], recorder=recorder, models_refresh_interval=60)
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "x"}
            async with s.post(gw.url + "/v1/completions", json=body) as resp:
                assert resp.status == 503
                err = (await resp.json())["error"]
            assert err["code"] == "model_not_ready" and err["param"] == "model"
            pod.models_available = True
            await asyncio.sleep(1.05)  # the on-demand polls are at most one per second
            async with s.post(gw.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
            async with s.post(gw.url + "/v1/completions", json={**body, "model": "nope"}) as r:
                assert r.status == 404
    finally:
        await gw.stop()
        await pod.stop()
    assert len(pod.requests) == 1


async def test_empty_pool(tmp_path: Path, recorder: Recorder) -> None:
    """With no endpoints, inference requests get 503 in the OpenAI shape and /health says so."""
    gw = await start_gateway(tmp_path, [], recorder=recorder)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                gw.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}
            ) as resp:
                assert resp.status == 503
                data = await resp.json()
            async with s.get(gw.url + "/health") as resp:
                health = await resp.json()
    finally:
        await gw.stop()
    assert data["error"]["code"] == "no_endpoint"
    assert data["error"]["type"] == "server_error"
    assert health["endpoints"] == 0
    assert recorder.calls == []
