"""CPU of one metrics scrape round over a pool of pods, against the socket exchange's floor.

Starts ``--pods`` emulated vLLM pods (``kvaware sim serve``, their ``/metrics`` pages as vLLM
writes them), then measures on this thread (``time.thread_time``: user and kernel time, the
loopback TCP work of the sends and receives included) in turns, ``--trials`` times each:

- ``floor``: the least a round can cost from Python: on kept-alive sockets, send every pod its
  ``GET``, wait on all of them with one ``poll`` object, receive until each answer's
  ``Content-Length`` is in (no parsing beyond that, no bounds, no errors handled);
- ``fetch``: `PagePool.get`, the scraper's bounded HTTP/1.1 client, pages only;
- ``scrape``: `MetricsScraper.scrape_all`, a whole round: fetch, parse each page into
  `EndpointMetrics`, count the scrapes and their latency.

Prints the median and best CPU per round of each and their ratios to the floor. A gateway runs
up to 1/interval rounds a second (10 by default) while it schedules requests; bench_live.py's
``rounds/req`` column gives the rounds a live workload costs per request.

Run: ``python benchmarks/bench_scrape.py [--pods 4] [--rounds 2000] [--trials 5]``.
"""

from __future__ import annotations

import argparse
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from kvaware_scorer.scheduler.datamodel import Endpoint
from kvaware_scorer.scheduler.metrics import SchedulerMetrics
from kvaware_scorer.scheduler.pagefetch import PagePool
from kvaware_scorer.scheduler.scrape import MetricsScraper


def start_pods(n: int, workdir: Path) -> tuple[subprocess.Popen[bytes], list[Endpoint]]:
    """``kvaware sim serve`` with `n` pods (stops when its stdin closes); their endpoints."""
    out = workdir / "endpoints.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvaware_scorer.cli", "sim", "serve", "--pods", str(n)]
        + ["--no-kv-events", "--endpoints-out", str(out), "--stop-on-eof", "--duration", "600"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not out.exists() or not out.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            raise SystemExit("the emulated pods did not start")
        time.sleep(0.2)
    time.sleep(0.5)  # the file is written once every pod listens; let them settle
    entries = yaml.safe_load(out.read_text())["endpoints"]
    return proc, [Endpoint(name=e["name"], address=e["address"], port=e["port"]) for e in entries]


class Floor:
    """The bare exchange on kept-alive sockets (see the module doc)."""

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.socks = [socket.create_connection((e.address, e.port)) for e in endpoints]
        self.poller = select.poll()
        self.by_fd: dict[int, socket.socket] = {}
        for s in self.socks:
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.poller.register(s.fileno(), select.POLLIN)
            self.by_fd[s.fileno()] = s
        self.request = b"GET /metrics HTTP/1.1\r\nHost: pod\r\nAccept: text/plain\r\n\r\n"

    def round(self) -> None:
        bufs = {fd: bytearray() for fd in self.by_fd}
        for s in self.socks:
            s.send(self.request)
        pending = set(self.by_fd)
        while pending:
            for fd, _ in self.poller.poll(1000):
                buf = bufs[fd]
                buf += self.by_fd[fd].recv(65536)
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head = bytes(buf[:end]).lower()
                at = head.find(b"content-length:") + 15
                stop = head.find(b"\r\n", at)
                if len(buf) >= end + 4 + int(head[at : stop if stop > 0 else None]):
                    pending.discard(fd)

    def close(self) -> None:
        for s in self.socks:
            s.close()


def cpu_per_round(fn: Callable[[], object], rounds: int) -> float:
    """Microseconds of this thread's CPU per call of `fn`."""
    t0 = time.thread_time()
    for _ in range(rounds):
        fn()
    return (time.thread_time() - t0) / rounds * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2000, help="rounds per trial")
    ap.add_argument("--trials", type=int, default=5, help="trials of each, in turns")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvaware-scrape-") as tmp:
        proc, endpoints = start_pods(args.pods, Path(tmp))
        try:
            floor = Floor(endpoints)
            pool = PagePool()
            targets = [(e.id, e.address, e.port, e.metrics_path) for e in endpoints]
            scraper = MetricsScraper(
                lambda: endpoints, metrics=SchedulerMetrics(CollectorRegistry())
            )
            runs: dict[str, Callable[[], object]] = {
                "floor": floor.round,
                "fetch": lambda: pool.get(targets, 1.0),
                "scrape": scraper.scrape_all,
            }
            for fn in runs.values():  # connections open, caches warm
                cpu_per_round(fn, 50)
            samples: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.trials):
                for name, fn in runs.items():
                    samples[name].append(cpu_per_round(fn, args.rounds))
            page = pool.get(targets[:1], 1.0)[0][0]
            floor.close()
            pool.close()
        finally:
            assert proc.stdin is not None
            proc.stdin.close()  # --stop-on-eof
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    size = len(page) if isinstance(page, bytes) else 0
    print(
        f"{args.pods} pods, {size}-byte pages, {args.trials} trials x {args.rounds} rounds "
        "(CPU us per round)"
    )
    base = statistics.median(samples["floor"])
    print(f"{'':8} {'median':>8} {'best':>8} {'vs floor':>9}")
    for name, values in samples.items():
        med = statistics.median(values)
        print(f"{name:8} {med:8.0f} {min(values):8.0f} {med / base:8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
