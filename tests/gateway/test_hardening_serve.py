"""``kvaware serve`` under attack, as its own process: SIGTERM with runaway renders, gzip bombs
(peak memory), and a connection flood at a low open-file limit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from kvaware_scorer.tokenization import install_local_tokenizer

from .conftest import MODEL, ROOT, endpoints_yaml, serve_command
from .pods import FakePod

pytestmark = pytest.mark.timeout(120)

RUNAWAY = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


class Served:
    """A ``kvaware serve`` process and its URL."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url

    def peak_rss_mb(self) -> float:
        """Peak resident memory of the process so far (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")


@contextlib.asynccontextmanager
async def serve(
    config: Path, endpoints: Path, *flags: str, preexec: Callable[[], None] | None = None
) -> AsyncIterator[Served]:
    """Run ``kvaware serve`` on a free port until the block ends (then SIGKILL if needed)."""
    proc = await asyncio.create_subprocess_exec(
        *serve_command(config, endpoints, "--port", "0", "--no-scrape", *flags),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=preexec,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line.startswith("kvaware gateway listening on http://"), line
        yield Served(proc, line.rsplit(" ", 1)[1].strip())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sigterm_stops_serve_during_runaway_renders(tmp_path: Path, pod: FakePod) -> None:
    """With request templates trusted, six runaway renders in progress do not keep SIGTERM from
    stopping the process promptly (exit status 0)."""
    root = tmp_path / "tokenizers"
    install_local_tokenizer(root, MODEL)
    data: dict[str, Any] = yaml.safe_load((ROOT / "config" / "precise.yaml").read_text())
    for plugin in data["plugins"]:
        if plugin["type"] == "precise-prefix-cache-scorer":
            plugin["parameters"]["tokenizersPoolConfig"] = {
                "local": {"autoDiscoveryDir": str(root)},
                "renderTimeout": 3.0,
            }
    config = tmp_path / "precise.yaml"
    config.write_text(yaml.safe_dump(data))
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(endpoints_yaml([pod]))
    async with (
        serve(config, endpoints, "--trust-request-chat-template") as served,
        aiohttp.ClientSession() as s,
    ):
        # Both render workers up (a cold worker first loads the tokenizer, not part of the
        # render budget), then the runaway renders.
        warm = [
            s.post(
                served.url + "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"warm {i}"}],
                    "chat_template": "{{ messages[0].content }}",
                },
            )
            for i in range(2)
        ]
        for resp in await asyncio.gather(*warm):
            assert resp.status == 200
        evil = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "chat_template": RUNAWAY,
        }
        tasks = [
            asyncio.ensure_future(s.post(served.url + "/v1/chat/completions", json=evil))
            for _ in range(6)
        ]
        await asyncio.sleep(1.0)  # the renders are running
        t0 = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(served.proc.wait(), 20)
        took = time.monotonic() - t0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert code == 0
    assert took < 8.0


def _bomb(inflated_mb: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join(c.compress(zeros) for _ in range(inflated_mb)) + c.flush()


async def test_gzip_bombs_cost_no_memory(tmp_path: Path, pod: FakePod) -> None:
    """Four 512 MB gzip bombs at once get 413 without the gateway's memory growing by more than
    a few body caps, and /health keeps answering meanwhile."""
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(endpoints_yaml([pod]))
    bomb = _bomb(512)
    async with (
        serve(ROOT / "config" / "load.yaml", endpoints) as served,
        aiohttp.ClientSession() as s,
    ):
        async with s.get(served.url + "/health") as resp:
            assert resp.status == 200
        before = served.peak_rss_mb()

        async def send() -> int:
            async with s.post(
                served.url + "/v1/completions",
                data=bomb,
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            ) as resp:
                return resp.status

        tasks = [asyncio.ensure_future(send()) for _ in range(4)]
        stalls = []
        while not all(t.done() for t in tasks):
            t1 = time.monotonic()
            async with s.get(served.url + "/health") as resp:
                assert resp.status == 200
            stalls.append(time.monotonic() - t1)
            await asyncio.sleep(0.05)
        statuses = [t.result() for t in tasks]
        after = served.peak_rss_mb()
    assert statuses == [413] * 4
    # Each bomb inflates to at most the 32 MiB cap (and each compressed body is ~0.5 MB).
    assert after - before < 4 * 32 + 40, (before, after)
    assert max(stalls) < 1.0


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))


async def test_connection_flood_at_a_low_fd_limit(tmp_path: Path, pod: FakePod) -> None:
    """With 160 open files allowed, 400 idle connections never exhaust them: the cap is fitted
    to the limit, the excess is refused with 503 at once, no accept() error is logged, and
    requests are served as soon as the flood goes away."""
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(endpoints_yaml([pod]))
    async with serve(ROOT / "config" / "load.yaml", endpoints, preexec=_low_fd_limit) as served:
        port = int(served.url.rsplit(":", 1)[1])
        conns = []
        refused = 0
        for _ in range(400):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            conns.append((r, w))
        await asyncio.sleep(0.5)
        for r, _ in conns:
            with contextlib.suppress(Exception):
                data = await asyncio.wait_for(r.read(100), 0.01)
                if data.startswith(b"HTTP/1.1 503"):
                    refused += 1
        t0 = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.get(served.url + "/health") as resp:
                flooded = resp.status
            answered = time.monotonic() - t0
            for _, w in conns:
                w.close()
            await asyncio.sleep(0.5)
            async with s.get(served.url + "/health") as resp:
                assert resp.status == 200
            async with s.post(
                served.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}
            ) as resp:
                assert resp.status == 200
        served.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(served.proc.wait(), 20)
        assert served.proc.stderr is not None
        log = (await served.proc.stderr.read()).decode(errors="replace")
    assert refused >= 400 - 80
    assert flooded == 503 and answered < 1.0
    assert "accept" not in log, log[-2000:]


async def test_serve_key_flags(
    tmp_path: Path, pod: FakePod, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--api-key-env`` protects the inference routes of ``kvaware serve``; a key file that
    does not exist stops it with status 1 and a message naming the file, never a key."""
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(endpoints_yaml([pod]))
    monkeypatch.setenv("KV_SERVE_TEST_KEY", "sk-serve-secret")
    body = {"model": MODEL, "prompt": "x"}
    async with (
        serve(
            ROOT / "config" / "load.yaml", endpoints, "--api-key-env", "KV_SERVE_TEST_KEY"
        ) as served,
        aiohttp.ClientSession() as s,
    ):
        async with s.post(served.url + "/v1/completions", json=body) as resp:
            assert resp.status == 401
        headers = {"Authorization": "Bearer sk-serve-secret"}
        async with s.post(served.url + "/v1/completions", json=body, headers=headers) as resp:
            assert resp.status == 200
    missing = tmp_path / "no-such-keys.txt"
    proc = await asyncio.create_subprocess_exec(
        *serve_command(
            ROOT / "config" / "load.yaml",
            endpoints,
            "--admin-key-file",
            str(missing),
            "--api-key-env",
            "KV_SERVE_TEST_KEY",
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert str(missing) in err.decode()
    assert b"sk-serve-secret" not in out + err


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_serve_streams_on_either_event_loop(tmp_path: Path, pod: FakePod, loop: str) -> None:
    """The guarded listener, streaming and SIGTERM work on asyncio's loop and on uvloop's."""
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(endpoints_yaml([pod]))
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": True}
    async with (
        serve(ROOT / "config" / "random.yaml", endpoints, "--event-loop", loop) as served,
        aiohttp.ClientSession() as s,
    ):
        async with s.post(served.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            assert b"data: [DONE]" in await resp.read()
        served.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), 20) == 0


def test_serve_says_which_extra_uvloop_needs(tmp_path: Path) -> None:
    """``--event-loop uvloop`` without uvloop installed: one line naming the extra, exit 1."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoUvloop:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'uvloop':\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, _NoUvloop())\n"
    )
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: [{address: 127.0.0.1, port: 9}]\n")
    cmd = serve_command(Path("random"), endpoints, "--event-loop", "uvloop")
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(site)}
    )
    assert out.returncode == 1
    assert "pip install 'kvaware-scorer[fast]'" in out.stderr, out.stderr
