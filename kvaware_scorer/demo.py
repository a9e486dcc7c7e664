"""``kvaware demo``: precise KV-aware routing vs random, through the real gateway, on live pods.

    kvaware demo            # about a minute
    kvaware demo --quick    # about 30 seconds
    kvaware demo --via envoy   # the same through Envoy with the epp Endpoint Picker

For each config (the shipped ``precise``, then ``random``) the demo starts fresh
live emulated pods (``kvaware sim serve`` in a child process: OpenAI HTTP servers publishing KV
events over ZMQ), a gateway in front of them with that config (the precise scorer ingests the
pods' KV events in connect mode and tokenizes with a locally built tokenizer, the very one the
pods use), and drives the same shared-prefix load through the gateway with several concurrent
streaming clients (text prompts and chat messages, one system prompt per group). It then prints
the table of ``kvaware bench`` for both runs: TTFT as the clients measured it (wall clock),
throughput, the prefix-hit rate the pods reported (``usage.prompt_tokens_details.
cached_tokens``) next to the ideal one, queue and KV usage sampled from the pods' ``/metrics``,
and each pod's share of the requests (from the gateway's ``x-kvaware-endpoint`` header).

The pods get a small KV capacity (``--num-gpu-blocks``): about 1.4 times the system prompts one
pod needs when every group sticks to one pod. Random routing sends every group everywhere, so
each pod's working set is about ``pods`` times its capacity and its prefix cache thrashes;
precise routing keeps each group on the pod that holds it.

Everything listens on 127.0.0.1 and stops by itself: at the end, on an error, on Ctrl-C, or
after ``--timeout`` seconds; the child process also exits when this process goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
import random
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.resources import resolve_config
from kvaware_scorer.sim.engine import EngineStats
from kvaware_scorer.sim.fleet import RequestRecord, RunResult
from kvaware_scorer.sim.profiles import PROFILES, get_profile
from kvaware_scorer.sim.report import format_run, format_summary, summarize, write_json
from kvaware_scorer.sim.workloads import StageWindow

__all__ = [
    "DemoRequest",
    "DemoSettings",
    "PodProcess",
    "build_workload",
    "register",
    "run",
    "run_demo",
    "scheduler_config",
]

logger = logging.getLogger(__name__)

#: Plugin types whose parameters get the local tokenizer (they tokenize text prompts).
_TOKENIZING_PLUGINS = ("precise-prefix-cache-scorer", "precise-prefix-cache-producer")
_MODEL = "kvaware/demo-8b"


@dataclass
class DemoSettings:
    """What the demo runs (defaults: the full demo; `quick` shrinks the load).

    Attributes:
        configs: Scheduler YAMLs run in turn (the last is the baseline of the ratios).
        pods: Live pods per run.
        profile: Engine profile of the pods.
        speedup: Emulated seconds per wall second.
        concurrency: Concurrent clients (closed loop: each sends its next request when the
            previous one ended).
        requests: Requests per config.
        groups: Shared system prompts.
        prompts_per_group: Distinct questions per group.
        system_words: Words per system prompt (about 1.25 tokens each).
        question_words: Words per question.
        output_tokens: ``max_tokens`` of every request.
        chat_share: Fraction of the groups sent as chat messages (the others as text prompts).
        num_gpu_blocks: KV blocks per pod; None = about 1.4x what one pod needs under perfect
            affinity (see the module docstring).
        seed: Seed of the workload and of the pickers.
        timeout: Wall seconds after which everything is stopped.
        json_path: Write the summaries as JSON here.
        via: ``gateway`` (``kvaware serve``'s proxy) or ``envoy`` (Envoy + ``kvaware epp``).
    """

    configs: tuple[str, ...] = ("precise", "random")
    pods: int = 4
    profile: str = "llama-3.1-8b-1xh100"
    speedup: float = 1.0
    concurrency: int = 16
    requests: int = 1200
    groups: int = 12
    prompts_per_group: int = 6
    system_words: int = 2000
    question_words: int = 60
    output_tokens: int = 24
    chat_share: float = 0.5
    num_gpu_blocks: int | None = None
    seed: int = 0
    timeout: float = 170.0
    json_path: str | None = None
    quick: bool = False
    via: str = "gateway"

    @classmethod
    def quick_settings(cls, **changes: Any) -> DemoSettings:
        """The ``--quick`` sizes (same shape, fewer requests)."""
        base: dict[str, Any] = {"requests": 500, "timeout": 90.0, "quick": True}
        base.update(changes)
        return cls(**base)


@dataclass(frozen=True)
class DemoRequest:
    """One request of the demo load.

    Attributes:
        index: Position in the sequence sent.
        group: Its system prompt.
        chat: Sent as chat messages (else as a text prompt).
        body: The OpenAI request body (without the streaming fields).
    """

    index: int
    group: int
    chat: bool
    body: dict[str, Any]


@dataclass
class _Outcome:
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
class _RunData:
    name: str
    outcomes: list[_Outcome] = field(default_factory=list)
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)
    duration: float = 0.0
    pods: list[str] = field(default_factory=list)
    pod_counters: dict[str, dict[str, float]] = field(default_factory=dict)


def _vocabulary() -> list[str]:
    from kvaware_scorer.tokenization import builtin_corpus

    return sorted({w for line in builtin_corpus() for w in re.findall(r"[a-z]+", line.lower())})


def build_workload(settings: DemoSettings, model: str = _MODEL) -> list[DemoRequest]:
    """The shared-prefix load: groups x questions, shuffled once and sent in a cycle.

    Group ``g`` is sent as chat messages (system + user) when ``g`` falls in the chat share,
    else as one text prompt (system prompt, blank line, question).
    """
    rng = random.Random(settings.seed)
    words = _vocabulary()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    systems = [
        f"You are assistant {g} of the kvaware demo. " + text(settings.system_words)
        for g in range(settings.groups)
    ]
    pairs = [
        (g, text(settings.question_words))
        for g in range(settings.groups)
        for _ in range(settings.prompts_per_group)
    ]
    rng.shuffle(pairs)
    out: list[DemoRequest] = []
    for i in range(settings.requests):
        g, question = pairs[i % len(pairs)]
        chat = _is_chat(g, settings.chat_share)
        body: dict[str, Any] = {"model": model, "max_tokens": settings.output_tokens}
        if chat:
            body["messages"] = [
                {"role": "system", "content": systems[g]},
                {"role": "user", "content": question},
            ]
        else:
            body["prompt"] = systems[g] + "\n\n" + question
        out.append(DemoRequest(i, g, chat, body))
    return out


def _is_chat(group: int, share: float) -> bool:
    """Whether `group` is sent as chat: `share` of the groups, spread evenly."""
    return math.floor((group + 1) * share) > math.floor(group * share)


def scheduler_config(path: str | Path, tokenizer_root: str | Path) -> dict[str, Any]:
    """The EndpointPickerConfig at `path`, its tokenizing plugins pointed at `tokenizer_root`
    (``tokenizersPoolConfig.local.autoDiscoveryDir``).

    Raises:
        ConfigError: The file is missing or is not a mapping with ``plugins``.
    """
    file = resolve_config(path)
    if not file.is_file():
        raise ConfigError("scheduler config not found", str(file))
    data = yaml.safe_load(file.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("plugins"), list):
        raise ConfigError("not an EndpointPickerConfig (no plugins list)", str(file))
    for plugin in data["plugins"]:
        if isinstance(plugin, dict) and plugin.get("type") in _TOKENIZING_PLUGINS:
            params = plugin.setdefault("parameters", None) or {}
            plugin["parameters"] = params
            pool = params.setdefault("tokenizersPoolConfig", {})
            pool.setdefault("local", {})["autoDiscoveryDir"] = str(tokenizer_root)
    return data


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
                "--pods", str(s.pods), "--profile", s.profile, "--model", _MODEL,
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


def default_num_gpu_blocks(settings: DemoSettings) -> int:
    """About 1.4x the system-prompt blocks one pod holds under perfect affinity, plus the
    blocks of the requests it runs at once."""
    profile = get_profile(settings.profile)
    bs = profile.block_size
    system_tokens = settings.system_words * 1.25 + 20
    per_pod = math.ceil(settings.groups / settings.pods) * system_tokens / bs
    running = math.ceil(settings.concurrency / settings.pods) * 2
    own = (settings.question_words * 1.25 + settings.output_tokens + 40) / bs
    return int(1.4 * per_pod + running * (own + 1)) + 1


def _ideal_hits(token_lists: Sequence[Sequence[int]], block_size: int) -> list[int]:
    """Hit of each prompt in an infinite cache that saw every earlier prompt (capped like
    vLLM at ``len - 1`` tokens, full blocks only)."""
    seen: set[bytes] = set()
    out: list[int] = []
    for ids in token_lists:
        digest = b""
        chain: list[bytes] = []
        for k in range(len(ids) // block_size):
            block = ids[k * block_size : (k + 1) * block_size]
            digest = hashlib.blake2b(
                digest + b"".join(t.to_bytes(4, "little") for t in block), digest_size=16
            ).digest()
            chain.append(digest)
        cap = (len(ids) - 1) // block_size
        hit = 0
        while hit < cap and chain[hit] in seen:
            hit += 1
        out.append(hit * block_size)
        seen.update(chain)
    return out


def _tokenize_all(requests: Sequence[DemoRequest], tokenizer: Path) -> list[list[int]]:
    """The token ids the pods will see for each request (same tokenization code)."""
    from kvaware_scorer.config import LocalTokenizerConfig, PrefixStoreConfig, TokenizersPoolConfig
    from kvaware_scorer.tokenization import TokenizationService

    service = TokenizationService(
        TokenizersPoolConfig(
            local=LocalTokenizerConfig(model_tokenizer_map={_MODEL: str(tokenizer)})
        ),
        PrefixStoreConfig(cache_size=0),
    )
    cache: dict[str, list[int]] = {}
    out: list[list[int]] = []
    try:
        for r in requests:
            key = json.dumps(r.body.get("messages") or r.body.get("prompt"), sort_keys=True)
            ids = cache.get(key)
            if ids is None:
                if r.chat:
                    ids = service.tokenize(_MODEL, messages=r.body["messages"])
                else:
                    ids = service.tokenize(_MODEL, prompt=r.body["prompt"])
                cache[key] = ids
            out.append(ids)
    finally:
        service.close()
    return out


async def _client(
    session: Any,
    url: str,
    requests: Sequence[DemoRequest],
    counter: itertools.count[int],
    outcomes: list[_Outcome],
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


async def _run_config(
    name: str,
    config: dict[str, Any],
    settings: DemoSettings,
    requests: Sequence[DemoRequest],
    tokenizer: Path,
    workdir: Path,
    say: Callable[[str], object],
) -> _RunData:
    import aiohttp

    from kvaware_scorer.gateway import Gateway, GatewayConfig
    from kvaware_scorer.scheduler import Scheduler

    pods = _Pods(settings, tokenizer, workdir, name)
    data = _RunData(name)
    gateway: Any = None
    t_setup = time.perf_counter()
    try:
        data.pods = await pods.start()
        scheduler = Scheduler.from_config(config, seed=settings.seed)
        try:
            scheduler.use_endpoints_file(pods.endpoints, poll_interval=0.5)
        except BaseException:
            scheduler.close()
            raise
        if settings.via == "envoy":
            from kvaware_scorer.epp.front import EnvoyFront

            gateway = EnvoyFront(scheduler, workdir)
        else:
            gateway = Gateway(
                scheduler,
                GatewayConfig(port=0, endpoint_header=True, drain_timeout=2.0),
                own_scheduler=True,
            )
        await gateway.start()
        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(limit=settings.concurrency + 8)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            # Warm the scheduler's tokenizer (the first tokenization loads it) and let its
            # KV-event subscriber dial the pods before the clock starts.
            from kvaware_scorer.scheduler import SchedulingRequest

            warm = SchedulingRequest("warm-up", _MODEL, prompt="warm up the tokenizer")
            await scheduler.aschedule(warm, dry_run=True)
            await asyncio.sleep(0.3)
            say(f"  {name}: pods and gateway up in {time.perf_counter() - t_setup:.1f} s; "
                f"{len(requests)} requests, {settings.concurrency} clients")  # fmt: skip
            pod_urls = [f"http://{p}" for p in data.pods]
            data.outcomes = [_Outcome() for _ in requests]
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            sampler = asyncio.create_task(_sampler(session, pod_urls, data.samples, t0))
            counter = itertools.count()
            try:
                await asyncio.gather(
                    *(
                        _client(session, gateway.url, requests, counter, data.outcomes, t0)
                        for _ in range(settings.concurrency)
                    )
                )
            finally:
                sampler.cancel()
            data.duration = loop.time() - t0
            data.pod_counters = await _pod_counters(session, pod_urls)
    finally:
        if gateway is not None:
            await gateway.stop()
        await pods.stop()
    return data


def _result(
    data: _RunData, requests: Sequence[DemoRequest], ideal: Sequence[int], settings: DemoSettings
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


async def run_demo(
    settings: DemoSettings, say: Callable[[str], object] = print
) -> list[dict[str, Any]]:
    """Run every config of `settings` on fresh pods; returns their summaries.

    Args:
        settings: What to run.
        say: Where progress lines go (``print`` by default).

    Raises:
        ConfigError: A config file is missing or invalid.
        TimeoutError: The demo ran longer than ``settings.timeout``.
    """
    from kvaware_scorer.tokenization import install_local_tokenizer

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvaware-demo-") as tmp:
        workdir = Path(tmp)
        root = workdir / "tokenizers"
        tokenizer = await asyncio.to_thread(install_local_tokenizer, root, _MODEL)
        configs = [(Path(c).stem, scheduler_config(c, root)) for c in settings.configs]
        requests = build_workload(settings)
        token_lists = await asyncio.to_thread(_tokenize_all, requests, tokenizer)
        block_size = get_profile(settings.profile).block_size
        ideal = _ideal_hits(token_lists, block_size)
        prompt_lens = sorted(len(t) for t in token_lists)
        blocks = settings.num_gpu_blocks or default_num_gpu_blocks(settings)
        say(
            f"kvaware demo: {settings.pods} live pods x {settings.profile} (model {_MODEL}, "
            f"{blocks:,} KV blocks x {block_size} tokens = {blocks * block_size:,} tokens/pod), "
            f"speedup {settings.speedup:g}x"
        )
        say(
            f"load: {settings.groups} shared system prompts x {settings.prompts_per_group} "
            f"questions ({sum(_is_chat(g, settings.chat_share) for g in range(settings.groups))} "
            f"groups as chat), prompts "
            f"{prompt_lens[0]:,}-{prompt_lens[-1]:,} tokens, {settings.output_tokens} output "
            f"tokens, {settings.concurrency} concurrent streaming clients, "
            f"{settings.requests} requests per config, through "
            + ("Envoy + kvaware epp" if settings.via == "envoy" else "the gateway")
        )
        runs: list[RunResult] = []
        async with asyncio.timeout(settings.timeout):
            for name, config in configs:
                data = await _run_config(name, config, settings, requests, tokenizer, workdir, say)
                failed = [o for o in data.outcomes if o.status != 200 or o.error]
                if failed:
                    say(f"  {name}: {len(failed)} request(s) failed, e.g. {failed[0].error}")
                say(f"  {name}: {len(requests)} requests in {data.duration:.1f} s")
                runs.append(_result(data, requests, ideal, settings))
    summaries = [summarize(r) for r in runs]
    say("")
    say("TTFT and throughput are wall-clock figures measured by the clients "
        f"(emulated GPU time = wall x {settings.speedup:g}); hit = cached_tokens / prompt_tokens "
        "reported by the pods; ideal = an infinite cache that saw every earlier prompt.")  # fmt: skip
    for s in summaries:
        say("")
        say(format_run(s))
    say("")
    say(format_summary(summaries, summaries[-1]["config"] if summaries else None))
    say("")
    say(f"demo wall time {time.perf_counter() - t_start:.1f} s")
    if settings.json_path:
        write_json(settings.json_path, summaries, {"demo": _describe(settings)})
        say(f"wrote {settings.json_path}")
    return summaries


def _describe(settings: DemoSettings) -> dict[str, Any]:
    out = dict(vars(settings))
    out["configs"] = list(settings.configs)
    out["num_gpu_blocks"] = settings.num_gpu_blocks or default_num_gpu_blocks(settings)
    return out


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="precise vs random routing through the gateway on live emulated pods",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="a shorter run (about 30 s: fewer requests)"
    )
    p.add_argument(
        "--configs",
        nargs="+",
        metavar="CFG",
        help="scheduler YAML paths or shipped config names (default: precise random)",
    )
    p.add_argument("--pods", type=int, help="live pods per run (default: 4)")
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help="engine profile of the pods (default: llama-3.1-8b-1xh100)",
    )
    p.add_argument("--speedup", type=float, help="emulated seconds per wall second (default: 1)")
    p.add_argument("--concurrency", type=int, help="concurrent clients (default: 16)")
    p.add_argument("--requests", type=int, help="requests per config (default: 1200; --quick 500)")
    p.add_argument("--groups", type=int, help="shared system prompts (default: 12)")
    p.add_argument("--prompts-per-group", type=int, help="questions per group (default: 6)")
    p.add_argument("--system-words", type=int, help="words per system prompt (default: 2000)")
    p.add_argument("--question-words", type=int, help="words per question (default: 60)")
    p.add_argument("--output-tokens", type=int, help="max_tokens per request (default: 24)")
    p.add_argument(
        "--chat-share", type=float, help="fraction of groups sent as chat (default: 0.5)"
    )
    p.add_argument(
        "--num-gpu-blocks", type=int, help="KV blocks per pod (default: sized to the load)"
    )
    p.add_argument("--seed", type=int, help="workload and picker seed (default: 0)")
    p.add_argument(
        "--timeout",
        type=float,
        help="stop everything after this many seconds (default: 170; --quick 90)",
    )
    p.add_argument("--json", metavar="PATH", help="write the summaries as JSON")
    p.add_argument(
        "--via",
        choices=["gateway", "envoy"],
        help="front door: kvaware's gateway (default) or Envoy with the epp Endpoint Picker (ext_proc)",
    )
    p.set_defaults(func=run, extras=("gateway", "tokenizers"))


def _settings(args: argparse.Namespace) -> DemoSettings:
    fields = (
        "pods", "profile", "speedup", "concurrency", "requests", "groups", "prompts_per_group",
        "system_words", "question_words", "output_tokens", "chat_share", "num_gpu_blocks",
        "seed", "timeout", "via",
    )  # fmt: skip
    changes: dict[str, Any] = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    if args.configs:
        changes["configs"] = tuple(args.configs)
    if args.json:
        changes["json_path"] = args.json
    return DemoSettings.quick_settings(**changes) if args.quick else DemoSettings(**changes)


def _check(settings: DemoSettings) -> None:
    positive = ("pods", "concurrency", "requests", "groups", "prompts_per_group", "output_tokens")
    for name in positive:
        if getattr(settings, name) < 1:
            raise ConfigError("must be >= 1", name.replace("_", "-"))
    if settings.speedup <= 0 or settings.timeout <= 0:
        raise ConfigError("speedup and timeout must be > 0")
    if not 0.0 <= settings.chat_share <= 1.0:
        raise ConfigError("must be in [0, 1]", "chat-share")
    if settings.system_words < 1 or settings.question_words < 1:
        raise ConfigError("prompts need words", "system-words")


async def _main(settings: DemoSettings) -> None:
    """`run_demo`, with SIGTERM cancelling it like Ctrl-C (the pods are stopped either way)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await run_demo(settings)
    finally:
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGTERM)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    try:
        settings = _settings(args)
        _check(settings)
    except ConfigError as exc:
        print(f"kvaware demo: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_main(settings))
    except ConfigError as exc:
        print(f"kvaware demo: {exc}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"kvaware demo: stopped after {settings.timeout:g} s", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as exc:
        print(f"kvaware demo: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("kvaware demo: stopped", file=sys.stderr)
        return 143
    return 0
