"""KV-block index backends behind one protocol, chosen from config by a registry + factory."""

from __future__ import annotations

import time
from collections.abc import Callable

from kvaware_scorer.config import IndexerConfig
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.index.base import (
    MAX_TIERS,
    IndexStats,
    IndexWriteBatch,
    KVBlockIndex,
    PodMatch,
    TierTable,
    normalize_medium,
)
from kvaware_scorer.index.memory import InMemoryIndex

__all__ = [
    "MAX_TIERS",
    "InMemoryIndex",
    "IndexStats",
    "IndexWriteBatch",
    "KVBlockIndex",
    "PodMatch",
    "TierTable",
    "create_index",
    "normalize_medium",
    "tier_table",
]


def tier_table(config: IndexerConfig) -> TierTable:
    """The tier table described by an `IndexerConfig`."""
    return TierTable(config.tier_weights(), config.unknown_tier_weight, config.default_tier)


def _memory(config: IndexerConfig, tiers: TierTable, clock: Callable[[], float]) -> KVBlockIndex:
    mem = config.kv_block_index_config.in_memory_config
    if mem is None:
        return InMemoryIndex(tiers=tiers, clock=clock)
    return InMemoryIndex(size=mem.size, pod_cache_size=mem.pod_cache_size, tiers=tiers, clock=clock)


def _redis(config: IndexerConfig, tiers: TierTable, clock: Callable[[], float]) -> KVBlockIndex:
    try:
        from kvaware_scorer.index.redis import RedisIndex
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            f"the Redis backend needs the 'redis' package: pip install 'kvaware-scorer[redis]' ({exc})",
            "kvBlockIndexConfig.redisConfig",
        ) from None
    cfg = config.kv_block_index_config
    rcfg = cfg.redis_config or cfg.valkey_config
    assert rcfg is not None
    index: KVBlockIndex = RedisIndex(rcfg, tiers=tiers)
    return index


_BACKENDS: dict[str, Callable[[IndexerConfig, TierTable, Callable[[], float]], KVBlockIndex]] = {
    "memory": _memory,
    "redis": _redis,
    "valkey": _redis,
}


def create_index(
    config: IndexerConfig, clock: Callable[[], float] = time.monotonic
) -> KVBlockIndex:
    """Build the backend selected by ``config.kv_block_index_config``.

    Args:
        config: The indexer configuration.
        clock: Monotonic clock for TTLs of speculative entries (the emulator passes its
            virtual clock; the Redis backend uses server time and ignores it).

    Raises:
        ConfigError: Unknown backend, or its optional dependency is missing.
    """
    name = config.kv_block_index_config.backend
    factory = _BACKENDS.get(name)
    if factory is None:  # pragma: no cover - the config model only yields known names
        raise ConfigError(
            f"unknown index backend {name!r}; valid: {sorted(_BACKENDS)}", "kvBlockIndexConfig"
        )
    return factory(config, tier_table(config), clock)
