"""Scheduling latency of the shipped profiles, and the precise profile's overhead over a bare
`Indexer.score` in the same process.

The scheduler runs on a virtual clock advanced by ``1 / --rate`` per request, so the number of
live speculative entries matches that request rate (a tight loop on the real clock would model
thousands of requests per second). Setup: 16 endpoints with load metrics, a warm index (every pod holds a few thousand blocks of
8k-token prompts that share system prefixes), and requests of 8,192 token ids that share a
6k-token prefix with some pod. Each `schedule()` is followed by `post_response()` so in-flight
counts stay bounded; requests rotate over a pool so speculative entries do not pile up on one key.

Usage::

    python benchmarks/bench_schedule.py [--iterations 3000] [--endpoints 16] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvaware_scorer.scheduler import (
    Endpoint,
    EndpointMetrics,
    ResponseInfo,
    Scheduler,
    SchedulingRequest,
)
from kvaware_scorer.scheduler.config import read_yaml

ROOT = Path(__file__).resolve().parent.parent
MODEL = "Qwen/Qwen3-32B"


class VirtualClock:
    """The scheduler's clock, advanced by the benchmark (one request every 1/rate s)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def timed(fn: Callable[[int], object], n: int, warmup: int) -> list[float]:
    """Per-call latencies in microseconds of ``fn(i)`` for i in range(n), after a warm-up."""
    for i in range(warmup):
        fn(i)
    gc.collect()
    out: list[float] = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        fn(i)
        out.append((clock() - t0) / 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--endpoints", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--prefixes", type=int, default=32, help="distinct system prefixes")
    parser.add_argument("--requests", type=int, default=128, help="distinct requests rotated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="requests per second of the virtual clock (sets how many speculative entries "
        "are alive at once: rate x speculativeTTL requests' worth)",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() after warming the index (long-lived index objects leave the GC scan)",
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)

    endpoints = [
        Endpoint(f"vllm-{i}", f"10.0.0.{i + 1}", 8000, {"llm-d.ai/role": "decode"})
        for i in range(args.endpoints)
    ]
    for e in endpoints:
        e.metrics = EndpointMetrics(
            waiting_queue_size=rng.randrange(0, 8),
            running_requests_size=rng.randrange(0, 64),
            kv_cache_usage_percent=rng.random(),
            cache_block_size=16,
            cache_num_blocks=20000,
        )
    pods = [e.id for e in endpoints]
    prefix_len = args.tokens * 3 // 4
    prefixes = [[rng.randrange(150_000) for _ in range(prefix_len)] for _ in range(args.prefixes)]

    def prompt(p: int) -> list[int]:
        return prefixes[p] + [rng.randrange(150_000) for _ in range(args.tokens - prefix_len)]

    requests = [prompt(rng.randrange(args.prefixes)) for _ in range(args.requests)]

    rows: list[tuple[str, list[float]]] = []
    bare: list[float] = []
    no_spec = read_yaml(ROOT / "config" / "precise.yaml")
    for plugin in no_spec["plugins"]:
        if plugin["type"] == "precise-prefix-cache-scorer":
            plugin["parameters"]["speculativeIndexing"] = False
    configs: dict[str, Any] = {
        name: ROOT / "config" / f"{name}.yaml" for name in ("random", "load", "estimated")
    }
    configs["precise, no speculative"] = no_spec
    configs["precise"] = ROOT / "config" / "precise.yaml"
    for name, cfg in configs.items():
        clock = VirtualClock()
        sched = Scheduler.from_config(cfg, seed=args.seed, clock=clock)
        sched.set_endpoints(endpoints)
        if name.startswith("precise"):
            indexer = sched.plugin("precise-prefix-cache-scorer").indexer
            # warm index: each pod holds several full prompts of a few prefixes
            for i, pod in enumerate(pods):
                for p in range(i % args.prefixes, args.prefixes, max(1, args.endpoints // 2)):
                    indexer.index.add(pod, indexer.block_keys(prompt(p), MODEL))
            stats = indexer.stats()
            if args.gc_freeze:
                gc.collect()
                gc.freeze()

        if name == "precise":
            # NOTE: measured before the schedule loop: afterwards its speculative entries
            # would expire inside the bare calls and bill them for the scheduler's work.
            def score(i: int, indexer: Any = indexer) -> object:
                return indexer.score(MODEL, requests[i % len(requests)], pods)

            bare = timed(score, args.iterations, args.warmup)

        def run(i: int, sched: Scheduler = sched, clock: VirtualClock = clock) -> object:
            clock.now += 1.0 / args.rate
            req = SchedulingRequest(f"r{i}", MODEL, token_ids=requests[i % len(requests)])
            result = sched.schedule(req, endpoints)
            sched.post_response(req, result, ResponseInfo())
            return result

        rows.append((name, timed(run, args.iterations, args.warmup)))
        sched.close()

    print(
        f"{args.endpoints} endpoints, {args.tokens}-token prompts as token ids "
        f"({args.tokens // 16} blocks of 16), {args.iterations} calls each at "
        f"{args.rate:g} req/s of virtual time; "
        f"warm index: {stats.entries} (block, pod) entries, {stats.blocks} blocks"
    )
    print(f"{'profile':<24} {'p50 us':>9} {'p99 us':>9} {'mean us':>9}")
    for name, lat in [*rows, ("bare Indexer.score", bare)]:
        print(
            f"{name:<24} {percentile(lat, 50):>9.1f} {percentile(lat, 99):>9.1f} "
            f"{statistics.fmean(lat):>9.1f}"
        )
    precise = dict(rows)["precise"]
    p50_over = percentile(precise, 50) - percentile(bare, 50)
    p99_over = percentile(precise, 99) - percentile(bare, 99)
    print(
        f"precise schedule() over bare Indexer.score: p50 {p50_over:+.1f} us "
        f"(x{percentile(precise, 50) / percentile(bare, 50):.2f}), p99 {p99_over:+.1f} us; "
        f"target p50 <= 1000 us: {'met' if percentile(precise, 50) <= 1000 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
