"""`EnvoyFront`: Envoy + an in-process `EndpointPicker` in front of a scheduler's pool, as one
object with a URL (``kvaware demo --via envoy``, benchmarks, tests).

Envoy runs as a child process with the bootstrap `kvaware_scorer.epp.envoy.bootstrap` writes
(FULL_DUPLEX_STREAMED, override-host pool listing the scheduler's endpoints at start); the EPP
serves plaintext on a free loopback port and adds ``x-kvaware-endpoint`` to responses.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from kvaware_scorer.epp.config import EppConfig
from kvaware_scorer.epp.envoy import EnvoyProcess, bootstrap, write_bootstrap
from kvaware_scorer.epp.server import EndpointPicker
from kvaware_scorer.scheduler import Scheduler

__all__ = ["EnvoyFront"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EnvoyFront:
    """Envoy and an EPP over `scheduler` (closed by `stop` when `own_scheduler`).

    Args:
        scheduler: The scheduler; its pool must be known before `start` (Envoy lists it).
        workdir: Where the bootstrap and Envoy's log are written.
        own_scheduler: `stop` also closes the scheduler.
    """

    def __init__(self, scheduler: Scheduler, workdir: Path, *, own_scheduler: bool = True) -> None:
        self.scheduler = scheduler
        self.workdir = workdir
        self.picker = EndpointPicker(
            scheduler,
            EppConfig(
                host="127.0.0.1",
                grpc_port=0,
                grpc_health_port=0,
                metrics_port=None,
                secure_serving=False,
                endpoint_header=True,
                drain_timeout=2.0,
            ),
            own_scheduler=own_scheduler,
        )
        self.envoy: EnvoyProcess | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        """Base URL of Envoy's listener."""
        if self.port is None:
            raise RuntimeError("not running")
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start the EPP, then Envoy; returns once Envoy's health check passed the EPP."""
        await self.picker.start()
        try:
            port, admin = _free_port(), _free_port()
            assert self.picker.grpc_port is not None
            cfg = write_bootstrap(
                self.workdir / f"envoy-{port}.yaml",
                bootstrap(
                    listen_port=port,
                    admin_port=admin,
                    epp_port=self.picker.grpc_port,
                    endpoints=self.scheduler.endpoints,
                ),
            )
            self.envoy = EnvoyProcess(cfg, admin, self.workdir / f"envoy-{port}.log")
            self.envoy.start()
            await self.envoy.await_ready(30)
            self.port = port
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop Envoy, then drain and stop the EPP; idempotent."""
        if self.envoy is not None:
            envoy, self.envoy = self.envoy, None
            await asyncio.to_thread(envoy.stop)
        self.port = None
        await self.picker.stop()
