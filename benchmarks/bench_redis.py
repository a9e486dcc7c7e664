"""Redis index vs the in-memory index: lookup latency, ingestion rate, memory per entry.

Workload: prompts of ``--blocks`` blocks (512 = an 8k-token prompt at block size 16) over
``--pods`` pods. Prompts come in groups that share a system prompt (``--shared`` blocks); each
prompt is cached by 1-4 pods, each holding a prefix of it (vLLM frees tail blocks first), until
the index holds ``--entries`` (block, pod) entries. Every pod stores only blocks it does not
hold yet, as vLLM does, in events of ``--event-blocks`` blocks with distinct engine hashes.

Lookups: whole prompts with every pod a candidate: half are indexed prompts, a quarter new
prompts on a known system prompt, a quarter wholly new prompts.

Ingestion end to end: the KV-event stream of ``bench_ingest.py`` (vLLM-format payloads:
chunked-prefill stores chained to cached system prompts, one-block decode continuations,
tail-first evictions one hash per BlockRemoved) through ``Indexer.ingest`` (decode, key
derivation, reference counting) into Redis, against the same into the in-memory index.

Run (starts its own redis-server on a free loopback port unless ``--url`` is given)::

    python benchmarks/bench_redis.py
    python benchmarks/bench_redis.py --entries 200000 --lookups 500   # quicker
    python benchmarks/bench_redis.py --cluster   # a local 3-master Redis Cluster
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import MODEL, generate

from kvaware_scorer import Indexer
from kvaware_scorer.config import RedisIndexConfig
from kvaware_scorer.index import InMemoryIndex, KVBlockIndex
from kvaware_scorer.index.redis import RedisIndex

Event = tuple[str, list[int], list[int]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_redis() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: install it or pass --url")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
            + ["no", "--dir", tmp, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            client = redis.Redis.from_url(url)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


@contextmanager
def local_cluster(masters: int = 3) -> Iterator[list[str]]:
    """A Redis Cluster of `masters` redis-servers on loopback ports; yields their URLs."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: install it or pass --url")
    ports = [(free_port(), free_port()) for _ in range(masters)]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, (port, bus) in enumerate(ports):
            work = Path(tmp) / f"n{i}"
            work.mkdir()
            cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            cmd += ["--appendonly", "no", "--dir", str(work), "--protected-mode", "no"]
            cmd += ["--cluster-enabled", "yes", "--cluster-port", str(bus)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        try:
            clients = [redis.Redis(port=p) for p, _ in ports]
            for c in clients:
                for _ in range(100):
                    try:
                        c.ping()
                        break
                    except redis.ConnectionError:
                        time.sleep(0.05)
            per = 16384 // masters
            for i, c in enumerate(clients):
                c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                end = 16383 if i == masters - 1 else (i + 1) * per - 1
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, end)
            for port, bus in ports[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)
            for _ in range(300):
                infos = [c.cluster("info") for c in clients]
                if all(i["cluster_state"] == "ok" for i in infos):
                    break
                time.sleep(0.1)
            yield [f"redis://127.0.0.1:{p}" for p, _ in ports]
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)


def workload(
    entries: int, pods: int, blocks: int, shared: int, event_blocks: int, seed: int
) -> tuple[list[Event], list[list[int]], list[list[int]]]:
    """Events to ingest, the indexed prompts and the system prompts."""
    rng = random.Random(seed)
    names = [f"10.0.{i // 256}.{i % 256}:8000" for i in range(pods)]
    systems = [[rng.getrandbits(64) for _ in range(shared)] for _ in range(16)]
    held: list[set[int]] = [set() for _ in range(pods)]
    events: list[Event] = []
    prompts: list[list[int]] = []
    total = 0
    while total < entries:
        sysp = systems[rng.randrange(len(systems))]
        prompt = sysp + [rng.getrandbits(64) for _ in range(blocks - shared)]
        prompts.append(prompt)
        for p in rng.sample(range(pods), rng.randint(1, 4)):
            run = rng.randint(shared, blocks)
            new = [k for k in prompt[:run] if k not in held[p]]
            held[p].update(new)
            total += len(new)
            for i in range(0, len(new), event_blocks):
                ks = new[i : i + event_blocks]
                events.append((names[p], ks, [rng.getrandbits(64) for _ in ks]))
    return events, prompts, systems


def queries(
    prompts: list[list[int]], systems: list[list[int]], n: int, blocks: int, seed: int
) -> list[list[int]]:
    rng = random.Random(seed + 1)
    out = []
    for i in range(n):
        kind = i % 4
        if kind < 2:
            out.append(rng.choice(prompts))
        elif kind == 2:
            sysp = rng.choice(systems)
            out.append(sysp + [rng.getrandbits(64) for _ in range(blocks - len(sysp))])
        else:
            out.append([rng.getrandbits(64) for _ in range(blocks)])
    return out


def latencies(
    index: KVBlockIndex, qs: list[list[int]], pods: list[str]
) -> tuple[list[float], float]:
    lat = []
    hit = 0
    for q in qs:
        t0 = time.perf_counter()
        res = index.lookup(q, pods)
        lat.append(time.perf_counter() - t0)
        hit += max((m.blocks for m in res.values()), default=0)
    return lat, hit / len(qs)


class Servers:
    """The Redis server(s) under test: stats summed over every node."""

    def __init__(self, urls: list[str]) -> None:
        self.clients = [redis.Redis.from_url(u) for u in urls]

    def reset(self) -> None:
        for c in self.clients:
            c.config_resetstat()

    def script_usec(self) -> float:
        """Microseconds the servers spent in our script calls since the last reset."""
        total = 0.0
        for c in self.clients:
            total += float(c.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))
        return total

    def script_calls(self) -> int:
        """Script calls the servers ran since the last reset."""
        return sum(
            int(c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
            for c in self.clients
        )

    def used_memory(self) -> int:
        return sum(int(c.info("memory")["used_memory"]) for c in self.clients)


def ingest_through_indexer(urls: list[str], cluster: bool, blocks: int, repeat: int) -> str:
    """Stored blocks/s of `Indexer.ingest` on a bench_ingest stream: in memory, then into
    Redis (best of `repeat`); also server script time per stored block and script calls per
    event batch. Returns the table to print."""
    stream = generate(n_pods=8, target_blocks=blocks, seed=5)
    frames = stream.frames
    servers = Servers(urls)
    rows: list[tuple[str, float, float, float, int]] = []
    best = float("inf")
    entries = 0
    for _ in range(repeat):
        mem = Indexer()
        t0 = time.perf_counter()
        for pod, seq, payload in frames:
            mem.ingest(pod, MODEL, payload, seq)
        best = min(best, time.perf_counter() - t0)
        entries = mem.stats().entries
    rows.append(("in-memory index", stream.stored / best, float("nan"), float("nan"), entries))
    best, best_us, calls = float("inf"), 0.0, 0.0
    got = 0
    for _ in range(repeat):
        cfg = {
            "kvBlockIndexConfig": {
                "redisConfig": {
                    "address": urls[0],
                    "cluster": cluster,
                    "keyPrefix": f"ing{uuid.uuid4().hex[:6]}:",
                    "socketTimeout": 5.0,
                }
            }
        }
        red = Indexer(cfg)
        red.ingest(*frames[0][:1], MODEL, frames[0][2], frames[0][1])  # connects, loads
        red.ingestor.wait()
        servers.reset()
        t0 = time.perf_counter()
        for pod, seq, payload in frames[1:]:
            red.ingest(pod, MODEL, payload, seq)
        red.ingestor.wait()
        elapsed = time.perf_counter() - t0
        if elapsed < best:
            best = elapsed
            best_us = servers.script_usec() / stream.stored
            calls = servers.script_calls() / (len(frames) - 1)
        got = red.stats().entries
        red.close()
    name = "redis cluster (3 masters)" if cluster else "redis"
    rows.append((name, stream.stored / best, best_us, calls, got))
    assert got == rows[0][4], (got, rows[0][4])
    lines = [
        f"{'Indexer.ingest (decode, keys, refcounts)':<40}{'blocks/s':>12}"
        f"{'redis us/block':>16}{'calls/batch':>13}{'entries':>10}"
    ]
    for label, rate, us, per, n in rows:
        nums = f"{us:>16.2f}{per:>13.2f}" if us == us else f"{'-':>16}{'-':>13}"
        lines.append(f"{label:<40}{rate:>12,.0f}{nums}{n:>10,}")
    lines.append(
        f"stream: {len(frames):,} event batches, {stream.stored:,} blocks stored and"
        f" {stream.removed:,} removed (blocks/s counts stored blocks; best of {repeat})"
    )
    return "\n".join(lines)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--pods", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--shared", type=int, default=64, help="system prompt blocks")
    ap.add_argument("--event-blocks", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="events per pipelined batch")
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--url", default=None, help="use this Redis instead of a local one")
    ap.add_argument(
        "--cluster", action="store_true", help="start a local 3-master Redis Cluster instead"
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-memory-profile", action="store_true", help="skip tracemalloc pass")
    ap.add_argument(
        "--ingest-blocks",
        type=int,
        default=300_000,
        help="blocks stored by the Indexer.ingest stream (0: skip that part)",
    )
    ap.add_argument("--repeat", type=int, default=2, help="Indexer.ingest runs (best is shown)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    events, prompts, systems = workload(
        args.entries, args.pods, args.blocks, args.shared, args.event_blocks, args.seed
    )
    n_blocks = sum(len(e[1]) for e in events)
    print(
        f"workload: {n_blocks:,} (block, pod) entries in {len(events):,} events, "
        f"{len(prompts):,} prompts of {args.blocks} blocks, {args.pods} pods "
        f"({time.perf_counter() - t0:.1f}s to generate)"
    )
    qs = queries(prompts, systems, args.lookups, args.blocks, args.seed)
    pods = [f"10.0.{i // 256}.{i % 256}:8000" for i in range(args.pods)]

    mem = InMemoryIndex(size=10 * args.entries)
    t0 = time.perf_counter()
    for pod, ks, ehs in events:
        mem.add(pod, ks, ehs)
    mem_rate = n_blocks / (time.perf_counter() - t0)

    mem_bytes = float("nan")
    if not args.no_memory_profile:
        tracemalloc.start()
        probe = InMemoryIndex(size=10 * args.entries)
        base = tracemalloc.get_traced_memory()[0]
        for pod, ks, ehs in events:
            probe.add(pod, ks, ehs)
        mem_bytes = (tracemalloc.get_traced_memory()[0] - base) / probe.stats().entries
        tracemalloc.stop()
        del probe

    if args.cluster:
        servers_cm: Any = local_cluster()
    elif args.url is None:
        servers_cm = _listed(local_redis())
    else:
        servers_cm = _listed(_given(args.url))
    with servers_cm as urls:
        servers = Servers(urls)

        def config() -> RedisIndexConfig:
            return RedisIndexConfig(
                address=urls[0],
                cluster=args.cluster,
                key_prefix=f"bench{uuid.uuid4().hex[:6]}:",
                size=10 * args.entries,
                socket_timeout=5.0,
            )

        # the same events twice, into two indexes: one round trip per event, then batches
        sync_ix = RedisIndex(config())
        servers.reset()
        t0 = time.perf_counter()
        for pod, ks, ehs in events:
            sync_ix.add(pod, ks, ehs)
        sync_s = time.perf_counter() - t0
        sync_cpu = servers.script_usec() / n_blocks
        sync_ix.close()

        before = servers.used_memory()
        rix = RedisIndex(config())
        servers.reset()
        t0 = time.perf_counter()
        for i in range(0, len(events), args.batch):
            with rix.batch() as b:
                for pod, ks, ehs in events[i : i + args.batch]:
                    b.add(pod, ks, ehs)
        batch_s = time.perf_counter() - t0
        batch_cpu = servers.script_usec() / n_blocks
        st = rix.stats()
        after = servers.used_memory()
        assert st.entries == mem.stats().entries, (st.entries, mem.stats().entries)

        # NOTE: a first pass warms up and is not counted: right after bulk loading, Redis is
        # still rehashing its keyspace incrementally (every lookup pays steps of it)
        latencies(mem, qs, pods)
        mem_lat, mem_hit = latencies(mem, qs, pods)
        latencies(rix, qs, pods)
        servers.reset()
        red_lat, red_hit = latencies(rix, qs, pods)
        lookup_cpu = servers.script_usec() / len(qs)
        rix.close()
        ingest_table = ""
        if args.ingest_blocks:
            ingest_table = ingest_through_indexer(
                urls, args.cluster, args.ingest_blocks, args.repeat
            )

    ms = 1000.0
    print()
    print(f"{'lookup (512 blocks, 16 candidates)':<40}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    kind = "redis cluster (3 masters)" if args.cluster else "redis"
    for name, lat in (("in-memory", mem_lat), (kind, red_lat)):
        print(
            f"{name:<40}{pct(lat, 0.5) * ms:>10.3f}{pct(lat, 0.99) * ms:>10.3f}"
            f"{statistics.fmean(lat) * ms:>10.3f}"
        )
    print(
        f"redis / in-memory p50: {pct(red_lat, 0.5) / pct(mem_lat, 0.5):.1f}x; "
        f"mean best match {red_hit:.0f} blocks (in-memory {mem_hit:.0f})"
    )
    print()
    print(f"redis server time per lookup (script CPU, all nodes): {lookup_cpu / 1000:.3f} ms")
    print()
    print(f"{'ingestion':<40}{'blocks/s':>12}{'redis us/block':>16}")
    print(f"{'in-memory add()':<40}{mem_rate:>12,.0f}")
    print(
        f"{'redis add(), one round trip per event':<40}{n_blocks / sync_s:>12,.0f}{sync_cpu:>16.2f}"
    )
    print(
        f"{f'redis batch() of {args.batch} events':<40}{n_blocks / batch_s:>12,.0f}"
        f"{batch_cpu:>16.2f}"
    )
    if ingest_table:
        print()
        print(ingest_table)
    print()
    print(f"{'memory per (block, pod) entry':<40}{'bytes':>12}")
    print(f"{'redis (INFO used_memory delta)':<40}{(after - before) / st.entries:>12.1f}")
    print(f"{'in-memory (tracemalloc)':<40}{mem_bytes:>12.1f}")
    print(
        f"index: {st.entries:,} entries, {st.blocks:,} blocks, {st.engine_hashes:,} engine "
        f"hashes, {st.pods} pods"
    )
    return 0


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


@contextmanager
def _listed(cm: Any) -> Iterator[list[str]]:
    with cm as url:
        yield [url]


if __name__ == "__main__":
    sys.exit(main())
