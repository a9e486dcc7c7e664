"""The Redis / Valkey `KVBlockIndex` backend (interface; implementation in progress)."""

from __future__ import annotations

from kvaware_scorer.config import RedisIndexConfig
from kvaware_scorer.index.base import TierTable

__all__ = ["RedisIndex"]


class RedisIndex:
    """A KV-block index shared through Redis or Valkey."""

    backend = "redis"

    def __init__(self, config: RedisIndexConfig, tiers: TierTable | None = None) -> None:
        raise NotImplementedError("the Redis backend is not built yet")
