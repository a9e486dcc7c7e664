"""Pydantic models for the indexer's configuration, loadable from the upstream camelCase form.

Every model forbids unknown keys (the error names the key), accepts both the camelCase name used
in upstream llm-d YAML (``tokenProcessorConfig.blockSize``) and the Python snake_case name, and
defaults every field. Building a model (``IndexerConfig(...)``, ``model_validate``) or `load_model`
raises a `ConfigError` listing every problem in the shared form of `kvaware_scorer.configio`
(``tokenProcessorConfig.blockSiz: unknown key; did you mean 'blockSize'? (valid: ...)``), never
pydantic's raw ``ValidationError``. That base (`ConfigModel`, `load_model`,
`format_validation_error`) lives in `kvaware_scorer.configmodel` and is re-exported here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kvaware_scorer.configmodel import ConfigModel, format_validation_error, load_model

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TIER_WEIGHTS",
    "UPSTREAM_ONLY_HASHES",
    "ConfigModel",
    "HFTokenizerConfig",
    "InMemoryIndexConfig",
    "IndexerConfig",
    "KVBlockIndexConfig",
    "KVCacheBackendConfig",
    "KVEventsConfig",
    "KVEventsCurve",
    "KVEventsEndpoint",
    "LocalTokenizerConfig",
    "PrefixStoreConfig",
    "RedisIndexConfig",
    "TokenProcessorConfig",
    "TokenizersPoolConfig",
    "format_validation_error",
    "load_model",
]

HashAlgorithm = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor", "cbor-fnv", "xxh64"]
#: Upstream llm-d's own key hashes: meaningful for its key derivation only, so accepted (and
#: without effect) under ``derived`` keys, refused under ``vllm`` keys (vLLM has no such hash).
UPSTREAM_ONLY_HASHES = frozenset({"cbor-fnv", "xxh64"})
KeyMode = Literal["derived", "vllm"]
#: Wire formats of KV events (`Indexer.ingest(engine=...)`, upstream's ``engineType``).
EngineType = Literal["vllm", "sglang"]

#: Tier weights used when `kvCacheBackendConfigs` is not given (upstream: gpu 1.0, cpu 0.8).
DEFAULT_TIER_WEIGHTS: dict[str, float] = {"gpu": 1.0, "cpu": 0.8, "storage": 0.5}


class TokenProcessorConfig(ConfigModel):
    """How prompts are cut into blocks and keyed (`tokenProcessorConfig`).

    Attributes:
        block_size: Tokens per block (vLLM's default is 16). Under ``derived`` keys it need not
            equal the engine's block size as long as it divides it (events are re-chunked).
        hash_seed: Under ``derived`` keys, mixed into every key. Under ``vllm`` keys it is the
            pods' ``PYTHONHASHSEED``; empty means unset (vLLM then seeds with "vllm-none-hash").
        hash_algorithm: vLLM's ``--prefix-caching-hash-algo`` (``vllm`` key mode only).
            Upstream's own ``cbor-fnv`` and ``xxh64`` are accepted without effect under
            ``derived`` keys and refused under ``vllm`` keys; the YAML plugin path and the
            library follow this one rule.
        key_mode: ``derived`` (default: our own fast chained keys, derived from event tokens) or
            ``vllm`` (reproduce vLLM's block hashes exactly; needs algorithm, seed, block size).
        lora_adapters: LoRA name -> adapter path, needed in ``vllm`` key mode because vLLM
            (0.31 and later) hashes ``("lora", name, path)`` while its events carry only the
            name.
        vllm_hash_generation: ``vllm`` key mode: the pods' hashing generation, ``0.31``
            (default, the newest: tagged extra keys) or ``pre-0.31`` (the bare LoRA name and
            salt, as llm-d's published LoRA vectors).
    """

    block_size: int = Field(16, ge=1, le=4096)
    hash_seed: str = ""
    hash_algorithm: HashAlgorithm = "sha256"
    key_mode: KeyMode = "derived"
    lora_adapters: dict[str, str] = Field(default_factory=dict)
    vllm_hash_generation: Literal["0.31", "pre-0.31"] = "0.31"

    @model_validator(mode="before")
    @classmethod
    def _accept_block_size_tokens(cls, data: Any) -> Any:
        # NOTE: newer upstream releases renamed blockSize -> blockSizeTokens. As upstream's
        # token processor does: 0 means unset (both unset -> 16), blockSizeTokens wins when
        # both are set.
        if not isinstance(data, Mapping) or not ({"blockSizeTokens", "blockSize"} & set(data)):
            return data
        data = dict(data)
        tokens = data.pop("blockSizeTokens", None)
        legacy = data.pop("blockSize", None)
        chosen = next((v for v in (tokens, legacy) if v is not None and v != 0), None)
        if "block_size" in data:
            if chosen is not None:
                raise ValueError("give block_size or blockSizeTokens/blockSize, not both")
            return data
        data["blockSize"] = 16 if chosen is None else chosen
        return data

    @model_validator(mode="after")
    def _hash_for_key_mode(self) -> TokenProcessorConfig:
        if self.key_mode == "vllm" and self.hash_algorithm in UPSTREAM_ONLY_HASHES:
            raise ValueError(
                f"hashAlgorithm {self.hash_algorithm!r} is upstream's own key hash; vllm key "
                "mode needs one of vLLM's: sha256, sha256_cbor, xxhash, xxhash_cbor"
            )
        return self

    @field_validator("hash_seed", mode="before")
    @classmethod
    def _seed_to_str(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value


class InMemoryIndexConfig(ConfigModel):
    """The embedded index (`kvBlockIndexConfig.inMemoryConfig`).

    Attributes:
        size: Maximum number of (block, pod) entries kept; beyond it the least recently used
            blocks are evicted (CLOCK approximation of LRU: lookups refresh recency).
        pod_cache_size: Maximum pods remembered per block key; 0 = no limit. Upstream defaults
            to 10, which silently forgets holders of popular blocks on larger fleets, so the
            default here is no limit.
    """

    size: int = Field(10_000_000, ge=1)
    pod_cache_size: int = Field(0, ge=0)


class RedisIndexConfig(ConfigModel):
    """A shared index on Redis or Valkey (`redisConfig` / `valkeyConfig`).

    Attributes:
        address: ``redis://``, ``rediss://`` (TLS), ``unix://``, ``valkey://`` or
            ``valkeys://`` (TLS) URL, or ``host:port``.
        username: ACL user (overrides the URL's).
        password: Password (overrides the URL's).
        db: Database number (overrides the URL's; must be 0 on a cluster).
        cluster: Use the Redis Cluster protocol (the address is any node of the cluster).
        cluster_shards: Shards the pods are spread over on a cluster (0 = one per master at
            first use). Fixed once the index exists: it is stored in the cluster.
        key_prefix: Prefix for every key this index writes.
        size: Maximum (block, pod) entries; beyond it blocks are evicted, least recently used
            first (CLOCK approximation; lookups refresh recency). 0 = no bound but the TTL. On a
            cluster each shard keeps ``size / shards``.
        pod_cache_size: Maximum pods remembered per block; 0 = no limit.
        ttl_seconds: A pod that wrote nothing for this long is treated as gone (and purged
            by the next writer); a block neither written nor walked by a lookup for this long
            is dropped. 0 = never.
        socket_timeout: Seconds before a command times out.
        connect_timeout: Seconds before a connection attempt times out.
        retry_interval: Seconds to wait before retrying an unreachable server.
        max_buffered_writes: Writes kept while Redis is unreachable; older ones are dropped
            (and counted) beyond this. 0 = drop (and count) every write made while down.
        maintenance_interval: Seconds between a writer's maintenance rounds (expiry sweep,
            purge of pods gone quiet, replay of buffered writes).
    """

    address: str = "redis://127.0.0.1:6379"
    username: str | None = None
    password: str | None = None
    db: int | None = Field(None, ge=0)
    cluster: bool = False
    cluster_shards: int = Field(0, ge=0, le=1024)
    key_prefix: str = "kvaware:"
    size: int = Field(10_000_000, ge=0)
    pod_cache_size: int = Field(0, ge=0)
    ttl_seconds: float = Field(3600.0, ge=0)
    socket_timeout: float = Field(0.25, gt=0)
    connect_timeout: float = Field(0.25, gt=0)
    retry_interval: float = Field(1.0, gt=0)
    max_buffered_writes: int = Field(100_000, ge=0)
    maintenance_interval: float = Field(1.0, gt=0)

    @field_validator("address")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        value = value.strip()
        if "://" in value:
            scheme = value.split("://", 1)[0].lower()
            if scheme not in ("redis", "rediss", "unix", "valkey", "valkeys"):
                raise ValueError(
                    f"unsupported scheme {scheme!r}; use redis://, rediss://, unix://, "
                    "valkey:// or valkeys://"
                )
        elif not value:
            raise ValueError("address must not be empty")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _no_braces(cls, value: str) -> str:
        # NOTE: braces would turn part of the prefix into a Redis Cluster hash tag.
        if "{" in value or "}" in value:
            raise ValueError("key prefix must not contain '{' or '}'")
        return value


class IndexBackendConfig(ConfigModel):
    """A backend registered by name (`kvBlockIndexConfig.backendConfig`): a third party's, or a
    built-in one named explicitly.

    Attributes:
        type: The name the backend registered (`kvaware_scorer.index.register_backend`, or the
            ``kvaware_scorer.index_backends`` entry-point group).
        parameters: Passed to the backend's factory as they are.
    """

    type: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)


class KVBlockIndexConfig(ConfigModel):
    """Which index backend to use (`kvBlockIndexConfig`). At most one backend may be set;
    none means the in-memory default."""

    in_memory_config: InMemoryIndexConfig | None = None
    redis_config: RedisIndexConfig | None = None
    valkey_config: RedisIndexConfig | None = None
    backend_config: IndexBackendConfig | None = None
    enable_metrics: bool = True
    metrics_logging_interval: float = Field(0.0, ge=0)

    @field_validator("metrics_logging_interval", mode="before")
    @classmethod
    def _go_duration(cls, value: Any) -> Any:
        # NOTE: upstream's field is a Go time.Duration, an integer of nanoseconds in JSON
        # (60000000000 = 1 min); seconds here. An integer >= 1e6 can only mean nanoseconds.
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1_000_000:
            return value / 1e9
        return value

    @model_validator(mode="before")
    @classmethod
    def _drop_legacy_limit(cls, data: Any) -> Any:
        # NOTE: older upstream configs put maxPrefixBlocksToMatch here; lookups here walk
        # until the first block no candidate holds, so the limit has no use.
        if isinstance(data, Mapping) and "maxPrefixBlocksToMatch" in data:
            logger.warning("kvBlockIndexConfig.maxPrefixBlocksToMatch is ignored")
            data = {k: v for k, v in data.items() if k != "maxPrefixBlocksToMatch"}
        return data

    @model_validator(mode="after")
    def _one_backend(self) -> KVBlockIndexConfig:
        chosen = [
            name
            for name, value in (
                ("inMemoryConfig", self.in_memory_config),
                ("redisConfig", self.redis_config),
                ("valkeyConfig", self.valkey_config),
                ("backendConfig", self.backend_config),
            )
            if value is not None
        ]
        if len(chosen) > 1:
            raise ValueError(f"choose one index backend, got {', '.join(chosen)}")
        return self

    @property
    def backend(self) -> str:
        """Name of the selected backend: ``memory``, ``redis``, ``valkey`` or a registered
        backend's name (`backend_config`)."""
        if self.backend_config is not None:
            return self.backend_config.type
        if self.redis_config is not None:
            return "redis"
        if self.valkey_config is not None:
            return "valkey"
        return "memory"


class KVCacheBackendConfig(ConfigModel):
    """One KV-cache tier and its scoring weight (`kvCacheBackendConfigs[]`)."""

    name: str
    weight: float = Field(1.0, ge=0)

    @field_validator("name")
    @classmethod
    def _lower(cls, value: str) -> str:
        value = value.strip().lower()
        if not value:
            raise ValueError("tier name must not be empty")
        return value


class LocalTokenizerConfig(ConfigModel):
    """Local tokenizer sources (`tokenizersPoolConfig.local`).

    Attributes:
        model_tokenizer_map: Model name -> directory or ``tokenizer.json`` path.
        auto_discovery_dir: Directory searched for tokenizers (Hugging Face cache layout
            ``models--org--name/snapshots/<rev>/`` or nested ``org/name/``).
        auto_discovery_tokenizer_file_name: File that marks a tokenizer directory.
        auto_discovery_refresh_seconds: A model not found is looked for again (directory
            rescanned, hub retried) after this many seconds; until then it fails fast.
    """

    model_tokenizer_map: dict[str, str] = Field(default_factory=dict)
    auto_discovery_dir: str | None = None
    auto_discovery_tokenizer_file_name: str = Field("tokenizer.json", min_length=1)
    auto_discovery_refresh_seconds: float = Field(30.0, ge=0)


class HFTokenizerConfig(ConfigModel):
    """Hub downloads (`tokenizersPoolConfig.hf`). Off unless enabled.

    When ``HF_HUB_OFFLINE`` is set, an enabled hub is read from its local cache only.

    Attributes:
        enabled: Whether the hub (or its cache) is a tokenizer source.
        tokenizers_cache_dir: Hugging Face cache directory (None = the default cache).
        token: Access token for gated models.
    """

    enabled: bool = False
    tokenizers_cache_dir: str | None = None
    token: str | None = None


class TokenizersPoolConfig(ConfigModel):
    """Tokenization workers and sources (`tokenizersPoolConfig`).

    Attributes:
        workers_count: Threads that tokenize (and score) off the event loop.
        min_prefix_overlap_ratio: A cached text prefix covering at least this fraction of a
            prompt's characters is used instead of tokenizing (the result is then a prefix of
            the tokens); below it, the text after the cached tokens is tokenized and appended
            where the tokenizer allows (1.0: every result is the whole tokenization).
        max_cached_tokenizers: Loaded tokenizers kept (LRU).
        local: Local sources: explicit map and auto-discovery directory.
        hf: The Hugging Face hub as a source.
        render_timeout: Seconds a request-supplied chat template may take to render (in a
            separate worker process, which is killed beyond it).
        render_max_chars: Longest text a request-supplied chat template may render.
        render_workers: Worker processes rendering request-supplied chat templates at once; a
            render finding them all busy is refused at once.
    """

    workers_count: int = Field(5, ge=1, le=256)
    min_prefix_overlap_ratio: float = Field(0.8, ge=0, le=1)
    max_cached_tokenizers: int = Field(16, ge=1)
    local: LocalTokenizerConfig = Field(default_factory=LocalTokenizerConfig)
    hf: HFTokenizerConfig = Field(default_factory=HFTokenizerConfig)
    render_timeout: float = Field(1.0, gt=0, le=600)
    render_max_chars: int = Field(1 << 20, ge=1)
    render_workers: int = Field(2, ge=1, le=64)


class PrefixStoreConfig(ConfigModel):
    """Text-prefix -> tokens cache (`prefixStoreConfig`).

    Attributes:
        cache_size: Maximum chunk entries kept (LRU); 0 disables the store.
        block_size: Chunk length in characters.
    """

    cache_size: int = Field(500_000, ge=0)
    block_size: int = Field(256, ge=8)


class KVEventsEndpoint(ConfigModel):
    """One pod's KV-event publisher in connect mode (`kvEventsConfig.endpoints.<pod-id>`).

    Attributes:
        endpoint: The pod's PUB endpoint, e.g. ``tcp://10.0.0.1:5557`` (rank 0's, when the pod
            runs several data-parallel ranks).
        replay_endpoint: The pod's replay ROUTER endpoint (rank 0's), if it has one.
        model: Model assumed for this pod's events (else the topic's, else `default_model`).
        data_parallel_size: DP ranks publishing; rank ``r`` uses port ``+r`` of both endpoints,
            as vLLM offsets them.
        engine: The pod's wire format (None: `KVEventsConfig.engine_type`).
    """

    endpoint: str
    replay_endpoint: str | None = None
    model: str | None = None
    data_parallel_size: int | None = Field(None, ge=1, le=1024)
    engine: EngineType | None = None


class KVEventsCurve(ConfigModel):
    """ZMQ CURVE authentication and encryption of the KV-event sockets (`kvEventsConfig.curve`).

    Attributes:
        certificate: Our secret certificate file (``zmq.auth.create_certificates`` format: it
            holds our public and secret keys). Never logged.
        server_key: Connect mode: the Z85 public key of the pods' publishers (and replay
            ROUTERs); our SUB and DEALER sockets authenticate them with it.
        client_keys_dir: Bind mode: a directory of the public certificates of the publishers
            allowed to connect to our bound socket; None allows any publisher that knows our
            public key (traffic is still encrypted).
    """

    certificate: str
    server_key: str | None = None
    client_keys_dir: str | None = None


class KVEventsConfig(ConfigModel):
    """How KV events reach the indexer (`kvEventsConfig`).

    Attributes:
        zmq_endpoint: Bind mode: one SUB socket bound here (e.g. ``tcp://*:5557``); pods
            connect and name themselves in the topic ``kv@<pod-id>@<model>`` (``kv@<pod-id>``
            falls back to `default_model`). None = no bound socket.
        topic_filter: Topic prefix subscribed to ("" = everything, incl. vLLM's default empty
            topic).
        endpoints: Connect mode: pod id (``"<address>:<port>"``) -> the pod's publisher
            endpoint (``tcp://host:5557``), or an object with its replay endpoint and model.
        replay_endpoints: Pod id -> the pod's replay ROUTER endpoint (both modes).
        default_model: Model assumed when neither the endpoint nor the topic names one.
        data_parallel_size: DP ranks per pod when an endpoint does not say (rank ``r``
            publishes on port ``+r``). In bind mode, `zmq_endpoint`'s port and the next
            ``data_parallel_size - 1`` ports are bound (vLLM points rank ``r`` at port ``+r``).
        concurrency: Threads applying events; a pod's events always go to the same thread, in
            order. 1 applies on the receiving thread (best for the in-memory index).
        queue_size: Frames buffered per applying thread when `concurrency` > 1.
        rcvhwm: Receive high-water mark of each SUB socket (frames; 0 = unlimited).
        rcvbuf: Kernel receive buffer in bytes (0 = system default).
        replay_timeout: Seconds to wait for each replay answer frame.
        replay_on_join: On the first frame of a stream whose seq is above 0, first replay the
            publisher's buffer (when a replay endpoint is known) so that blocks stored before
            this subscriber started are indexed with their parents.
        max_replay_batches: Most batches taken from one replay answer.
        stats_interval: Seconds between refreshes of the index-size gauges (0 = never).
        apply_interval: Seconds the receiving thread lets frames gather after it took some
            (0 = every frame at once). A frame after a quiet spell is taken at once; under
            load, the frames that arrive within the interval wait in the sockets' queues (at
            most `rcvhwm` each) and are taken together. A frame handled tens of milliseconds
            after the last costs ~3x the CPU of one handled right after another
            (caches gone cold: ``benchmarks/bench_ingest.py --parts 5``), so a live fleet's
            events cost less in groups; the index learns of them up to this much later
            (speculative indexing covers the scheduler's own picks meanwhile). Off by
            default: on the live benchmark's four pods, whose frames come tens of
            milliseconds apart, 50 ms saved nothing measurable (docs/events.md).
        discover_pods: The scheduler dials every endpoint of its endpoints file at
            ``tcp://<address>:<socketPort>`` (see `discovery_endpoints`).
        socket_port: Publisher port used by discovery.
        replay_socket_port: Replay port used by discovery and by bind mode for pods without a
            `replay_endpoints` entry (0 = no replay).
        engine_type: Wire format of pods that do not name theirs (upstream's ``engineType``):
            ``vllm`` or ``sglang``.
        max_frame_bytes: Largest frame a publisher or replay ROUTER may send (ZMQ
            ``MAXMSGSIZE``); a larger one closes that connection (the publisher reconnects, the
            lost batch shows as a seq gap).
        replay_deadline: Seconds one replay may take in total, however slowly it trickles.
        max_replay_bytes: Payload bytes taken from one replay answer (the rest is dropped).
        max_concurrent_replays: Replays running at once; a replay beyond it is refused
            (``busy``) rather than waiting, so replays never hold up live events.
        max_event_tokens: Token ids one BlockStored may carry (events beyond are dropped).
        max_seq_jump: A live seq further than this above the last one is a publisher restart.
        accept_unknown_pods: Bind mode: apply events of any pod id a topic names (open mode).
            Off: only pods the scheduler knows (its endpoints, `endpoints`, `known_pods`).
        max_pods: Bind mode: most distinct pods tracked in open mode (new pods beyond it are
            dropped until idle ones are reclaimed).
        pod_idle_seconds: Open mode: a pod silent this long is forgotten by the subscriber.
        discovery_allowed_hosts: Hosts a pod's ``/kv_event_sources`` answer may point at
            besides the pod's own address (``"*"`` = any); only ``tcp://`` is ever dialed.
        discovery_timeout: Total seconds for one ``/kv_event_sources`` request.
        max_discovery_bytes: Largest ``/kv_event_sources`` answer read.
        max_discovery_ranks: Most DP ranks taken from one answer (extra ranks are refused).
        curve: ZMQ CURVE authentication for both modes (None = plain ZMQ).
    """

    zmq_endpoint: str | None = None
    topic_filter: str = ""
    endpoints: dict[str, str | KVEventsEndpoint] = Field(default_factory=dict)
    replay_endpoints: dict[str, str] = Field(default_factory=dict)
    default_model: str | None = None
    data_parallel_size: int = Field(1, ge=1, le=1024)
    concurrency: int = Field(1, ge=1, le=64)
    queue_size: int = Field(10_000, ge=1)
    rcvhwm: int = Field(100_000, ge=0)
    rcvbuf: int = Field(0, ge=0)
    replay_timeout: float = Field(2.0, gt=0)
    replay_on_join: bool = True
    max_replay_batches: int = Field(100_000, ge=1)
    stats_interval: float = Field(5.0, ge=0)
    apply_interval: float = Field(0.0, ge=0, le=1.0)
    discover_pods: bool = False
    socket_port: int = Field(5557, ge=0, le=65535)
    replay_socket_port: int = Field(0, ge=0, le=65535)
    engine_type: EngineType = "vllm"
    max_frame_bytes: int = Field(8 << 20, ge=1024)
    replay_deadline: float = Field(10.0, gt=0)
    max_replay_bytes: int = Field(64 << 20, ge=1024)
    max_concurrent_replays: int = Field(2, ge=1, le=64)
    max_event_tokens: int = Field(1 << 20, ge=1)
    max_seq_jump: int = Field(1 << 24, ge=1)
    accept_unknown_pods: bool = False
    max_pods: int = Field(10_000, ge=1)
    pod_idle_seconds: float = Field(600.0, gt=0)
    discovery_allowed_hosts: list[str] = Field(default_factory=list)
    discovery_timeout: float = Field(2.0, gt=0)
    max_discovery_bytes: int = Field(1 << 20, ge=1024)
    max_discovery_ranks: int = Field(64, ge=1, le=1024)
    curve: KVEventsCurve | None = None

    def endpoint_config(self, pod_id: str) -> KVEventsEndpoint | None:
        """The connect-mode entry of `pod_id` (strings expanded with `replay_endpoints`)."""
        entry = self.endpoints.get(pod_id)
        if entry is None:
            return None
        if isinstance(entry, str):
            return KVEventsEndpoint(
                endpoint=entry, replay_endpoint=self.replay_endpoints.get(pod_id)
            )
        return entry

    def discovery_endpoints(self, address: str) -> tuple[str, str | None]:
        """Publisher and replay endpoints of a pod found at `address` (discovery)."""
        host = f"[{address}]" if ":" in address and not address.startswith("[") else address
        replay = f"tcp://{host}:{self.replay_socket_port}" if self.replay_socket_port else None
        return f"tcp://{host}:{self.socket_port}", replay


class IndexerConfig(ConfigModel):
    """Everything the `Indexer` needs; loads from the upstream camelCase dict form.

    Attributes:
        token_processor_config: Block size, key mode, seed and algorithm.
        kv_block_index_config: Index backend and its bounds.
        kv_cache_backend_configs: Tier weights (defaults gpu 1.0, cpu 0.8, storage 0.5).
        unknown_tier_weight: Weight of a tier not listed (e.g. an LMCache medium string).
        default_tier: Tier assumed for events whose ``medium`` is nil.
        match_length_weight: Weight ``w`` of the absolute match-length term (upstream
            ``matchLengthWeight``): ``score = w*min(1, matched_tokens/scale)^2 + (1-w)*ratio``.
        match_length_scale_tokens: ``scale`` above (upstream ``matchLengthScaleTokens``).
        tokenizers_pool_config: Tokenizer sources and workers.
        prefix_store_config: Text-prefix cache.
    """

    token_processor_config: TokenProcessorConfig = Field(default_factory=TokenProcessorConfig)
    kv_block_index_config: KVBlockIndexConfig = Field(default_factory=KVBlockIndexConfig)
    kv_cache_backend_configs: list[KVCacheBackendConfig] = Field(
        default_factory=lambda: [
            KVCacheBackendConfig(name=n, weight=w) for n, w in DEFAULT_TIER_WEIGHTS.items()
        ]
    )
    unknown_tier_weight: float = Field(0.5, ge=0)
    default_tier: str = "gpu"
    match_length_weight: float = Field(0.0, ge=0, le=1)
    match_length_scale_tokens: int = Field(8192, ge=1)
    tokenizers_pool_config: TokenizersPoolConfig = Field(default_factory=TokenizersPoolConfig)
    prefix_store_config: PrefixStoreConfig = Field(default_factory=PrefixStoreConfig)

    @field_validator("default_tier")
    @classmethod
    def _tier_lower(cls, value: str) -> str:
        return value.strip().lower() or "gpu"

    @field_validator("kv_cache_backend_configs")
    @classmethod
    def _unique_tiers(cls, value: list[KVCacheBackendConfig]) -> list[KVCacheBackendConfig]:
        names = [b.name for b in value]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tier names in {names}")
        return value

    def tier_weights(self) -> dict[str, float]:
        """Tier name -> weight, as configured."""
        return {b.name: b.weight for b in self.kv_cache_backend_configs}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, path: str = "") -> IndexerConfig:
        """Load from the upstream camelCase dict form; errors name the offending key."""
        return load_model(cls, data or {}, path)
