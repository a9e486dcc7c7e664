"""``kvaware serve``: the gateway as its own process, stopped by SIGTERM after draining."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from .conftest import MODEL, ROOT, endpoints_yaml, serve_command
from .pods import FakePod

pytestmark = pytest.mark.timeout(60)


async def test_serve_and_drain_on_sigterm(tmp_path: Path, pods: list[FakePod]) -> None:
    """The serve command listens on a free port, routes requests, and on SIGTERM lets the
    in-flight request finish before exiting with status 0."""
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(endpoints_yaml(pods[:1]))
    proc = await asyncio.create_subprocess_exec(
        *serve_command(
            ROOT / "config" / "precise.yaml", endpoints, "--port", "0", "--drain-timeout", "10s"
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("kvaware gateway listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1].strip()
        async with aiohttp.ClientSession() as s:
            async with s.post(
                url + "/v1/completions", json={"model": MODEL, "prompt": [7] * 40}
            ) as resp:
                assert resp.status == 200
                assert "x-kvaware-endpoint" not in resp.headers  # off by default
            held = asyncio.create_task(
                s.post(
                    url + "/v1/completions",
                    json={"model": MODEL, "prompt": "x", "test_pod": {"hold": True}},
                )
            )
            while len(pods[0].requests) < 2:
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            assert proc.returncode is None  # still draining
            pods[0].release.set()
            resp = await held
            assert resp.status == 200
            assert (await resp.json())["choices"]
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_serve_config_error(tmp_path: Path) -> None:
    """A bad endpoints file makes serve exit with status 1 and say where the error is."""
    bad = tmp_path / "endpoints.yaml"
    bad.write_text("endpoints:\n  - address: 127.0.0.1\n    port: 99999\n")
    out = subprocess.run(
        serve_command(ROOT / "config" / "load.yaml", bad),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "endpoints[0].port" in out.stderr
