"""Core indexer benchmark: score latency (1k/8k/32k-token prompts, 16 pods, >= 1M entries) and
memory per (block, pod) entry, against a straightforward dict-of-sets baseline in-process.

Run: python benchmarks/bench_index.py [--entries 1000000] [--iters 2000]
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from collections.abc import Callable, Sequence

from kvaware_scorer import Indexer, IndexerConfig

PODS = [f"10.0.{i // 250}.{i % 250 + 1}:8000" for i in range(16)]
MODEL = "Qwen/Qwen3-32B"


class NaiveIndex:
    """Baseline: key -> {pod: tier} dicts, walked per pod like a straightforward port would."""

    def __init__(self) -> None:
        self.blocks: dict[int, dict[str, str]] = {}

    def add(self, pod: str, keys: Sequence[int]) -> None:
        for k in keys:
            self.blocks.setdefault(k, {})[pod] = "gpu"

    def lookup(self, keys: Sequence[int], pods: Sequence[str]) -> dict[str, int]:
        active = set(pods)
        runs = dict.fromkeys(pods, 0)
        for k in keys:
            holders = self.blocks.get(k)
            if not holders:
                break
            active = {p for p in active if p in holders}
            if not active:
                break
            for p in active:
                runs[p] += 1
        return {p: r for p, r in runs.items() if r}


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def timeit(fn: Callable[[], object], iters: int) -> list[float]:
    for _ in range(min(50, iters)):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def fill(
    indexer: Indexer,
    entries: int,
    sharing: int,
    rng: random.Random,
    baseline: NaiveIndex | None = None,
    engine_hashes: bool = True,
) -> int:
    """Index prompts of 2048 tokens (128 blocks), each held by `sharing` pods, until `entries`."""
    added = 0
    n = 0
    while added < entries:
        toks = [rng.randrange(150_000) for _ in range(2048)]
        keys = indexer.block_keys(toks, MODEL)
        for j in range(sharing):
            pod = PODS[(n + j) % len(PODS)]
            indexer.index.add(pod, keys, [k ^ 0x5BD1E995 for k in keys] if engine_hashes else None)
            if baseline is not None:
                baseline.add(pod, keys)
            added += len(keys)
        n += 1
    return added


def _ours(entries: int, sharing: int, engine_hashes: bool) -> float:
    gc.collect()
    rng = random.Random(7)
    indexer = Indexer(
        IndexerConfig.from_dict({"kvBlockIndexConfig": {"inMemoryConfig": {"size": entries * 2}}})
    )
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    added = fill(indexer, entries, sharing, rng, engine_hashes=engine_hashes)
    ours = (tracemalloc.get_traced_memory()[0] - before) / added
    tracemalloc.stop()
    del indexer
    return ours


def memory_per_entry(entries: int, sharing: int) -> tuple[float, float, float]:
    """Bytes per (block, pod) entry: ours with distinct engine hashes (derived keys), ours with
    keys = engine hashes (vllm key mode), and the baseline's."""
    derived = _ours(entries, sharing, True)
    vllm = _ours(entries, sharing, False)
    gc.collect()
    rng = random.Random(7)
    base = NaiveIndex()
    keyer = Indexer()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    n = added2 = 0
    while added2 < entries:
        toks = [rng.randrange(150_000) for _ in range(2048)]
        keys = keyer.block_keys(toks, MODEL)
        for j in range(sharing):
            base.add(PODS[(n + j) % len(PODS)], keys)
            added2 += len(keys)
        n += 1
    theirs = (tracemalloc.get_traced_memory()[0] - before) / added2
    tracemalloc.stop()
    return derived, vllm, theirs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    latency(args.entries, args.iters)
    if args.skip_memory:
        return
    memory(args.entries)


def latency(entries: int, iters: int) -> None:
    """Score latency table."""
    rng = random.Random(1)
    print(f"== score latency: 16 candidate pods, index with >= {entries:,} (block, pod) entries ==")
    indexer = Indexer(
        IndexerConfig.from_dict({"kvBlockIndexConfig": {"inMemoryConfig": {"size": entries * 4}}})
    )
    baseline = NaiveIndex()
    fill(indexer, entries, 2, rng, baseline)
    st = indexer.stats()
    print(f"index: {st.entries:,} entries, {st.blocks:,} blocks, {st.pods} pods")
    print(
        f"{'prompt':>8} {'blocks':>6} | {'score p50':>10} {'p99':>9} | {'keys p50':>9} {'lookup p50':>10} | {'baseline lookup p50':>19} {'ratio':>6}"
    )
    for n_tokens in (1024, 8192, 32768):
        toks = [rng.randrange(150_000) for _ in range(n_tokens)]
        keys = indexer.block_keys(toks, MODEL)
        # pod i holds the first (i+1)/16 of the prompt: every pod matches, runs differ
        for i, pod in enumerate(PODS):
            cut = len(keys) * (i + 1) // len(PODS)
            indexer.index.add(pod, keys[:cut], [k ^ 0x77 for k in keys[:cut]])
            baseline.add(pod, keys[:cut])
        s = timeit(lambda toks=toks: indexer.score(MODEL, toks, PODS), iters)
        kt = timeit(lambda toks=toks: indexer.block_keys(toks, MODEL), iters)
        lt = timeit(lambda keys=keys: indexer.index.lookup(keys, PODS), iters)
        bt = timeit(lambda keys=keys: baseline.lookup(keys, PODS), max(50, iters // 10))
        assert {
            p: m.blocks for p, m in indexer.index.lookup(keys, PODS).items()
        } == baseline.lookup(keys, PODS)
        print(
            f"{n_tokens:>8} {len(keys):>6} | {pct(s, 0.5) * 1e3:>8.3f}ms {pct(s, 0.99) * 1e3:>7.3f}ms | "
            f"{pct(kt, 0.5) * 1e3:>7.3f}ms {pct(lt, 0.5) * 1e3:>8.3f}ms | {pct(bt, 0.5) * 1e3:>17.3f}ms "
            f"{pct(bt, 0.5) / pct(lt, 0.5):>5.1f}x"
        )


def memory(entries: int) -> None:
    """Memory-per-entry table."""
    print(f"\n== memory per (block, pod) entry over {entries:,} entries (tracemalloc) ==")
    print(
        f"{'pods per block':>14} | {'ours, derived keys':>18} | {'ours, vllm keys':>15} | {'baseline':>8}  (bytes per entry)"
    )
    for sharing in (1, 2, 4, 16):
        derived, vllm, theirs = memory_per_entry(entries, sharing)
        print(f"{sharing:>14} | {derived:>18.1f} | {vllm:>15.1f} | {theirs:>8.1f}")
    print(
        "ours includes the per-pod engine-hash -> key map that resolves removals and doubles as the\n"
        "pod's reverse index for purges (derived keys: a distinct engine-hash int per entry); the\n"
        "baseline has neither, so it cannot apply BlockRemoved nor purge a pod without a full scan."
    )


if __name__ == "__main__":
    main()
