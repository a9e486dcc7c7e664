"""Hostile engines and a sick Redis, measured: what each attack costs the KV-event path now.

Every attack runs against real sockets on 127.0.0.1 (attackers that send big frames run in a
child process, so that the figures are the subscriber's own), and a redis-server started on a
free loopback port. Printed per attack: what the attacker did, and the observed RSS growth,
stall time and counters.

Usage::

    python benchmarks/bench_event_attacks.py            # every attack
    python benchmarks/bench_event_attacks.py --only poison,seq
    python benchmarks/bench_event_attacks.py --big-mb 20 # smaller oversized frames
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvaware_scorer import Indexer
from kvaware_scorer.config import KVEventsConfig
from kvaware_scorer.events import KVEventSubscriber, VllmEventPublisher
from kvaware_scorer.events.decode import BlockStored, encode_batch
from kvaware_scorer.events.subscriber import fetch_event_sources

POD, OTHER, MODEL = "10.0.0.1:8000", "10.0.0.2:8000", "m"
ROWS: list[tuple[str, str, str]] = []


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    """Samples this process's RSS every 10 ms in a thread; `peak` is the largest seen."""

    def __init__(self) -> None:
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        """Stop sampling; returns the growth of the peak over the start (MB)."""
        self._stop.set()
        self._t.join()
        return self.peak - self.start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def counter(ix: Indexer, name: str, **labels: str) -> float:
    return ix.metrics.registry.get_sample_value(name, labels) or 0.0


def store(hashes: list[int], toks: list[int], parent: int | None = None) -> BlockStored:
    return BlockStored(hashes, parent, toks, 16, medium="GPU", extra_keys=[None] * len(hashes))


def wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def sub_for(ix: Indexer, **cfg: Any) -> KVEventSubscriber:
    base: dict[str, Any] = {"default_model": MODEL, "stats_interval": 0.2}
    base.update(cfg)
    return KVEventSubscriber(ix, KVEventsConfig(**base))


def row(attack: str, before: str, now: str) -> None:
    ROWS.append((attack, before, now))
    print(f"- {attack}: {now}", flush=True)


# -- engines ------------------------------------------------------------------------------------


def poison_payload(depth: int = 996) -> bytes:
    enc = msgspec.msgpack.encode
    ev = b"\x86" + b"".join(
        enc(x) for x in ("type", "BlockStored", "block_hashes", [1], "parent_block_hash")
    )
    ev += b"\xc0" + b"".join(enc(x) for x in ("token_ids", list(range(16)), "block_size", 16))
    ev += enc("extra_keys") + b"\x91" * depth + b"\xc0"
    return b"\x93" + enc(1.0) + b"\x91" + ev + enc(0)


def attack_poison() -> None:
    ix = Indexer()
    toks = list(range(16 * 16))
    port, rport = free_port(), free_port()
    with VllmEventPublisher(tcp(port), tcp(rport), bind=True) as pub, sub_for(ix) as sub:
        sub.add_endpoint(POD, tcp(port), tcp(rport))
        pub.wait_for_subscriber(10)
        pub.publish([store([1], toks[:16])])
        wait(lambda: sub.frames_handled == 1, 10)
        pub.publish(poison_payload())
        for i in range(1, 16):
            pub.publish([store([i + 1], toks[16 * i : 16 * (i + 1)], parent=i)])
        wait(lambda: sub.frames_handled == 17, 10)
        served = pub.replays_served
    good = round(ix.score(MODEL, toks, [POD])[POD] * 16) - 1
    row(
        "poison frame (1,113 B, nested 996 deep) then 15 good frames, replay endpoint set",
        "RecursionError per frame (internal_error), poison replayed, 15 of 15 good frames lost",
        f"{good} of 15 good frames applied; decode_error "
        f"{counter(ix, 'kvaware_dropped_messages_total', reason='decode_error'):.0f}, "
        f"internal_error {counter(ix, 'kvaware_dropped_messages_total', reason='internal_error'):.0f}"
        f", replays served {served}",
    )
    ix.close()


def _send_big(endpoint: str, n: int, size: int, topic: bytes) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUB)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(endpoint)
    time.sleep(0.5)
    payload = b"\x00" * size
    for i in range(n):
        s.send_multipart([topic, i.to_bytes(8, "big"), payload])
    time.sleep(2.0)
    s.close(0)
    ctx.term()


def attack_big_frames(big_mb: int) -> None:
    ix = Indexer()
    port = free_port()
    with sub_for(ix, zmq_endpoint=tcp(port), accept_unknown_pods=True) as sub:
        peak = PeakRSS()
        child = mp.get_context("spawn").Process(
            target=_send_big, args=(tcp(port), 5, big_mb << 20, f"kv@{POD}@{MODEL}".encode())
        )
        t0 = time.monotonic()
        child.start()
        child.join(120)
        grew = peak.stop()
        took = time.monotonic() - t0
        received = sub.frames_received
    row(
        f"5 live frames of {big_mb} MB each (bind mode)",
        "RSS 45 -> 462 MB (5 x 100 MB)",
        f"RSS peak +{grew:.0f} MB, frames received {received} (dropped by ZMQ at "
        f"maxFrameBytes {KVEventsConfig().max_frame_bytes >> 20} MiB), {took:.1f}s",
    )
    ix.close()


def _serve_big_replay(endpoint: str, n: int, size: int, ready: Any) -> None:
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.SNDHWM, 0)
    r.bind(endpoint)
    ready.set()
    payload = b"\x00" * size
    if r.poll(20_000):
        ident = r.recv_multipart()[0]
        try:
            for i in range(n):
                r.send_multipart([ident, b"", b"", i.to_bytes(8, "big"), payload])
            r.send_multipart([ident, b"", b"", b"\xff" * 8, b""])
        except zmq.ZMQError:
            pass
    time.sleep(2.0)
    r.close(0)
    ctx.term()


def attack_big_replay(frame_mb: int) -> None:
    ix = Indexer()
    rport = free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_serve_big_replay, args=(tcp(rport), 60, frame_mb << 20, ready))
    child.start()
    ready.wait(20)
    sub = sub_for(ix, max_frame_bytes=(frame_mb + 1) << 20)
    sub.add_endpoint(POD, tcp(free_port()), tcp(rport))
    with sub:
        peak = PeakRSS()
        t0 = time.monotonic()
        result = sub.replay(POD, 0, 0, "gap")
        took = time.monotonic() - t0
        grew = peak.stop()
    child.join(30)
    assert result is not None
    got = sum(len(p) for _, p in result.frames) >> 20
    row(
        f"replay answer of 60 x {frame_mb} MB",
        "peak 944 MB (60 x 10 MB)",
        f"RSS peak +{grew:.0f} MB; kept {len(result.frames)} frames ({got} MiB, maxReplayBytes "
        f"{KVEventsConfig().max_replay_bytes >> 20} MiB), status {result.status}, {took:.1f}s",
    )
    ix.close()


def attack_huge_event() -> None:
    cfg = KVEventsConfig()
    bs = 16 << 20
    payload = encode_batch([BlockStored([7], None, list(range(bs)), bs, medium="GPU")])
    for bound, name in ((cfg.max_frame_bytes, "payload bound"), (1 << 30, "token bound")):
        ix = Indexer()
        ix.ingestor.max_event_tokens = cfg.max_event_tokens
        ix.ingestor.max_payload_bytes = bound
        peak = PeakRSS()
        t0 = time.monotonic()
        ix.ingest(POD, MODEL, payload, None)
        took = time.monotonic() - t0
        grew = peak.stop()
        dropped = {
            r: counter(ix, "kvaware_dropped_messages_total", reason=r)
            for r in ("frame_too_large", "too_many_tokens")
        }
        row(
            f"one BlockStored with block_size 16*2^20 ({len(payload) >> 20} MB payload) given to"
            f" ingest ({name})",
            "1 M keys, +245 MB, 2.1 s",
            f"{ix.index.stats().entries} keys, RSS peak +{grew:.0f} MB, {took:.2f}s; dropped "
            + ", ".join(f"{r} {n:.0f}" for r, n in dropped.items()),
        )
        ix.close()


class Trickle:
    def __init__(self, interval: float) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.port = free_port()
        self.sock.bind(tcp(self.port))
        self.stop = threading.Event()
        self.interval = interval
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        ident, seq, payload = None, 1, encode_batch([])
        while not self.stop.is_set():
            if self.sock.poll(int(self.interval * 1000)):
                ident = self.sock.recv_multipart()[0]
            if ident is not None:
                self.sock.send_multipart([ident, b"", b"", seq.to_bytes(8, "big"), payload])
                seq += 1

    def close(self) -> None:
        self.stop.set()
        self.t.join()
        self.sock.close(0)
        self.ctx.term()


def attack_slow_replay() -> None:
    ix = Indexer()
    router = Trickle(1.5)
    a_port, b_port = free_port(), free_port()
    cfg = KVEventsConfig()
    with (
        VllmEventPublisher(tcp(a_port), bind=True) as a,
        VllmEventPublisher(tcp(b_port), bind=True) as b,
        sub_for(ix, replay_on_join=False) as sub,
    ):
        sub.add_endpoint(POD, tcp(a_port), tcp(router.port))
        sub.add_endpoint(OTHER, tcp(b_port))
        a.wait_for_subscriber(10)
        b.wait_for_subscriber(10)
        a.publish([store([1], list(range(16)))])
        a.publish([], send=False)
        t0 = time.monotonic()
        a.publish([])
        time.sleep(0.2)
        stalls = []
        for i in range(10):
            toks = list(range(1000 + 16 * i, 1016 + 16 * i))
            t1 = time.monotonic()
            b.publish([store([100 + i], toks)])
            wait(lambda t=toks: ix.score(MODEL, t, [OTHER]) == {OTHER: 1.0}, 60)  # type: ignore[misc]
            stalls.append(time.monotonic() - t1)
            time.sleep(0.3)
        wait(lambda: counter(ix, "kvaware_replays_total", result="deadline") > 0, 60)
        took = time.monotonic() - t0
    router.close()
    row(
        "replay trickling 1 frame / 1.5 s while another pod publishes",
        "ingestion of every pod stalled > 40 s",
        f"other pod's frames applied in {max(stalls) * 1000:.0f} ms at most (10 frames); "
        f"replay ended after {took:.1f}s (replayDeadline {cfg.replay_deadline:.0f} s)",
    )
    ix.close()


def attack_seq() -> None:
    ix = Indexer()
    toks = list(range(32))
    ix.ingest(POD, MODEL, encode_batch([store([1], toks[:16])]), 0)
    ix.ingest(POD, MODEL, encode_batch([store([2], toks[16:], parent=1)]), 2**64 - 1)
    row(
        "seq 0 then seq 2^64-1",
        "kvaware_lost_batches_total 1.8e19",
        f"kvaware_lost_batches_total {counter(ix, 'kvaware_lost_batches_total'):.0f}, "
        f"restart purges {counter(ix, 'kvaware_purges_total', reason='publisher_restart'):.0f}",
    )
    ix.close()


def _http(routes: dict[str, Callable[[Any], None]]) -> tuple[str, Callable[[], None]]:
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            routes.get(self.path, lambda h: h.send_error(404))(self)

        def log_message(self, *a: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    def close() -> None:
        srv.shutdown()
        srv.server_close()

    return f"http://127.0.0.1:{srv.server_address[1]}", close


def _json(data: Any) -> Callable[[Any], None]:
    body = json.dumps(data).encode()

    def h(req: Any) -> None:
        req.send_response(200)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    return h


def attack_discovery() -> None:
    fetched: list[str] = []

    def redirect(h: Any) -> None:
        h.send_response(302)
        h.send_header("Location", base + "/metadata")
        h.send_header("Content-Length", "0")
        h.end_headers()

    def metadata(h: Any) -> None:
        fetched.append(h.path)
        h.send_error(404)

    def trickle(h: Any) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        try:
            for _ in range(100):
                h.wfile.write(b" ")
                h.wfile.flush()
                time.sleep(1.0)
        except OSError:
            pass

    src = {"enable_kv_cache_events": True, "publisher": "zmq"}
    many = {str(r): {**src, "endpoint": f"tcp://127.0.0.1:{20000 + r}"} for r in range(10_000)}
    routes = {"/metadata": metadata}
    base, close = _http(routes)
    outcomes = []
    for name, handler in [
        ("redirect", redirect),
        ("ipc endpoint", _json({"0": {**src, "endpoint": "ipc:///tmp/x"}})),
        ("other host", _json({"0": {**src, "endpoint": "tcp://10.9.9.9:5557"}})),
        ("10,000 ranks", _json(many)),
        ("1 byte/s answer", trickle),
    ]:
        routes["/kv_event_sources"] = handler
        fds = len(os.listdir("/proc/self/fd"))
        t0 = time.monotonic()
        try:
            fetch_event_sources(base, timeout=2.0)
            outcome = "accepted"
        except (OSError, ValueError) as exc:
            outcome = f"refused ({type(exc).__name__})"
        took = time.monotonic() - t0
        fds = len(os.listdir("/proc/self/fd")) - fds
        outcomes.append(f"{name}: {outcome} in {took:.2f}s, +{max(fds, 0)} fds")
    close()
    row(
        "/kv_event_sources: redirect, ipc://, other host, 10,000 ranks, 1 B/s",
        "redirect followed; any endpoint dialed; 6,653 fds; 1 B/s outlived 2 s by 20 s",
        "; ".join(outcomes) + f"; internal URL fetched {len(fetched)} times",
    )


def _spoof(endpoint: str, n_pods: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUB)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(endpoint)
    time.sleep(0.5)
    payload = encode_batch([store([5], list(range(16)))])
    for i in range(n_pods):
        topic = f"kv@10.{i >> 16}.{(i >> 8) & 255}.{i & 255}:80@{MODEL}".encode()
        s.send_multipart([topic, b"\x00" * 8, payload])
    time.sleep(2.0)
    s.close(0)
    ctx.term()


def attack_spoof(n_pods: int) -> None:
    for mode in ("known", "open"):
        ix = Indexer()
        port = free_port()
        cfg: dict[str, Any] = {"zmq_endpoint": tcp(port)}
        if mode == "open":
            cfg["accept_unknown_pods"] = True
        with sub_for(ix, **cfg) as sub:
            sub.set_known_pods([POD])
            before = rss_mb()
            t0 = time.monotonic()
            child = mp.get_context("spawn").Process(target=_spoof, args=(tcp(port), n_pods))
            child.start()
            wait(lambda: sub.frames_received >= n_pods, 300)
            wait(lambda: sub.queued_frames == 0, 300)
            took = time.monotonic() - t0
            child.join(30)
            pods = len(ix.index.pods())
            grew = rss_mb() - before
        dropped = counter(ix, "kvaware_dropped_messages_total", reason="unknown_pod") + counter(
            ix, "kvaware_dropped_messages_total", reason="too_many_pods"
        )
        row(
            f"{n_pods:,} spoofed pod ids in bind mode ({mode} pods; sender in another process)",
            "120,000 ids: RSS +968 MB, never reclaimed",
            f"pods indexed {pods:,}, dropped {dropped:,.0f}, RSS +{grew:.0f} MB, {took:.1f}s",
        )
        ix.close()


# -- Redis ----------------------------------------------------------------------------------------


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvaware-bench-redis-")
        binary = shutil.which("redis-server") or "redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        self.client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                self.client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class CountWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


def attack_redis_oom(batches: int) -> None:
    server = RedisServer()
    cfg = {"address": server.url, "keyPrefix": f"b{uuid.uuid4().hex[:6]}:", "retryInterval": 0.2,
           "maintenanceInterval": 3600}  # fmt: skip
    ix = Indexer({"kvBlockIndexConfig": {"redisConfig": cfg}})
    truth = Indexer()
    payloads = []
    for i in range(batches):
        toks = list(range(i * 64, (i + 1) * 64))
        payloads.append(encode_batch([store([10_000 + i * 4 + j for j in range(4)], toks)]))
    warn = CountWarnings()
    logging.getLogger("kvaware_scorer").addHandler(warn)
    half = batches // 4
    for seq, p in enumerate(payloads[:half]):
        ix.ingest(POD, MODEL, p, seq)
        truth.ingest(POD, MODEL, p, seq)
    ix.ingestor.wait()
    server.client.config_set("maxmemory-policy", "noeviction")
    server.client.config_set("maxmemory", 1)
    t0 = time.monotonic()
    for seq, p in enumerate(payloads[half:], half):
        ix.ingest(POD, MODEL, p, seq)
        truth.ingest(POD, MODEL, p, seq)
    ix.ingestor.wait()
    extra = ix.index.stats().extra
    refused = extra.get("refused_writes", 0)
    buffered = extra.get("buffered_now", 0)
    server.client.config_set("maxmemory", 0)
    want = truth.index.references(POD)
    ok = wait(lambda: ix.index.flush() and ix.index.references(POD) == want, 30)  # type: ignore[attr-defined]
    took = time.monotonic() - t0
    got = ix.index.references(POD).get("gpu", {})
    missing = sum(want.get("gpu", {}).values()) - sum(got.values())
    logging.getLogger("kvaware_scorer").removeHandler(warn)
    row(
        f"Redis maxmemory + noeviction during {batches - half:,} event batches, then lifted",
        "3,098 writes dropped (one WARNING each), 24,784 references missing after the lift",
        f"refused {refused:.0f} times, {buffered:.0f} writes kept and retried; converged {ok}"
        f" {took:.1f}s after the limit was set, "
        f"{missing} references missing; {warn.n} WARNING lines",
    )
    ix.close()
    truth.close()
    server.close()


def attack_redis_down(scores: int) -> None:
    server = RedisServer()
    cfg = {"address": server.url, "keyPrefix": f"b{uuid.uuid4().hex[:6]}:", "retryInterval": 0.2,
           "socketTimeout": 0.2, "connectTimeout": 0.2}  # fmt: skip
    ix = Indexer({"kvBlockIndexConfig": {"redisConfig": cfg}})
    toks = list(range(64))
    ix.score(MODEL, toks, [POD])
    warn = CountWarnings()
    logging.getLogger("kvaware_scorer.indexer").addHandler(warn)
    server.proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    for _ in range(scores):
        ix.score(MODEL, toks, [POD])
    took = time.monotonic() - t0
    server.proc.send_signal(signal.SIGCONT)
    logging.getLogger("kvaware_scorer.indexer").removeHandler(warn)
    row(
        f"{scores} scores with Redis not answering",
        "555 WARNING lines (one per score)",
        f"{warn.n} WARNING line(s) with a count; {took:.1f}s for {scores} scores",
    )
    ix.close()
    server.close()


ATTACKS = ["poison", "frames", "replay", "event", "slow", "seq", "discovery", "spoof", "oom",
           "down"]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", default=",".join(ATTACKS), help="attacks to run (comma list)")
    parser.add_argument("--big-mb", type=int, default=100, help="size of each oversized frame")
    parser.add_argument("--replay-mb", type=int, default=10, help="size of each replay frame")
    parser.add_argument("--pods", type=int, default=120_000, help="spoofed pod ids")
    parser.add_argument("--batches", type=int, default=4_000, help="event batches (OOM attack)")
    parser.add_argument("--scores", type=int, default=555, help="scores with Redis down")
    args = parser.parse_args()
    only = set(args.only.split(","))
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("kvaware_scorer").setLevel(logging.WARNING)
    print(f"# KV-event and Redis attacks (RSS at start {rss_mb():.0f} MB)\n", flush=True)
    runs: dict[str, Callable[[], None]] = {
        "poison": attack_poison,
        "frames": lambda: attack_big_frames(args.big_mb),
        "replay": lambda: attack_big_replay(args.replay_mb),
        "event": attack_huge_event,
        "slow": attack_slow_replay,
        "seq": attack_seq,
        "discovery": attack_discovery,
        "spoof": lambda: attack_spoof(args.pods),
        "oom": lambda: attack_redis_oom(args.batches),
        "down": lambda: attack_redis_down(args.scores),
    }
    for name in ATTACKS:
        if name in only:
            runs[name]()
    print("\n| attack | reported before | now |\n| --- | --- | --- |")
    for attack, before, now in ROWS:
        print(f"| {attack} | {before} | {now} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
