"""An emulated pod publishing SGLang's KV-event format, read live through the engine seam."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec
import pytest
import zmq

from kvaware_scorer import Indexer, IndexerConfig
from kvaware_scorer.events.subscriber import KVEventSubscriber
from kvaware_scorer.sim.live import LiveFleet, LivePodsConfig

pytestmark = pytest.mark.timeout(60)

MODEL = "kvaware/live-model"


async def _wait(cond: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return bool(cond())  # type: ignore[operator]


async def test_an_emulated_sglang_pod_feeds_the_index() -> None:
    fleet = LiveFleet(LivePodsConfig(num_pods=1, speedup=20.0, model=MODEL, event_format="sglang"))
    await fleet.start()
    indexer = Indexer(IndexerConfig.model_validate({"tokenProcessorConfig": {"blockSize": 16}}))
    sub = KVEventSubscriber(indexer, {})
    raw = zmq.Context.instance().socket(zmq.SUB)
    try:
        pod = fleet.pods[0]
        assert pod.kv_endpoint is not None
        raw.setsockopt(zmq.SUBSCRIBE, b"")
        raw.connect(pod.kv_endpoint)
        sub.add_endpoint(pod.id, pod.kv_endpoint, pod.replay_endpoint, model=MODEL, engine="sglang")
        sub.start()
        await asyncio.sleep(0.5)  # both SUB sockets joined the pod's XPUB
        prompt = list(range(100, 148))  # 3 full blocks
        other = [7] * 48
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                pod.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}
            ) as resp,
        ):
            assert resp.status == 200
        assert await _wait(
            lambda: indexer.score(model=MODEL, token_ids=prompt, pods=[pod.id]) == {pod.id: 1.0}
        )
        assert indexer.score(model=MODEL, token_ids=other, pods=[pod.id]) == {pod.id: 0.0}
        # the frames really are SGLang's: map events with signed hashes, AllBlocksCleared first
        frames = []
        while raw.poll(500):
            frames.append(raw.recv_multipart())
            if len(frames) >= 1 and any(
                e.get("type") == "BlockStored"
                for f in frames
                for e in msgspec.msgpack.decode(f[2])[1]
            ):
                break
        events = [e for f in frames for e in msgspec.msgpack.decode(f[2])[1]]
        assert events and all(
            (isinstance(e, dict) and "medium" in e) or e["type"] == "AllBlocksCleared"
            for e in events
        )
        stored = [e for e in events if e["type"] == "BlockStored"]
        assert stored and all(
            -(1 << 63) <= h < (1 << 63) for e in stored for h in e["block_hashes"]
        )
    finally:
        raw.close(linger=0)
        sub.stop()
        await fleet.stop()
