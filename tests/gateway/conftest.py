"""Gateway test harness: real OpenAI-like pods on 127.0.0.1 and a real gateway in front of them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvaware_scorer.gateway import Gateway, GatewayConfig
from kvaware_scorer.scheduler import (
    ResponseInfo,
    Scheduler,
    SchedulingRequest,
    SchedulingResult,
    hookimpl,
    make_plugin_manager,
)

from .pods import FakePod

ROOT = Path(__file__).resolve().parents[2]
MODEL = "test-model"


def endpoints_yaml(pods: Sequence[FakePod], *, with_model: bool = False) -> str:
    """An endpoints file for `pods` (optionally with each pod's `model`)."""
    entries: list[dict[str, Any]] = []
    for pod in pods:
        entry: dict[str, Any] = {"name": pod.name, "address": "127.0.0.1", "port": pod.port}
        if with_model:
            entry["model"] = pod.model
        entries.append(entry)
    return yaml.safe_dump({"endpoints": entries})


class Recorder:
    """A post-response plugin (registered through the real plugin mechanism) that records every
    `post_response` call, so tests can check it runs exactly once per scheduled request."""

    def __init__(self) -> None:
        self.calls: list[tuple[SchedulingRequest, str, ResponseInfo]] = []
        self.scheduled: list[tuple[str, str]] = []

    def pre_request(self, ctx: Any, request: SchedulingRequest, result: SchedulingResult) -> None:
        self.scheduled.append((request.request_id, result.targets[0].id))

    def post_response(
        self, request: SchedulingRequest, result: SchedulingResult, response: ResponseInfo
    ) -> None:
        self.calls.append((request, result.targets[0].id, response))

    def per_request(self) -> dict[str, int]:
        """post_response calls per request id."""
        out: dict[str, int] = {}
        for request, _, _ in self.calls:
            out[request.request_id] = out.get(request.request_id, 0) + 1
        return out


class FailingStartRecorder(Recorder):
    """A recorder whose background work cannot start (like a KV-event subscriber that fails)."""

    def start(self) -> None:
        raise RuntimeError("cannot start background work")

    def stop(self) -> None:
        pass


class RecorderPlugin:
    """Hook implementation registering the ``test-recorder`` plugin type."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    @hookimpl
    def kvaware_register_plugins(self, registry: Any) -> None:
        recorder = self.recorder
        registry.register(
            "test-recorder",
            lambda params, ctx: recorder,
            kinds=("pre-request", "post-response"),
            description="records request hooks (tests)",
        )


def scheduler_config(base: str = "load.yaml", *, recorder: bool = True) -> dict[str, Any]:
    """A shipped config plus the ``test-recorder`` plugin (request hooks run for every plugin
    that has them, listed in a profile or not)."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "config" / base).read_text())
    if recorder:
        data["plugins"].append({"type": "test-recorder"})
    return data


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
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(endpoints_yaml(pods, with_model=with_model))
    plugins = [RecorderPlugin(recorder)] if recorder is not None else []
    scheduler = Scheduler.from_config(
        scheduler_config(config, recorder=recorder is not None),
        plugin_manager=make_plugin_manager(use_env=False, plugins=plugins),
        seed=0,
    )
    scheduler.use_endpoints_file(endpoints, poll_interval=0.05, scrape_interval=0.1)
    settings.setdefault("endpoint_header", True)
    settings.setdefault("drain_timeout", 5.0)
    gateway = Gateway(scheduler, GatewayConfig(port=0, **settings), own_scheduler=True)
    await gateway.start()
    return gateway


@pytest.fixture
async def pods() -> AsyncIterator[list[FakePod]]:
    """Three running pods serving ``test-model``."""
    started = [FakePod(f"pod-{i}", MODEL, cached_tokens=16 * i) for i in range(3)]
    for pod in started:
        await pod.start()
    yield started
    for pod in started:
        await pod.stop()


@pytest.fixture
def recorder() -> Recorder:
    """A fresh hook recorder."""
    return Recorder()
