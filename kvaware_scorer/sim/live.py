"""Live emulated vLLM pods: the emulator engine in real time behind HTTP and ZMQ.

Each `LivePod` (``live_pod.py``) is one vLLM server: an `Engine` (vLLM v1's scheduler and KV-cache manager, see
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
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kvaware_scorer.config import (
    LocalTokenizerConfig,
    PrefixStoreConfig,
    TokenizersPoolConfig,
)
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.sim.hashing import make_hasher

if TYPE_CHECKING:
    import zmq

    from kvaware_scorer.tokenization import TokenizationService
from kvaware_scorer.sim.live_config import LivePodsConfig, OutputText
from kvaware_scorer.sim.live_pod import MAX_CATCH_UP_S, LivePod
from kvaware_scorer.sim.live_state import Job, LiveRequest, PodFailure

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

        from kvaware_scorer.sim.server import make_app

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
            LivePod(
                i, cfg, self.profile, self.hasher, text, self.tokenization, self._context, make_app
            )
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
