"""KV-block index backends behind one protocol, chosen from config through a registry.

Built-in backends (``memory``, ``redis``, ``valkey``) and third-party ones register the same
way: `register_backend(name, factory)`, or an entry point in the ``kvaware_scorer.index_backends``
group whose object is the factory (loaded the first time a config names it). A factory takes
``(config, tiers, clock)`` and returns a `KVBlockIndex`; a config selects it with
``kvBlockIndexConfig: {backendConfig: {type: NAME, parameters: {...}}}`` (the parameters are in
``config.kv_block_index_config.backend_config``). ``tests/index/contract.py`` is the test suite a
backend author runs against their backend (see docs/core.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from importlib.metadata import entry_points

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
    "BackendFactory",
    "InMemoryIndex",
    "IndexStats",
    "IndexWriteBatch",
    "KVBlockIndex",
    "PodMatch",
    "TierTable",
    "backend_names",
    "create_index",
    "normalize_medium",
    "register_backend",
    "tier_table",
]


logger = logging.getLogger(__name__)

#: Entry-point group third-party index backends register under (name -> factory).
ENTRY_POINT_GROUP = "kvaware_scorer.index_backends"

#: Builds a backend from the indexer config, its tier table and a monotonic clock.
BackendFactory = Callable[[IndexerConfig, TierTable, Callable[[], float]], KVBlockIndex]


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


_BACKENDS: dict[str, BackendFactory] = {
    "memory": _memory,
    "redis": _redis,
    "valkey": _redis,
}
_lock = threading.Lock()


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make `factory` the backend a config selects as `name`.

    Raises:
        ValueError: `name` is taken (and `replace` is false), or empty.
    """
    if not name:
        raise ValueError("a backend needs a name")
    with _lock:
        if name in _BACKENDS and not replace and _BACKENDS[name] is not factory:
            raise ValueError(f"index backend {name!r} is already registered")
        _BACKENDS[name] = factory


def backend_names() -> list[str]:
    """Every backend name a config can select: registered ones and installed entry points."""
    names = set(_BACKENDS)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def _factory(name: str) -> BackendFactory | None:
    factory = _BACKENDS.get(name)
    if factory is not None:
        return factory
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            loaded = ep.load()
        except Exception as exc:
            raise ConfigError(
                f"index backend {name!r} ({ep.value}) failed to load: {exc}",
                "kvBlockIndexConfig.backendConfig.type",
            ) from None
        if not callable(loaded):
            raise ConfigError(
                f"index backend {name!r} ({ep.value}) is not a factory",
                "kvBlockIndexConfig.backendConfig.type",
            )
        with _lock:
            _BACKENDS.setdefault(name, loaded)
        return _BACKENDS[name]
    return None


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
    factory = _factory(name)
    if factory is None:
        raise ConfigError(
            f"unknown index backend {name!r} (valid: {', '.join(backend_names())})",
            "kvBlockIndexConfig.backendConfig.type",
        )
    return factory(config, tier_table(config), clock)
