"""Shared helpers for the tests that run live emulated pods over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from kvaware_scorer.sim.live import LiveFleet, LivePod, LivePodsConfig

FleetFactory = Callable[..., Awaitable[LiveFleet]]


@asynccontextmanager
async def live_fleets(**defaults: Any) -> AsyncIterator[FleetFactory]:
    """A factory of started fleets (`defaults` overridden per call), all stopped on exit."""
    fleets: list[LiveFleet] = []

    async def make(**options: Any) -> LiveFleet:
        fleet = LiveFleet(LivePodsConfig(**{**defaults, **options}))
        await fleet.start()
        fleets.append(fleet)
        return fleet

    try:
        yield make
    finally:
        for fleet in fleets:
            await fleet.stop()


async def post(
    session: aiohttp.ClientSession, pod: LivePod, path: str, body: Any
) -> tuple[int, Any]:
    """POST `body` as JSON to one of `pod`'s routes: the status and the decoded answer."""
    async with session.post(pod.url + path, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def metric_samples(session: aiohttp.ClientSession, pod: LivePod) -> dict[str, Sample]:
    """Every sample of `pod`'s /metrics by its name."""
    async with session.get(pod.url + "/metrics") as resp:
        text = await resp.text()
    return {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
