"""KV-event ingestion throughput and its effect on score latency.

Measures, on pre-encoded vLLM-format payloads (a realistic mix: chunked-prefill stores of many
blocks chained to cached system prompts, one-block decode continuations, tail-first evictions
sent one hash per BlockRemoved as vLLM does):

1. decode + apply into the in-memory index, in stored blocks per second on one thread, with
   in-process baselines: decode only, and the index's own add/remove calls with precomputed
   keys, one call per event and one per run of a batch (the floor this Python index allows);
2. end to end over ZMQ on loopback: a vLLM-protocol publisher in another process, the
   subscriber in this one;
3. ``Indexer.score`` latency while the subscriber ingests at a fixed rate, against idle;
4. memory per (block, pod) entry on the full ingestion path (the in-memory index and the
   ingestor's own state, measured with tracemalloc), against the index alone fed the same
   writes;
5. the CPU one frame costs at a live rate (frames a few milliseconds apart, as a fleet of
   emulated pods sends them, not flat out), per thread of this process, against the same
   frames decoded and applied back to back on one thread, and one at a time at the same rate
   on one thread: what receiving and handing a frame to the applying threads adds, and what
   a frame costs only for coming alone (the caches gone cold between frames).

Usage::

    python benchmarks/bench_ingest.py            # all parts
    python benchmarks/bench_ingest.py --quick    # smaller runs
    python benchmarks/bench_ingest.py --parts 4  # memory only
    python benchmarks/bench_ingest.py --quick --parts 5  # CPU per frame at 50 frames/s
    python benchmarks/bench_ingest.py --quick --parts 5 --apply-interval 0.05  # frames grouped
"""

from __future__ import annotations

import argparse
import array
import gc
import multiprocessing as mp
import random
import statistics
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvaware_scorer import Indexer
from kvaware_scorer.events import KVEventSubscriber, VllmEventPublisher
from kvaware_scorer.events.decode import (
    BlockRemoved,
    BlockStored,
    EventDecoder,
    KVCacheEvent,
    encode_batch,
)
from kvaware_scorer.keys import DerivedKeyer

MODEL = "bench-model"
BS = 16


@dataclass
class _Req:
    hashes: list[int]
    toks: list[int]
    decode_left: int


@dataclass
class _Pod:
    name: str
    held: list[list[int]] = field(default_factory=list)  # finished requests' chains (LRU)
    running: list[_Req] = field(default_factory=list)
    blocks: int = 0
    seq: int = 0
    cached_systems: set[int] = field(default_factory=set)


@dataclass
class Stream:
    """Pre-encoded frames and what they contain."""

    frames: list[tuple[str, int, bytes]]
    stored: int
    removed: int
    events: int
    prompts: list[list[int]]
    #: Index of the first frame with an eviction, and blocks stored before it.
    fill_frames: int = 0
    fill_stored: int = 0


def generate(
    n_pods: int = 8,
    target_blocks: int = 400_000,
    capacity: int | None = None,
    seed: int = 1,
    legacy: bool = False,
) -> Stream:
    """A realistic event stream for `n_pods` pods until `target_blocks` blocks were stored."""
    rng = random.Random(seed)
    # NOTE: pools fill after about a third of the run, so most of it is steady state with
    # evictions (one BlockRemoved per evicted block) as on a busy vLLM server.
    cap = capacity or max(2_000, target_blocks // (3 * n_pods))
    systems = [[rng.randrange(120_000) for _ in range(BS * rng.randint(16, 96))] for _ in range(40)]
    sys_hashes = [[rng.getrandbits(64) for _ in range(len(s) // BS)] for s in systems]
    pods = [_Pod(f"10.0.0.{i}:8000") for i in range(1, n_pods + 1)]
    frames: list[tuple[str, int, bytes]] = []
    stored = removed = n_events = 0
    prompts: list[list[int]] = []
    fill_frames = fill_stored = 0
    while stored < target_blocks:
        for pod in pods:
            events: list[KVCacheEvent] = []
            # evictions first (vLLM evicts while allocating), one hash per event, tail first
            while pod.blocks > cap and pod.held:
                chain = pod.held[0]
                h = chain.pop()
                events.append(BlockRemoved([h], medium="GPU", group_idx=0))
                pod.blocks -= 1
                removed += 1
                if not chain:
                    pod.held.pop(0)
            # new requests: system prompt (stored once per pod), user part in 32-block chunks
            for _ in range(rng.choice([0, 1, 1, 2])):
                si = rng.randrange(len(systems))
                parent: int | None = None
                if si not in pod.cached_systems:
                    events.append(_stored(sys_hashes[si], systems[si], None))
                    # NOTE: hot system prompts are hit by every request of their group, so
                    # vLLM keeps them at the busy end of its LRU: they are never evicted here.
                    pod.cached_systems.add(si)
                    pod.blocks += len(sys_hashes[si])
                    stored += len(sys_hashes[si])
                parent = sys_hashes[si][-1]
                user = [rng.randrange(120_000) for _ in range(BS * rng.randint(8, 200))]
                hashes = [rng.getrandbits(64) for _ in range(len(user) // BS)]
                if len(prompts) < 200:
                    prompts.append(systems[si] + user)
                for c in range(0, len(hashes), 32):
                    events.append(_stored(hashes[c : c + 32], user[c * BS : (c + 32) * BS], parent))
                    parent = hashes[min(c + 32, len(hashes)) - 1]
                stored += len(hashes)
                pod.blocks += len(hashes)
                pod.running.append(_Req(hashes, user, rng.randint(1, 30)))
            # decode continuations: one block each
            for req in list(pod.running):
                if rng.random() < 0.5:
                    toks = [rng.randrange(120_000) for _ in range(BS)]
                    h = rng.getrandbits(64)
                    events.append(_stored([h], toks, req.hashes[-1]))
                    req.hashes.append(h)
                    stored += 1
                    pod.blocks += 1
                    req.decode_left -= 1
                if req.decode_left <= 0:
                    pod.running.remove(req)
                    pod.held.append(req.hashes)
            if events:
                if not fill_frames and removed:
                    fill_frames, fill_stored = (
                        len(frames),
                        stored
                        - sum(len(e.block_hashes) for e in events if isinstance(e, BlockStored)),
                    )
                n_events += len(events)
                payload = encode_batch(events, time.time(), 0, legacy=legacy)
                frames.append((pod.name, pod.seq, payload))
                pod.seq += 1
    return Stream(frames, stored, removed, n_events, prompts, fill_frames, fill_stored)


def _stored(hashes: list[int], toks: list[int], parent: int | None) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=toks,
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        extra_keys=[None] * len(hashes),
        group_idx=0,
        kv_cache_spec_kind="full_attention",
    )


def _best(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_apply(stream: Stream, repeat: int) -> None:
    frames = stream.frames
    dec = EventDecoder()

    def decode_only() -> None:
        for _, _, p in frames:
            dec.decode(p)

    phases: dict[str, float] = {}

    def ingest(config: dict[str, Any] | None, split: bool = False) -> Any:
        def run() -> None:
            ix = Indexer(config)
            ingest = ix.ingest
            k = stream.fill_frames
            t0 = time.perf_counter()
            for pod, seq, payload in frames[:k]:
                ingest(pod, MODEL, payload, seq)
            t1 = time.perf_counter()
            for pod, seq, payload in frames[k:]:
                ingest(pod, MODEL, payload, seq)
            if split:
                t2 = time.perf_counter()
                phases["fill"] = min(phases.get("fill", 1e9), t1 - t0)
                phases["steady"] = min(phases.get("steady", 1e9), t2 - t1)

        return run

    # the floors: the index's own calls with keys already derived, one call per event (as a
    # naive consumer would) and one call per run of stores / removals in a batch (as apply does)
    ix0 = Indexer()
    keyer = ix0.keyer
    assert isinstance(keyer, DerivedKeyer)
    per_event: list[tuple[str, str, list[int], list[int]]] = []
    per_run: list[tuple[str, str, list[int], list[int]]] = []
    emap: dict[tuple[str, int], int] = {}
    for pod, _, p in frames:
        run: tuple[str, str, list[int], list[int]] | None = None
        for ev in dec.decode(p).events:
            if isinstance(ev, BlockStored):
                parent = (
                    keyer.root(MODEL)
                    if ev.parent_block_hash is None
                    else emap.get((pod, ev.parent_block_hash), 0)
                )
                keys = keyer.chain(parent, ev.token_ids, BS)
                for h, k in zip(ev.block_hashes, keys, strict=True):
                    emap[(pod, h)] = k
                per_event.append(("add", pod, keys, ev.block_hashes))
                if run is None or run[0] != "add" or run[3][-1] == ev.block_hashes[0]:
                    run = ("add", pod, [], [])
                    per_run.append(run)
                run[2].extend(keys)
                run[3].extend(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                per_event.append(("rm", pod, ev.block_hashes, []))
                if run is None or run[0] != "rm":
                    run = ("rm", pod, [], [])
                    per_run.append(run)
                run[2].extend(ev.block_hashes)

    def floor(ops: list[tuple[str, str, list[int], list[int]]]) -> Any:
        def go() -> None:
            ix = Indexer()
            add, remove = ix.index.add, ix.index.remove
            for op, pod, a, b in ops:
                if op == "add":
                    add(pod, a, b, "gpu")
                else:
                    remove(pod, a, "gpu")

        return go

    results = [
        ("decode only (typed msgspec)", _best(decode_only, repeat)),
        ("index only, one call per event (keys precomputed)", _best(floor(per_event), repeat)),
        ("index only, one call per run (keys precomputed)", _best(floor(per_run), repeat)),
        ("decode + apply, derived keys", _best(ingest(None, split=True), repeat)),
        (
            "decode + apply, derived keys, 8-token index blocks",
            _best(ingest({"tokenProcessorConfig": {"blockSize": 8}}), repeat),
        ),
        (
            "decode + apply, vllm keys",
            _best(ingest({"tokenProcessorConfig": {"keyMode": "vllm"}}), repeat),
        ),
    ]
    base = results[3][1]
    print(
        f"\n## 1. decode + apply on one thread ({len(frames):,} batches, {stream.events:,} events,"
        f" {stream.stored:,} blocks stored, {stream.removed:,} removed; best of {repeat})\n"
    )
    print(f"| {'path':<52} | {'seconds':>8} | {'stored blocks/s':>15} | {'vs apply':>8} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 17}|{'-' * 10}|")
    for name, t in results:
        print(f"| {name:<52} | {t:8.3f} | {stream.stored / t:15,.0f} | {t / base:7.2f}x |")
    fill = stream.fill_stored / phases["fill"]
    steady = (stream.stored - stream.fill_stored) / phases["steady"]
    print(
        f"\nderived keys by phase: pools filling (no evictions, {stream.fill_frames:,} batches)"
        f" {fill:,.0f} stored blocks/s; steady state (evictions) {steady:,.0f} stored blocks/s"
        f" plus the removals"
    )
    check = Indexer()
    for pod, seq, payload in frames:
        check.ingest(pod, MODEL, payload, seq)
    st = check.stats()
    orphans = check.metrics.registry.get_sample_value("kvaware_orphaned_blocks_total")
    print(f"\nindex after the run: {st.entries:,} entries, {st.pods} pods, orphaned {orphans:.0f}")


def _paced_publisher(
    endpoints: list[str],
    frames: list[tuple[int, int, bytes, int]],
    rate: float,
    ready: Any,
    idle: float = 0.2,
    per_frame: bool = False,
) -> None:
    pubs = [VllmEventPublisher(ep, bind=True, hwm=0) for ep in endpoints]
    for p in pubs:
        p.wait_for_subscriber(30)
    ready.set()
    time.sleep(idle)
    t0 = time.perf_counter()
    blocks = 0
    for i, _seq, payload, n in frames:
        pubs[i].publish(payload)
        blocks += 1 if per_frame else n
        if rate:
            ahead = blocks / rate - (time.perf_counter() - t0)
            if ahead > 0.002:
                time.sleep(ahead)
    time.sleep(1.0)
    for p in pubs:
        p.close()


def _blocks_in(payload: bytes, dec: EventDecoder) -> int:
    return sum(
        len(e.block_hashes) for e in dec.decode(payload).events if isinstance(e, BlockStored)
    )


def _subscribed(
    stream: Stream, apply_interval: float | None = None
) -> tuple[list[tuple[int, int, bytes, int]], list[str], Indexer, KVEventSubscriber]:
    """The stream's frames per pod index, one bind endpoint per pod, and a subscriber
    (not started) connected to them (`apply_interval`: the subscriber's ``applyInterval``,
    None for its default)."""
    import socket

    dec = EventDecoder()
    pods = sorted({p for p, _, _ in stream.frames})
    ports = []
    for _ in pods:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    endpoints = [f"tcp://127.0.0.1:{p}" for p in ports]
    index_of = {p: i for i, p in enumerate(pods)}
    frames = [(index_of[p], s, pl, _blocks_in(pl, dec)) for p, s, pl in stream.frames]
    ix = Indexer()
    cfg: dict[str, Any] = {"defaultModel": MODEL, "rcvhwm": 0, "statsInterval": 0}
    if apply_interval is not None:
        cfg["applyInterval"] = apply_interval
    sub = KVEventSubscriber(ix, cfg)
    for pod, ep in zip(pods, endpoints, strict=True):
        sub.add_endpoint(pod, ep)
    return frames, endpoints, ix, sub


def bench_zmq(stream: Stream, rate: float = 0.0) -> tuple[float, Indexer, KVEventSubscriber]:
    """Publish the stream from another process; returns stored blocks/s as applied here."""
    frames, endpoints, ix, sub = _subscribed(stream)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_paced_publisher, args=(endpoints, frames, rate, ready))
    sub.start()
    proc.start()
    ready.wait(60)
    total = len(frames)
    while sub.frames_handled == 0:
        time.sleep(0.0005)
    t0 = time.perf_counter()
    first_seen = sub.frames_handled
    deadline = time.monotonic() + 600
    while sub.frames_handled < total and time.monotonic() < deadline:
        time.sleep(0.002)
    elapsed = time.perf_counter() - t0
    proc.join(30)
    applied_frac = (sub.frames_handled - first_seen) / max(1, total - first_seen)
    return stream.stored * applied_frac / elapsed, ix, sub


def bench_score_latency(stream: Stream, rates: list[float], score_rate: float) -> None:
    """Score latency with the index idle, then while the subscriber ingests at each rate; the
    scheduler side issues `score_rate` score calls per second, as a busy gateway would."""
    import socket

    pods = sorted({p for p, _, _ in stream.frames})
    prompts = stream.prompts
    dec = EventDecoder()
    index_of = {p: i for i, p in enumerate(pods)}
    frames = [(index_of[p], s, pl, _blocks_in(pl, dec)) for p, s, pl in stream.frames]

    def score_once(ix: Indexer, i: int) -> float:
        toks = prompts[i % len(prompts)]
        t0 = time.perf_counter()
        ix.score(MODEL, toks, pods)
        return time.perf_counter() - t0

    idle_ix = Indexer()
    for pod, seq, payload in stream.frames:
        idle_ix.ingest(pod, MODEL, payload, seq)
    rows = [("idle (index loaded, no ingestion)", [score_once(idle_ix, i) for i in range(2000)])]
    for rate in rates:
        ports = []
        for _ in pods:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        endpoints = [f"tcp://127.0.0.1:{p}" for p in ports]
        ix = Indexer()
        sub = KVEventSubscriber(ix, {"defaultModel": MODEL, "rcvhwm": 0, "statsInterval": 0})
        for pod, ep in zip(pods, endpoints, strict=True):
            sub.add_endpoint(pod, ep)
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        proc = ctx.Process(target=_paced_publisher, args=(endpoints, frames, rate, ready))
        with sub:
            proc.start()
            ready.wait(60)
            # lookups walk a populated index: start once a fifth of the stream is in
            while sub.frames_handled < len(frames) // 5:
                time.sleep(0.001)
            lat: list[float] = []
            h0, t0 = sub.frames_handled, time.perf_counter()
            period = 1.0 / score_rate
            next_call = t0
            while sub.frames_handled < len(frames) - 5:
                lat.append(score_once(ix, len(lat)))
                next_call += period
                pause = next_call - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            h1, t1 = sub.frames_handled, time.perf_counter()
            proc.join(120)
        achieved = (h1 - h0) * (stream.stored / len(frames)) / (t1 - t0)
        label = f"{rate:,.0f}/s" if rate else "flat out"
        rows.append((f"ingesting, paced {label} (achieved {achieved:,.0f}/s)", lat))

    def q(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1e6

    n_blocks = statistics.mean(len(p) // BS for p in prompts)
    print(
        f"\n## 3. Indexer.score latency at {score_rate:,.0f} calls/s (in-process, same GIL as the"
        f" subscriber), {len(pods)} candidate pods, prompts of {n_blocks:.0f} blocks on average\n"
    )
    print(f"| {'condition':<56} | {'calls':>6} | {'p50 us':>7} | {'p90 us':>7} | {'p99 us':>7} |")
    print(f"|{'-' * 58}|{'-' * 8}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    for name, xs in rows:
        print(
            f"| {name:<56} | {len(xs):6d} | {q(xs, 0.5):7.0f} | {q(xs, 0.9):7.0f} |"
            f" {q(xs, 0.99):7.0f} |"
        )


def _thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each thread of this process, by thread name."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        name = names.get(int(tid), "other (libzmq)")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def bench_paced(
    stream: Stream,
    frames_per_s: float,
    count: int,
    apply_interval: float | None,
    idle: float = 3.0,
) -> None:
    """Part 5: CPU per frame at a live rate, per thread, against apply alone."""
    import os

    sub_stream = Stream(
        stream.frames[:count], stream.stored, stream.removed, stream.events, stream.prompts
    )
    frames, endpoints, _, sub = _subscribed(sub_stream, apply_interval)
    n = len(frames)
    # the floor: the same frames decoded and applied back to back on this thread
    alone = Indexer()
    t0 = time.process_time()
    for pod, seq, payload in sub_stream.frames:
        alone.ingest(pod, MODEL, payload, seq)
    floor_us = (time.process_time() - t0) / n * 1e6
    # the same on this thread, one frame at the paced rate: no hand-off, caches gone cold
    spaced = Indexer()
    t0 = time.process_time()
    for pod, seq, payload in sub_stream.frames:
        spaced.ingest(pod, MODEL, payload, seq)
        time.sleep(1.0 / frames_per_s)
    spaced_us = (time.process_time() - t0) / n * 1e6
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(
        target=_paced_publisher, args=(endpoints, frames, frames_per_s, ready, idle, True)
    )
    sub.start()
    proc.start()
    ready.wait(60)
    # the idle baseline: connected, nothing sent yet
    time.sleep(0.5)
    c0, w0 = _thread_cpu(), time.monotonic()
    time.sleep(idle - 1.0)
    c1, w1 = _thread_cpu(), time.monotonic()
    while sub.frames_handled == 0:
        time.sleep(0.001)
    c2, w2 = _thread_cpu(), time.monotonic()
    deadline = time.monotonic() + 600
    while sub.frames_handled < n and time.monotonic() < deadline:
        time.sleep(0.01)
    c3, w3 = _thread_cpu(), time.monotonic()
    proc.join(30)
    sub.stop()
    handled = sub.frames_handled
    print(
        f"\n## 5. CPU per frame at {frames_per_s:g} frames/s ({handled:,} of {n:,} frames over"
        f" {len({p for p, _, _ in sub_stream.frames})} pods, {w3 - w2:.1f} s; the idle"
        f" baseline of each thread, measured for {w1 - w0:.1f} s before, taken off;"
        f" applyInterval {sub.config.apply_interval:g} s)\n"
    )
    print("| thread | us per frame |\n|---|---:|")
    total = 0.0
    for name in sorted(set(c3) | set(c2)):
        idle_rate = (c1.get(name, 0.0) - c0.get(name, 0.0)) / (w1 - w0)
        busy = c3.get(name, 0.0) - c2.get(name, 0.0) - idle_rate * (w3 - w2)
        if name == threading.main_thread().name:
            continue  # this benchmark's own polling
        total += busy
        print(f"| {name} | {busy / max(1, handled) * 1e6:,.0f} |")
    per = total / max(1, handled) * 1e6
    tick = os.sysconf("SC_CLK_TCK")
    print(
        f"| **all** | **{per:,.0f}** |\n\ndecode + apply alone, back to back on one thread:"
        f" {floor_us:,.0f} us per frame; the receiving path costs {per / floor_us:.2f}x that"
        f" (thread CPU is counted in clock ticks of {1e6 / tick:,.0f} us); one frame every"
        f" {1e3 / frames_per_s:g} ms on one thread, no hand-off: {spaced_us:,.0f} us per frame"
        f" ({spaced_us / floor_us:.2f}x)"
    )


def index_writes(stream: Stream) -> list[tuple[str, str, list[int], list[int]]]:
    """The index writes of `stream` with derived keys precomputed, one call per run of stores
    or removals of a batch (what decode + apply hands the index)."""
    dec = EventDecoder()
    keyer = Indexer().keyer
    assert isinstance(keyer, DerivedKeyer)
    runs: list[tuple[str, str, list[int], list[int]]] = []
    emap: dict[tuple[str, int], int] = {}
    for pod, _, p in stream.frames:
        run: tuple[str, str, list[int], list[int]] | None = None
        for ev in dec.decode(p).events:
            if isinstance(ev, BlockStored):
                parent = (
                    keyer.root(MODEL)
                    if ev.parent_block_hash is None
                    else emap.get((pod, ev.parent_block_hash), 0)
                )
                keys = keyer.chain(parent, ev.token_ids, BS)
                for h, k in zip(ev.block_hashes, keys, strict=True):
                    emap[(pod, h)] = k
                if run is None or run[0] != "add" or run[3][-1] == ev.block_hashes[0]:
                    run = ("add", pod, [], [])
                    runs.append(run)
                run[2].extend(keys)
                run[3].extend(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                if run is None or run[0] != "rm":
                    run = ("rm", pod, [], [])
                    runs.append(run)
                run[2].extend(ev.block_hashes)
    return runs


def _traced(fn: Any) -> tuple[int, Any]:
    """Bytes still allocated after `fn()` (tracemalloc), and its result."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = fn()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, out
    finally:
        tracemalloc.stop()


def memory_per_entry(stream: Stream) -> tuple[int, float, float, int]:
    """Entries, then bytes per entry of the full ingestion path and of the index alone fed
    the same writes, and the number of streams, after `stream`."""
    writes = index_writes(stream)
    # NOTE: packed, so that replaying them makes fresh int objects (as decoding does) and
    # the index is charged for the keys and hashes it keeps
    packed = [(op, pod, array.array("Q", a), array.array("Q", b)) for op, pod, a, b in writes]
    del writes

    def full() -> Indexer:
        ix = Indexer()
        for pod, seq, payload in stream.frames:
            ix.ingest(pod, MODEL, payload, seq)
        return ix

    def index_only() -> Any:
        from kvaware_scorer.index import InMemoryIndex

        index = InMemoryIndex()
        for op, pod, a, b in packed:
            if op == "add":
                index.add(pod, a.tolist(), b.tolist(), "gpu")
            else:
                index.remove(pod, a.tolist(), "gpu")
        return index

    full_bytes, ix = _traced(full)
    n = ix.stats().entries
    streams = sum(len(ix.ingestor.streams(p)) for p in ix.index.pods())
    del ix
    index_bytes, index = _traced(index_only)
    assert index.stats().entries == n, (index.stats().entries, n)
    return n, full_bytes / n, index_bytes / n, streams


def bench_memory(entries: int, n_pods: int = 8) -> None:
    """Bytes per (block, pod) entry when pools have filled about `entries` entries, and after
    as many stores again in steady state (evictions; the dicts then carry the slack of their
    churn): the full ingestion path against the index alone fed the same writes."""
    cap = entries // n_pods
    rows = []
    for label, target in (("pools just full", entries), ("steady state", 2 * entries)):
        stream = generate(n_pods=n_pods, target_blocks=target, capacity=cap, seed=3)
        n, full, index, streams = memory_per_entry(stream)
        rows.append((label, stream, n, full, index, streams))
    print(f"\n## 4. memory per (block, pod) entry (tracemalloc; {n_pods} pods, one stream each)\n")
    print(
        f"| {'state':<16} | {'stored':>9} | {'removed':>9} | {'entries':>9} |"
        f" {'full path B':>11} | {'index alone B':>13} | {'ingestor B':>10} |"
    )
    print(f"|{'-' * 18}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 13}|{'-' * 15}|{'-' * 12}|")
    for label, stream, n, full, index, _streams in rows:
        print(
            f"| {label:<16} | {stream.stored:9,} | {stream.removed:9,} | {n:9,} |"
            f" {full:11.1f} | {index:13.1f} | {full - index:10.1f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--blocks", type=int, default=None, help="stored blocks per stream")
    parser.add_argument(
        "--rates",
        default="50000,100000,0",
        help="part 3 publishing rates in stored blocks/s (0 = flat out)",
    )
    parser.add_argument("--parts", default="12345", help="which parts to run (e.g. 14)")
    parser.add_argument("--paced-rate", type=float, default=50.0, help="part 5: frames per second")
    parser.add_argument("--paced-frames", type=int, default=1000, help="part 5: frames sent")
    parser.add_argument(
        "--apply-interval",
        type=float,
        default=None,
        help="part 5: the subscriber's applyInterval in seconds (default: its default; 0 takes "
        "every frame as it comes)",
    )
    parser.add_argument(
        "--memory-entries", type=int, default=320_000, help="part 4: entries the stream fills"
    )
    parser.add_argument("--score-rate", type=float, default=500, help="part 3 score calls/s")
    args = parser.parse_args()
    n = args.blocks or (150_000 if args.quick else 600_000)
    repeat = 2 if args.quick else 3
    t0 = time.perf_counter()
    stream = generate(target_blocks=n)
    print(
        f"# KV-event ingestion benchmark\n\nstream: {len(stream.frames):,} batches, "
        f"{stream.stored:,} blocks stored, {stream.removed:,} removed, {stream.events:,} events,"
        f" {sum(len(p) for _, _, p in stream.frames) / 1e6:.1f} MB (generated in"
        f" {time.perf_counter() - t0:.1f}s). Shared 2-core machine: figures are noisy."
    )
    if "1" in args.parts:
        bench_apply(stream, repeat)
    if "2" in args.parts:
        rate, ix, sub = bench_zmq(stream)
        lost = ix.metrics.registry.get_sample_value("kvaware_lost_batches_total") or 0
        print(
            f"\n## 2. end to end over ZMQ on loopback (publisher in another process, flat out)"
            f"\n\n{rate:,.0f} stored blocks/s applied; frames received {sub.frames_received:,}"
            f" of {len(stream.frames):,}; lost batches counted {lost:.0f}"
        )
        sub.stop()
    if "3" in args.parts:
        rates = [float(r) for r in args.rates.split(",")]
        bench_score_latency(stream, rates, args.score_rate)
    if "4" in args.parts:
        bench_memory(args.memory_entries)
    if "5" in args.parts:
        bench_paced(stream, args.paced_rate, args.paced_frames, args.apply_interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
