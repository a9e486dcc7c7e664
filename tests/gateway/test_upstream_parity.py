"""Upstream parity through the gateway: the decode pod gets the scheduler's P/D routing header
(never a client's own), and flow control sheds with 429."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from kvaware_scorer.gateway import Gateway, GatewayConfig
from kvaware_scorer.scheduler import Scheduler, make_plugin_manager

from .conftest import MODEL
from .pods import FakePod

PD = {
    "apiVersion": "llm-d.ai/v1alpha1",
    "kind": "EndpointPickerConfig",
    "plugins": [
        {"type": "disagg-profile-handler", "parameters": {"deciders": {"prefill": "always"}}},
        {"type": "always-disagg-pd-decider", "name": "always"},
        {"type": "decode-filter"},
        {"type": "prefill-filter"},
        {"type": "queue-scorer"},
    ],
    "schedulingProfiles": [
        {
            "name": "decode",
            "plugins": [{"pluginRef": "decode-filter"}, {"pluginRef": "queue-scorer"}],
        },
        {
            "name": "prefill",
            "plugins": [{"pluginRef": "prefill-filter"}, {"pluginRef": "queue-scorer"}],
        },
    ],
}


async def test_decode_pod_gets_the_prefill_pick(tmp_path: Path) -> None:
    """The request goes to the decode pod with x-prefiller-host-port naming the prefill pod; a
    client-supplied value of that header is replaced."""
    decode, prefill = FakePod("decode", MODEL), FakePod("prefill", MODEL)
    for pod in (decode, prefill):
        await pod.start()
    entries: list[dict[str, Any]] = [
        {
            "name": p.name,
            "address": "127.0.0.1",
            "port": p.port,
            "labels": {"llm-d.ai/role": p.name},
        }
        for p in (decode, prefill)
    ]
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({"endpoints": entries}))
    scheduler = Scheduler.from_config(PD, plugin_manager=make_plugin_manager(use_env=False), seed=0)
    scheduler.use_endpoints_file(endpoints, poll_interval=0.05, scrape_interval=0.1)
    gw = Gateway(scheduler, GatewayConfig(port=0, drain_timeout=5.0), own_scheduler=True)
    await gw.start()
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    try:
        async with aiohttp.ClientSession() as s:
            hdrs = {"x-prefiller-host-port": "203.0.113.9:1"}
            async with s.post(gw.url + "/v1/completions", json=body, headers=hdrs) as resp:
                assert resp.status == 200
    finally:
        await gw.stop()
        for pod in (decode, prefill):
            await pod.stop()
    assert len(decode.requests) == 1 and not prefill.requests
    sent = decode.requests[0]["headers"]
    assert sent.getall("x-prefiller-host-port") == [f"127.0.0.1:{prefill.port}"]


async def test_flow_control_sheds_with_429(tmp_path: Path) -> None:
    """With flow control on one pod taking one request at a time, a second request waits in
    the queue and is shed with 429 when its TTL passes; the first completes."""
    pod = FakePod("pod", MODEL)
    await pod.start()
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(
        yaml.safe_dump({"endpoints": [{"name": "pod", "address": "127.0.0.1", "port": pod.port}]})
    )
    data = {
        "apiVersion": "llm-d.ai/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [
            {"type": "concurrency-detector", "parameters": {"maxConcurrency": 1}},
            {"type": "queue-scorer"},
        ],
        "flowControl": {
            "saturationDetector": {"pluginRef": "concurrency-detector"},
            "defaultRequestTTL": "300ms",
        },
    }
    scheduler = Scheduler.from_config(
        data, plugin_manager=make_plugin_manager(use_env=False), seed=0
    )
    scheduler.use_endpoints_file(endpoints, poll_interval=0.05, scrape_interval=0.1)
    gw = Gateway(scheduler, GatewayConfig(port=0, drain_timeout=5.0), own_scheduler=True)
    await gw.start()
    held = {"model": MODEL, "prompt": "a", "max_tokens": 1, "test_pod": {"hold": True}}
    body = {"model": MODEL, "prompt": "b", "max_tokens": 1}
    try:
        async with aiohttp.ClientSession() as s:
            first = asyncio.create_task(s.post(gw.url + "/v1/completions", json=held))
            for _ in range(100):
                if pod.requests:
                    break
                await asyncio.sleep(0.01)
            async with s.post(gw.url + "/v1/completions", json=body) as resp:
                status = resp.status
                err = await resp.json()
            pod.release.set()
            resp1 = await first
            assert resp1.status == 200
            resp1.release()
    finally:
        await gw.stop()
        await pod.stop()
    assert status == 429 and "timed out in queue" in err["error"]["message"]
    assert len(pod.requests) == 1
