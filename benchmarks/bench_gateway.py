"""Gateway overhead per request and the request rate one gateway process sustains.

Three processes on loopback: a pod process (a minimal OpenAI-like server answering
``/v1/completions`` at once, several ports = several endpoints), ``kvaware serve`` with the
precise profile in front of those ports, and this script as the load generator (one aiohttp
client session, bounded concurrency).

1. Latency at concurrency 1: requests alternate between a pod directly and the same pods
   through the gateway, from the same client in the same process; the added latency is the
   difference of the percentiles (and the median of paired differences).
2. Rate: ``--concurrency`` requests in flight through the gateway for ``--duration`` seconds,
   then the same directly against the pods (the ceiling of this pod process + load generator
   on this machine). The gateway's CPU time per request comes from ``/proc``.

Prompts are token-id lists of the llm-d shared-prefix shape (groups x a system prefix + a
unique question), so the precise scorer derives and looks up every block of every request.
All three processes share the machine's cores: figures are noisy on a busy machine.

Usage::

    python benchmarks/bench_gateway.py [--requests 1000] [--concurrency 32] [--duration 10]
        [--pods 4] [--tokens 1024] [--config config/precise.yaml]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# -- the pod process ---------------------------------------------------------------------------


async def serve_pods(ports: list[int]) -> None:
    """Minimal OpenAI-like pods: answer every completion at once with a fixed body."""
    from aiohttp import web

    answer = msgspec.json.encode(
        {
            "id": "cmpl-bench",
            "object": "text_completion",
            "created": 0,
            "model": MODEL,
            "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": "length"}],
            "usage": {
                "prompt_tokens": 1024,
                "completion_tokens": 1,
                "total_tokens": 1025,
                "prompt_tokens_details": {"cached_tokens": 768},
            },
        }
    )
    metrics = (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{model_name="{MODEL}",engine="0"}} 0.0\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{model_name="{MODEL}",engine="0"}} 0.0\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f'vllm:kv_cache_usage_perc{{model_name="{MODEL}",engine="0"}} 0.2\n'
    )

    async def completions(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/json")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def prom(request: web.Request) -> web.Response:
        return web.Response(text=metrics, content_type="text/plain")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", prom)
    await serve_app(app, ports)


async def serve_app(app: aiohttp.web.Application, ports: list[int]) -> None:
    """Serve `app` on every port of 127.0.0.1, print ``ready``, then run until killed."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for port in ports:
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


# -- load generation ------------------------------------------------------------------------------


def make_bodies(n: int, tokens: int, groups: int, seed: int) -> list[bytes]:
    """Completion bodies: `groups` system prefixes (3/4 of the prompt) + unique questions."""
    rng = random.Random(seed)
    prefix_len = tokens * 3 // 4
    prefixes = [[rng.randrange(150_000) for _ in range(prefix_len)] for _ in range(groups)]
    bodies = []
    for i in range(n):
        question = [rng.randrange(150_000) for _ in range(tokens - prefix_len)]
        prompt = prefixes[i % groups] + question
        bodies.append(msgspec.json.encode({"model": MODEL, "prompt": prompt, "max_tokens": 1}))
    return bodies


async def one(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} from {url}")
    return time.perf_counter() - t0


async def latency_phase(
    gateway: str, pods: list[str], bodies: list[bytes], warmup: int
) -> tuple[list[float], list[float]]:
    direct: list[float] = []
    through: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        for i, body in enumerate(bodies):
            pod = pods[i % len(pods)] + "/v1/completions"
            gw = gateway + "/v1/completions"
            # Alternate which goes first, so neither side always gets the warmer caches.
            if i % 2:
                d = await one(s, pod, body)
                g = await one(s, gw, body)
            else:
                g = await one(s, gw, body)
                d = await one(s, pod, body)
            if i >= warmup:
                direct.append(d)
                through.append(g)
    return direct, through


async def rate_phase(
    urls: list[str], bodies: list[bytes], concurrency: int, duration: float
) -> tuple[int, int, float, list[float]]:
    done = 0
    errors = 0
    lat: list[float] = []
    stop_at = time.perf_counter() + duration
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def worker(w: int) -> None:
            nonlocal done, errors
            i = w
            while time.perf_counter() < stop_at:
                url = urls[i % len(urls)] + "/v1/completions"
                try:
                    lat.append(await one(s, url, bodies[i % len(bodies)]))
                    done += 1
                except (aiohttp.ClientError, RuntimeError):
                    errors += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return done, errors, elapsed, lat


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 60) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited before printing {prefix!r}")
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"timed out waiting for {prefix!r}")


async def run(args: argparse.Namespace) -> None:
    ports = [free_port() for _ in range(args.pods)]
    pod_urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        endpoints = Path(tmp) / "endpoints.yaml"
        endpoints.write_text(
            "endpoints:\n"
            + "".join(
                f"  - {{name: pod-{i}, address: 127.0.0.1, port: {p}, model: {MODEL}}}\n"
                for i, p in enumerate(ports)
            )
        )
        try:
            pod = subprocess.Popen(
                [sys.executable, __file__, "--serve-pods", ",".join(map(str, ports))],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(pod)
            wait_line(pod, "ready")
            gw = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kvaware_scorer.cli",
                    "serve",
                    "--config",
                    str(args.config),
                    "--endpoints",
                    str(endpoints),
                    "--port",
                    "0",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(gw)
            gateway = wait_line(gw, "kvaware gateway listening on").rsplit(" ", 1)[1]
            bodies = make_bodies(
                max(args.requests + args.warmup, 512), args.tokens, args.groups, args.seed
            )

            direct, through = await latency_phase(
                gateway, pod_urls, bodies[: args.requests + args.warmup], args.warmup
            )
            paired = sorted(g - d for d, g in zip(direct, through, strict=True))
            print(
                f"gateway overhead at concurrency 1 ({len(direct)} requests, {args.tokens}-token "
                f"prompts, {args.pods} endpoints, {args.config.name})"
            )
            print(f"{'':<22} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
            for label, xs in (("direct to pod", direct), ("through gateway", through)):
                print(
                    f"{label:<22} {percentile(xs, 50) * 1e3:>8.3f} {percentile(xs, 90) * 1e3:>8.3f} "
                    f"{percentile(xs, 99) * 1e3:>8.3f} {statistics.fmean(xs) * 1e3:>8.3f}"
                )
            print(
                f"{'added (difference)':<22} "
                f"{(percentile(through, 50) - percentile(direct, 50)) * 1e3:>8.3f} "
                f"{(percentile(through, 90) - percentile(direct, 90)) * 1e3:>8.3f} "
                f"{(percentile(through, 99) - percentile(direct, 99)) * 1e3:>8.3f} "
                f"{(statistics.fmean(through) - statistics.fmean(direct)) * 1e3:>8.3f}"
            )
            print(
                f"{'added (paired)':<22} {percentile(paired, 50) * 1e3:>8.3f} "
                f"{percentile(paired, 90) * 1e3:>8.3f} {percentile(paired, 99) * 1e3:>8.3f} "
                f"{statistics.fmean(paired) * 1e3:>8.3f}"
            )

            cpu0 = cpu_seconds(gw.pid)
            done, errors, elapsed, lat = await rate_phase(
                [gateway], bodies, args.concurrency, args.duration
            )
            gw_cpu = cpu_seconds(gw.pid) - cpu0
            d_done, d_errors, d_elapsed, d_lat = await rate_phase(
                pod_urls, bodies, args.concurrency, args.duration
            )
            async with aiohttp.ClientSession() as s, s.get(gateway + "/metrics") as resp:
                text = await resp.text()
            print()
            print(f"request rate at concurrency {args.concurrency} for {args.duration:.0f}s")
            print(f"{'':<22} {'req/s':>8} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8}")
            print(
                f"{'through gateway':<22} {done / elapsed:>8.0f} {errors:>7} "
                f"{percentile(lat, 50) * 1e3:>8.2f} {percentile(lat, 99) * 1e3:>8.2f}"
            )
            print(
                f"{'direct to pods':<22} {d_done / d_elapsed:>8.0f} {d_errors:>7} "
                f"{percentile(d_lat, 50) * 1e3:>8.2f} {percentile(d_lat, 99) * 1e3:>8.2f}"
            )
            print(
                f"gateway process CPU: {gw_cpu / max(done, 1) * 1e3:.3f} ms per request "
                f"({gw_cpu / elapsed:.2f} cores busy) -> at most "
                f"{done / max(gw_cpu, 1e-9):.0f} req/s per gateway core"
            )
            n_sched = metric(text, "kvaware_schedule_latency_seconds_count")
            n_over = metric(text, "kvaware_gateway_overhead_seconds_count")
            print(
                "inside the gateway (means over the whole run): schedule "
                f"{metric(text, 'kvaware_schedule_latency_seconds_sum') / n_sched * 1e6:.0f} us, "
                "arrival -> forwarded "
                f"{metric(text, 'kvaware_gateway_overhead_seconds_sum') / n_over * 1e6:.0f} us"
            )
            print(f"machine: {os.cpu_count()} cores shared by pod, gateway and load generator")
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="latency-phase requests")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate run")
    parser.add_argument("--pods", type=int, default=4, help="endpoints (ports of one pod process)")
    parser.add_argument("--tokens", type=int, default=1024, help="prompt length in tokens")
    parser.add_argument("--groups", type=int, default=8, help="shared system prefixes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "precise.yaml")
    parser.add_argument("--serve-pods", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_pods:
        asyncio.run(serve_pods([int(p) for p in args.serve_pods.split(",")]))
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
