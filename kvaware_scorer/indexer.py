"""The facade: ``Indexer.score(...)`` on the read path, ``Indexer.ingest(...)`` on the write path.

An `Indexer` owns a keyer (tokens -> block keys), an index backend, the tier weights and the
metrics; it optionally owns tokenization (text -> tokens) and event ingestion (an
`EventIngestor`, built on first use from the index, keyer, tiers and metrics, which applies KV
events to the index). It wires these parts and delegates to them; none of them calls back into
it. Scoring never raises into a scheduler for data or backend problems: a missing tokenizer or
an unreachable backend yields zeros, a counted reason and a log line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

from kvaware_scorer.config import IndexerConfig, load_model
from kvaware_scorer.errors import (
    BackendUnavailableError,
    KeyDerivationError,
    KVAwareError,
    TokenizerNotFoundError,
)
from kvaware_scorer.events.apply import index_stats, purge_index
from kvaware_scorer.index import KVBlockIndex, create_index, tier_table
from kvaware_scorer.index.base import IndexStats
from kvaware_scorer.keys import BlockKey, make_keyer
from kvaware_scorer.metrics import Metrics
from kvaware_scorer.scoring import PodScore, ScoreResult, score_matches

if TYPE_CHECKING:
    from kvaware_scorer.events.ingest import EventIngestor
    from kvaware_scorer.tokenization import TokenizationService

__all__ = ["Indexer"]

logger = logging.getLogger(__name__)

#: Seconds between two log lines about failed index lookups.
_LOOKUP_LOG_INTERVAL = 10.0


class Indexer:
    """Scores candidate pods by the longest run of prompt blocks each already holds.

    Args:
        config: An `IndexerConfig`, or its upstream camelCase dict form; None = defaults
            (embedded in-memory index, derived keys, block size 16).
        index: Use this backend instead of building one from `config`.
        metrics: Share a `Metrics` (and its registry); a private one is made otherwise.
        ingest: Whether this process applies KV events (False for score-only replicas that
            read a shared Redis index written by another process).
        clock: Monotonic clock for speculative entries' TTL (the emulator's virtual clock).

    Example:
        >>> indexer = Indexer(IndexerConfig())
        >>> indexer.score(model="m", token_ids=list(range(64)), pods=["10.0.0.1:8000"])
        {'10.0.0.1:8000': 0.0}
    """

    def __init__(
        self,
        config: IndexerConfig | Mapping[str, Any] | None = None,
        *,
        index: KVBlockIndex | None = None,
        metrics: Metrics | None = None,
        ingest: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config is None:
            config = IndexerConfig()
        elif not isinstance(config, IndexerConfig):
            config = load_model(IndexerConfig, dict(config))
        self.config = config
        tp = config.token_processor_config
        self.keyer = make_keyer(
            tp.key_mode,
            tp.block_size,
            tp.hash_seed,
            tp.hash_algorithm,
            tp.lora_adapters,
            tp.vllm_hash_generation,
        )
        self.block_size = tp.block_size
        self.tiers = tier_table(config)
        self.index: KVBlockIndex = index if index is not None else create_index(config, clock)
        self.metrics = metrics or Metrics()
        self.ingest_enabled = ingest
        self._lock = threading.Lock()
        self._tokenization: TokenizationService | None = None
        self._ingestor: EventIngestor | None = None
        self._executor: ThreadPoolExecutor | None = None
        # lookup failures not logged yet, and when the next log line may be written
        self._unlogged_lookup_errors = 0
        self._next_lookup_log = 0.0

    # -- tokens and keys --------------------------------------------------------------------

    @property
    def tokenization(self) -> TokenizationService:
        """Text -> token ids (built on first use; needs the ``tokenizers`` extra)."""
        if self._tokenization is None:
            with self._lock:
                if self._tokenization is None:
                    from kvaware_scorer.tokenization import TokenizationService

                    self._tokenization = TokenizationService(
                        self.config.tokenizers_pool_config,
                        self.config.prefix_store_config,
                        metrics=self.metrics,
                    )
        return self._tokenization

    def tokens(
        self,
        model: str,
        token_ids: Sequence[int] | None = None,
        prompt: str | Sequence[int] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        **chat: Any,
    ) -> list[int]:
        """Token ids for a request: given ids as they are (a list is returned itself, not a
        copy), else tokenized like vLLM does.

        Text goes through the prefix store first: when a cached prefix covers at least
        ``minPrefixOverlapRatio`` of it, only those leading tokens are returned (enough to
        score, without tokenizing); see `TokenizationService.tokenize_request`.

        Args:
            model: Served model name (selects the tokenizer).
            token_ids: The prompt as token ids (used as they are).
            prompt: Completion prompt text, or token ids (used as they are).
            messages: Chat messages, rendered with the model's chat template.
            **chat: vLLM request fields: ``add_special_tokens``, and for messages
                ``chat_template``, ``chat_template_kwargs``, ``tools``,
                ``add_generation_prompt``, ``continue_final_message``, ``documents``,
                ``reasoning_effort``.

        Raises:
            TokenizerNotFoundError: No tokenizer for `model`.
            ValueError: None or several of `token_ids`, `prompt`, `messages` given, or a
                malformed chat request.
        """
        given = sum(x is not None for x in (token_ids, prompt, messages))
        if given != 1:
            raise ValueError("give exactly one of token_ids, prompt or messages")
        # NOTE: a list is used as it is, not copied (an 8k-token copy is ~10% of a score call)
        if token_ids is not None:
            return token_ids if isinstance(token_ids, list) else list(token_ids)
        if prompt is not None and not isinstance(prompt, str):
            # a prompt given as token ids is used as it is (as vLLM does)
            return prompt if isinstance(prompt, list) else list(prompt)
        ids: list[int] = self.tokenization.tokenize(model, prompt=prompt, messages=messages, **chat)
        return ids

    def block_keys(
        self,
        token_ids: Sequence[int],
        model: str,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> list[BlockKey]:
        """The index keys of every full block of `token_ids` in this request's namespace."""
        return cast(
            "list[BlockKey]", self.keyer.block_keys(token_ids, model, lora_name, cache_salt)
        )

    # -- scoring ------------------------------------------------------------------------------

    def match(
        self,
        model: str,
        token_ids: Sequence[int] | None = None,
        pods: Sequence[str] | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        *,
        prompt: str | Sequence[int] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        **chat: Any,
    ) -> ScoreResult:
        """Like `score`, with every pod's matched blocks, tiers and any degradation reason."""
        t0 = time.perf_counter()
        metrics = self.metrics
        bs = self.block_size
        try:
            ids = self.tokens(model, token_ids, prompt, messages, **chat)
            keys = self.block_keys(ids, model, lora_name, cache_salt)
        except (TokenizerNotFoundError, KeyDerivationError) as exc:
            reason = "tokenizer" if isinstance(exc, TokenizerNotFoundError) else "keys"
            metrics.score_errors.labels(reason).inc()
            # NOTE: the registry warns once per model without a tokenizer; not once per call.
            log = logger.debug if reason == "tokenizer" else logger.warning
            log("scoring %s as zeros: %s", model, exc)
            return ScoreResult(0, bs, {p: PodScore(0.0) for p in pods or ()}, error=str(exc))
        result = self.match_keys(keys, pods, t0=t0)
        result.tokens = len(ids)
        return result

    def match_keys(
        self, keys: Sequence[int], pods: Sequence[str] | None = None, *, t0: float | None = None
    ) -> ScoreResult:
        """Score `pods` for a prompt given as block keys (see `block_keys`).

        For callers that derive keys once and reuse them (the scheduler's pre-request hook
        records the same keys as speculative entries). A backend failure yields zeros, a counted
        reason and a log line, never an exception.

        Args:
            keys: The prompt's block keys, from block 0.
            pods: Candidate pod ids; None or empty = every pod the index knows (as upstream).
            t0: `time.perf_counter()` at the start of the request, for the latency histogram.
        """
        if t0 is None:
            t0 = time.perf_counter()
        if pods is not None and not pods:
            pods = None
        metrics = self.metrics
        bs = self.block_size
        total = len(keys)
        try:
            matches = self.index.lookup(cast("Sequence[BlockKey]", keys), pods) if keys else {}
        except (BackendUnavailableError, KVAwareError, OSError) as exc:
            metrics.score_errors.labels("backend").inc()
            metrics.backend_errors.labels("lookup").inc()
            self._warn_lookup(exc)
            return ScoreResult(total, bs, {p: PodScore(0.0) for p in pods or ()}, error=str(exc))
        cfg = self.config
        candidates = pods if pods is not None else list(matches)
        scored = score_matches(
            matches, candidates, total, bs, cfg.match_length_weight, cfg.match_length_scale_tokens
        )
        metrics.lookups.inc()
        metrics.lookup_blocks.inc(total)
        if matches:
            metrics.hit_blocks.inc(max(m.blocks for m in matches.values()))
        metrics.score_latency.observe(time.perf_counter() - t0)
        return ScoreResult(total, bs, scored)

    def score(
        self,
        model: str,
        token_ids: Sequence[int] | None = None,
        pods: Sequence[str] | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        *,
        prompt: str | Sequence[int] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        **chat: Any,
    ) -> dict[str, float]:
        """Score `pods` for a request: fraction of its full blocks each holds from block 0.

        Args:
            model: Served model name (namespaces keys).
            token_ids: The prompt as token ids; or give `prompt` (text) or `messages` (chat).
            pods: Candidate pod ids; None or empty = every pod the index knows.
            lora_name: LoRA adapter name (keys are namespaced by it instead of the model).
            cache_salt: vLLM ``cache_salt`` (isolates tenants).
            prompt: Completion prompt text (or token ids).
            messages: Chat messages, rendered with the model's chat template.
            **chat: ``chat_template``, ``chat_template_kwargs``, ``tools``,
                ``add_generation_prompt``, ``add_special_tokens`` as in vLLM's request.

        Returns:
            Pod -> score in [0, 1]; pods never seen score 0.
        """
        return self.match(
            model, token_ids, pods, lora_name, cache_salt, prompt=prompt, messages=messages, **chat
        ).scores()

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        max_workers=self.config.tokenizers_pool_config.workers_count,
                        thread_name_prefix="kvaware-score",
                    )
        return self._executor

    async def amatch(
        self,
        model: str,
        token_ids: Sequence[int] | None = None,
        pods: Sequence[str] | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        **kwargs: Any,
    ) -> ScoreResult:
        """`match` on the bounded worker pool, so tokenization never blocks the event loop."""
        loop = asyncio.get_running_loop()
        call = functools.partial(
            self.match, model, token_ids, pods, lora_name, cache_salt, **kwargs
        )
        return await loop.run_in_executor(self._pool(), call)

    async def ascore(
        self,
        model: str,
        token_ids: Sequence[int] | None = None,
        pods: Sequence[str] | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        **kwargs: Any,
    ) -> dict[str, float]:
        """`score` on the bounded worker pool, so tokenization never blocks the event loop."""
        result = await self.amatch(model, token_ids, pods, lora_name, cache_salt, **kwargs)
        return result.scores()

    # -- writes -------------------------------------------------------------------------------

    @property
    def ingestor(self) -> EventIngestor:
        """Applies KV-event frames to the index (built on first use); the `EventSink` a
        `KVEventSubscriber` hands frames to."""
        if self._ingestor is None:
            with self._lock:
                if self._ingestor is None:
                    from kvaware_scorer.events.ingest import EventIngestor

                    self._ingestor = EventIngestor(
                        self.index,
                        self.keyer,
                        self.block_size,
                        tier_names=self.tiers.names,
                        default_tier=self.config.default_tier,
                        metrics=self.metrics,
                    )
        return self._ingestor

    def ingest(
        self,
        pod: str,
        model: str | None,
        payload: bytes,
        seq: int | None = None,
        engine: str = "vllm",
    ) -> None:
        """Apply one KV-event payload frame (msgpack ``EventBatch``) from `pod`.

        Malformed payloads are dropped and counted, never raised. `seq` is the frame's sequence
        number when known: gaps and restarts are detected from it. `engine` names the wire
        format: ``"vllm"`` (default) or ``"sglang"`` (needs ``derived`` key mode).

        Raises:
            ValueError: `engine` names no known wire format.
        """
        self.ingestor.ingest(pod=pod, model=model, payload=payload, seq=seq, engine=engine)

    def record_speculative(self, pod: str, keys: Sequence[int], ttl: float) -> None:
        """Count `keys` as held by `pod` for `ttl` seconds (a routing decision in flight)."""
        try:
            self.index.add_speculative(pod, cast("Sequence[BlockKey]", keys), ttl)
        except (KVAwareError, OSError) as exc:
            self.metrics.backend_errors.labels("speculative").inc()
            logger.warning("speculative insert failed: %s", exc)

    def purge_pod(self, pod: str, reason: str = "manual") -> int:
        """Forget everything indexed for `pod` (and the ingestor's streams of it). Returns the
        entries dropped."""
        if self._ingestor is not None:
            return self._ingestor.purge_pod(pod, reason)
        return purge_index(self.index, self.metrics, pod, reason)

    def stats(self) -> IndexStats:
        """Index size and counters; also refreshes the size gauges."""
        return index_stats(self.index, self.metrics)

    def _warn_lookup(self, exc: BaseException) -> None:
        """Log a failed lookup at most once per `_LOOKUP_LOG_INTERVAL` seconds, with how many
        failed since the last line (an index down fails every score call)."""
        with self._lock:
            self._unlogged_lookup_errors += 1
            now = time.monotonic()
            if now < self._next_lookup_log:
                return
            count, self._unlogged_lookup_errors = self._unlogged_lookup_errors, 0
            self._next_lookup_log = now + _LOOKUP_LOG_INTERVAL
        logger.warning(
            "index lookup failed, scoring zeros (%d lookups failed since the last report): %s",
            count,
            exc,
        )

    def close(self) -> None:
        """Stop workers and release the backend."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._tokenization is not None:
            self._tokenization.close()
        self.index.close()

    def __enter__(self) -> Indexer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
