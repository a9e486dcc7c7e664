"""The CPU a Python relay spends per streamed answer, in two designs, against the same pod.

Relaying SSE token events is most of the gateway's event-loop CPU (docs/live.md). This compares:

* ``await``: the gateway's design: an aiohttp client to the pod, an aiohttp server to the client,
  one task per request awaiting each chunk the pod sends (``content.readany()``) and writing it
  on (``StreamResponse.write``): every event wakes the task through a future.
* ``callback``: the pod connection is a raw asyncio protocol; its ``data_received`` decodes the
  HTTP chunked framing and writes each event to the client's transport at once (the server side
  is still aiohttp); the request's task only waits for the end. No task wake-up per event.

Three kinds of processes on 127.0.0.1: a pod (answers every POST with ``--events`` SSE events
``--interval`` ms apart, chunked), one relay process per design, and this script as the client
(aiohttp, ``--concurrency`` streams at a time for ``--duration`` seconds per design and event
count, designs taking turns). Each relay reports its own CPU (``getrusage``) before and after.
With two event counts the CPU per request is fitted as ``fixed + events x per_event``.

    python benchmarks/bench_relay.py                        # about a minute
    python benchmarks/bench_relay.py --events 8,128 --interval 20 --concurrency 16 --duration 12

Prints ms of relay CPU per request for each design and event count (and the share of it spent
in the kernel: the socket reads and writes), the fit, and the ratio of the designs. The client and the pod share the machine's cores with the relays: compare the
designs of one run, not figures across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

EVENT = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":'
    b'[{"index":0,"text":" token","logprobs":null,"finish_reason":null}]}\n\n'
)
DONE = b"data: [DONE]\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# -- the pod ------------------------------------------------------------------------------------


def run_pod(port: int, events: int, interval: float) -> None:
    import uvloop

    answering: set[asyncio.Future[None]] = set()

    class Pod(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # NOTE: uvloop's transports are not asyncio.Transport subclasses.
            self.transport = cast(asyncio.Transport, transport)
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while (end := self.buf.find(b"\r\n\r\n")) >= 0:
                length = 0
                for line in self.buf[:end].split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(self.buf) < end + 4 + length:
                    return
                self.buf = self.buf[end + 4 + length :]
                task = asyncio.ensure_future(self.answer())
                answering.add(task)
                task.add_done_callback(answering.discard)

        async def answer(self) -> None:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for _ in range(events):
                await asyncio.sleep(interval)
                self.transport.write(_chunk(EVENT))
            self.transport.write(_chunk(DONE) + b"0\r\n\r\n")

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Pod, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# -- the relays ---------------------------------------------------------------------------------


def run_relay(design: str, port: int, pod_port: int) -> None:
    import resource

    import aiohttp
    import uvloop
    from aiohttp import web

    pod_url = f"http://127.0.0.1:{pod_port}/v1/completions"

    async def cpu(_: web.Request) -> web.Response:
        use = resource.getrusage(resource.RUSAGE_SELF)
        return web.Response(text=f"{use.ru_utime!r} {use.ru_stime!r}")

    async def relay_await(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session: aiohttp.ClientSession = request.app["session"]
        async with session.post(
            pod_url, data=body, headers={"content-type": "application/json"}
        ) as resp:
            out = web.StreamResponse(
                status=resp.status, headers={"content-type": "text/event-stream"}
            )
            await out.prepare(request)
            while chunk := await resp.content.readany():
                await out.write(chunk)
            await out.write_eof()
            return out

    class PodStream(asyncio.Protocol):
        """A pod connection: the answer's head is skipped, its chunked body decoded and each
        complete chunk written to the client as a chunk of its own."""

        def __init__(self) -> None:
            self.client: asyncio.WriteTransport | None = None
            self.done: asyncio.Future[None] | None = None
            self.buf = b""
            self.head = True

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def start(self, client: asyncio.WriteTransport, done: asyncio.Future[None]) -> None:
            self.client, self.done, self.head, self.buf = client, done, True, b""

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data if self.buf else data
            if self.head:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    self.buf = buf
                    return
                buf = buf[end + 4 :]
                self.head = False
            pos = 0
            out: list[bytes] = []
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol], 16)
                if size == 0:  # the last chunk: the server writes the client's own
                    if self.client is not None and out:
                        self.client.write(b"".join(out))
                    assert self.done is not None
                    self.done.set_result(None)
                    self.buf = b""
                    return
                if len(buf) < eol + 2 + size + 2:
                    break
                out.append(_chunk(buf[eol + 2 : eol + 2 + size]))
                pos = eol + 4 + size
            self.buf = buf[pos:]
            if out and self.client is not None:
                self.client.write(b"".join(out) if len(out) > 1 else out[0])

        def connection_lost(self, exc: Exception | None) -> None:
            if self.done is not None and not self.done.done():
                self.done.set_exception(ConnectionError("pod closed the stream"))

    idle: list[tuple[asyncio.Transport, PodStream]] = []

    async def relay_callback(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        loop = asyncio.get_running_loop()
        if idle:
            transport, pod = idle.pop()
        else:
            transport, pod = await loop.create_connection(PodStream, "127.0.0.1", pod_port)
        out = web.StreamResponse(status=200, headers={"content-type": "text/event-stream"})
        out.enable_chunked_encoding()
        await out.prepare(request)
        # NOTE: aiohttp sends a prepared response's head with its first body write; an empty
        # write flushes it before the pod's chunks go to the transport directly.
        await out.write(b"")
        client = request.transport
        assert client is not None
        done = loop.create_future()
        pod.start(client, done)
        transport.write(
            b"POST /v1/completions HTTP/1.1\r\nhost: pod\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await done
        idle.append((transport, pod))
        await out.write_eof()
        return out

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/cpu", cpu)
        if design == "await":
            app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            app.router.add_post("/v1/completions", relay_await)
        else:
            app.router.add_post("/v1/completions", relay_callback)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    uvloop.run(main())


# -- the client ---------------------------------------------------------------------------------


async def drive(port: int, concurrency: int, duration: float) -> tuple[int, int, float, float]:
    """Streams through the relay on `port`: (requests, events, relay CPU seconds, the part of
    them spent in the kernel)."""
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:

        async def cpu() -> tuple[float, float]:
            async with session.get(base + "/cpu") as r:
                user, system = (float(v) for v in (await r.text()).split())
                return user, system

        requests = events = 0
        end = time.monotonic() + duration

        async def worker() -> None:
            nonlocal requests, events
            while time.monotonic() < end:
                payload = {"model": "m", "prompt": "hello " * 50, "stream": True}
                async with session.post(base + "/v1/completions", json=payload) as resp:
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            events += 1
                requests += 1

        u0, s0 = await cpu()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        u1, s1 = await cpu()
        return requests, events, u1 - u0 + s1 - s0, s1 - s0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args], start_new_session=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", default="8,128", help="event counts per answer (two)")
    parser.add_argument("--interval", type=float, default=20.0, help="ms between events")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--role", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--pod-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(n) for n in args.events.split(",")]
    if args.role == "pod":
        run_pod(args.port, counts[0], args.interval / 1000)
        return
    if args.role in ("await", "callback"):
        run_relay(args.role, args.port, args.pod_port)
        return
    if len(counts) != 2 or counts[0] == counts[1]:
        raise SystemExit("--events takes two different counts")

    designs = ("await", "callback")
    figures: dict[tuple[str, int], float] = {}
    print(
        f"{'design':<10} {'events':>6} {'requests':>9} {'CPU ms/req':>11} {'us/event':>9} "
        f"{'kernel':>7}"
    )
    for n in counts:
        procs: list[subprocess.Popen[bytes]] = []
        try:
            pod_port = free_port()
            procs.append(spawn("--role", "pod", "--port", str(pod_port), "--events", str(n),
                               "--interval", str(args.interval)))  # fmt: skip
            wait_port(pod_port)
            ports = {}
            for design in designs:
                ports[design] = free_port()
                procs.append(spawn("--role", design, "--port", str(ports[design]),
                                   "--pod-port", str(pod_port)))  # fmt: skip
                wait_port(ports[design])
            for design in designs:
                reqs, events, cpu, kernel = asyncio.run(
                    drive(ports[design], args.concurrency, args.duration)
                )
                if reqs == 0 or events != reqs * n:
                    raise SystemExit(f"{design}: {reqs} requests, {events} events (want {n} each)")
                figures[design, n] = 1000 * cpu / reqs
                per_event = 1e6 * cpu / events
                share = kernel / cpu if cpu else 0.0
                print(
                    f"{design:<10} {n:>6} {reqs:>9} {figures[design, n]:>11.3f} "
                    f"{per_event:>9.1f} {share:>7.0%}"
                )
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(10)
    lo, hi = counts
    print()
    print(f"{'design':<10} {'fixed ms/req':>13} {'us/event':>9}")
    for design in designs:
        slope = (figures[design, hi] - figures[design, lo]) / (hi - lo)
        fixed = figures[design, lo] - slope * lo
        print(f"{design:<10} {fixed:>13.3f} {1000 * slope:>9.1f}")
    for n in counts:
        ratio = figures["callback", n] / figures["await", n]
        print(f"callback / await at {n} events: {ratio:.2f}")


if __name__ == "__main__":
    main()
