"""Accuracy: long scripted vLLM event streams (with loss, replay, restarts, clears) against the
block pools that produced them."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from kvaware_scorer import Indexer
from kvaware_scorer.events import KVEventSubscriber, VllmEventPublisher
from kvaware_scorer.events.decode import encode_batch
from kvaware_scorer.events.ingest import ReplayResult
from tests.conftest import free_port
from tests.events.pool_model import PoolModel, Workload, engine_hashes
from tests.events.test_subscriber import two_free_ports

MODEL = "m"
POD_A, POD_B = "10.0.0.1:8000", "10.0.0.2:8000"


@dataclass
class Engine:
    """One publisher: a pod's DP rank with its pool, seq counter and replay buffer."""

    pod: str
    rank: int
    pool: PoolModel
    cpu_blocks: int = 0
    seq: int = 0
    buffer: list[tuple[int, bytes]] = field(default_factory=list)
    delivered_last: bool = True
    publisher: VllmEventPublisher | None = None
    ports: tuple[int, int] | None = None

    def open_publisher(self) -> None:
        """(Re)start this engine's publisher on its ports (a restarted vLLM rebinds them)."""
        if self.publisher is not None:
            self.publisher.close()
        assert self.ports is not None
        pub, replay = (f"tcp://127.0.0.1:{p}" for p in self.ports)
        self.publisher = VllmEventPublisher(pub, replay, bind=True, data_parallel_rank=self.rank)


class Buffers:
    """Replay source over every engine's buffer (what each publisher's ROUTER would serve)."""

    def __init__(self, engines: dict[tuple[str, int], Engine]) -> None:
        self.engines = engines

    def replay(self, pod: str, rank: int, start_seq: int, reason: str) -> ReplayResult | None:
        eng = self.engines[(pod, rank)]
        return ReplayResult([f for f in eng.buffer if f[0] >= start_seq], "ok")


def check_truth(ix: Indexer, engines: dict[tuple[str, int], Engine], work: Workload) -> int:
    """Compare per-rank references and prompt lookups with the pools; returns checks made."""
    checks = 0
    for (pod, rank), eng in engines.items():
        if not eng.delivered_last:
            continue
        assert ix.ingestor.held(pod, "gpu", rank) == eng.pool.gpu_state(), (pod, rank)
        assert ix.ingestor.held(pod, "cpu", rank) == eng.pool.cpu_state(), (pod, rank)
        checks += 2
    for pod in {p for p, _ in engines}:
        ranks = [e for (p, _), e in engines.items() if p == pod]
        if not all(e.delivered_last for e in ranks):
            continue
        gpu: set[int] = set().union(*(e.pool.gpu_state() for e in ranks))
        cpu: set[int] = set().union(*(e.pool.cpu_state() for e in ranks))
        for toks, lora, salt in work.seen[-40:]:
            want_blocks = 0
            want_tiers: dict[str, int] = {}
            for h in engine_hashes(toks, 16, lora, salt):
                tier = "gpu" if h in gpu else "cpu" if h in cpu else None
                if tier is None:
                    break
                want_blocks += 1
                want_tiers[tier] = want_tiers.get(tier, 0) + 1
            got = ix.match(MODEL, toks, [pod], lora_name=lora, cache_salt=salt).pods[pod]
            assert (got.blocks, {k: v for k, v in got.tiers.items() if v}) == (
                want_blocks,
                want_tiers,
            ), (pod, lora, salt, len(toks))
            checks += 1
    return checks


def drive(
    seed: int,
    steps: int,
    engines: dict[tuple[str, int], Engine],
    deliver: Callable[[Engine, bytes, int, bool], None],
    settle: Callable[[], None],
    ix: Indexer,
    drop: float = 0.0,
) -> int:
    """Run a random workload on every engine; returns how many truth checks passed."""
    rng = random.Random(seed)
    work = Workload(rng)
    checks = 0
    for step in range(steps):
        for eng in engines.values():
            pool = eng.pool
            roll = rng.random()
            if roll < 0.004:  # the engine restarts: empty pool, seq from 0, empty buffer
                eng.pool = pool = PoolModel(48, cpu_blocks=eng.cpu_blocks)
                eng.seq, eng.buffer = 0, []
                if eng.publisher is not None:
                    settle()  # the old publisher closes with linger 0, as vLLM's does
                    eng.open_publisher()
            elif roll < 0.01:
                for req in list(pool.running):
                    pool.finish(req)
                pool.reset_prefix_cache()
            for _ in range(rng.choice([0, 1, 1, 2])):
                toks, lora, salt = work.prompt()
                pool.admit(toks, lora, salt, report_full=rng.random() < 0.2)
            for req in list(pool.running):
                r = rng.random()
                if r < 0.3 or (
                    r < 0.8 and not pool.decode(req, [rng.randrange(50_000) for _ in range(7)])
                ):
                    pool.finish(req)
            events = pool.take_events()
            if not events:
                continue
            payload = encode_batch(events, time.time(), eng.rank)
            seq = eng.seq
            eng.seq += 1
            eng.buffer.append((seq, payload))
            send = rng.random() >= drop
            eng.delivered_last = send
            deliver(eng, payload, seq, send)
        if step % 10 == 9:
            settle()
            checks += check_truth(ix, engines, work)
    assert ix.metrics.registry.get_sample_value("kvaware_orphaned_blocks_total") == 0
    internal = ix.metrics.registry.get_sample_value(
        "kvaware_dropped_messages_total", {"reason": "internal_error"}
    )
    assert not internal
    return checks


def make_engines() -> dict[tuple[str, int], Engine]:
    return {
        (POD_A, 0): Engine(POD_A, 0, PoolModel(48)),
        (POD_A, 1): Engine(POD_A, 1, PoolModel(48)),
        (POD_B, 0): Engine(POD_B, 0, PoolModel(48, cpu_blocks=24), cpu_blocks=24),
    }


@pytest.mark.parametrize(("seed", "drop"), [(1, 0.0), (2, 0.08), (3, 0.15)])
def test_long_stream_matches_the_pools(seed: int, drop: float) -> None:
    """Over 600 steps of three engines (DP ranks, CPU offload, duplicates, full-report
    re-announcements, decode continuations, tail-first evictions, clears, restarts and lost
    frames replayed), the index equals the pools at every checkpoint."""
    engines = make_engines()
    ix = Indexer()
    ix.ingestor.set_replay_source(Buffers(engines))

    def deliver(eng: Engine, payload: bytes, seq: int, send: bool) -> None:
        if send:
            ix.ingest(eng.pod, MODEL, payload, seq)

    checks = drive(seed, 600, engines, deliver, lambda: None, ix, drop)
    assert checks > 1000
    reg = ix.metrics.registry
    if drop:
        assert (reg.get_sample_value("kvaware_seq_gaps_total") or 0) > 5
        assert reg.get_sample_value("kvaware_lost_batches_total") == 0
    assert (reg.get_sample_value("kvaware_purges_total", {"reason": "publisher_restart"}) or 0) > 0
    assert (
        reg.get_sample_value("kvaware_blocks_skipped_total", {"reason": "reannounced"}) or 0
    ) > 0


def test_long_stream_over_zmq_with_loss_matches_the_pools() -> None:
    """The same kind of stream through real publishers, dropping frames on the wire and
    recovering them over DEALER/ROUTER replays, leaves the index equal to the pools."""
    engines = make_engines()
    ix = Indexer()
    sub = KVEventSubscriber(ix, {"defaultModel": MODEL, "replayTimeout": 2.0})
    port, rport = two_free_ports(), two_free_ports()  # the DP pod's ranks use port + rank
    engines[(POD_A, 0)].ports = (port, rport)
    engines[(POD_A, 1)].ports = (port + 1, rport + 1)
    engines[(POD_B, 0)].ports = (free_port(), free_port())
    for eng in engines.values():
        eng.open_publisher()
    tcp = "tcp://127.0.0.1:{}".format
    sub.add_endpoint(POD_A, tcp(port), tcp(rport), data_parallel_size=2)
    b_port, b_rport = engines[(POD_B, 0)].ports
    sub.add_endpoint(POD_B, tcp(b_port), tcp(b_rport))

    def deliver(eng: Engine, payload: bytes, seq: int, send: bool) -> None:
        nonlocal sent
        assert eng.publisher is not None
        if eng.publisher.next_seq == 0 and seq == 0:
            assert eng.publisher.wait_for_subscriber(10)
        assert eng.publisher.publish(payload, send=send) == seq
        sent += send

    sent = 0

    def settle() -> None:
        deadline = time.monotonic() + 10
        while sub.frames_handled < sent:
            assert time.monotonic() < deadline, "subscriber did not catch up"
            time.sleep(0.005)

    try:
        with sub:
            checks = drive(11, 200, engines, deliver, settle, ix, drop=0.1)
    finally:
        for eng in engines.values():
            if eng.publisher is not None:
                eng.publisher.close()
    assert checks > 300
    assert (
        ix.metrics.registry.get_sample_value("kvaware_replays_total", {"result": "ok"}) or 0
    ) > 3
