"""Shared harness of the gateway and EPP tests: real OpenAI-like pods, a file-polled pool and a
hook recorder registered through the real plugin mechanism."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml

from kvaware_scorer.scheduler import (
    ResponseInfo,
    Scheduler,
    SchedulingRequest,
    SchedulingResult,
    hookimpl,
    make_plugin_manager,
)
from tests.gateway.pods import FakePod

ROOT = Path(__file__).resolve().parents[1]
MODEL = "test-model"


class Recorder:
    """A pre-request and post-response plugin that records every call, so tests can check the
    hooks run exactly once per scheduled request."""

    def __init__(self) -> None:
        self.calls: list[tuple[SchedulingRequest, str, ResponseInfo]] = []
        self.scheduled: list[tuple[str, str]] = []
        self.streaming: dict[str, bool | None] = {}  # request id -> SchedulingRequest.streaming
        self.first_tokens: list[str] = []  # request ids, one per first_token call

    def pre_request(self, ctx: Any, request: SchedulingRequest, result: SchedulingResult) -> None:
        self.scheduled.append((request.request_id, result.targets[0].id))
        self.streaming[request.request_id] = request.streaming

    def first_token(self, now: float, request: SchedulingRequest, result: SchedulingResult) -> None:
        self.first_tokens.append(request.request_id)

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


def endpoints_yaml(pods: Sequence[FakePod], *, with_model: bool = False) -> str:
    """An endpoints file for `pods` (optionally with each pod's `model`)."""
    entries: list[dict[str, Any]] = []
    for pod in pods:
        entry: dict[str, Any] = {"name": pod.name, "address": "127.0.0.1", "port": pod.port}
        if with_model:
            entry["model"] = pod.model
        entries.append(entry)
    return yaml.safe_dump({"endpoints": entries})


def scheduler_config(base: str = "load.yaml", *, recorder: bool = True) -> dict[str, Any]:
    """A shipped config plus the ``test-recorder`` plugin (request hooks run for every plugin
    that has them, listed in a profile or not)."""
    data: dict[str, Any] = yaml.safe_load((ROOT / "config" / base).read_text())
    if recorder:
        data["plugins"].append({"type": "test-recorder"})
    return data


def pool_scheduler(
    tmp_path: Path,
    pods: Sequence[FakePod],
    config: dict[str, Any],
    plugins: Sequence[object],
    *,
    with_model: bool = False,
) -> Scheduler:
    """A scheduler of `config` over `pods`, from an endpoints file polled every 50 ms."""
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(endpoints_yaml(pods, with_model=with_model))
    scheduler = Scheduler.from_config(
        config,
        plugin_manager=make_plugin_manager(use_env=False, plugins=list(plugins)),
        seed=0,
    )
    scheduler.use_endpoints_file(endpoints, poll_interval=0.05, scrape_interval=0.1)
    return scheduler


@asynccontextmanager
async def running_pods(count: int = 3) -> AsyncIterator[list[FakePod]]:
    """`count` running pods serving ``test-model``, stopped on exit."""
    started = [FakePod(f"pod-{i}", MODEL, cached_tokens=16 * i) for i in range(count)]
    for pod in started:
        await pod.start()
    try:
        yield started
    finally:
        for pod in started:
            await pod.stop()
