"""What ``kvaware epp`` adds to a request behind Envoy, next to a minimal round-robin ext_proc
picker in the same run.

    python benchmarks/bench_epp.py                 # about a minute
    python benchmarks/bench_epp.py --requests 1000 --rounds 3

Processes (all on 127.0.0.1): small OpenAI-like backends (one process), ``kvaware epp`` (the
command, plaintext, pool from an endpoints file, ``config/load.yaml`` by default), a minimal
round-robin picker (this script, the same protocol flow with no parsing and no scheduling), and
one Envoy per picker with the bootstrap ``kvaware epp`` ships (FULL_DUPLEX_STREAMED both ways,
override-host pool). The client sends small completion requests one at a time over one keep-alive
connection per path, the paths taking turns every 20 requests (latency: p50 / p99 after a
warm-up), then from several concurrent connections to each path in turn (throughput), for
several rounds. "added" is the p50 over going straight
to a backend.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BODY = json.dumps({"model": "bench-model", "prompt": "hello there", "max_tokens": 4}).encode()
ANSWER = json.dumps(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": "bench-model",
        "choices": [{"index": 0, "text": "a b c d", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6},
    }
).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- child processes --------------------------------------------------------------------------


async def _serve_backends(ports: list[int]) -> None:
    from aiohttp import web

    async def completions(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n")

    for port in ports:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _serve_round_robin(port: int, targets: list[str]) -> None:
    """A minimal FULL_DUPLEX_STREAMED picker: round robin, the body echoed back, no parsing."""
    import grpc
    from envoy.config.core.v3 import base_pb2 as core
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
    from google.protobuf import struct_pb2
    from grpc_health.v1 import health, health_pb2

    cycle = itertools.cycle(targets)

    class RoundRobin(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, it: Any, context: Any) -> AsyncIterator[Any]:
            body: list[bytes] = []
            async for msg in it:
                kind = msg.WhichOneof("request")
                if kind == "request_headers":
                    continue
                if kind == "request_body":
                    body.append(msg.request_body.body)
                    if not msg.request_body.end_of_stream:
                        continue
                    dest = next(cycle)
                    md = struct_pb2.Struct()
                    md.update({"envoy.lb": {"x-gateway-destination-endpoint": dest}})
                    hv = core.HeaderValueOption(
                        header=core.HeaderValue(
                            key="x-gateway-destination-endpoint", raw_value=dest.encode()
                        )
                    )
                    yield ep.ProcessingResponse(
                        request_headers=ep.HeadersResponse(
                            response=ep.CommonResponse(
                                header_mutation=ep.HeaderMutation(set_headers=[hv]),
                                clear_route_cache=True,
                            )
                        ),
                        dynamic_metadata=md,
                    )
                    yield ep.ProcessingResponse(
                        request_body=ep.BodyResponse(
                            response=ep.CommonResponse(
                                body_mutation=ep.BodyMutation(
                                    streamed_response=ep.StreamedBodyResponse(
                                        body=b"".join(body), end_of_stream=True
                                    )
                                )
                            )
                        )
                    )
                elif kind == "response_headers":
                    yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())
                elif kind == "response_body":
                    rb = msg.response_body
                    yield ep.ProcessingResponse(
                        response_body=ep.BodyResponse(
                            response=ep.CommonResponse(
                                body_mutation=ep.BodyMutation(
                                    streamed_response=ep.StreamedBodyResponse(
                                        body=rb.body, end_of_stream=rb.end_of_stream
                                    )
                                )
                            )
                        )
                    )
                elif kind == "response_trailers":
                    yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())

    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(RoundRobin(), server)
    hs = health.aio.HealthServicer()
    await hs.set(
        "envoy.service.ext_proc.v3.ExternalProcessor", health_pb2.HealthCheckResponse.SERVING
    )
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("serving ext_proc", flush=True)
    await server.wait_for_termination()


class Child:
    def __init__(self, cmd: list[str], ready: str, log: Path) -> None:
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"{cmd[:4]} exited; see {log}")
            if ready in line:
                return
        raise RuntimeError(f"{cmd[:4]} not ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- measurement ------------------------------------------------------------------------------


def latency(ports: dict[str, int], n: int, warmup: int, block: int = 20) -> dict[str, list[float]]:
    """Milliseconds of `n` sequential POSTs per path, each path over one keep-alive connection;
    the paths take turns every `block` requests so that a noisy neighbour hits them alike."""
    headers = {"Content-Type": "application/json"}
    conns = {k: http.client.HTTPConnection("127.0.0.1", p, timeout=10) for k, p in ports.items()}
    out: dict[str, list[float]] = {k: [] for k in ports}

    def one(conn: http.client.HTTPConnection) -> float:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", BODY, headers)
        resp = conn.getresponse()
        data = resp.read()
        dt = (time.perf_counter() - t0) * 1000
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return dt

    try:
        for conn in conns.values():
            for _ in range(warmup):
                one(conn)
        done = 0
        while done < n:
            step = min(block, n - done)
            for k, conn in conns.items():
                out[k] += [one(conn) for _ in range(step)]
            done += step
    finally:
        for conn in conns.values():
            conn.close()
    return out


def throughput(port: int, clients: int, seconds: float) -> float:
    """Requests per second from `clients` threads, each on its own keep-alive connection."""
    stop = time.monotonic() + seconds
    counts = [0] * clients

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Content-Type": "application/json"}
        try:
            while time.monotonic() < stop:
                conn.request("POST", "/v1/completions", BODY, headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    counts[i] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - t0)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=400, help="sequential requests per round (400)")
    p.add_argument("--warmup", type=int, default=30, help="warm-up requests per round (30)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over every path (2)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients for req/s (8)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per req/s run (3)")
    p.add_argument("--backends", type=int, default=3, help="backend servers (3)")
    p.add_argument(
        "--configs",
        nargs="+",
        default=[str(ROOT / "config" / "load.yaml"), str(ROOT / "config" / "precise.yaml")],
        help="EPP configs, one kvaware epp each (default: config/load.yaml config/precise.yaml)",
    )
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--serve-backends", help=argparse.SUPPRESS)
    p.add_argument("--serve-rr", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_backends:
        asyncio.run(_serve_backends([int(x) for x in args.serve_backends.split(",")]))
        return 0
    if args.serve_rr:
        port, targets = args.serve_rr.split("=", 1)
        asyncio.run(_serve_round_robin(int(port), targets.split(",")))
        return 0
    return run(args)


def run(args: argparse.Namespace) -> int:
    from kvaware_scorer.epp import EnvoyProcess, bootstrap, write_bootstrap
    from kvaware_scorer.scheduler import Endpoint

    children: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="bench-epp-") as tmp:
        work = Path(tmp)
        try:
            ports = [free_port() for _ in range(args.backends)]
            targets = [f"127.0.0.1:{p}" for p in ports]
            me = [sys.executable, str(Path(__file__).resolve())]
            children.append(
                Child([*me, "--serve-backends", ",".join(map(str, ports))], "ready", work / "b.log")
            )
            eps = [Endpoint(f"b{i}", "127.0.0.1", p) for i, p in enumerate(ports)]
            (work / "endpoints.yaml").write_text(
                yaml.safe_dump(
                    {
                        "endpoints": [
                            {"name": e.name, "address": e.address, "port": e.port} for e in eps
                        ]
                    }
                )
            )
            from kvaware_scorer.demo import scheduler_config
            from kvaware_scorer.tokenization import install_local_tokenizer

            # NOTE: the precise scorer tokenizes with a locally built tokenizer of the model.
            install_local_tokenizer(work / "tok", "bench-model")
            pickers: list[tuple[str, int]] = []
            for path in args.configs:
                cfg_file = work / f"epp-{Path(path).name}"
                cfg_file.write_text(yaml.safe_dump(scheduler_config(path, work / "tok")))
                kv_port = free_port()
                children.append(
                    Child(
                        [
                            sys.executable, "-m", "kvaware_scorer.cli", "epp",
                            "--config", str(cfg_file), "--endpoints", str(work / "endpoints.yaml"),
                            "--grpc-port", str(kv_port), "--grpc-health-port", str(free_port()),
                            "--metrics-port", "-1", "--host", "127.0.0.1",
                            "--secure-serving=false",
                        ],
                        "serving ext_proc",
                        work / f"epp-{kv_port}.log",
                    )
                )  # fmt: skip
                pickers.append((f"Envoy + kvaware epp ({Path(path).stem})", kv_port))
            rr_port = free_port()
            children.append(
                Child(
                    [*me, "--serve-rr", f"{rr_port}={','.join(targets)}"],
                    "serving",
                    work / "rr.log",
                )
            )
            pickers.insert(0, ("Envoy + minimal RR picker", rr_port))
            fronts: dict[str, int] = {"direct to a backend": ports[0]}
            for name, epp_port in pickers:
                listen, admin = free_port(), free_port()
                cfg = write_bootstrap(
                    work / f"envoy-{listen}.yaml",
                    bootstrap(
                        listen_port=listen, admin_port=admin, epp_port=epp_port, endpoints=eps
                    ),
                )
                envoy = EnvoyProcess(cfg, admin, work / f"envoy-{listen}.log")
                envoy.start()
                children.append(envoy)
                envoy.wait_ready(30)
                fronts[name] = listen
            results: dict[str, dict[str, list[float]]] = {k: {"lat": [], "rps": []} for k in fronts}
            for r in range(args.rounds):
                for name, lat in latency(fronts, args.requests, args.warmup).items():
                    results[name]["lat"] += lat
                for name, port in fronts.items():
                    results[name]["rps"].append(throughput(port, args.clients, args.seconds))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for child in reversed(children):
                child.stop()
    rows = _report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _report(
    results: dict[str, dict[str, list[float]]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    direct = statistics.median(results["direct to a backend"]["lat"])
    rows: list[dict[str, Any]] = []
    print(
        f"{args.requests} sequential requests x {args.rounds} rounds per path (after "
        f"{args.warmup} warm-up each), {args.clients} clients x {args.seconds:g}s for req/s"
    )
    print(f"{'path':<36} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10} {'req/s':>8}")
    for name, res in results.items():
        p50, p99 = statistics.median(res["lat"]), pct(res["lat"], 0.99)
        rps = statistics.median(res["rps"])
        rows.append(
            {"path": name, "p50_ms": p50, "p99_ms": p99, "added_p50_ms": p50 - direct, "rps": rps}
        )
        print(f"{name:<36} {p50:8.2f} {p99:8.2f} {p50 - direct:10.2f} {rps:8.0f}")
    rr = next(r for r in rows if "RR" in r["path"])
    for kv in (r for r in rows if "kvaware" in r["path"]):
        ratio = kv["added_p50_ms"] / rr["added_p50_ms"] if rr["added_p50_ms"] > 0 else float("inf")
        print(
            f"{kv['path']} adds {kv['added_p50_ms']:.2f} ms p50 over direct = {ratio:.2f}x the "
            f"minimal picker's {rr['added_p50_ms']:.2f} ms (targets: <= 1.5x, <= 3 ms)"
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
