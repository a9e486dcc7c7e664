"""Attacks on ``kvaware serve`` and what each costs: status, time, peak memory, /health stall.

For every attack a fresh ``kvaware serve`` process is started in front of a pod process (minimal
OpenAI-like pods answering completions and chat at once), and this script plays the attacker while a probe client
asks ``/health`` every 50 ms; the figure "stall" is the slowest probe answer during the attack
(what other clients waited). Peak memory is the gateway process's ``VmHWM``.

Attacks (the items of the hardening issue): a client ``chat_template`` looping 10^10 times (six
at once; refused by default, then with ``--trust-request-chat-template``, followed by SIGTERM),
slow request heads on 1,500 connections, 1,500 idle connections against a cap of 1,000, four
gzip bombs (1 MB inflating to 1 GB), an invalid gzip body, an 8 MB prompt to ``/v1/score``, a
hung pod (accepts connections, never answers), and every pod gone (readiness).

Usage::

    python benchmarks/bench_attacks.py [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from bench_gateway import free_port, serve_app, wait_line

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
RUNAWAY = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


async def serve_pods(ports: list[int]) -> None:
    """Minimal OpenAI-like pods: answer every completion and chat request at once."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {"id": "x", "object": "text_completion", "model": MODEL, "choices": []}
        )

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/completions", answer)
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_get("/v1/models", models)
    await serve_app(app, ports)


async def metric(url: str, name: str) -> float:
    """A sample of the gateway's /metrics (loopback: no admin key needed)."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def vm(pid: int, key: str) -> float:
    """A ``/proc/<pid>/status`` memory figure in MB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Bench:
    """Shared fixtures: the pod process, a local tokenizer, config files."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = [free_port() for _ in range(2)]
        self.pods: subprocess.Popen[str] | None = None
        self.hung = socket.socket()
        self.hung.bind(("127.0.0.1", 0))
        self.hung.listen(1024)  # accepted by the kernel, never read: a SIGSTOPped pod
        from kvaware_scorer.tokenization import install_local_tokenizer

        root = tmp / "tokenizers"
        install_local_tokenizer(root, MODEL)
        data: dict[str, Any] = yaml.safe_load((ROOT / "config" / "precise.yaml").read_text())
        for plugin in data["plugins"]:
            if plugin["type"] == "precise-prefix-cache-scorer":
                plugin["parameters"]["tokenizersPoolConfig"] = {
                    "local": {"autoDiscoveryDir": str(root)}
                }
        self.precise = tmp / "precise.yaml"
        self.precise.write_text(yaml.safe_dump(data))
        self.load = ROOT / "config" / "load.yaml"

    def start_pods(self) -> None:
        self.pods = subprocess.Popen(
            [sys.executable, __file__, "--serve-pods", ",".join(map(str, self.ports))],
            stdout=subprocess.PIPE,
            text=True,
        )
        wait_line(self.pods, "ready")

    def stop_pods(self) -> None:
        if self.pods is not None:
            self.pods.kill()
            self.pods.wait()
            self.pods = None

    def endpoints(self, hung: bool = False) -> Path:
        entries = [
            {"name": f"pod-{i}", "address": "127.0.0.1", "port": p, "model": MODEL}
            for i, p in enumerate(self.ports)
        ]
        if hung:
            port = self.hung.getsockname()[1]
            entries = [{"name": "hung", "address": "127.0.0.1", "port": port, "model": MODEL}]
            entries.append({"name": "pod-0", "address": "127.0.0.1", "port": self.ports[0]})
            entries[-1]["model"] = MODEL
        path = self.tmp / ("hung.yaml" if hung else "endpoints.yaml")
        path.write_text(yaml.safe_dump({"endpoints": entries}))
        return path

    @contextlib.asynccontextmanager
    async def gateway(
        self, config: Path, *flags: str, settings: dict[str, Any] | None = None, hung: bool = False
    ) -> AsyncIterator[tuple[subprocess.Popen[str], str]]:
        extra: list[str] = []
        if settings:
            gcfg = self.tmp / "gateway.yaml"
            gcfg.write_text(yaml.safe_dump(settings))
            extra = ["--gateway-config", str(gcfg)]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvaware_scorer.cli",
                "serve",
                "--config",
                str(config),
                "--endpoints",
                str(self.endpoints(hung)),
                "--port",
                "0",
                "--no-scrape",
                *extra,
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            url = wait_line(proc, "kvaware gateway listening on").rsplit(" ", 1)[1]
            async with aiohttp.ClientSession() as s:
                for _ in range(3):  # warm up
                    async with s.get(url + "/health") as resp:
                        await resp.read()
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


class Probe:
    """Asks /health every 50 ms from its own connection; records the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: list[float] = []
        self.statuses: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            while True:
                t0 = time.monotonic()
                try:
                    async with s.get(self.url + "/health") as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                self.times.append(time.monotonic() - t0)
                self.statuses[status] = self.statuses.get(status, 0) + 1
                await asyncio.sleep(0.05)

    def __enter__(self) -> Probe:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    @property
    def stall(self) -> float:
        return max(self.times, default=float("nan"))


def row(name: str, status: str, seconds: float, rss: tuple[float, float], probe: Probe) -> None:
    print(
        f"{name:<34} {status:<26} {seconds:>8.2f} {rss[0]:>7.0f} {rss[1]:>7.0f} "
        f"{probe.stall * 1e3:>9.1f}  {dict(sorted(probe.statuses.items()))}",
        flush=True,
    )


def counts(statuses: list[int]) -> str:
    out: dict[int, int] = {}
    for s in statuses:
        out[s] = out.get(s, 0) + 1
    return " ".join(f"{k}x{v}" for k, v in sorted(out.items()))


async def post_status(s: aiohttp.ClientSession, url: str, **kw: Any) -> int:
    try:
        async with s.post(url, **kw) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


def runaway_renders(s: aiohttp.ClientSession, url: str, tag: str) -> list[asyncio.Future[int]]:
    """Six chat requests with the runaway template, started at once (distinct prompts)."""
    return [
        asyncio.ensure_future(
            post_status(
                s,
                url + "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"{tag} {i}"}],
                    "chat_template": RUNAWAY,
                },
            )
        )
        for i in range(6)
    ]


# -- the attacks ---------------------------------------------------------------------------------


async def template_refused(b: Bench) -> None:
    async with b.gateway(b.precise) as (proc, url):
        base = vm(proc.pid, "VmRSS")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        body["chat_template"] = RUNAWAY
        with Probe(url) as probe:
            t0 = time.monotonic()
            async with aiohttp.ClientSession() as s:
                st = await asyncio.gather(
                    *(post_status(s, url + "/v1/chat/completions", json=body) for _ in range(6))
                )
            took = time.monotonic() - t0
        row("6 runaway templates (default)", counts(st), took, (base, vm(proc.pid, "VmHWM")), probe)


async def template_trusted(b: Bench) -> None:
    async with b.gateway(b.precise, "--trust-request-chat-template") as (proc, url):
        base = vm(proc.pid, "VmRSS")
        async with aiohttp.ClientSession() as s:
            warm = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "warm"}],
                "chat_template": "{{ messages[0].content }}",
            }
            await asyncio.gather(
                *(post_status(s, url + "/v1/chat/completions", json=warm) for _ in range(2))
            )
            with Probe(url) as probe:
                t0 = time.monotonic()
                evil = runaway_renders(s, url, "attack")
                others: list[float] = []
                while not all(t.done() for t in evil):
                    t1 = time.monotonic()
                    await post_status(
                        s, url + "/v1/completions", json={"model": MODEL, "prompt": "text " * 64}
                    )
                    await post_status(
                        s,
                        url + "/v1/chat/completions",
                        json={"model": MODEL, "messages": [{"role": "user", "content": "chat"}]},
                    )
                    others.append(time.monotonic() - t1)
                st = [t.result() for t in evil]
                took = time.monotonic() - t0
            row(
                "6 runaway templates (trusted)",
                counts(st),
                took,
                (base, vm(proc.pid, "VmHWM")),
                probe,
            )
            print(
                f"{'':<4}meanwhile {len(others)} text+chat pairs from another client: "
                f"max {max(others) * 1e3:.0f} ms, median {statistics.median(others) * 1e3:.0f} ms",
                flush=True,
            )
            again = runaway_renders(s, url, "again")
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            proc.terminate()
            await asyncio.to_thread(proc.wait, 60)
            print(
                f"{'':<4}SIGTERM with 6 runaway renders in flight: exited "
                f"{proc.returncode} after {time.monotonic() - t0:.2f} s",
                flush=True,
            )
            await asyncio.gather(*again, return_exceptions=True)


async def slowloris(b: Bench) -> None:
    async with b.gateway(b.load) as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        base = vm(proc.pid, "VmRSS")
        conns = []
        for _ in range(1500):
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        with Probe(url) as probe:
            t0 = time.monotonic()
            for w in (w for _, w in conns):
                w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            for i in range(3):  # one header line every 5 s
                await asyncio.sleep(5)
                for _, w in conns:
                    if not w.is_closing():
                        with contextlib.suppress(Exception):
                            w.write(f"X-Slow-{i}: 1\r\n".encode())
            took = time.monotonic() - t0
        closed = await metric(
            url, 'kvaware_gateway_rejected_connections_total{reason="header_timeout"}'
        )
        for _, w in conns:
            w.close()
        row(
            "1500 slow heads (line / 5 s, 15 s)",
            f"408+closed {closed:.0f}/1500",
            took,
            (base, vm(proc.pid, "VmHWM")),
            probe,
        )


async def conn_flood(b: Bench) -> None:
    async with b.gateway(b.load, "--max-client-connections", "1000") as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        base = vm(proc.pid, "VmRSS")
        with Probe(url) as probe:
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(1500)]
            refused = 0
            waits = []
            for r, _ in conns[1000:]:
                t1 = time.monotonic()
                with contextlib.suppress(Exception):
                    data = await asyncio.wait_for(r.read(64), 2)
                    refused += data.startswith(b"HTTP/1.1 503")
                waits.append(time.monotonic() - t1)
            took = time.monotonic() - t0
            for _, w in conns:
                w.close()
            await asyncio.sleep(0.3)
        row(
            "1500 idle connections, cap 1000",
            f"503 {refused}/500",
            took,
            (base, vm(proc.pid, "VmHWM")),
            probe,
        )


async def gzip_bomb(b: Bench) -> None:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    bomb = b"".join(c.compress(zeros) for _ in range(1024)) + c.flush()
    async with b.gateway(b.load) as (proc, url):
        base = vm(proc.pid, "VmRSS")
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as s:
            with Probe(url) as probe:
                t0 = time.monotonic()
                st = [await post_status(s, url + "/v1/completions", data=bomb, headers=headers)]
                one = time.monotonic() - t0
                st += await asyncio.gather(
                    *(
                        post_status(s, url + "/v1/completions", data=bomb, headers=headers)
                        for _ in range(4)
                    )
                )
                took = time.monotonic() - t0
            row(
                f"gzip bomb {len(bomb) >> 10} KB -> 1 GB: 1, then 4",
                counts(st),
                took,
                (base, vm(proc.pid, "VmHWM")),
                probe,
            )
            print(f"{'':<4}one bomb alone answered in {one:.3f} s", flush=True)
            with Probe(url) as probe:
                t0 = time.monotonic()
                status = await post_status(
                    s, url + "/v1/completions", data=b"\x1f\x8b\x08\x00not gzip", headers=headers
                )
                row("invalid gzip body", str(status), time.monotonic() - t0, (base, base), probe)


async def huge_prompt(b: Bench) -> None:
    async with b.gateway(b.precise) as (proc, url):
        base = vm(proc.pid, "VmRSS")
        prompt = ("lorem ipsum dolor sit amet " * 400_000)[: 8 << 20]
        async with aiohttp.ClientSession() as s:
            with Probe(url) as probe:
                t0 = time.monotonic()
                status = await post_status(
                    s, url + "/v1/score", json={"model": MODEL, "prompt": prompt}
                )
                took = time.monotonic() - t0
        row(
            "8 MB text prompt to /v1/score", str(status), took, (base, vm(proc.pid, "VmHWM")), probe
        )


async def hung_pod(b: Bench) -> None:
    settings = {"firstByteTimeout": "2s", "responseTimeout": "2s", "unhealthyCooldown": "0s"}
    async with b.gateway(b.load, settings=settings, hung=True) as (proc, url):
        base = vm(proc.pid, "VmRSS")
        async with aiohttp.ClientSession() as s:
            for stream in (True, False):
                with Probe(url) as probe:
                    t0 = time.monotonic()
                    times: list[float] = []

                    async def one(i: int, stream: bool, times: list[float]) -> int:
                        t1 = time.monotonic()
                        body = {"model": MODEL, "prompt": f"p{i}", "stream": stream}
                        st = await post_status(s, url + "/v1/completions", json=body)
                        times.append(time.monotonic() - t1)
                        return st

                    st = await asyncio.gather(*(one(i, stream, times) for i in range(20)))
                    took = time.monotonic() - t0
                kind = "streamed" if stream else "non-streamed"
                row(
                    f"hung pod + good pod, 20 {kind}",
                    counts(st),
                    took,
                    (base, vm(proc.pid, "VmHWM")),
                    probe,
                )
                print(f"{'':<4}slowest request {max(times):.2f} s (timeouts set to 2 s)")


async def pods_down(b: Bench) -> None:
    async with b.gateway(b.load) as (proc, url):
        base = vm(proc.pid, "VmRSS")
        async with aiohttp.ClientSession() as s:
            with Probe(url) as probe:
                b.stop_pods()
                t0 = time.monotonic()
                st = [
                    await post_status(
                        s, url + "/v1/completions", json={"model": MODEL, "prompt": "x"}
                    )
                ]
                status = 200
                while status != 503 and time.monotonic() - t0 < 30:
                    async with s.get(url + "/health/ready") as resp:
                        status = resp.status
                    await asyncio.sleep(0.05)
                took = time.monotonic() - t0
                async with s.get(url + "/health/live") as resp:
                    live = resp.status
            b.start_pods()
        row(
            "all pods down",
            f"req {counts(st)} ready {status} live {live}",
            took,
            (base, vm(proc.pid, "VmHWM")),
            probe,
        )


ATTACKS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "template-refused": template_refused,
    "template-trusted": template_trusted,
    "slowloris": slowloris,
    "conn-flood": conn_flood,
    "gzip-bomb": gzip_bomb,
    "huge-prompt": huge_prompt,
    "hung-pod": hung_pod,
    "pods-down": pods_down,
}


async def run(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        bench.start_pods()
        try:
            print(
                f"{'attack':<34} {'status':<26} {'time s':>8} {'RSS MB':>7} {'peak MB':>7} "
                f"{'stall ms':>9}  /health statuses during"
            )
            for name in names:
                await ATTACKS[name](bench)
        finally:
            bench.stop_pods()
            bench.hung.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(ATTACKS), default=None)
    parser.add_argument("--list", action="store_true", help="list the attacks and exit")
    parser.add_argument("--serve-pods", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_pods:
        asyncio.run(serve_pods([int(p) for p in args.serve_pods.split(",")]))
        return
    if args.list:
        print("\n".join(ATTACKS))
        return
    asyncio.run(run(args.only or list(ATTACKS)))


if __name__ == "__main__":
    main()
