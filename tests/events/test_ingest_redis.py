"""Ingestion into the Redis index: vLLM's pool states, one script call per event batch, and
the accuracy stream, on a real redis-server."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kvaware_scorer import Indexer
from kvaware_scorer.events.decode import BlockStored
from tests.conftest import RedisProcess, free_port
from tests.events.conftest import EVENTS_DIR, stream_frames
from tests.events.test_accuracy import Buffers, drive, make_engines
from tests.events.test_ingest import MODEL, POD, counter, frame, removed, stored, u64s


def redis_indexer(url: str, **extra: Any) -> Indexer:
    return Indexer(
        {
            "kvBlockIndexConfig": {
                "redisConfig": {
                    "address": url,
                    "keyPrefix": f"ev{uuid.uuid4().hex[:8]}:",
                    "maintenanceInterval": 3600,
                    **extra,
                }
            }
        }
    )


@pytest.fixture
def quiet_redis(redis_binary: str, tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone, so that its command counts are this test's."""
    server = RedisProcess(redis_binary, free_port(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def wait_for(pred: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


def script_calls(url: str) -> int:
    stats = redis.Redis.from_url(url).info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_fixture_streams_on_redis_leave_vllm_pool_state(
    redis_server: RedisProcess, manifest: dict[str, Any]
) -> None:
    """Through a Redis index, the copies held per hash equal vLLM's BlockPool state after every
    captured step."""
    checked = 0
    for names in stream_frames(manifest).values():
        ix = redis_indexer(redis_server.url)
        for seq, name in names:
            ix.ingest(POD, MODEL, (EVENTS_DIR / name).read_bytes(), seq)
            pool = manifest["files"][name].get("pool_state_after")
            if pool is None:
                continue
            for tier in pool:
                assert ix.ingestor.held(POD, tier) == u64s(pool, tier), (name, tier)
                checked += 1
        assert counter(ix, "kvaware_orphaned_blocks_total") == 0
        ix.close()
    assert checked >= 12


def test_an_event_batch_is_one_script_call(quiet_redis: RedisProcess) -> None:
    """A batch of stores, continuations and removals reaches Redis in one script call; a
    parent that is neither in the batch nor among the stream's recent stores costs one
    lookup more."""
    ix = redis_indexer(quiet_redis.url)
    toks = list(range(16 * 6))
    ix.ingest(POD, MODEL, frame(stored([1, 2, 3], toks[:48])), 0)  # warms up the script
    ix.ingestor.wait()
    calls = script_calls(quiet_redis.url)
    batch = frame(
        stored([4], toks[48:64], parent=3),
        removed([3]),
        stored([5], toks[64:80], parent=4),
        stored([6], toks[80:96], parent=5),
        removed([9]),
    )
    ix.ingest(POD, MODEL, batch, 1)
    ix.ingestor.wait()
    assert script_calls(quiet_redis.url) - calls == 1
    assert ix.ingestor.held(POD) == {1: 1, 2: 1, 4: 1, 5: 1, 6: 1}
    calls = script_calls(quiet_redis.url)
    ix.ingest(POD, MODEL, frame(stored([7], toks[32:48], parent=2)), 2)  # 2: not a recent tail
    ix.ingestor.wait()
    assert script_calls(quiet_redis.url) - calls == 2
    assert ix.score(MODEL, toks[:48], [POD]) == {POD: 1.0}
    assert counter(ix, "kvaware_blocks_skipped_total", {"reason": "unknown_block"}) == 1
    ix.close()


def test_reannouncement_and_offload_on_redis(redis_server: RedisProcess) -> None:
    """Parent-less re-announcements add nothing and offload placeholders add their tier, as
    with the in-memory index."""
    toks = list(range(32))
    ix = redis_indexer(redis_server.url)
    ix.ingest(POD, MODEL, frame(stored([1, 2], toks)), 0)
    placeholder = BlockStored([1, 77], None, [], 0, medium="CPU", group_idx=0)
    ix.ingest(POD, MODEL, frame(stored([1, 2], toks), placeholder, removed([1])), 1)
    assert ix.ingestor.held(POD) == {2: 1} and ix.ingestor.held(POD, "cpu") == {1: 1}
    assert counter(ix, "kvaware_blocks_skipped_total", {"reason": "reannounced"}) == 2
    assert counter(ix, "kvaware_blocks_skipped_total", {"reason": "unknown_block"}) == 1
    ix.ingestor.wait()
    m = ix.match(MODEL, toks, [POD]).pods[POD]
    assert m.blocks == 2 and dict(m.tiers) == {"cpu": 1, "gpu": 1}
    ix.close()


def test_long_stream_on_redis_matches_the_pools(redis_server: RedisProcess) -> None:
    """The scripted accuracy stream (DP ranks, offload, duplicates, re-announcements,
    restarts, clears and lost frames replayed) leaves a Redis index equal to the pools."""
    engines = make_engines()
    ix = redis_indexer(redis_server.url)
    ix.ingestor.set_replay_source(Buffers(engines))

    def deliver(eng: Any, payload: bytes, seq: int, send: bool) -> None:
        if send:
            ix.ingest(eng.pod, "m", payload, seq)

    checks = drive(2, 300, engines, deliver, ix.ingestor.wait, ix, 0.08)
    assert checks > 400
    reg = ix.metrics.registry
    assert (reg.get_sample_value("kvaware_purges_total", {"reason": "publisher_restart"}) or 0) > 0
    assert not reg.get_sample_value("kvaware_backend_errors_total", {"operation": "ingest"})
    ix.close()


def test_second_rank_splits_references_read_from_redis(redis_server: RedisProcess) -> None:
    """A second DP rank takes the first rank's references from Redis, and a restart of the
    first rank then drops only its own."""
    a, b = list(range(16)), list(range(16, 32))
    ix = redis_indexer(redis_server.url)
    ix.ingest(POD, MODEL, frame(stored([1, 2], a + b), rank=0), 0)
    ix.ingest(POD, MODEL, frame(stored([1], a), rank=1), 0)
    assert ix.ingestor.streams(POD)[0].held == {"gpu": {1: 1, 2: 1}}
    ix.ingest(POD, MODEL, frame(rank=0), 0)  # rank 0 restarted
    assert ix.ingestor.held(POD) == {1: 1}
    ix.ingestor.wait()  # lookups see writes once applied (written behind ingest)
    assert ix.score(MODEL, a + b, [POD]) == {POD: 0.5}
    ix.close()


def test_ingestion_rides_out_a_redis_outage(quiet_redis: RedisProcess) -> None:
    """While Redis is down, ingestion keeps going (continuations find their parents among the
    stream's recent stores) and its writes land once Redis is back."""
    toks = list(range(48))
    ix = redis_indexer(
        quiet_redis.url,
        socketTimeout=0.2,
        connectTimeout=0.2,
        retryInterval=0.2,
        maintenanceInterval=0.2,
    )
    ix.ingest(POD, MODEL, frame(stored([1, 2], toks[:32])), 0)
    ix.ingestor.wait()
    quiet_redis.stop()
    t0 = time.monotonic()
    ix.ingest(POD, MODEL, frame(stored([3], toks[32:], parent=2), removed([1])), 1)
    ix.ingestor.wait()
    assert time.monotonic() - t0 < 2
    assert counter(ix, "kvaware_orphaned_blocks_total") == 0
    quiet_redis.start()  # an empty server: what was written before the outage is gone
    assert wait_for(lambda: ix.index.stats().extra.get("buffered_now") == 0)
    assert ix.ingestor.held(POD) == {3: 1}
    assert not counter(ix, "kvaware_dropped_messages_total", {"reason": "internal_error"})
    ix.close()


def test_restarted_ingest_process_on_redis_rejoins_without_counting_twice(
    redis_server: RedisProcess,
) -> None:
    """An ingest process restarted on the same Redis index replays each pod's publisher buffer
    on join without doubling the references the previous process wrote."""
    from tests.events.test_ingest import BufferReplay, _history

    history = _history()
    first = redis_indexer(redis_server.url)
    prefix = first.config.kv_block_index_config.redis_config.key_prefix  # type: ignore[union-attr]
    for seq, payload in history[:5]:
        first.ingest(POD, MODEL, payload, seq)
    first.close()  # applies what is queued
    again = redis_indexer(redis_server.url, keyPrefix=prefix)
    again.ingestor.set_replay_source(BufferReplay(history[:5]))
    again.ingest(POD, MODEL, history[5][1], 5)
    again.ingestor.wait()
    assert again.ingestor.references(POD) == {"gpu": {1: 1, 2: 1, 3: 1}, "cpu": {1: 1}}
    again.close()
