"""The Redis backend against the shared contract, plus its roles, layout and failure behaviour."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kvaware_scorer.config import RedisIndexConfig
from kvaware_scorer.index import KVBlockIndex, TierTable
from kvaware_scorer.index.redis import RedisIndex
from tests.conftest import RedisProcess
from tests.index.contract import IndexContract


def fresh_config(url: str, **kw: Any) -> RedisIndexConfig:
    return RedisIndexConfig(address=url, key_prefix=f"t{uuid.uuid4().hex[:10]}:", **kw)


class TestRedisContract(IndexContract):
    @pytest.fixture
    def make_index(self, redis_server: RedisProcess) -> Iterator[Any]:
        made: list[RedisIndex] = []

        def factory(
            size: int = 1_000_000, pod_cache_size: int = 0, tiers: TierTable | None = None
        ) -> KVBlockIndex:
            cfg = fresh_config(redis_server.url, size=size, pod_cache_size=pod_cache_size)
            ix = RedisIndex(cfg, tiers=tiers)
            made.append(ix)
            return ix

        yield factory
        for ix in made:
            ix.close()


class TestRedisClusterContract(IndexContract):
    @pytest.fixture
    def make_index(self, redis_cluster: Any) -> Iterator[Any]:
        made: list[RedisIndex] = []

        def factory(
            size: int = 1_000_000, pod_cache_size: int = 0, tiers: TierTable | None = None
        ) -> KVBlockIndex:
            cfg = fresh_config(
                redis_cluster.url, size=size, pod_cache_size=pod_cache_size, cluster=True
            )
            ix = RedisIndex(cfg, tiers=tiers)
            made.append(ix)
            return ix

        yield factory
        for ix in made:
            ix.close()
