"""``kvaware quickstart``: a small in-process walk-through of indexing and scoring.

Builds an embedded indexer, records which of four pods hold which blocks of a few prompts,
and prints each pod's score for a new request that shares a prefix with them.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from kvaware_scorer.config import IndexerConfig
from kvaware_scorer.indexer import Indexer

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add the ``quickstart`` subcommand."""
    p = sub.add_parser(
        "quickstart", help="index a few prompts in memory and score pods for a request"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the example prompts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the walk-through; returns 0."""
    rng = random.Random(args.seed)
    indexer = Indexer(IndexerConfig())
    model = "Qwen/Qwen3-32B"
    pods = [f"10.0.0.{i}:8000" for i in range(1, 5)]
    system = [rng.randrange(150_000) for _ in range(6000)]
    other = [rng.randrange(150_000) for _ in range(6000)]
    # pod 1 served the system prompt + question A; pod 2 the system prompt only; pod 3 another prompt
    question_a = [rng.randrange(150_000) for _ in range(1200)]
    indexer.index.add(pods[0], indexer.block_keys(system + question_a, model))
    indexer.index.add(pods[1], indexer.block_keys(system, model))
    indexer.index.add(pods[2], indexer.block_keys(other, model))
    request = system + question_a[:600] + [rng.randrange(150_000) for _ in range(600)]
    t0 = time.perf_counter()
    result = indexer.match(model, request, pods)
    dt = (time.perf_counter() - t0) * 1e3
    print(
        f"request: {len(request)} tokens = {result.total_blocks} full blocks of {result.block_size}"
    )
    print(f"{'pod':<16} {'blocks':>6} {'score':>6}")
    for pod, s in result.pods.items():
        print(f"{pod:<16} {s.blocks:>6} {s.score:>6.3f}")
    best = max(result.pods, key=lambda p: result.pods[p].score)
    print(f"best pod: {best} (scored in {dt:.2f} ms)")
    return 0
