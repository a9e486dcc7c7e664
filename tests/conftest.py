"""Session-wide real parts: a `redis-server` on a free loopback port (installed when missing)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(v) for v in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL = _ephemeral_range()
_ports = random.Random()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, below the kernel's ephemeral range.

    NOTE: a port the kernel handed out for ``bind(0)`` is one it also hands out as the source
    port of outgoing connections; between picking it and the test's own bind, any connection
    (a scrape, a ZMQ reconnect) could take it and the bind fails with "address in use". Ports
    below the ephemeral range are only ever taken by explicit binds.
    """
    lo = _EPHEMERAL[0]
    for _ in range(200) if lo > 12000 else ():
        port = _ports.randrange(10000, lo)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(
    proc: subprocess.Popen[Any], timeout: float, kill_timeout: float | None = None
) -> None:
    """SIGTERM `proc` if it still runs; SIGKILL it when it has not exited after `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(kill_timeout)


def redis_server_binary() -> str:
    """Path of redis-server, installing it with apt-get where it is missing."""
    found = shutil.which("redis-server")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.fail("redis-server is missing and apt-get is not available to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "redis-server"]
    if os.geteuid() != 0 and shutil.which("sudo"):
        cmd = ["sudo", "-E", *cmd]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        update = (
            ["apt-get", "update", "-q"]
            if cmd[0] == "apt-get"
            else ["sudo", "apt-get", "update", "-q"]
        )
        subprocess.run(update, env=env, capture_output=True, check=False)
        subprocess.run(cmd, env=env, capture_output=True, check=True)
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if not found:
        pytest.fail("apt-get did not provide redis-server")
    return found


class RedisProcess:
    """A redis-server child process on 127.0.0.1."""

    def __init__(self, binary: str, port: int, workdir: Path, *extra: str) -> None:
        self.binary = binary
        self.port = port
        self.workdir = workdir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "no",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5, 5)
            self.proc = None


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """The redis-server binary (installed on first use)."""
    return redis_server_binary()


@pytest.fixture(scope="session")
def redis_server(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisProcess]:
    """One real redis-server for the session."""
    server = RedisProcess(redis_binary, free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """The vLLM KV-event fixtures (payloads captured from vLLM's own publisher)."""
    return FIXTURES / "vllm-kv-events"
