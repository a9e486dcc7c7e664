"""Gateway test harness: real OpenAI-like pods on 127.0.0.1 and a real gateway in front of them."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvaware_scorer.gateway import Gateway, GatewayConfig
from tests.harness import (
    MODEL,
    ROOT,
    Recorder,
    RecorderPlugin,
    endpoints_yaml,
    pool_scheduler,
    running_pods,
    scheduler_config,
)

from .pods import FakePod

__all__ = ["MODEL", "ROOT", "Recorder", "RecorderPlugin", "endpoints_yaml", "scheduler_config"]


class FailingStartRecorder(Recorder):
    """A recorder whose background work cannot start (like a KV-event subscriber that fails)."""

    def start(self) -> None:
        raise RuntimeError("cannot start background work")

    def stop(self) -> None:
        pass


def serve_command(config: Path, endpoints: Path, *args: str) -> list[str]:
    """The ``kvaware serve`` command line of `config` over `endpoints`, then `args`."""
    return [
        sys.executable,
        "-m",
        "kvaware_scorer.cli",
        "serve",
        "--config",
        str(config),
        "--endpoints",
        str(endpoints),
        *args,
    ]


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, **kw: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """POST `body` as JSON: the status, the decoded answer and the response."""
    async with session.post(url, json=body, **kw) as resp:
        data = await resp.json(content_type=None)
        return resp.status, data, resp


async def start_gateway(
    tmp_path: Path,
    pods: Sequence[FakePod],
    *,
    config: str = "load.yaml",
    recorder: Recorder | None = None,
    with_model: bool = False,
    **settings: Any,
) -> Gateway:
    """A running gateway over `pods` (pool from an endpoints file polled every 50 ms)."""
    plugins = [RecorderPlugin(recorder)] if recorder is not None else []
    config_data = scheduler_config(config, recorder=recorder is not None)
    scheduler = pool_scheduler(tmp_path, pods, config_data, plugins, with_model=with_model)
    settings.setdefault("endpoint_header", True)
    settings.setdefault("drain_timeout", 5.0)
    gateway = Gateway(scheduler, GatewayConfig(port=0, **settings), own_scheduler=True)
    await gateway.start()
    return gateway


@pytest.fixture
async def pods() -> AsyncIterator[list[FakePod]]:
    """Three running pods serving ``test-model``."""
    async with running_pods() as started:
        yield started


@pytest.fixture
async def pod() -> AsyncIterator[FakePod]:
    """One running pod serving ``test-model``."""
    p = FakePod("pod-0", MODEL)
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
def recorder() -> Recorder:
    """A fresh hook recorder."""
    return Recorder()
