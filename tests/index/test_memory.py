"""The in-memory backend against the shared contract, plus its own internals."""

from __future__ import annotations

from typing import Any

import pytest

from kvaware_scorer.index import InMemoryIndex, KVBlockIndex, TierTable
from tests.index.contract import A, B, IndexContract, ehs, keys


class TestInMemoryContract(IndexContract):
    @pytest.fixture
    def make_index(self) -> Any:
        def factory(
            size: int = 1_000_000, pod_cache_size: int = 0, tiers: TierTable | None = None
        ) -> KVBlockIndex:
            return InMemoryIndex(size=size, pod_cache_size=pod_cache_size, tiers=tiers)

        return factory


def test_protocol_conformance() -> None:
    """InMemoryIndex satisfies the KVBlockIndex protocol."""
    assert isinstance(InMemoryIndex(), KVBlockIndex)


def test_plain_values_return_to_compact_form() -> None:
    """After an upgrade to a multi-tier value, removing the extra tier restores the int form."""
    ix = InMemoryIndex()
    k, e = keys(1), ehs(1)
    ix.add(A, k, e)
    ix.add_tier(A, e, "cpu")
    assert not isinstance(ix._blocks[k[0]], int)
    ix.remove(A, e, "cpu")
    assert isinstance(ix._blocks[k[0]], int)


def test_purge_cost_is_per_pod() -> None:
    """Purging a small pod leaves a large pod's entries untouched and is proportional to it."""
    ix = InMemoryIndex()
    ix.add(A, keys(50_000), ehs(50_000))
    ix.add(B, keys(10, base=10**9), ehs(10, 10**9))
    assert ix.purge(B) == 10
    assert ix.entries_for(A) == 50_000


def test_slot_reuse_after_purge() -> None:
    """A purged pod's slot is reused without resurrecting its old blocks."""
    ix = InMemoryIndex()
    ix.add(A, keys(3), ehs(3))
    ix.purge(A)
    ix.add(B, keys(1, base=5), ehs(1, 5))
    assert ix.lookup(keys(3), [B]) == {}
    assert ix.stats().blocks == 1


def test_engine_map_garbage_collected_after_evictions() -> None:
    """Engine-hash mappings of evicted blocks do not accumulate without bound."""
    ix = InMemoryIndex(size=1000)
    for i in range(200):
        ix.add(A, keys(1000, base=i * 10_000), ehs(1000, i * 10_000))
    st = ix.stats()
    assert st.entries <= 1000
    assert st.engine_hashes <= 2 * st.entries + 65536
