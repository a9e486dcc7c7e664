"""One run of ``kvaware demo``: live pods, a front door with one config, clients, samples.

`PodProcess` runs ``kvaware sim serve`` in a child process; `run_config` starts the pods and
a front door (kvaware's gateway, or Envoy with the epp Endpoint Picker) in front of them with
one scheduler config, drives the load through it with concurrent streaming clients while
sampling the pods' ``/metrics``, and stops everything; `run_result` turns what the clients saw
into the `RunResult` that ``kvaware bench``'s report prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvaware_scorer.sim.engine import EngineStats
from kvaware_scorer.sim.fleet import RequestRecord, RunResult
from kvaware_scorer.sim.workloads import StageWindow
from kvaware_scorer.tours.demo_load import (
    DEMO_MODEL,
    DemoRequest,
    DemoSettings,
    default_num_gpu_blocks,
)

__all__ = ["Outcome", "PodProcess", "RunData", "run_config", "run_result"]

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: int = 0
    pod: str = ""
    start: float = 0.0
    first_token: float | None = None
    finish: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class RunData:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)
    duration: float = 0.0
    pods: list[str] = field(default_factory=list)
    pod_counters: dict[str, dict[str, float]] = field(default_factory=dict)


class PodProcess:
    """``kvaware sim serve`` in a child process (stops when this process goes away).

    Args:
        args: Arguments after ``kvaware sim serve``.
        endpoints: Where the child writes its endpoints file.
    """

    def __init__(self, args: Sequence[str], endpoints: Path) -> None:
        self.args = list(args)
        self.endpoints = endpoints
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._readers: list[asyncio.Task[None]] = []

    async def start(self, timeout: float = 60.0) -> None:
        """Start the child and wait until its pods are ready.

        Raises:
            RuntimeError: The child exited or did not become ready in time.
        """
        cmd = [sys.executable, "-m", "kvaware_scorer.cli", "sim", "serve", *self.args]
        cmd += ["--endpoints-out", str(self.endpoints), "--stop-on-eof"]
        self.proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        ready = asyncio.Event()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(self.proc.stdout, ready)),
            asyncio.create_task(self._read(self.proc.stderr, None)),
        ]
        waiter = asyncio.create_task(ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
            exited.cancel()
        if waiter not in done:
            tail = "\n".join(self.lines[-15:])
            await self.stop()
            raise RuntimeError(f"the emulated pods did not start:\n{tail}")

    async def _read(self, stream: asyncio.StreamReader, ready: asyncio.Event | None) -> None:
        while True:
            line = await stream.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            self.lines.append(text)
            logger.debug("pods: %s", text)
            if ready is not None and " pods ready " in text:
                ready.set()

    async def stop(self) -> None:
        """Close the child's stdin, then SIGTERM, then SIGKILL; bounded."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._readers:
            task.cancel()
        self._readers = []


class _Pods:
    """The live pods of one run (``kvaware sim serve`` in a child process)."""

    def __init__(self, settings: DemoSettings, tokenizer: Path, workdir: Path, name: str) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.endpoints = workdir / f"endpoints-{name}.yaml"
        self._process: PodProcess | None = None

    def _blocks(self) -> int:
        s = self.settings
        if s.num_gpu_blocks is not None:
            return s.num_gpu_blocks
        return default_num_gpu_blocks(s)

    async def start(self) -> list[str]:
        """Start the pods; returns their endpoint ids."""
        s = self.settings
        self._process = PodProcess(
            [
                "--pods", str(s.pods), "--profile", s.profile, "--model", DEMO_MODEL,
                "--speedup", str(s.speedup), "--num-gpu-blocks", str(self._blocks()),
                "--tokenizer", str(self.tokenizer),
            ],
            self.endpoints,
        )  # fmt: skip
        await self._process.start()
        data = yaml.safe_load(self.endpoints.read_text())
        return [f"{e['address']}:{e['port']}" for e in data["endpoints"]]

    async def stop(self) -> None:
        if self._process is not None:
            process, self._process = self._process, None
            await process.stop()


async def _client(
    session: Any,
    url: str,
    requests: Sequence[DemoRequest],
    counter: itertools.count[int],
    outcomes: list[Outcome],
    t0: float,
) -> None:
    import msgspec

    loop = asyncio.get_running_loop()
    while True:
        i = next(counter)
        if i >= len(requests):
            return
        r = requests[i]
        path = "/v1/chat/completions" if r.chat else "/v1/completions"
        body = dict(r.body, stream=True, stream_options={"include_usage": True})
        o = outcomes[i]
        o.start = loop.time() - t0
        try:
            async with session.post(url + path, json=body) as resp:
                o.status = resp.status
                o.pod = resp.headers.get("x-kvaware-endpoint", "")
                if resp.status != 200:
                    o.error = (await resp.text())[:200]
                    continue
                async for line in resp.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    event = msgspec.json.decode(line[6:])
                    if "error" in event:
                        o.status, o.error = 502, str(event["error"])[:200]
                        continue
                    for choice in event.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content") or choice.get("text")
                        if piece and o.first_token is None:
                            o.first_token = loop.time() - t0
                    usage = event.get("usage")
                    if usage:
                        o.prompt_tokens = usage.get("prompt_tokens") or 0
                        o.completion_tokens = usage.get("completion_tokens") or 0
                        details = usage.get("prompt_tokens_details") or {}
                        o.cached_tokens = details.get("cached_tokens") or 0
                o.finish = loop.time() - t0
        except Exception as exc:
            o.status, o.error = 599, f"{type(exc).__name__}: {exc}"


async def _scrape(session: Any, pod_urls: Sequence[str]) -> list[Any]:
    from kvaware_scorer.scheduler.scrape import parse_vllm_metrics

    async def one(url: str) -> Any:
        async with session.get(url + "/metrics") as resp:
            return parse_vllm_metrics(await resp.text())

    return list(await asyncio.gather(*(one(u) for u in pod_urls)))


async def _sampler(
    session: Any,
    pod_urls: Sequence[str],
    samples: list[tuple[float, float, float, float]],
    t0: float,
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0.25)
        try:
            ms = await _scrape(session, pod_urls)
        except Exception as exc:
            logger.debug("metrics sample failed: %s", exc)
            continue
        n = len(ms) or 1
        samples.append(
            (
                loop.time() - t0,
                sum(m.waiting_queue_size for m in ms) / n,
                sum(m.running_requests_size for m in ms) / n,
                sum(m.kv_cache_usage_percent for m in ms) / n,
            )
        )


async def _pod_counters(session: Any, pod_urls: Sequence[str]) -> dict[str, dict[str, float]]:
    wanted = (
        "vllm:num_preemptions_total",
        "kvaware_sim_kv_event_batches_total",
        "kvaware_sim_kv_event_bytes_total",
    )
    out: dict[str, dict[str, float]] = {}
    for url in pod_urls:
        values: dict[str, float] = {}
        async with session.get(url + "/metrics") as resp:
            for line in (await resp.text()).splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in wanted:
                    values[name] = float(line.rsplit(" ", 1)[1])
        out[url] = values
    return out


async def run_config(
    name: str,
    config: dict[str, Any],
    settings: DemoSettings,
    requests: Sequence[DemoRequest],
    tokenizer: Path,
    workdir: Path,
    say: Callable[[str], object],
) -> RunData:
    """Send `requests` through a front door scheduling with `config` on fresh pods.

    The pods and the front door are stopped before this returns, whatever happened.
    """
    pods = _Pods(settings, tokenizer, workdir, name)
    data = RunData(name)
    front: Any = None
    t_setup = time.perf_counter()

    def ready() -> None:
        say(f"  {name}: pods and gateway up in {time.perf_counter() - t_setup:.1f} s; "
            f"{len(requests)} requests, {settings.concurrency} clients")  # fmt: skip

    try:
        data.pods = await pods.start()
        scheduler = _scheduler(config, settings, pods.endpoints)
        front = _front_door(scheduler, settings, workdir)
        await front.start()
        await _drive(front.url, scheduler, data, settings, requests, ready)
    finally:
        if front is not None:
            await front.stop()
        await pods.stop()
    return data


def _scheduler(config: dict[str, Any], settings: DemoSettings, endpoints: Path) -> Any:
    """A scheduler built from `config` that follows the pods' endpoints file."""
    from kvaware_scorer.scheduler import Scheduler

    scheduler = Scheduler.from_config(config, seed=settings.seed)
    try:
        scheduler.use_endpoints_file(endpoints, poll_interval=0.5)
    except BaseException:
        scheduler.close()
        raise
    return scheduler


def _front_door(scheduler: Any, settings: DemoSettings, workdir: Path) -> Any:
    """kvaware's gateway (owning `scheduler`) or Envoy with the epp Endpoint Picker."""
    if settings.via == "envoy":
        from kvaware_scorer.epp.front import EnvoyFront

        return EnvoyFront(scheduler, workdir)
    from kvaware_scorer.gateway import Gateway, GatewayConfig

    return Gateway(
        scheduler,
        GatewayConfig(port=0, endpoint_header=True, drain_timeout=2.0),
        own_scheduler=True,
    )


async def _drive(
    url: str,
    scheduler: Any,
    data: RunData,
    settings: DemoSettings,
    requests: Sequence[DemoRequest],
    ready: Callable[[], None],
) -> None:
    """Warm up, then run the closed-loop clients against `url` while sampling the pods."""
    import aiohttp

    from kvaware_scorer.scheduler import SchedulingRequest

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=settings.concurrency + 8)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # Warm the scheduler's tokenizer (the first tokenization loads it) and let its
        # KV-event subscriber dial the pods before the clock starts.
        warm = SchedulingRequest("warm-up", DEMO_MODEL, prompt="warm up the tokenizer")
        await scheduler.aschedule(warm, dry_run=True)
        await asyncio.sleep(0.3)
        ready()
        pod_urls = [f"http://{p}" for p in data.pods]
        data.outcomes = [Outcome() for _ in requests]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sampler = asyncio.create_task(_sampler(session, pod_urls, data.samples, t0))
        counter = itertools.count()
        try:
            await asyncio.gather(
                *(
                    _client(session, url, requests, counter, data.outcomes, t0)
                    for _ in range(settings.concurrency)
                )
            )
        finally:
            sampler.cancel()
        data.duration = loop.time() - t0
        data.pod_counters = await _pod_counters(session, pod_urls)


def run_result(
    data: RunData, requests: Sequence[DemoRequest], ideal: Sequence[int], settings: DemoSettings
) -> RunResult:
    stage = StageWindow(0, f"c={settings.concurrency}", 0.0, 0.0, data.duration)
    records: list[RequestRecord] = []
    tokens = 0
    for r, o, best in zip(requests, data.outcomes, ideal, strict=True):
        ok = o.status == 200 and o.error is None
        if ok:
            tokens += o.completion_tokens
        records.append(
            RequestRecord(
                request_id=str(r.index),
                stage=0,
                pod=o.pod,
                status=200 if ok else (o.status or 0),
                arrival=o.start,
                first_token=o.first_token,
                finish=o.finish,
                prompt_tokens=o.prompt_tokens,
                cached_tokens=o.cached_tokens,
                ideal_cached_tokens=min(best, o.prompt_tokens) if ok else 0,
                output_tokens=o.completion_tokens,
            )
        )
    result = RunResult(router=data.name, stages=[stage], records=records)
    result.stage_output_tokens = [tokens]
    result.samples = data.samples
    result.pods = list(data.pods)
    result.end_time = data.duration * settings.speedup
    result.wall_time_s = data.duration
    for url, values in data.pod_counters.items():
        pod = url.removeprefix("http://")
        result.engine_stats[pod] = EngineStats(
            preemptions=int(values.get("vllm:num_preemptions_total", 0))
        )
        result.payloads += int(values.get("kvaware_sim_kv_event_batches_total", 0))
        result.payload_bytes += int(values.get("kvaware_sim_kv_event_bytes_total", 0))
    return result
