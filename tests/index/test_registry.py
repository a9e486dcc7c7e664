"""Index backends register by name (a call or an entry point) and are chosen by config; a
third-party backend passes the same contract suite as the built-ins."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvaware_scorer import Indexer, IndexerConfig
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.index import (
    InMemoryIndex,
    KVBlockIndex,
    TierTable,
    backend_names,
    create_index,
    register_backend,
)
from tests.index.contract import IndexContract


class CountingIndex(InMemoryIndex):
    """A third party's backend: the in-memory index, counting lookups."""

    instances: list[CountingIndex] = []

    def __init__(self, size: int, **kw: Any) -> None:
        super().__init__(size=size, **kw)
        self.lookups = 0
        CountingIndex.instances.append(self)

    def lookup(self, *args: Any, **kwargs: Any) -> Any:
        self.lookups += 1
        return super().lookup(*args, **kwargs)


def counting_factory(
    config: IndexerConfig, tiers: TierTable, clock: Callable[[], float]
) -> KVBlockIndex:
    bc = config.kv_block_index_config.backend_config
    assert bc is not None
    params = bc.parameters
    return CountingIndex(
        size=int(params.get("size", 1_000_000)),
        pod_cache_size=int(params.get("podCacheSize", 0)),
        tiers=tiers,
        clock=clock,
    )


register_backend("counting", counting_factory, replace=True)


def config_for(backend: str, **params: Any) -> IndexerConfig:
    return IndexerConfig.model_validate(
        {"kvBlockIndexConfig": {"backendConfig": {"type": backend, "parameters": params}}}
    )


class TestRegisteredBackendContract(IndexContract):
    """The contract suite run against a backend that reached kvaware only through the registry."""

    @pytest.fixture
    def make_index(self) -> Any:
        def factory(
            size: int = 1_000_000, pod_cache_size: int = 0, tiers: TierTable | None = None
        ) -> KVBlockIndex:
            cfg = config_for("counting", size=size, podCacheSize=pod_cache_size)
            index = create_index(cfg)
            assert isinstance(index, CountingIndex)
            if tiers is not None:
                index.tiers = tiers
            return index

        return factory


def test_an_indexer_scores_through_a_registered_backend() -> None:
    CountingIndex.instances.clear()
    ix = Indexer(config_for("counting"))
    assert isinstance(ix.index, CountingIndex)
    ix.score(model="m", token_ids=list(range(64)), pods=["a"])
    assert CountingIndex.instances[-1].lookups == 1


def test_unknown_backend_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        create_index(config_for("nosuch"))
    msg = str(info.value)
    assert "unknown index backend 'nosuch'" in msg
    assert "counting" in msg and "memory" in msg and "redis" in msg


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backend("memory", counting_factory)


def test_one_backend_per_config() -> None:
    with pytest.raises(ValueError, match="choose one index backend"):
        IndexerConfig.model_validate(
            {
                "kvBlockIndexConfig": {
                    "inMemoryConfig": {"size": 10},
                    "backendConfig": {"type": "counting"},
                }
            }
        )


@pytest.fixture
def installed_plugin(tmp_path: Path) -> Iterator[str]:
    """A distribution on sys.path whose entry point registers a backend module."""
    pkg = tmp_path / "thirdparty_index.py"
    pkg.write_text(
        textwrap.dedent(
            """
            from kvaware_scorer.index import InMemoryIndex

            def make(config, tiers, clock):
                return InMemoryIndex(size=123, tiers=tiers, clock=clock)
            """
        )
    )
    dist = tmp_path / "thirdparty_index-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-index\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[kvaware_scorer.index_backends]\nthirdparty = thirdparty_index:make\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield "thirdparty"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("thirdparty_index", None)


def test_an_entry_point_backend_is_found_by_name(installed_plugin: str) -> None:
    assert installed_plugin in backend_names()
    index = create_index(config_for(installed_plugin))
    assert isinstance(index, InMemoryIndex)
    assert type(index).__module__ == "kvaware_scorer.index.memory"
    assert index.size == 123
    assert index.blocking_io is False
