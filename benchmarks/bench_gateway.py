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

3. Streamed answers (``--stream-tokens N``): the pods answer every request as an SSE stream of
   N token events ``--token-interval`` ms apart (then the usage event and ``[DONE]``), as a
   decoding engine does, and the rate phase reports the CPU the gateway spends per streamed
   request: relaying N events is most of it.
4. A peer router in front of the same pods (``--peer sglang-router:cache_aware``, installed
   from PyPI into its own venv under the user's cache, as `bench_live` does): the same rate
   phase through it, its CPU per request, and kvaware's CPU as a ratio of it. Prompts are then
   words (``w123 w456 ...``) instead of token ids, which the Rust routers need; with no
   tokenizer configured kvaware's precise scorer scores them 0, so the comparison is of the
   HTTP and relay path plus scheduling, without tokenization, KV events or scrapes of a real
   pool (`bench_live` measures those). The latency phase is skipped.

Usage::

    python benchmarks/bench_gateway.py [--requests 1000] [--concurrency 32] [--duration 10]
        [--pods 4] [--tokens 1024] [--config config/precise.yaml]
        [--stream-tokens 32 --token-interval 10] [--peer sglang-router:cache_aware]
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
from types import SimpleNamespace

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


async def serve_pods(ports: list[int], stream_tokens: int, token_interval: float) -> None:
    """Minimal OpenAI-like pods: answer every completion at once with a fixed body, or (a
    request with ``"stream": true`` when `stream_tokens` > 0) with `stream_tokens` SSE events
    `token_interval` seconds apart, the usage event and ``[DONE]``."""
    import logging

    from aiohttp import web

    # NOTE: a peer router may probe the pods with other protocols (gRPC); those failures are
    # not the benchmark's business.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
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

    chunk = {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": None}],
    }
    event = b"data: " + msgspec.json.encode(chunk) + b"\n\n"
    last = {
        **chunk,
        "choices": [],
        "usage": {"prompt_tokens": 1024, "completion_tokens": stream_tokens},
    }
    tail = b"data: " + msgspec.json.encode(last) + b"\n\ndata: [DONE]\n\n"

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if stream_tokens <= 0 or b'"stream":true' not in body:
            return web.Response(body=answer, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(stream_tokens):
            await asyncio.sleep(token_interval)
            await resp.write(event)
        await resp.write(tail)
        await resp.write_eof()
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def prom(request: web.Request) -> web.Response:
        return web.Response(text=metrics, content_type="text/plain")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def info(request: web.Request) -> web.Response:
        # What a peer router asks a worker for when it registers it (SGLang's routes).
        return web.json_response({"model_path": MODEL, "served_model_name": MODEL})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", prom)
    for path in ("/health", "/health_generate"):
        app.router.add_get(path, ok)
    for path in ("/get_model_info", "/get_server_info"):
        app.router.add_get(path, info)
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


def make_bodies(
    n: int, tokens: int, groups: int, seed: int, stream_tokens: int = 0, words: bool = False
) -> list[bytes]:
    """Completion bodies: `groups` system prefixes (3/4 of the prompt) + unique questions;
    streamed with `stream_tokens` output tokens when > 0; the prompt as words (``w<id>``)
    instead of token ids when `words`."""
    rng = random.Random(seed)
    prefix_len = tokens * 3 // 4
    prefixes = [[rng.randrange(150_000) for _ in range(prefix_len)] for _ in range(groups)]
    bodies = []
    for i in range(n):
        question = [rng.randrange(150_000) for _ in range(tokens - prefix_len)]
        ids = prefixes[i % groups] + question
        prompt: str | list[int] = " ".join(f"w{t}" for t in ids) if words else ids
        body: dict[str, object] = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        if stream_tokens > 0:
            body.update(max_tokens=stream_tokens, stream=True)
        bodies.append(msgspec.json.encode(body))
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


async def rate_and_cpu(
    url: str, pid: int, bodies: list[bytes], args: argparse.Namespace
) -> tuple[int, int, float, float]:
    """One rate phase through `url`: (requests done, errors, seconds, CPU seconds of `pid` and
    its descendants meanwhile)."""
    from bench_live import cpu_seconds as tree_cpu_seconds

    await rate_phase([url], bodies, args.concurrency, min(args.duration, 3.0))  # warm-up
    cpu0 = tree_cpu_seconds(pid)
    done, errors, elapsed, _ = await rate_phase([url], bodies, args.concurrency, args.duration)
    return done, errors, elapsed, tree_cpu_seconds(pid) - cpu0


async def peer_comparison(
    args: argparse.Namespace, gateway: str, gw_pid: int, pod_urls: list[str], bodies: list[bytes]
) -> None:
    """The rate phase through kvaware, then through each peer in front of the same pods; CPU
    per request of each and kvaware's as a ratio of the peer's."""
    import bench_live

    rows = [(f"kvaware {args.config.name}", *await rate_and_cpu(gateway, gw_pid, bodies, args))]
    for spec in args.peer:
        kind, _, policy = spec.partition(":")
        if kind not in bench_live.PEERS:
            raise SystemExit(f"unknown peer {kind!r} (one of {', '.join(bench_live.PEERS)})")
        if policy == "kv_aware":
            print(f"skipping {spec}: these pods publish no KV events")
            continue
        package, exe, _ = bench_live.PEERS[kind]
        try:
            binary = bench_live.ensure_venv(args.venv_dir, kind, package, exe, sys.executable)
        except RuntimeError as exc:
            print(f"skipping {spec}: {exc}")
            continue
        port = free_port()
        # NOTE: a peer's command line reads only the pods' URLs (the work directory, the
        # tokenizers and the block size are kvaware's and kv_aware's).
        pods = SimpleNamespace(urls=pod_urls, entries=[])
        cmd = bench_live.router_command(
            bench_live.RouterSpec(kind, policy or "cache_aware"),
            str(binary),
            pods,  # type: ignore[arg-type]
            port,
            Path(),
            Path(),
            16,
        )
        peer = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            url = f"http://127.0.0.1:{port}"
            bench_live.wait_http(url + "/health", peer, 60)
            rows.append(
                (
                    f"{kind} {policy or 'cache_aware'}",
                    *await rate_and_cpu(url, peer.pid, bodies, args),
                )
            )
        except RuntimeError as exc:
            print(f"skipping {spec}: {exc}")
        finally:
            bench_live.stop_process(peer)
    shape = (
        f"{args.stream_tokens} streamed tokens {args.token_interval:g} ms apart"
        if args.stream_tokens > 0
        else "whole-body answers"
    )
    print(
        f"CPU per request at concurrency {args.concurrency} for {args.duration:.0f}s "
        f"({args.pods} endpoints, {args.tokens}-word prompts, {shape})"
    )
    base = rows[0][4] / max(rows[0][1], 1)
    print(f"{'router':<32} {'req/s':>8} {'errors':>7} {'CPU ms/req':>11} {'kvaware / it':>13}")
    for label, done, errors, elapsed, cpu in rows:
        per = cpu / max(done, 1)
        print(
            f"{label:<32} {done / elapsed:>8.0f} {errors:>7} {per * 1e3:>11.3f} "
            f"{base / per if per else float('nan'):>13.2f}"
        )
    print(f"machine: {os.cpu_count()} cores shared by pods, routers and load generator")


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
                [
                    sys.executable,
                    __file__,
                    "--serve-pods",
                    ",".join(map(str, ports)),
                    "--stream-tokens",
                    str(args.stream_tokens),
                    "--token-interval",
                    str(args.token_interval),
                ],
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
                max(args.requests + args.warmup, 512),
                args.tokens,
                args.groups,
                args.seed,
                args.stream_tokens,
                words=bool(args.peer),
            )
            if args.peer:
                await peer_comparison(args, gateway, gw.pid, pod_urls, bodies)
                return

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
    parser.add_argument(
        "--stream-tokens",
        type=int,
        default=0,
        help="pods stream this many token events per request (0: whole-body answers)",
    )
    parser.add_argument(
        "--token-interval", type=float, default=10.0, help="ms between streamed token events"
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        help="a peer router in front of the same pods, e.g. sglang-router:cache_aware "
        "(repeatable; skips the latency phase)",
    )
    parser.add_argument("--venv-dir", type=Path, default=None, help="peer venvs (user cache)")
    parser.add_argument("--serve-pods", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_pods:
        ports = [int(p) for p in args.serve_pods.split(",")]
        asyncio.run(serve_pods(ports, args.stream_tokens, args.token_interval / 1000))
        return
    if args.venv_dir is None:
        from bench_live import default_venv_dir

        args.venv_dir = default_venv_dir()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
