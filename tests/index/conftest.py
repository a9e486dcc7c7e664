"""A real 3-master Redis Cluster on loopback ports, started once per test session."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import RedisProcess, free_port


@pytest.fixture
def own_redis(redis_binary: str, tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone (stopped, restarted or paused by the test)."""
    server = RedisProcess(redis_binary, free_port(), tmp_path / "redis")
    server.start()
    yield server
    if server.proc is not None:
        server.proc.send_signal(signal.SIGCONT)
    server.stop()


class RedisClusterProcesses:
    """Three cluster-enabled redis-server masters sharing the 16384 slots."""

    def __init__(self, binary: str, workdir: Path, masters: int = 3) -> None:
        self.nodes: list[RedisProcess] = []
        self.bus_ports: list[int] = []
        for i in range(masters):
            port, bus = free_port(), free_port()
            self.bus_ports.append(bus)
            self.nodes.append(
                RedisProcess(
                    binary,
                    port,
                    workdir / f"node{i}",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    str(bus),
                )
            )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(port=n.port, socket_timeout=5) for n in self.nodes]
        per = 16384 // len(clients)
        for i, c in enumerate(clients):
            c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            end = 16383 if i == len(clients) - 1 else (i + 1) * per - 1
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, end)
        for node, bus in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = [c.cluster("info") for c in clients]
            if all(
                i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == len(clients)
                for i in infos
            ):
                for c in clients:
                    c.close()
                return
            time.sleep(0.1)
        raise RuntimeError("the test Redis Cluster did not converge")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisClusterProcesses]:
    """A real 3-master Redis Cluster (no replicas) on free loopback ports."""
    cluster = RedisClusterProcesses(redis_binary, tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
