"""Live emulated vLLM pods: the emulator engine in real time behind HTTP and ZMQ.

Each `LivePod` is one vLLM server: an `Engine` (vLLM v1's scheduler and KV-cache manager, see
``engine.py``) driven by one asyncio task in real time, an aiohttp server speaking vLLM's
OpenAI API (``server.py``), and a `VllmEventPublisher` sending the engine's KV events with
vLLM's exact frames, topic and replay protocol. `LiveFleet` starts N of them with one command
(``kvaware sim serve``).

Real time: a step the roofline model says takes ``d`` seconds takes ``d / speedup`` seconds of
wall time (`LivePodsConfig.speedup`). The step task schedules a batch (`Engine.begin_step`),
sleeps until the step's end, applies it (`Engine.finish_step`), publishes the step's events as
one batch (as vLLM does once per scheduler step) and hands the sampled tokens to the waiting
HTTP handlers. A late wake-up is caught up by starting the next step at the previous step's
deadline (up to `MAX_CATCH_UP_S`), so jitter of the event loop does not slow the emulated GPU
down. Aborts (client disconnects) and prefix-cache resets are applied between steps, as in vLLM.

A pod can be killed (`LivePod.stop`: connections dropped, publisher closed) and started again
on the same ports (`LivePod.restart`) with an empty KV cache and its event sequence back at 0,
like a restarted vLLM.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xxhash
import yaml
from pydantic import Field, field_validator

from kvaware_scorer.config import (
    ConfigModel,
    LocalTokenizerConfig,
    PrefixStoreConfig,
    TokenizersPoolConfig,
)
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.sim.engine import Engine, EngineRequest, RequestStatus, StepOutput
from kvaware_scorer.sim.hashing import BlockHasher, make_hasher
from kvaware_scorer.sim.profiles import PROFILES, EngineProfile, get_profile
from kvaware_scorer.sim.request import SimRequest
from kvaware_scorer.sim.wire import EventEncoder, KVEvent, SGLangEventEncoder

if TYPE_CHECKING:
    import zmq
    from aiohttp import web

    from kvaware_scorer.events.publisher import VllmEventPublisher
    from kvaware_scorer.tokenization import TokenizationService

__all__ = [
    "MAX_CATCH_UP_S",
    "Job",
    "LiveFleet",
    "LivePod",
    "LivePodsConfig",
    "LiveRequest",
    "OutputText",
    "PodFailure",
]

logger = logging.getLogger(__name__)

#: Most wall seconds a late step task may catch up on (beyond it, the emulated GPU stalls too).
MAX_CATCH_UP_S = 0.05
#: Prompts at least this long are hashed in a worker thread.
_HASH_OFF_LOOP_TOKENS = 2048
#: How long a restarted pod retries binding its publisher's ports while ZMQ releases them.
_REBIND_TIMEOUT_S = 2.0


class LivePodsConfig(ConfigModel):
    """Live emulated pods (``kvaware sim serve``).

    Attributes:
        profile: Engine profile (model, GPU, vLLM settings), see ``docs/emulator.md``.
        model: Served model name (default: the profile's model).
        num_pods: Pods started.
        speedup: Emulated seconds per wall second (10 = ten times faster than the GPU).
        host: Address every pod listens on (HTTP, publisher and replay sockets).
        base_port: HTTP port of pod 0 (pod i: ``base_port + i``); 0 = free ports.
        num_gpu_blocks: KV blocks per pod instead of the profile's (a small KV capacity makes
            routing quality visible with little load).
        block_size: vLLM ``--block-size`` override.
        max_num_batched_tokens: vLLM ``--max-num-batched-tokens`` override.
        max_num_seqs: vLLM ``--max-num-seqs`` override.
        max_model_len: vLLM ``--max-model-len`` override.
        engine_hash: Block hash of the engines: vLLM's default ``sha256`` (events carry the
            hashes a real vLLM would send) or the emulator's faster ``xxh3``.
        hash_seed: The pods' PYTHONHASHSEED (empty = unset, as vLLM's default).
        tokenizer: Tokenizer directory (or ``tokenizer.json``) for text prompts, chat rendering
            and output text; None = token-id prompts only.
        kv_events: Publish KV events.
        kv_events_connect: Connect every pod's PUB socket to this endpoint (a router bound
            there, e.g. ``tcp://127.0.0.1:5557``) instead of binding one per pod.
        kv_events_base_port: Publisher port of pod 0 (pod i: ``+2i``, its replay ROUTER
            ``+2i+1``); 0 = free ports.
        kv_topic: Topic template (``{pod}`` = ``<address>:<port>``, ``{model}``); ``""`` sends
            vLLM's default empty topic.
        replay: Bind a replay ROUTER per pod (vLLM's ``replay_endpoint``).
        buffer_steps: Batches kept for replay (vLLM's ``buffer_steps``).
        default_max_tokens: Tokens generated when a request gives no ``max_tokens`` (vLLM: 16
            for completions; for chat it generates up to the context limit, which an emulator
            that ignores EOS should not do).
        prompt_tokens_details: Report ``usage.prompt_tokens_details.cached_tokens`` (vLLM's
            ``--enable-prompt-tokens-details``).
        event_format: Wire format of the published KV events: ``vllm``, or ``sglang`` (an
            SGLang >= 0.5.20 publisher's payloads, for the engine seam's live tests).
    """

    profile: str = "llama-3.1-8b-1xh100"
    model: str | None = None
    num_pods: int = Field(3, ge=1, le=256)
    speedup: float = Field(1.0, gt=0, le=10_000)
    host: str = "127.0.0.1"
    base_port: int = Field(0, ge=0, le=65535)
    num_gpu_blocks: int | None = Field(None, ge=2)
    block_size: int | None = Field(None, ge=1, le=4096)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    engine_hash: Literal["sha256", "xxh3"] = "sha256"
    hash_seed: str = ""
    tokenizer: str | None = None
    kv_events: bool = True
    kv_events_connect: str | None = None
    kv_events_base_port: int = Field(0, ge=0, le=65535)
    kv_topic: str = "kv@{pod}@{model}"
    replay: bool = True
    buffer_steps: int = Field(10_000, ge=1)
    default_max_tokens: int = Field(16, ge=1)
    prompt_tokens_details: bool = True
    event_format: Literal["vllm", "sglang"] = "vllm"

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in PROFILES:
            raise ValueError(f"unknown profile {value!r}; valid: {sorted(PROFILES)}")
        return value

    @field_validator("kv_topic")
    @classmethod
    def _topic_template(cls, value: str) -> str:
        try:
            value.format(pod="p", model="m")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"bad topic template (use {{pod}} and {{model}}): {exc}") from None
        return value

    def engine_profile(self) -> EngineProfile:
        """The profile with this config's overrides."""
        return get_profile(self.profile).with_overrides(
            block_size=self.block_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
        )

    @property
    def model_name(self) -> str:
        """The served model name."""
        return self.model or get_profile(self.profile).model.name


class OutputText:
    """Deterministic output tokens and their text.

    Generated tokens are drawn, with a seed taken from the prompt's token ids (the same prompt
    gets the same answer on every pod, as greedy decoding would), from the tokenizer's
    ordinary word tokens (a space and letters, which decode on their own), so the text of a
    stream is the concatenation of its chunks. Without a tokenizer, ids from a fixed range are
    used and read ``" t<id>"``.

    Args:
        tokenizer: Tokenizer directory or ``tokenizer.json`` path; None = synthetic tokens.

    Raises:
        ConfigError: The tokenizer cannot be loaded or has no usable tokens.
    """

    def __init__(self, tokenizer: str | Path | None = None) -> None:
        self._pieces: dict[int, str] = {}
        self._tokenizer: Any = None
        if tokenizer is None:
            ids = np.arange(1000, 1000 + 4096, dtype=np.int32)
            self.vocab_size: int | None = None
            self._synthetic = True
        else:
            ids = self._load(Path(tokenizer))
            self._synthetic = False
        self.candidates = ids

    def _load(self, path: Path) -> np.ndarray:
        from tokenizers import Tokenizer

        file = path if path.is_file() else path / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise ConfigError(f"cannot load tokenizer: {exc}", str(file)) from None
        self._tokenizer = tok
        special = set(tok.get_added_tokens_decoder())
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        words: list[int] = []
        others: list[int] = []
        for i in range(tok.get_vocab_size(with_added_tokens=False)):
            if i in special:
                continue
            text = tok.decode([i], skip_special_tokens=True)
            if not text or "\ufffd" in text or not text.isprintable():
                continue
            if len(text) > 2 and text[0] == " " and text[1:].isascii() and text[1:].isalpha():
                words.append(i)
            else:
                others.append(i)
            self._pieces[i] = text
        chosen = words if len(words) >= 16 else words + others
        if not chosen:
            raise ConfigError("the tokenizer has no token usable as output", str(file))
        return np.asarray(chosen, dtype=np.int32)

    def tokens(self, prompt: np.ndarray, n: int) -> np.ndarray:
        """`n` output token ids for `prompt` (deterministic)."""
        seed = xxhash.xxh64_intdigest(np.ascontiguousarray(prompt, dtype="<i4").tobytes())
        rng = np.random.default_rng(seed)
        picked: np.ndarray = self.candidates[rng.integers(0, len(self.candidates), n)]
        return picked

    def text(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of output tokens `ids` (the concatenation of their pieces)."""
        if self._synthetic:
            return "".join(f" t{int(i)}" for i in ids)
        pieces = self._pieces
        return "".join(pieces.get(int(i), "") for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of any token ids, special tokens included (vLLM's ``/detokenize``)."""
        if self._tokenizer is None:
            return self.text(ids)
        text: str = self._tokenizer.decode(list(ids), skip_special_tokens=False)
        return text

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        """Each id's vocabulary entry (``convert_ids_to_tokens``), for ``return_token_strs``."""
        if self._tokenizer is None:
            return [f"t{int(i)}" for i in ids]
        tok = self._tokenizer
        return [tok.id_to_token(int(i)) or "" for i in ids]


class PodFailure:
    """What a handler receives when its requests cannot finish (the engine failed)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class LiveRequest:
    """One engine request of an HTTP request (one choice): its state as handlers see it.

    Attributes:
        engine_request: The engine's request.
        job: The HTTP request it belongs to.
        index: Its choice index.
        sent: Output tokens handed to the handler so far.
    """

    __slots__ = ("engine_request", "index", "job", "sent")

    def __init__(self, engine_request: EngineRequest, job: Job, index: int) -> None:
        self.engine_request = engine_request
        self.job = job
        self.index = index
        self.sent = 0

    @property
    def output_tokens(self) -> np.ndarray:
        """All the tokens this request will generate."""
        return self.engine_request.sim.output_tokens

    @property
    def cached_tokens(self) -> int:
        """Prefix-cache hit at its first admission (vLLM's ``num_cached_tokens``)."""
        return max(self.engine_request.num_cached_tokens, 0)

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens."""
        return self.engine_request.num_prompt_tokens


class Job:
    """The engine requests of one HTTP request and the queue of their progress.

    The step task puts ``(choice index, tokens generated so far, finished)`` tuples (or a
    `PodFailure`) on `queue` after every step that advanced one of them.
    """

    __slots__ = ("finished", "queue", "requests")

    def __init__(self) -> None:
        self.requests: list[LiveRequest] = []
        self.queue: asyncio.Queue[tuple[int, int, bool] | PodFailure] = asyncio.Queue()
        self.finished = 0

    @property
    def done(self) -> bool:
        """Whether every choice finished."""
        return self.finished >= len(self.requests)


class LivePod:
    """One emulated vLLM server (HTTP + engine + KV-event publisher) on the event loop.

    Args:
        index: Pod number in its fleet (``sim-<index>``).
        config: Fleet settings.
        profile: The engine profile.
        hasher: Block hasher (shared by the fleet, like pods sharing vLLM's hash settings).
        text: Output tokens and their text.
        tokenization: Tokenizes text prompts and renders chat exactly as the scorer does (None
            = token-id prompts only).
        context: ZMQ context for the publisher sockets.
    """

    def __init__(
        self,
        index: int,
        config: LivePodsConfig,
        profile: EngineProfile,
        hasher: BlockHasher,
        text: OutputText,
        tokenization: TokenizationService | None,
        context: zmq.Context[Any],
    ) -> None:
        self.index = index
        self.name = f"sim-{index}"
        self.config = config
        self.profile = profile
        self.hasher = hasher
        self.text = text
        self.tokenization = tokenization
        self.model = config.model_name
        self.speedup = config.speedup
        self.host = config.host
        self.port = config.base_port + index if config.base_port else 0
        self._context = context
        self.kv_endpoint: str | None = None
        self.replay_endpoint: str | None = None
        self.topic = ""
        self.engine: Engine | None = None
        self.publisher: VllmEventPublisher | None = None
        self.running = False
        self.failed: str | None = None
        #: Times the pod was started (a restart increments it).
        self.starts = 0
        #: KV-event batches and bytes published since the last start.
        self.batches_published = 0
        self.bytes_published = 0
        #: Requests completed and aborted since the last start.
        self.requests_finished = 0
        self.requests_aborted = 0
        self._encoder = EventEncoder() if config.event_format == "vllm" else SGLangEventEncoder()
        self._live: dict[str, LiveRequest] = {}
        self._ops: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count()
        self._epoch = 0.0
        self._subscribed = False

    # -- identity -------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        """Endpoint id ``<address>:<port>`` (the scheduler's and the index's pod id)."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """Base URL of the HTTP server."""
        return f"http://{self.host}:{self.port}"

    def endpoint_entry(self, *, kv_events: bool = True) -> dict[str, Any]:
        """This pod's entry of an endpoints file (with its publisher for connect mode)."""
        entry: dict[str, Any] = {
            "name": self.name,
            "address": self.host,
            "port": self.port,
            "model": self.model,
            "labels": {"llm-d.ai/role": "decode"},
        }
        if kv_events and self.kv_endpoint and not self.config.kv_events_connect:
            entry["kvEvents"] = self.kv_endpoint
            if self.replay_endpoint:
                entry["kvEventsReplay"] = self.replay_endpoint
        return entry

    def event_sources(self) -> dict[str, dict[str, Any]]:
        """vLLM's ``GET /kv_event_sources``: ``{dp_rank: KVEventsConfig}`` as served."""
        if self.publisher is None:
            return {}
        cfg = self.config
        return {
            "0": {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": self.kv_endpoint,
                "replay_endpoint": self.replay_endpoint,
                "buffer_steps": cfg.buffer_steps,
                "hwm": 100_000,
                "max_queue_size": 100_000,
                "topic": self.topic,
            }
        }

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine task, the publisher and the HTTP server (same ports on a restart).

        Raises:
            OSError: A port is taken.
            zmq.ZMQError: A publisher socket cannot be opened.
        """
        from aiohttp import web

        from kvaware_scorer.sim.server import make_app

        if self.running:
            return
        self.engine = Engine(self.profile, self.hasher, num_gpu_blocks=self.config.num_gpu_blocks)
        self.failed = None
        self._subscribed = False
        self.batches_published = self.bytes_published = 0
        self.requests_finished = self.requests_aborted = 0
        loop = asyncio.get_running_loop()
        self._epoch = loop.time()
        self._wake = asyncio.Event()
        runner = web.AppRunner(
            make_app(self), access_log=None, handler_cancellation=True, shutdown_timeout=0.05
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
            self.port = int(runner.addresses[0][1])
            await self._open_publisher()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._task = asyncio.create_task(self._run(), name=f"kvaware-sim-{self.name}")
        self.running = True
        self.starts += 1
        logger.info("%s listening on %s (KV events %s)", self.name, self.url, self.kv_endpoint)

    async def _open_publisher(self) -> None:
        import zmq

        from kvaware_scorer.events.publisher import VllmEventPublisher

        cfg = self.config
        if not cfg.kv_events:
            return
        self.topic = cfg.kv_topic.format(pod=self.id, model=self.model)
        if cfg.kv_events_connect:
            endpoint, bind = cfg.kv_events_connect, False
        else:
            port = cfg.kv_events_base_port + 2 * self.index if cfg.kv_events_base_port else "*"
            endpoint, bind = self.kv_endpoint or f"tcp://{self.host}:{port}", True
        replay: str | None = None
        if cfg.replay:
            rport = cfg.kv_events_base_port + 2 * self.index + 1 if cfg.kv_events_base_port else "*"
            replay = self.replay_endpoint or f"tcp://{self.host}:{rport}"
        # NOTE: on a restart the ports just closed are bound again; ZMQ releases a closed
        # socket's port from its I/O thread, a moment later.
        deadline = asyncio.get_running_loop().time() + _REBIND_TIMEOUT_S
        while True:
            try:
                self.publisher = VllmEventPublisher(
                    endpoint,
                    replay_endpoint=replay,
                    topic=self.topic,
                    buffer_steps=cfg.buffer_steps,
                    bind=bind,
                    context=self._context,
                )
                break
            except zmq.ZMQError as exc:
                retry = self.starts > 0 and exc.errno == errno.EADDRINUSE
                if not retry or asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.01)
        self.kv_endpoint = self.publisher.endpoint
        self.replay_endpoint = self.publisher.replay_endpoint

    async def stop(self) -> None:
        """Kill the pod: the engine stops, open connections are dropped (streams break off),
        the publisher closes. Idempotent."""
        if not self.running:
            return
        self.running = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.exception("%s: step task failed", self.name)
        for _op, fut in self._ops:
            if not fut.done():
                fut.set_exception(ConnectionError("the pod stopped"))
        self._ops.clear()
        self._live.clear()
        runner, self._runner = self._runner, None
        publisher, self.publisher = self.publisher, None
        try:
            if runner is not None:
                await runner.cleanup()
        finally:
            if publisher is not None:
                publisher.close()
        logger.info("%s stopped", self.name)

    async def wait_for_subscriber(self, timeout: float = 5.0) -> bool:
        """Wait until a subscriber has joined this pod's publisher (since its last start).

        ZMQ PUB drops what it sends before a subscriber is connected ("slow joiner"); tests and
        the demo wait here before sending requests whose KV events must arrive.

        Returns:
            Whether one joined within `timeout` seconds (False without a publisher).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.publisher is not None:
            if self._subscribed or self.publisher.wait_for_subscriber(0):
                self._subscribed = True
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return False

    async def restart(self) -> None:
        """Stop, then start again on the same ports: empty KV cache, event seq back at 0."""
        await self.stop()
        await self.start()

    # -- requests -------------------------------------------------------------------------------

    def new_request(
        self, prompt: Sequence[int], max_tokens: int, cache_salt: str | None = None
    ) -> SimRequest:
        """A request for the engine (output tokens chosen here)."""
        ids = np.asarray(prompt, dtype=np.int32)
        loop_now = asyncio.get_running_loop().time()
        return SimRequest(
            request_id=f"{self.name}-{next(self._ids)}",
            arrival_time=(loop_now - self._epoch) * self.speedup,
            prompt=ids,
            output_tokens=self.text.tokens(ids, max_tokens),
            cache_salt=cache_salt or None,
        )

    async def hash_prompts(self, requests: Sequence[SimRequest]) -> None:
        """Compute long prompts' block hashes off the event loop (vLLM's sha256 is ~1 ms per
        4k tokens); short ones are hashed when queued."""
        for r in requests:
            if len(r.prompt) >= _HASH_OFF_LOOP_TOKENS and r.block_hashes is None:
                hashes, state = await asyncio.to_thread(
                    self.hasher.chain, r.prompt, 0, None, r.lora_name, r.cache_salt
                )
                r.block_hashes, r.hash_state = hashes, state

    def validate(self, request: SimRequest) -> str | None:
        """Why vLLM would refuse `request` with a 400, or None."""
        if self.engine is None:
            return "the pod is not running"
        return self.engine.validate(request)

    def submit(self, requests: Sequence[SimRequest]) -> Job:
        """Queue `requests` (validated by the caller) as one HTTP request's choices.

        Raises:
            ConnectionError: The pod is not running or its engine failed.
            ValueError: A request is invalid (nothing was queued).
        """
        engine = self.engine
        if not self.running or engine is None or self._wake is None:
            raise ConnectionError("the pod is not running")
        if self.failed is not None:
            raise ConnectionError(self.failed)
        for r in requests:
            reason = engine.validate(r)
            if reason is not None:
                raise ValueError(reason)
        job = Job()
        for i, r in enumerate(requests):
            lr = LiveRequest(engine.add_request(r), job, i)
            self._live[r.request_id] = lr
            job.requests.append(lr)
        self._wake.set()
        return job

    def abort(self, job: Job) -> None:
        """Abort `job`'s unfinished requests at the next step boundary (frees their blocks)."""
        if job.done or not self.running:
            return
        pending = [lr for lr in job.requests if lr.engine_request.request_id in self._live]
        if not pending:
            return

        def apply() -> None:
            engine = self.engine
            if engine is None:
                return
            for lr in pending:
                rid = lr.engine_request.request_id
                if self._live.pop(rid, None) is not None and engine.abort_request(
                    lr.engine_request
                ):
                    self.requests_aborted += 1

        # Nobody awaits an abort: a pod killed before applying it fails the future, and that
        # failure must be retrieved here or asyncio logs it as an error.
        self._call_between_steps(apply).add_done_callback(_retrieve)

    async def reset_prefix_cache(self) -> bool:
        """vLLM's ``reset_prefix_cache`` between steps; on success ``AllBlocksCleared`` is
        published at once. Fails (False) while any block is in use.

        Raises:
            ConnectionError: The pod is not running.
        """

        def apply() -> bool:
            engine = self.engine
            if engine is None:
                return False
            ok = engine.reset_prefix_cache()
            events = engine.pool.take_events()
            if events:
                self._publish(events)
            return ok

        result: bool = await self._call_between_steps(apply)
        return result

    def _call_between_steps(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        if not self.running or self._wake is None:
            raise ConnectionError("the pod is not running")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops.append((fn, fut))
        self._wake.set()
        return fut

    # -- the step task ----------------------------------------------------------------------------

    def _virtual(self, t: float) -> float:
        return (t - self._epoch) * self.speedup

    def _run_ops(self) -> None:
        ops, self._ops = self._ops, []
        for fn, fut in ops:
            try:
                result = fn()
            except Exception as exc:
                logger.exception("%s: between-steps operation failed", self.name)
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(result)

    async def _run(self) -> None:
        """vLLM's busy loop in real time: step while there is work, sleep otherwise."""
        engine = self.engine
        wake = self._wake
        assert engine is not None and wake is not None
        loop = asyncio.get_running_loop()
        speedup = self.speedup
        deadline: float | None = None
        while True:
            if not self._ops and not engine.has_work():
                deadline = None
                wake.clear()
                await wake.wait()
            if self._ops:
                self._run_ops()
            if not engine.has_work():
                continue
            try:
                now = loop.time()
                start = now if deadline is None else max(deadline, now - MAX_CATCH_UP_S)
                duration = engine.begin_step(self._virtual(now))
                deadline = start + duration / speedup
                delay = deadline - loop.time()
                # NOTE: always yield, even for a step already due, so HTTP handlers run.
                await asyncio.sleep(delay if delay > 0 else 0)
                out = engine.finish_step(self._virtual(loop.time()))
                if out.events:
                    self._publish(out.events)
                self._deliver(out)
            except asyncio.CancelledError:
                raise
            except Exception:
                # NOTE: the engine's state cannot be trusted after a failed step (vLLM's engine
                # core dies too): fail every open request and refuse new ones.
                logger.exception("%s: engine step failed; the pod stops serving", self.name)
                self._fail_all("the emulated engine failed")
                return

    def _publish(self, events: Sequence[KVEvent]) -> None:
        publisher = self.publisher
        if publisher is None:
            return
        payload = self._encoder.encode(time.time(), events, 0)
        try:
            publisher.publish(payload)
        except Exception:
            logger.exception("%s: publishing a KV-event batch failed", self.name)
            return
        self.batches_published += 1
        self.bytes_published += len(payload)

    def _deliver(self, out: StepOutput) -> None:
        live = self._live
        if not live:
            return
        engine = self.engine
        assert engine is not None
        for batch in (engine.running, out.finished):
            for r in batch:
                lr = live.get(r.request_id)
                if lr is None:
                    continue
                n = r.num_output_tokens
                done = r.status is RequestStatus.FINISHED
                if n == lr.sent and not done:
                    continue
                lr.sent = n
                if done:
                    del live[r.request_id]
                    lr.job.finished += 1
                    self.requests_finished += 1
                lr.job.queue.put_nowait((lr.index, n, done))

    def _fail_all(self, message: str) -> None:
        self.failed = message
        failure = PodFailure(message)
        jobs = {id(lr.job): lr.job for lr in self._live.values()}
        self._live.clear()
        for job in jobs.values():
            job.queue.put_nowait(failure)

    # -- tokenization ---------------------------------------------------------------------------

    async def tokenize(
        self,
        prompt: str | None = None,
        messages: Sequence[Any] | None = None,
        **options: Any,
    ) -> list[int]:
        """Token ids of a text prompt or chat messages, as vLLM computes them (off the loop).

        Raises:
            LookupError: The pod has no tokenizer.
            ValueError: Malformed messages or options (a 400).
        """
        if self.tokenization is None:
            raise LookupError(
                "this emulated pod has no tokenizer (start it with --tokenizer); "
                "send the prompt as token ids"
            )
        ids = await self.tokenization.atokenize(
            self.model, prompt=prompt, messages=messages, **options
        )
        return ids


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class LiveFleet:
    """N live pods sharing one tokenizer, hasher and ZMQ context.

    Args:
        config: The fleet (a `LivePodsConfig` or its camelCase dict form).

    Example:
        >>> async with LiveFleet(LivePodsConfig(num_pods=3, speedup=10)) as fleet:
        ...     fleet.write_endpoints("endpoints.yaml")  # doctest: +SKIP
    """

    def __init__(self, config: LivePodsConfig | dict[str, Any] | None = None) -> None:
        if config is None:
            config = LivePodsConfig()
        elif not isinstance(config, LivePodsConfig):
            from kvaware_scorer.config import load_model

            config = load_model(LivePodsConfig, config, "livePods")
        self.config = config
        self.profile = config.engine_profile()
        self.hasher = make_hasher(config.engine_hash, self.profile.block_size, config.hash_seed)
        self.pods: list[LivePod] = []
        self.tokenization: TokenizationService | None = None
        self._context: zmq.Context[Any] | None = None

    @property
    def num_gpu_blocks(self) -> int:
        """KV blocks per pod."""
        return self.config.num_gpu_blocks or self.profile.num_gpu_blocks

    async def start(self) -> None:
        """Load the tokenizer (off the loop) and start every pod.

        Raises:
            ConfigError: The tokenizer cannot be loaded.
            OSError: A port is taken.
        """
        import zmq

        cfg = self.config
        text = await asyncio.to_thread(OutputText, cfg.tokenizer)
        if cfg.tokenizer is not None:
            from kvaware_scorer.tokenization import TokenizationService

            path = Path(cfg.tokenizer)
            self.tokenization = TokenizationService(
                TokenizersPoolConfig(
                    workers_count=2,
                    local=LocalTokenizerConfig(model_tokenizer_map={cfg.model_name: str(path)}),
                ),
                # NOTE: pods are the ground truth: always a full tokenization, never a cached
                # prefix of one.
                PrefixStoreConfig(cache_size=0),
            )
            try:
                await self.tokenization.atokenize(cfg.model_name, prompt="warm up")
            except Exception as exc:
                self.tokenization.close()
                self.tokenization = None
                raise ConfigError(f"cannot load the tokenizer: {exc}", "tokenizer") from None
        self._context = zmq.Context()
        self.pods = [
            LivePod(i, cfg, self.profile, self.hasher, text, self.tokenization, self._context)
            for i in range(cfg.num_pods)
        ]
        try:
            for pod in self.pods:
                await pod.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every pod and release the tokenizer and the ZMQ context."""
        for pod in self.pods:
            try:
                await pod.stop()
            except Exception:
                logger.exception("stopping %s failed", pod.name)
        if self.tokenization is not None:
            self.tokenization.close()
            self.tokenization = None
        if self._context is not None:
            # NOTE: destroy, not term: a publisher whose construction failed half way (a port
            # taken) leaves a socket open, and term() would wait for it forever. Every pod is
            # stopped by now, so no other thread uses a socket of this context.
            self._context.destroy(linger=0)
            self._context = None

    def pod(self, key: str | int) -> LivePod:
        """A pod by index, name or endpoint id.

        Raises:
            KeyError: No such pod.
        """
        for i, pod in enumerate(self.pods):
            if key in (i, pod.name, pod.id):
                return pod
        raise KeyError(key)

    def endpoints(
        self, *, kv_events: bool = True, pods: Sequence[LivePod] | None = None
    ) -> dict[str, Any]:
        """An endpoints file for the pods (``kvEvents`` of each for connect mode)."""
        chosen = self.pods if pods is None else pods
        return {"endpoints": [p.endpoint_entry(kv_events=kv_events) for p in chosen]}

    def write_endpoints(
        self,
        path: str | Path,
        *,
        kv_events: bool = True,
        pods: Sequence[LivePod] | None = None,
    ) -> Path:
        """Write `endpoints` to `path` atomically (a watcher never sees half a file)."""
        out = Path(path)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(yaml.safe_dump(self.endpoints(kv_events=kv_events, pods=pods)))
        tmp.replace(out)
        return out

    async def __aenter__(self) -> LiveFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
