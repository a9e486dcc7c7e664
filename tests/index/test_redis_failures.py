"""A sick Redis heals: what the index holds after each failure (OOM, restart empty, restart with
AOF, partition), checked against the same KV-event stream applied to the in-memory index, with
a real redis-server, a real publisher (replay buffer) and the ZMQ subscriber."""

from __future__ import annotations

import logging
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kvaware_scorer import Indexer
from kvaware_scorer.config import KVEventsConfig
from kvaware_scorer.events import KVEventSubscriber, VllmEventPublisher
from kvaware_scorer.events.decode import BlockRemoved, BlockStored, encode_batch
from kvaware_scorer.index.redis import _script_source
from tests.conftest import RedisProcess, free_port

POD = "10.0.0.1:8000"
MODEL = "m"


def payloads(n: int, start: int = 0) -> list[bytes]:
    """`n` event batches: each stores a new 4-block prompt and evicts a block of an older one."""
    out = []
    for i in range(start, start + n):
        toks = list(range(i * 64, (i + 1) * 64))
        hashes = [100_000 + i * 4 + j for j in range(4)]
        events: list[Any] = [
            BlockStored(hashes, None, toks, 16, medium="GPU", extra_keys=[None] * 4, group_idx=0)
        ]
        if i >= 2:
            events.append(BlockRemoved([100_000 + (i - 2) * 4 + 3], medium="GPU", group_idx=0))
        out.append(encode_batch(events, ts=time.time()))
    return out


class Rig:
    """A publisher with a replay buffer, a subscriber feeding a Redis-backed indexer, and the
    in-memory truth fed the same payloads."""

    def __init__(self, url: str, **redis_cfg: Any) -> None:
        cfg = {
            "address": url,
            "keyPrefix": f"h{uuid.uuid4().hex[:8]}:",
            "socketTimeout": 0.3,
            "connectTimeout": 0.3,
            "retryInterval": 0.2,
            "maintenanceInterval": 3600,
            **redis_cfg,
        }
        self.ix = Indexer({"kvBlockIndexConfig": {"redisConfig": cfg}})
        self.truth = Indexer()
        port, rport = free_port(), free_port()
        self.pub = VllmEventPublisher(
            f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{rport}", bind=True
        )
        self.sub = KVEventSubscriber(
            self.ix, KVEventsConfig(default_model=MODEL, replay_timeout=2.0, stats_interval=0)
        )
        self.sub.add_endpoint(POD, self.pub.endpoint, self.pub.replay_endpoint)
        self.sub.start()
        assert self.pub.wait_for_subscriber(10)
        self.sent = 0

    def publish(self, batch: list[bytes]) -> None:
        for p in batch:
            seq = self.pub.publish(p)
            self.truth.ingest(POD, MODEL, p, seq)
            self.sent += 1
        deadline = time.monotonic() + 20
        while self.sub.frames_handled < self.sent:
            assert time.monotonic() < deadline, "frames not applied in time"
            time.sleep(0.02)

    def converged(self, timeout: float = 20.0) -> bool:
        """Whether the Redis index holds exactly the truth's references (waits for it)."""
        want = self.truth.index.references(POD)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.ix.ingestor.wait()
                self.ix.index.flush()  # type: ignore[attr-defined]
                if self.ix.index.references(POD) == want:
                    return True
            except Exception:
                pass
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self.sub.stop()
        self.pub.close()
        self.ix.close()
        self.truth.close()


@pytest.fixture
def aof_redis(redis_binary: str, tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(
        redis_binary,
        free_port(),
        tmp_path / "redis-aof",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    )
    server.start()
    yield server
    server.stop()


def warnings_from(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= 30]


def set_maxmemory(url: str, value: int) -> None:
    r = redis.Redis.from_url(url)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", value)
    r.close()


def test_oom_writes_are_retried_once_memory_is_back(
    own_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes refused under maxmemory + noeviction are kept and applied once Redis takes them
    again (the index converges), with one warning for the episode, not one per write."""
    rig = Rig(own_redis.url, maxBufferedWrites=100_000)
    try:
        rig.publish(payloads(20))
        assert rig.converged()
        caplog.set_level(logging.WARNING, "kvaware_scorer.index.redis")
        set_maxmemory(own_redis.url, 1)
        rig.publish(payloads(100, 20))
        assert rig.ix.index.stats().extra["buffered_now"] > 0
        assert rig.ix.index.references(POD) != rig.truth.index.references(POD)
        set_maxmemory(own_redis.url, 0)
        assert rig.converged()
    finally:
        rig.close()
    lines = warnings_from(caplog, "kvaware_scorer.index.redis")
    assert 1 <= len(lines) <= 3, lines


def test_oom_beyond_the_buffer_resyncs_the_pod(own_redis: RedisProcess) -> None:
    """When more writes are refused than the buffer keeps, the pod is purged and rebuilt from
    its publisher's replay buffer once Redis takes writes again."""
    rig = Rig(own_redis.url, maxBufferedWrites=5)
    try:
        rig.publish(payloads(20))
        set_maxmemory(own_redis.url, 1)
        rig.publish(payloads(60, 20))
        assert rig.ix.index.stats().extra["dropped_writes"] > 0
        set_maxmemory(own_redis.url, 0)
        time.sleep(1.2)  # the ingestor checks for diverged pods once a second
        rig.publish(payloads(2, 80))
        assert rig.converged()
        purged = rig.ix.metrics.registry.get_sample_value(
            "kvaware_purges_total", {"reason": "index_diverged"}
        )
        assert purged == 1
    finally:
        rig.close()


def test_restart_empty_rebuilds_pods_from_their_events(own_redis: RedisProcess) -> None:
    """A Redis that restarts empty is noticed (its dataset marker changed); every pod written
    before is rebuilt from its replay buffer, so the index converges."""
    rig = Rig(own_redis.url)
    try:
        rig.publish(payloads(30))
        assert rig.converged()
        own_redis.stop()
        own_redis.start()
        # another process (a scheduler replica) reloads the script first
        redis.Redis.from_url(own_redis.url).script_load(_script_source())
        rig.publish(payloads(2, 30))
        time.sleep(1.2)
        rig.publish(payloads(2, 32))
        assert rig.converged()
        assert rig.ix.index.stats().extra["data_lost"] == 1
    finally:
        rig.close()


def test_restart_with_aof_loses_nothing_and_counts_nothing_twice(aof_redis: RedisProcess) -> None:
    """A Redis restarted from its AOF keeps the index; writes buffered meanwhile land once, and
    no pod is rebuilt."""
    rig = Rig(aof_redis.url)
    try:
        rig.publish(payloads(30))
        assert rig.converged()
        aof_redis.stop()
        rig.publish(payloads(5, 30))  # buffered while the server is down
        aof_redis.start()
        time.sleep(1.2)
        rig.publish(payloads(2, 35))
        assert rig.converged()
        extra = rig.ix.index.stats().extra
        assert extra["data_lost"] == 0
        purged = rig.ix.metrics.registry.get_sample_value(
            "kvaware_purges_total", {"reason": "index_diverged"}
        )
        assert purged is None
    finally:
        rig.close()


def test_partition_buffers_writes_and_rate_limits_score_warnings(
    own_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """While Redis does not answer (a partition: the process is stopped), scores are zeros with
    a few counted warnings, not one per score; afterwards the buffered writes land."""
    rig = Rig(own_redis.url)
    toks = list(range(64))
    try:
        rig.publish(payloads(10))
        assert rig.converged()
        caplog.set_level(logging.WARNING, "kvaware_scorer.indexer")
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        rig.publish(payloads(10, 10))
        for _ in range(200):
            assert rig.ix.score(MODEL, toks, [POD]) == {POD: 0.0}
        own_redis.proc.send_signal(signal.SIGCONT)
        assert rig.converged()
        assert (
            rig.ix.score(MODEL, toks, [POD]) == rig.truth.score(MODEL, toks, [POD]) == {POD: 0.75}
        )
    finally:
        rig.close()
    lines = warnings_from(caplog, "kvaware_scorer.indexer")
    assert 1 <= len(lines) <= 2, lines
    assert "lookups failed" in lines[0]
