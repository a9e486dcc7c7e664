"""``precise-prefix-cache-scorer``: scores candidates by the KV blocks they really hold.

The plugin owns an `Indexer` fed by the pods' own KV events (in process through `ingest`, or
over ZMQ by a `KVEventSubscriber` started in `start`). A request is scored through the index,
restricted to the candidates: ``score = sum of tier weights over the pod's consecutive run of
prompt blocks from block 0 / total full blocks`` (optionally blended with the match-length
term, ``matchLengthWeight``). After a pick, with ``speculativeIndexing`` on, the request's
block keys are recorded for the chosen pod as speculative entries for ``speculativeTTL``: a
burst of requests with one prefix then follows the first one instead of scattering while the
pod's real BlockStored events are still on their way.

Parameters: every `IndexerConfig` field in its camelCase form, at the top level or under the
upstream ``indexerConfig: {...}``, plus ``kvEventsConfig``, ``speculativeIndexing`` and
``speculativeTTL``.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field, field_validator

from kvaware_scorer import Indexer, IndexerConfig
from kvaware_scorer.config import UPSTREAM_ONLY_HASHES, KVEventsConfig
from kvaware_scorer.errors import ConfigError, KVAwareError, TokenizerNotFoundError
from kvaware_scorer.keys import BlockKey
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    SchedulingContext,
    SchedulingRequest,
    SchedulingResult,
    parse_duration,
)
from kvaware_scorer.scheduler.matchinfo import MatchInfo, per_call
from kvaware_scorer.scheduler.types import engine_of
from kvaware_scorer.scoring import ScoreResult

__all__ = [
    "PrecisePrefixCacheParams",
    "PrecisePrefixCacheScorer",
    "precise_transform",
    "register",
]

logger = logging.getLogger(__name__)


class PrecisePrefixCacheParams(IndexerConfig):
    """Parameters of ``precise-prefix-cache-scorer``: the `IndexerConfig` fields plus:

    Attributes:
        kv_events_config: How KV events reach the index when the scheduler is started.
        speculative_indexing: Record each pick's blocks for the chosen pod until real events
            confirm them or `speculative_ttl` passes (upstream's default is off; on here).
        speculative_ttl: Seconds (or a duration such as ``"2s"``) speculative entries live.
    """

    kv_events_config: KVEventsConfig = Field(default_factory=KVEventsConfig)
    speculative_indexing: bool = True
    speculative_ttl: float = Field(2.0, alias="speculativeTTL")

    @field_validator("speculative_ttl", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    def indexer_config(self) -> IndexerConfig:
        """The `IndexerConfig` part alone."""
        fields = set(IndexerConfig.model_fields)
        return IndexerConfig.model_validate({k: getattr(self, k) for k in fields})


def precise_transform(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Upstream forms -> ours: merge ``indexerConfig``, drop what upstream-only values mean
    nothing here (with warnings).

    Raises:
        ConfigError: A key given both at the top level and under ``indexerConfig``.
    """
    # NOTE: long on purpose: a sequence of independent upstream-compatibility rules, one block each.
    warnings: list[str] = []
    out = dict(params)
    nested = out.pop("indexerConfig", None)
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise ConfigError("expected a mapping", "indexerConfig")
        for k, v in nested.items():
            if k in out:
                raise ConfigError(
                    f"{k!r} given both here and at the top level", f"indexerConfig.{k}"
                )
            out[k] = v
    tp = out.get("tokenProcessorConfig")
    if isinstance(tp, Mapping) and "hashAlgorithm" in tp:
        algo = tp["hashAlgorithm"]
        # NOTE: the value is validated by TokenProcessorConfig (one rule with the library).
        if algo in UPSTREAM_ONLY_HASHES:
            warnings.append(
                f"tokenProcessorConfig.hashAlgorithm {algo!r} is upstream's own key hash; "
                "without effect (keys are derived from the events' token ids)"
            )
    pool = out.get("tokenizersPoolConfig")
    if isinstance(pool, Mapping) and ("modelName" in pool or "uds" in pool):
        pool = dict(pool)
        if pool.pop("modelName", None) is not None:
            warnings.append(
                "tokenizersPoolConfig.modelName ignored: each request is tokenized with its own "
                "model's tokenizer (local.modelTokenizerMap maps served names to tokenizer files)"
            )
        if pool.pop("uds", None) is not None:
            warnings.append(
                "tokenizersPoolConfig.uds ignored: tokenization runs in process, no sidecar"
            )
        out["tokenizersPoolConfig"] = pool
    kb = out.get("kvBlockIndexConfig")
    if isinstance(kb, Mapping) and "maxPrefixBlocksToMatch" in kb:
        warnings.append(
            "kvBlockIndexConfig.maxPrefixBlocksToMatch (older upstream configs) is ignored: "
            "lookups stop at the first block no candidate holds"
        )
    if isinstance(kb, Mapping) and "costAwareMemoryConfig" in kb:
        kb = dict(kb)
        del kb["costAwareMemoryConfig"]
        out["kvBlockIndexConfig"] = kb
        warnings.append(
            "kvBlockIndexConfig.costAwareMemoryConfig is not implemented; using the in-memory "
            "index (bounded by inMemoryConfig.size)"
        )
    ev = out.get("kvEventsConfig")
    if isinstance(ev, Mapping) and "podDiscoveryConfig" in ev:
        ev = dict(ev)
        pd = ev.pop("podDiscoveryConfig", None) or {}
        if not isinstance(pd, Mapping):
            raise ConfigError("expected a mapping", "kvEventsConfig.podDiscoveryConfig")
        for key in ("socketPort", "replaySocketPort"):
            if key in pd:
                if key in ev:
                    raise ConfigError(
                        f"{key!r} given twice", f"kvEventsConfig.podDiscoveryConfig.{key}"
                    )
                ev[key] = pd[key]
        dropped = sorted(k for k in pd if k not in ("socketPort", "replaySocketPort"))
        if dropped:
            warnings.append(
                f"kvEventsConfig.podDiscoveryConfig {dropped} ignored: pods come from the "
                "endpoints file"
            )
        out["kvEventsConfig"] = ev
    return out, warnings


class PrecisePrefixCacheScorer:
    """``precise-prefix-cache-scorer`` (see the module docstring)."""

    def __init__(self, params: PrecisePrefixCacheParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.params = params
        self.indexer = Indexer(params.indexer_config(), metrics=ctx.metrics, clock=ctx.clock)
        self.speculative = params.speculative_indexing
        self.ttl = params.speculative_ttl
        self._scheduler = ctx.scheduler
        self._match_key = ctx.name + ":match"
        # NOTE: a remote index answers lookups over the network: the scheduler then keeps the
        # whole pipeline off the event loop.
        self.blocking_io = self.indexer.index.blocking_io
        self._subscriber: Any = None
        self._started = False
        self._lock = threading.Lock()

    # -- tokens and keys ---------------------------------------------------------------------

    def tokens(self, request: SchedulingRequest) -> list[int] | None:
        """The request's token ids (tokenized once, shared with other plugins), or None
        when it has no prompt.

        Raises:
            KVAwareError: Tokenization failed (e.g. no tokenizer for the model).
        """
        if request.token_ids is not None:
            return request.token_ids
        if request.prompt is None and request.messages is None:
            return None
        return request.tokens(
            lambda: self.indexer.tokens(
                request.model, prompt=request.prompt, messages=request.messages, **request.chat
            )
        )

    def keys(self, request: SchedulingRequest) -> list[BlockKey]:
        """The request's block keys in this index's namespace; cached on the request."""
        key = self.name + ":keys"
        cached = request.state.get(key)
        if cached is None:
            ids = self.tokens(request) or []
            cached = request.state[key] = self.indexer.block_keys(
                ids, request.model, request.lora_name, request.cache_salt
            )
        keys: list[BlockKey] = cached
        return keys

    def prepare(self, request: SchedulingRequest) -> None:
        """Tokenize ahead of scheduling (the scheduler runs this off the event loop)."""
        self.tokens(request)

    # -- scoring --------------------------------------------------------------------------------

    def _match(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> ScoreResult:
        """The index match of the request's blocks for the candidates, once per scheduling call
        (the scorer and the plugins reading its match info share it).

        Uses `Indexer.match_keys` on block keys cached on the request, so the keys are derived
        once per request although the pre-request hook needs them again for speculative entries.

        Raises:
            KVAwareError: The request could not be tokenized or keyed.
        """
        return per_call(
            request, self._match_key, ctx, endpoints, lambda: self._lookup(request, endpoints)
        )

    def _lookup(self, request: SchedulingRequest, endpoints: Sequence[Endpoint]) -> ScoreResult:
        t0 = time.perf_counter()
        keys = self.keys(request)
        result = self.indexer.match_keys(keys, [e.id for e in endpoints], t0=t0)
        request.state[self.name + ":matched"] = {
            pod: s.blocks for pod, s in result.pods.items() if s.blocks
        }
        return result

    def match_info(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> MatchInfo:
        """(endpoint id -> tier-weighted consecutive blocks, total blocks, block size).

        Raises:
            KVAwareError: The request could not be tokenized.
        """
        result = self._match(ctx, request, endpoints)
        matched = {pod: s.weight for pod, s in result.pods.items() if s.blocks}
        return matched, result.total_blocks, result.block_size

    def score(
        self, ctx: SchedulingContext, request: SchedulingRequest, endpoints: Sequence[Endpoint]
    ) -> Mapping[str, float]:
        try:
            result = self._match(ctx, request, endpoints)
        except KVAwareError as exc:
            # NOTE: a request we cannot tokenize is scored 0 everywhere, never failed: the load
            # scorers still place it.
            self.indexer.metrics.score_errors.labels("tokenizer").inc()
            # NOTE: a missing tokenizer is warned about once per model by the registry.
            log = logger.debug if isinstance(exc, TokenizerNotFoundError) else logger.warning
            log("%s: scoring %s as zeros: %s", self.name, request.model, exc)
            return {}
        return result.scores()

    # -- after the pick ---------------------------------------------------------------------------

    def pre_request(
        self, ctx: SchedulingContext, request: SchedulingRequest, result: SchedulingResult
    ) -> None:
        """Record the request's blocks for the chosen pod as speculative entries.

        Only the blocks past the pod's current match are recorded. NOTE: re-recording matched
        blocks would refresh their TTL with every pick, so a pod whose KV events never arrive
        would keep a phantom affinity forever; this way unconfirmed entries always expire
        `speculativeTTL` after the pick that made them.
        """
        if not self.speculative or self.ttl <= 0:
            return
        try:
            keys = self.keys(request)
        except KVAwareError as exc:
            logger.debug("%s: no speculative entries: %s", self.name, exc)
            return
        target = result.targets[0].id
        matched = request.state.get(self.name + ":matched")
        held = matched.get(target, 0) if matched is not None else 0
        if held < len(keys):
            self.indexer.record_speculative(target, keys[held:], self.ttl)

    # -- events -------------------------------------------------------------------------------------

    def ingest(
        self,
        pod: str,
        model: str | None,
        payload: bytes,
        seq: int | None = None,
        engine: str = "vllm",
    ) -> None:
        """Apply one KV-event payload from `pod` (delegates to `Indexer.ingest`)."""
        self.indexer.ingest(pod, model, payload, seq, engine=engine)

    def _subscription(self, e: Endpoint) -> tuple[str, str | None] | None:
        cfg = self.params.kv_events_config
        if e.kv_events:
            return e.kv_events, e.kv_events_replay
        if cfg.discover_pods:
            replay = e.kv_events_replay
            if replay is None and cfg.replay_socket_port:
                replay = f"tcp://{e.address}:{cfg.replay_socket_port}"
            return f"tcp://{e.address}:{cfg.socket_port}", replay
        return None

    def _subscribe(self, e: Endpoint) -> None:
        sub = self._subscription(e)
        if sub is None or self._subscriber is None:
            return
        if not e.kv_events and self.params.kv_events_config.discover_pods:
            # NOTE: vLLM >= 0.33 lists where its publishers really are (``tcp://*:0`` binds a
            # random port; data-parallel ranks are offset) at GET /kv_event_sources. Asked in a
            # thread: a pod that is slow to answer must not hold up the scheduler.
            threading.Thread(
                target=self._discover,
                args=(e, self._subscriber, sub),
                name=f"kvaware-discover-{e.id}",
                daemon=True,
            ).start()
            return
        endpoint, replay = sub
        self._subscriber.add_endpoint(
            e.id, endpoint, replay_endpoint=replay, model=e.model, engine=engine_of(e)
        )

    def _discover(self, e: Endpoint, subscriber: Any, fallback: tuple[str, str | None]) -> None:
        """Dial `e`'s publishers as its ``/kv_event_sources`` lists them, else the configured
        ``socketPort`` (older vLLM, or the route unreachable)."""
        module = importlib.import_module("kvaware_scorer.events.subscriber")
        cfg = self.params.kv_events_config
        try:
            sources = module.fetch_event_sources(
                f"http://{e.address}:{e.port}",
                timeout=cfg.discovery_timeout,
                allowed_hosts=cfg.discovery_allowed_hosts,
                max_bytes=cfg.max_discovery_bytes,
                max_ranks=cfg.max_discovery_ranks,
            )
        except (OSError, ValueError) as exc:
            logger.debug(
                "%s: no /kv_event_sources from %s (%s); dialing %s",
                self.name,
                e.id,
                exc,
                fallback[0],
            )
            sources = None
        try:
            with self._lock:
                if self._subscriber is not subscriber or not any(
                    x.id == e.id for x in self._current_endpoints()
                ):
                    return  # stopped, or the endpoint left while we asked
                if sources:
                    subscriber.add_event_sources(e.id, sources, model=e.model, engine=engine_of(e))
                else:
                    endpoint, replay = fallback
                    subscriber.add_endpoint(
                        e.id, endpoint, replay_endpoint=replay, model=e.model, engine=engine_of(e)
                    )
        except Exception:
            logger.exception("%s: subscribing to %s failed", self.name, e.id)

    def _current_endpoints(self) -> list[Endpoint]:
        return self._scheduler.endpoints if self._scheduler is not None else []

    def _ensure_subscriber(self) -> None:
        """Start the subscriber (under the lock) and dial every known endpoint's publisher."""
        if self._subscriber is not None:
            return
        try:
            # NOTE: imported when needed only: the emulator and score-only users never need
            # ZMQ sockets.
            subscriber_mod = importlib.import_module("kvaware_scorer.events.subscriber")
        except ImportError as exc:
            raise ConfigError(
                f"the KV-event subscriber is not available: {exc}", "kvEventsConfig"
            ) from exc
        sub = subscriber_mod.KVEventSubscriber(self.indexer, self.params.kv_events_config)
        current = self._current_endpoints()
        sub.set_known_pods(e.id for e in current)
        sub.start()
        self._subscriber = sub
        for e in current:
            self._subscribe(e)

    def start(self) -> None:
        """Start receiving KV events over ZMQ (idempotent).

        A `KVEventSubscriber` runs on ``kvEventsConfig`` as soon as there is something to
        receive: a bound ``zmqEndpoint``, static ``endpoints``, or an endpoint with a publisher
        (its ``kvEvents``, or ``tcp://<address>:<socketPort>`` with ``discoverPods``); until
        then nothing is opened, and an endpoint with a publisher joining later starts it.
        """
        with self._lock:
            self._started = True
            cfg = self.params.kv_events_config
            current = self._current_endpoints()
            if cfg.zmq_endpoint or cfg.endpoints or any(self._subscription(e) for e in current):
                self._ensure_subscriber()
            self._warn_unsubscribed(current)

    def _warn_unsubscribed(self, endpoints: Sequence[Endpoint]) -> None:
        """Say which endpoints no KV event can come from (they would score 0 forever)."""
        cfg = self.params.kv_events_config
        if cfg.zmq_endpoint:
            return  # bind mode: pods publish to us
        silent = [
            e.id for e in endpoints if e.id not in cfg.endpoints and not self._subscription(e)
        ]
        if silent:
            logger.warning(
                "%s: no KV-event source for %s: these endpoints will score 0 (set their "
                "kvEvents in the endpoints file, kvEventsConfig.discoverPods: true to dial "
                "<address>:socketPort, or kvEventsConfig.zmqEndpoint for pods to publish to)",
                self.name,
                ", ".join(silent),
            )

    def stop(self) -> None:
        """Stop the subscriber (bounded); idempotent."""
        with self._lock:
            self._started = False
            sub, self._subscriber = self._subscriber, None
        if sub is not None:
            sub.stop()

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """Purge removed pods from the index (and stop dialing them); dial added ones."""
        with self._lock:
            if self._subscriber is not None and removed:
                self._subscriber.set_known_pods(e.id for e in self._current_endpoints())
            for e in removed:
                if self._subscriber is not None:
                    try:
                        self._subscriber.remove_endpoint(e.id)
                    except Exception:
                        logger.exception("%s: unsubscribing %s failed", self.name, e.id)
                self.indexer.purge_pod(e.id, "endpoint-removed")
            if not self._started:
                return
            self._warn_unsubscribed(added)
            if self._subscriber is None:
                if any(self._subscription(e) for e in added):
                    try:
                        self._ensure_subscriber()
                    except Exception:
                        logger.exception("%s: starting the KV-event subscriber failed", self.name)
                return
            # NOTE: bind mode applies events only of pods the scheduler knows
            self._subscriber.set_known_pods(e.id for e in self._current_endpoints())
            for e in added:
                try:
                    self._subscribe(e)
                except Exception:
                    logger.exception("%s: subscribing to %s failed", self.name, e.id)

    def close(self) -> None:
        """Stop and release the index."""
        self.stop()
        self.indexer.close()


def register(registry: PluginRegistry) -> None:
    """Register ``precise-prefix-cache-scorer`` and ``precise-prefix-cache-producer``."""
    registry.register(
        "precise-prefix-cache-scorer",
        PrecisePrefixCacheScorer,
        params=PrecisePrefixCacheParams,
        kinds=("scorer", "pre-request"),
        description="KV-event-driven prefix-cache affinity (this project's indexer)",
        transform=precise_transform,
    )
    registry.register(
        "precise-prefix-cache-producer",
        PrecisePrefixCacheScorer,
        params=PrecisePrefixCacheParams,
        kinds=("pre-request",),
        description="KV-event-driven match info for prefix-cache-scorer (upstream split form)",
        transform=precise_transform,
    )
