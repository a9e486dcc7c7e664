"""Multimodal embeddings-cache affinity (upstream llm-d's ``mm-embeddings-cache-producer`` and
``mm-embeddings-cache-scorer``).

vLLM keeps the encoder output of recent images, videos and audio clips in an encoder cache, so a
pod that already encoded a request's media skips that work. The *producer* remembers, per
endpoint, the media items of the requests routed there: a bounded LRU of item hashes per pod,
filled by its pre-request hook with the items of every primary target. The *scorer* gives each
candidate ``matched / total``: the fraction of the request's distinct media items in that pod's
LRU. A request without media items scores 0 everywhere (neutral).

Media items are the chat content parts ``image_url`` (and ``input_image``), ``video_url``,
``audio_url`` (their URL, data URLs included) and ``input_audio`` (its data followed by its
format); an item's hash is XXH64 of that text, as upstream's tokenizer-free token producer
hashes it, and repeated items of a request count once.

Bounds: each endpoint keeps at most ``cacheSizeInMBPerServer / 2`` hashes (upstream assumes
2 MiB per encoded item; at least 1), an endpoint's LRU is dropped when it leaves the pool, and
at most `MAX_TRACKED_ENDPOINTS` endpoints are tracked (the least recently recorded goes first).
A request contributes at most `MAX_ITEMS` distinct items from its first `MAX_PARTS` content
parts, and at most `HASH_SAMPLE_CHARS` characters of an item are hashed (its head, its tail and
its length beyond that), so hostile bodies cost bounded time.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from itertools import islice

import xxhash
from pydantic import Field, field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
)
from kvaware_scorer.scheduler.matchinfo import per_call

__all__ = [
    "BYTES_PER_ITEM",
    "DEFAULT_CACHE_SIZE_MB",
    "HASH_SAMPLE_CHARS",
    "MAX_ITEMS",
    "MAX_PARTS",
    "MAX_TRACKED_ENDPOINTS",
    "PRODUCER_TYPE",
    "SCORER_TYPE",
    "EncoderCacheMatch",
    "MMEmbeddingsCacheParams",
    "MMEmbeddingsCacheProducer",
    "MMEmbeddingsCacheScorer",
    "MMEmbeddingsScorerParams",
    "capacity_for",
    "media_items",
    "register",
]

logger = logging.getLogger(__name__)

PRODUCER_TYPE = "mm-embeddings-cache-producer"
SCORER_TYPE = "mm-embeddings-cache-scorer"

#: Upstream's default per-endpoint budget (MiB).
DEFAULT_CACHE_SIZE_MB = 4096
#: Upstream's assumed encoder-cache footprint of one item: the budget is divided by it.
BYTES_PER_ITEM = 2 * 1024 * 1024
#: Distinct media items of one request that count (upstream has no limit).
MAX_ITEMS = 1024
#: Content parts of one request looked at for media (upstream has no limit).
MAX_PARTS = 65536
#: Longer item references are hashed by their head, tail and length (half of this each way).
HASH_SAMPLE_CHARS = 4 * 1024 * 1024
#: Endpoints whose LRU is kept at once (the least recently recorded one is dropped first).
MAX_TRACKED_ENDPOINTS = 4096

_MIB = 1024 * 1024
_GO_INT_MAX = 2**63 - 1
#: request.state key of a request's media items (the same for every producer).
_ITEMS_KEY = "mm-embeddings-cache:items"
_URL_PARTS = {
    "image_url": "image_url",
    "input_image": "image_url",
    "video_url": "video_url",
    "audio_url": "audio_url",
}


# -- media items -------------------------------------------------------------------------------


def _digest(text: str) -> int:
    """XXH64 (seed 0) of `text`'s UTF-8 bytes; past `HASH_SAMPLE_CHARS`, of its head, tail and
    length (lone surrogates from JSON escapes are kept, never an error)."""
    if len(text) <= HASH_SAMPLE_CHARS:
        return int(xxhash.xxh64_intdigest(text.encode("utf-8", "surrogatepass")))
    half = HASH_SAMPLE_CHARS // 2
    h = xxhash.xxh64()
    h.update(text[:half].encode("utf-8", "surrogatepass"))
    h.update(text[-half:].encode("utf-8", "surrogatepass"))
    h.update(f"|{len(text)}".encode())
    return int(h.intdigest())


def _reference(part: object) -> str | None:
    """The text identifying the media item of content part `part`, or None (not media, or no
    usable reference)."""
    if not isinstance(part, Mapping):
        return None
    kind = part.get("type")
    if not isinstance(kind, str):
        return None
    field = _URL_PARTS.get(kind)
    if field is not None:
        value = part.get(field)
        if isinstance(value, Mapping):
            value = value.get("url")
        return value if isinstance(value, str) and value else None
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, Mapping):
            return None
        data, fmt = audio.get("data"), audio.get("format")
        if not isinstance(data, str) or not data:
            return None
        return data + (fmt if isinstance(fmt, str) else "")
    return None


def media_items(request: SchedulingRequest) -> tuple[int, ...]:
    """Hashes of the distinct media items of `request`'s chat messages, in first-seen order
    (memoized on the request; see the module docstring for the bounds)."""
    cached = request.state.get(_ITEMS_KEY)
    if isinstance(cached, tuple):
        return cached
    seen: dict[int, None] = {}
    budget = MAX_PARTS
    messages = request.messages
    for msg in messages if isinstance(messages, list) else ():
        if budget <= 0 or len(seen) >= MAX_ITEMS:
            break
        budget -= 1
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if not isinstance(content, list):
            continue
        for part in islice(content, budget):
            ref = _reference(part)
            if ref is not None:
                seen[_digest(ref)] = None
                if len(seen) >= MAX_ITEMS:
                    break
        budget -= len(content)
    items = tuple(seen)
    request.state[_ITEMS_KEY] = items
    return items


# -- producer ----------------------------------------------------------------------------------


def capacity_for(cache_size_mb: int) -> int:
    """Item hashes remembered per endpoint for a budget of `cache_size_mb` MiB (<= 0: the
    default), at least 1."""
    mb = cache_size_mb if cache_size_mb > 0 else DEFAULT_CACHE_SIZE_MB
    return max(1, mb * _MIB // BYTES_PER_ITEM)


class MMEmbeddingsCacheParams(ConfigModel):
    """Parameters of ``mm-embeddings-cache-producer``.

    Attributes:
        cache_size_in_mb_per_server: The model servers' encoder-cache budget in MiB (<= 0:
            the default, 4096); each endpoint remembers this / 2 MiB items.
    """

    cache_size_in_mb_per_server: int = Field(
        DEFAULT_CACHE_SIZE_MB, alias="cacheSizeInMBPerServer", strict=True, le=_GO_INT_MAX
    )

    @field_validator("cache_size_in_mb_per_server")
    @classmethod
    def _default_when_not_positive(cls, value: int) -> int:
        return value if value > 0 else DEFAULT_CACHE_SIZE_MB


#: (endpoint id -> matched items, for endpoints with a match; distinct items of the request).
EncoderCacheMatch = tuple[dict[str, int], int]


class MMEmbeddingsCacheProducer:
    """``mm-embeddings-cache-producer`` (see the module docstring)."""

    def __init__(self, params: MMEmbeddingsCacheParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.capacity = capacity_for(params.cache_size_in_mb_per_server)
        self._lock = threading.Lock()
        # endpoint id -> its item hashes, oldest first; endpoints least recently recorded first
        self._pods: OrderedDict[str, OrderedDict[int, None]] = OrderedDict()
        self._memo_key = f"{ctx.name}:mm-match"

    def encoder_matches(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> EncoderCacheMatch:
        """How many of `request`'s media items each of `endpoints` likely holds (memoized for
        the scheduling call). Looking up does not refresh an item's recency."""
        return per_call(
            request, self._memo_key, ctx, endpoints, lambda: self._match(request, endpoints)
        )

    def _match(
        self, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> EncoderCacheMatch:
        items = media_items(request)
        if not items:
            return {}, 0
        matched: dict[str, int] = {}
        with self._lock:
            for e in endpoints:
                lru = self._pods.get(e.id)
                if lru:
                    n = sum(map(lru.__contains__, items))
                    if n:
                        matched[e.id] = n
        return matched, len(items)

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """Record the request's media items on every target of the primary profile."""
        items = media_items(request)
        if items:
            for target in {e.id: e for e in result.targets}:
                self.record(target, items)

    def record(self, endpoint_id: str, items: Sequence[int]) -> None:
        """Remember that `endpoint_id` now holds `items` (the last one most recently used)."""
        with self._lock:
            pods = self._pods
            lru = pods.get(endpoint_id)
            if lru is None:
                lru = pods[endpoint_id] = OrderedDict()
                while len(pods) > MAX_TRACKED_ENDPOINTS:
                    pods.popitem(last=False)
            else:
                pods.move_to_end(endpoint_id)
            for h in items:
                if h in lru:
                    lru.move_to_end(h)
                else:
                    lru[h] = None
            while len(lru) > self.capacity:
                lru.popitem(last=False)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """Forget endpoints that left the pool."""
        with self._lock:
            for e in removed:
                self._pods.pop(e.id, None)

    def cached_items(self, endpoint_id: str) -> int:
        """Item hashes remembered for `endpoint_id`."""
        with self._lock:
            lru = self._pods.get(endpoint_id)
            return 0 if lru is None else len(lru)

    def tracked(self) -> list[str]:
        """Endpoint ids with remembered items, least recently recorded first."""
        with self._lock:
            return list(self._pods)


# -- scorer ------------------------------------------------------------------------------------


class MMEmbeddingsScorerParams(ConfigModel):
    """Parameters of ``mm-embeddings-cache-scorer``.

    Attributes:
        producer_name: The ``mm-embeddings-cache-producer`` to read; empty = the one named
            ``mm-embeddings-cache-producer``, or a default one when none is (as upstream
            auto-creates it).
    """

    producer_name: str = ""


class MMEmbeddingsCacheScorer:
    """``mm-embeddings-cache-scorer``: ``matched / total`` media items per candidate."""

    def __init__(self, params: MMEmbeddingsScorerParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self._scheduler = ctx.scheduler
        self._source: MMEmbeddingsCacheProducer | None = None
        #: The default producer this scorer owns (records through its pre-request hook).
        self.own: MMEmbeddingsCacheProducer | None = None
        target = params.producer_name or PRODUCER_TYPE
        configured = ctx.scheduler.config.plugins if ctx.scheduler is not None else {}
        found = configured.get(target)
        if found is not None:
            if found.type != PRODUCER_TYPE:
                raise ConfigError(
                    f"{target!r} is a {found.type!r}, not a {PRODUCER_TYPE!r}", "producerName"
                )
            self.producer_name: str | None = target
        elif params.producer_name:
            if ctx.scheduler is not None:
                raise ConfigError(f"names no plugin in plugins[]: {target!r}", "producerName")
            self.producer_name = target  # found when scoring
        else:
            # NOTE: upstream auto-creates the default producer (default parameters) for a
            # scorer whose producer is not configured; this scorer owns it instead.
            logger.info("%s: no %s configured; using a default one", self.name, PRODUCER_TYPE)
            self.producer_name = None
            self.own = MMEmbeddingsCacheProducer(
                MMEmbeddingsCacheParams(),
                PluginContext(name=PRODUCER_TYPE, type=PRODUCER_TYPE, metrics=ctx.metrics),
            )

    def producer(self, ctx: SchedulingContext | None = None) -> MMEmbeddingsCacheProducer:
        """The producer this scorer reads."""
        if self.own is not None:
            return self.own
        if self._source is None:
            sched = (ctx.scheduler if ctx is not None else None) or self._scheduler
            obj = sched.plugins.get(str(self.producer_name)) if sched is not None else None
            if not isinstance(obj, MMEmbeddingsCacheProducer):
                raise ConfigError(
                    f"{self.name}: {self.producer_name!r} is not a configured {PRODUCER_TYPE}",
                    "producerName",
                )
            self._source = obj
        return self._source

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        matched, total = self.producer(ctx).encoder_matches(ctx, request, endpoints)
        if total <= 0:
            return {}
        return {eid: n / total for eid, n in matched.items()}

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """Record through the default producer this scorer owns (a configured producer
        records itself)."""
        if self.own is not None:
            self.own.pre_request(ctx, request, result)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        if self.own is not None:
            self.own.endpoints_changed(added, removed)


def register(registry: PluginRegistry) -> None:
    """Register ``mm-embeddings-cache-producer`` and ``mm-embeddings-cache-scorer``."""
    registry.register(
        PRODUCER_TYPE,
        MMEmbeddingsCacheProducer,
        params=MMEmbeddingsCacheParams,
        kinds=("pre-request",),
        description="remembers the media items routed to each pod (encoder-cache affinity)",
    )
    registry.register(
        SCORER_TYPE,
        MMEmbeddingsCacheScorer,
        params=MMEmbeddingsScorerParams,
        kinds=("scorer", "pre-request"),
        description="fraction of the request's media items a pod's encoder cache likely holds",
        refs={"producerName": "pre-request"},
    )
