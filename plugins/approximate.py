"""``prefix-cache-scorer``: approximate prefix affinity from the scheduler's own routing history.

No KV events: every routing decision is remembered as "this pod now holds these prompt
blocks" in a bounded per-pod LRU (upstream's ``approx-prefix-cache-producer``, the "estimated"
baseline). Scoring walks the request's blocks from block 0 and counts, per candidate, how many
consecutive blocks were routed to it; ``score = w * min(1, matched_tokens / S) ** 2 +
(1 - w) * matched / total`` (w = ``matchLengthWeight``, S = ``matchLengthScaleTokens``).

Tokens: the request's token ids when given; else the shared tokenization when
``tokenizersPoolConfig`` is set (and a tokenizer is found); else a character estimate: the
UTF-8 bytes of the prompt (chat messages rendered as ``<|im_start|>role\\ncontent<|im_end|>\\n``)
packed 4 bytes per pseudo-token (``charsPerToken``), as upstream's "estimate" token producer.
"""

from __future__ import annotations

import array
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from kvaware_scorer.config import ConfigModel, PrefixStoreConfig, TokenizersPoolConfig
from kvaware_scorer.errors import ConfigError, KVAwareError
from kvaware_scorer.keys import DerivedKeyer
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
)
from kvaware_scorer.scheduler.matchinfo import (
    MatchInfo,
    MatchInfoProducer,
    match_sources,
    per_call,
    producer,
)
from kvaware_scorer.scoring import prefix_score

__all__ = [
    "ApproxPrefixCacheParams",
    "ApproxPrefixCacheScorer",
    "RoutingHistory",
    "estimate_tokens",
    "register",
]

logger = logging.getLogger(__name__)

#: Seconds between metrics scrapes when `autoTune` needs the pods' cache size.
AUTO_TUNE_SCRAPE_INTERVAL = 1.0


class ApproxPrefixCacheParams(ConfigModel):
    """Parameters of ``prefix-cache-scorer``.

    Attributes:
        block_size_tokens: Tokens per block. Upstream defaults to 16 but clamps it to 64 at
            request time (memory); 64 is the default here and smaller values are honoured.
        max_prefix_blocks_to_match: Blocks of a prompt considered (0 = no limit).
        max_prefix_tokens_to_match: Tokens of a prompt considered; wins over the block limit
            when > 0.
        lru_capacity_per_server: Blocks remembered per pod.
        auto_tune: Size each pod's LRU from its ``vllm:cache_config_info`` (num_gpu_blocks x
            block_size / blockSizeTokens) when known, else `lru_capacity_per_server`.
        match_length_weight: Weight of the absolute match-length term (0 = pure ratio).
        match_length_scale_tokens: Matched tokens at which the length term saturates.
        hash_seed: Mixed into every block key.
        chars_per_token: Bytes packed per pseudo-token by the character estimate.
        tokenizers_pool_config: Tokenize text prompts with a real tokenizer (else estimate).
        prefix_match_info_producer_name: Upstream's producer/scorer split: name a configured
            ``precise-prefix-cache-producer`` or ``approx-prefix-cache-producer`` to score from
            its match info; empty = this plugin produces its own (routing history).
    """

    block_size_tokens: int = Field(64, ge=1, le=65536)
    max_prefix_blocks_to_match: int = Field(2048, ge=0)
    max_prefix_tokens_to_match: int = Field(131072, ge=0)
    lru_capacity_per_server: int = Field(31250, ge=1)
    auto_tune: bool = True
    match_length_weight: float = Field(0.0, ge=0, le=1)
    match_length_scale_tokens: int = Field(8192, ge=1)
    hash_seed: str = ""
    chars_per_token: int = Field(4, ge=1, le=64)
    tokenizers_pool_config: TokenizersPoolConfig | None = None
    prefix_match_info_producer_name: str | None = None


def _render(request: SchedulingRequest) -> str:
    if request.prompt is not None:
        return request.prompt
    parts: list[str] = []
    for msg in request.messages or ():
        content = msg.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
        parts.append(f"<|im_start|>{msg.get('role', '')}\n{content or ''}<|im_end|>\n")
    return "".join(parts)


def estimate_tokens(text: str, chars_per_token: int = 4) -> list[int]:
    """Pseudo-tokens of `text`: its UTF-8 bytes packed `chars_per_token` bytes per token."""
    data = text.encode("utf-8")
    if chars_per_token == 4:
        data += b"\0" * (-len(data) % 4)
        arr = array.array("I")
        if arr.itemsize == 4:
            arr.frombytes(data)
            return arr.tolist()
    n = chars_per_token
    return [int.from_bytes(data[i : i + n], "little") for i in range(0, len(data), n)]


class RoutingHistory:
    """Per-pod bounded LRU of block keys plus a reverse map key -> pods; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, OrderedDict[int, None]] = {}
        self._holders: dict[int, set[str]] = {}

    def lookup(self, keys: Sequence[int], pods: Sequence[str]) -> dict[str, int]:
        """Consecutive blocks from block 0 recorded for each of `pods` (0s left out)."""
        runs: dict[str, int] = {}
        with self._lock:
            holders = self._holders
            active = {p for p in pods if p in self._pods}
            i = 0
            for i, k in enumerate(keys):
                h = holders.get(k)
                if h is None:
                    break
                still = active & h
                if len(still) != len(active):
                    for p in active - still:
                        if i:
                            runs[p] = i
                    active = still
                if not active:
                    break
            else:
                i = len(keys)
            for p in active:
                if i:
                    runs[p] = i
        return runs

    def record(self, pod: str, keys: Sequence[int], capacity: int) -> None:
        """Remember that `pod` now holds `keys` (block 0 most recently used)."""
        with self._lock:
            lru = self._pods.get(pod)
            if lru is None:
                lru = self._pods[pod] = OrderedDict()
            holders = self._holders
            # NOTE: reversed, so block 0 ends up most recently used and the prompt's tail is
            # evicted first, as vLLM frees blocks tail-first; evicting block 0 first would
            # break every longer match of the prompt at once.
            for k in reversed(keys):
                if k in lru:
                    lru.move_to_end(k)
                else:
                    lru[k] = None
                    h = holders.get(k)
                    if h is None:
                        holders[k] = {pod}
                    else:
                        h.add(pod)
            while len(lru) > capacity:
                old, _ = lru.popitem(last=False)
                h = holders.get(old)
                if h is not None:
                    h.discard(pod)
                    if not h:
                        del holders[old]

    def purge(self, pod: str) -> int:
        """Forget `pod`; returns the blocks dropped."""
        with self._lock:
            lru = self._pods.pop(pod, None)
            if lru is None:
                return 0
            for k in lru:
                h = self._holders.get(k)
                if h is not None:
                    h.discard(pod)
                    if not h:
                        del self._holders[k]
            return len(lru)

    def size(self, pod: str) -> int:
        """Blocks remembered for `pod`."""
        with self._lock:
            lru = self._pods.get(pod)
            return 0 if lru is None else len(lru)


class ApproxPrefixCacheScorer:
    """``prefix-cache-scorer``: approximate prefix-cache affinity (see the module docstring)."""

    def __init__(self, params: ApproxPrefixCacheParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.params = params
        self.block_size = params.block_size_tokens
        self.keyer = DerivedKeyer(params.block_size_tokens, params.hash_seed)
        self.history = RoutingHistory()
        limit = 0
        if params.max_prefix_tokens_to_match > 0:
            limit = params.max_prefix_tokens_to_match
        elif params.max_prefix_blocks_to_match > 0:
            limit = params.max_prefix_blocks_to_match * params.block_size_tokens
        self.token_limit = limit
        self._metrics = ctx.metrics
        self._scheduler = ctx.scheduler
        # NOTE: autoTune reads only the pods' cache size (static): a slow scrape, well inside
        # the metrics staleness threshold, is enough.
        self.metrics_interval: float | None = (
            AUTO_TUNE_SCRAPE_INTERVAL if params.auto_tune else None
        )
        name = params.prefix_match_info_producer_name
        if ctx.scheduler is not None:
            name = match_sources(ctx.scheduler.config).get(ctx.name, name)
        self.producer_name = name if name and name != ctx.name else None
        self._info_key = ctx.name + ":info"
        self._delegate: MatchInfoProducer | None = None
        self._tokenizer: Any = None
        self._tok_lock = threading.Lock()

    # -- tokens and keys -------------------------------------------------------------------

    def _tokenization(self) -> Any:
        cfg = self.params.tokenizers_pool_config
        if cfg is None:
            return None
        if self._tokenizer is None:
            with self._tok_lock:
                if self._tokenizer is None:
                    from kvaware_scorer.tokenization import TokenizationService

                    self._tokenizer = TokenizationService(
                        cfg, PrefixStoreConfig(), metrics=self._metrics
                    )
        return self._tokenizer

    def tokens(self, request: SchedulingRequest) -> list[int]:
        """Token ids of the request (real or estimated; see the module docstring)."""
        if request.token_ids is not None:
            return request.token_ids
        service = self._tokenization()
        if service is not None:
            try:
                return request.tokens(
                    lambda: service.tokenize(
                        request.model,
                        prompt=request.prompt,
                        messages=request.messages,
                        **request.chat,
                    )
                )
            except KVAwareError as exc:
                logger.warning(
                    "%s: tokenization failed, estimating from characters: %s", self.name, exc
                )
        key = self.name + ":estimate"
        est = request.state.get(key)
        if est is None:
            est = request.state[key] = estimate_tokens(
                _render(request), self.params.chars_per_token
            )
        tokens: list[int] = est
        return tokens

    def keys(self, request: SchedulingRequest) -> list[int]:
        """Block keys of the request's (capped) prompt; cached on the request."""
        key = self.name + ":keys"
        cached = request.state.get(key)
        if cached is None:
            toks = self.tokens(request)
            if self.token_limit and len(toks) > self.token_limit:
                toks = toks[: self.token_limit]
            cached = request.state[key] = self.keyer.block_keys(
                toks, request.model, request.lora_name, request.cache_salt
            )
        keys: list[int] = cached
        return keys

    def prepare(self, request: SchedulingRequest) -> None:
        """Tokenize and key the request ahead of scheduling (off the event loop); nothing when
        the match info comes from another plugin (which prepares itself)."""
        if not self.producer_name:
            self.keys(request)

    # -- scoring ---------------------------------------------------------------------------

    def _source(self, ctx: SchedulingContext) -> MatchInfoProducer:
        if self._delegate is None:
            sched = ctx.scheduler or self._scheduler
            if sched is None:
                raise ConfigError(
                    "no scheduler to find the producer in", "prefixMatchInfoProducerName"
                )
            self._delegate = producer(sched.plugins, str(self.producer_name), self.name)
        return self._delegate

    def match_info(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> MatchInfo:
        """(endpoint id -> consecutive matched blocks, total blocks, block size in tokens),
        from the producer this scorer reads, or from its own routing history."""
        if self.producer_name:
            return self._source(ctx).match_info(ctx, request, endpoints)
        return per_call(
            request, self._info_key, ctx, endpoints, lambda: self._own(request, endpoints)
        )

    def _own(self, request: SchedulingRequest, endpoints: Sequence[Endpoint]) -> MatchInfo:
        keys = self.keys(request)
        if not keys:
            return {}, 0, self.block_size
        runs = self.history.lookup(keys, [e.id for e in endpoints])
        return {k: float(v) for k, v in runs.items()}, len(keys), self.block_size

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        try:
            matched, total, bs = self.match_info(ctx, request, endpoints)
        except KVAwareError as exc:
            # NOTE: only a precise producer can fail (its tokenizer); the request is then scored
            # 0 everywhere and the load scorers place it.
            self._metrics.score_errors.labels("tokenizer").inc()
            logger.warning("%s: scoring %s as zeros: %s", self.name, request.model, exc)
            return {}
        p = self.params
        return {
            eid: prefix_score(n, total, bs, p.match_length_weight, p.match_length_scale_tokens)
            for eid, n in matched.items()
        }

    # -- recording -------------------------------------------------------------------------

    def capacity(self, ctx: SchedulingContext, endpoint: Endpoint) -> int:
        """Blocks remembered for `endpoint` (auto-tuned from its cache size when known)."""
        if self.params.auto_tune:
            m = ctx.metrics(endpoint)
            if m is not None and m.cache_num_blocks and m.cache_block_size:
                return max(1, m.cache_num_blocks * m.cache_block_size // self.block_size)
        return self.params.lru_capacity_per_server

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        if self.producer_name:
            return  # the producer records routing decisions itself
        target = result.targets[0]
        keys = self.keys(request)
        if keys:
            self.history.record(target.id, keys, self.capacity(ctx, target))

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        for e in removed:
            self.history.purge(e.id)

    def close(self) -> None:
        """Release the tokenizer pool, if one was built."""
        if self._tokenizer is not None:
            self._tokenizer.close()


def register(registry: PluginRegistry) -> None:
    """Register ``prefix-cache-scorer`` and ``approx-prefix-cache-producer``."""
    registry.register(
        "prefix-cache-scorer",
        ApproxPrefixCacheScorer,
        params=ApproxPrefixCacheParams,
        kinds=("scorer", "pre-request"),
        description="approximate prefix-cache affinity from routing history (no events)",
        param_aliases={"hashBlockSize": "blockSizeTokens", "blockSize": "blockSizeTokens"},
    )
    registry.register(
        "approx-prefix-cache-producer",
        ApproxPrefixCacheScorer,
        params=ApproxPrefixCacheParams,
        kinds=("pre-request",),
        description="routing-history match info for prefix-cache-scorer (upstream split form)",
        param_aliases={"blockSize": "blockSizeTokens"},
    )
