"""The in-memory backend against the shared contract, plus its own internals."""

from __future__ import annotations

from typing import Any

import pytest

from kvaware_scorer.index import InMemoryIndex, KVBlockIndex, TierTable
from tests.index.contract import A, B, C, IndexContract, ehs, keys


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


def test_bound_of_n_keeps_n() -> None:
    """Size 2 keeps the last two blocks after a third is added (upstream's index-size table)."""
    ix = InMemoryIndex(size=2)
    k1, k2, k3 = keys(1, base=1), keys(1, base=2), keys(1, base=3)
    ix.add(A, k1, ehs(1, 1))
    ix.add(B, k2, ehs(1, 2))
    assert ix.stats().entries == 2 and ix.stats().evictions == 0
    ix.add(C, k3, ehs(1, 3))
    assert ix.stats().entries == 2
    assert ix.lookup(k1) == {}
    assert B in ix.lookup(k2) and C in ix.lookup(k3)


def test_pod_cache_size_evicts_least_recently_stored_pod() -> None:
    """podCacheSize 2: a third pod evicts the pod that stored the block least recently, not the
    highest slot (upstream's per-block pod LRU)."""
    ix = InMemoryIndex(size=100, pod_cache_size=2)
    k = keys(1)
    ix.add(A, k, ehs(1))
    ix.add(B, k, ehs(1))
    ix.remove(A, ehs(1))
    ix.add(A, k, ehs(1))  # A stored it again: B is now the least recent
    ix.add(C, k, ehs(1))
    assert set(ix.lookup(k)) == {A, C}
    ix.add(B, k, ehs(1))  # A is now the least recent
    assert set(ix.lookup(k)) == {B, C}


def test_pod_cache_size_order_of_first_stores() -> None:
    """Without re-stores, the first pod to store a block is the first forgotten."""
    ix = InMemoryIndex(size=100, pod_cache_size=2)
    k = keys(1)
    # slots: C gets a higher slot than A and B; the old rule dropped the highest slot (C)
    for pod in (C, B, A):
        ix.add(pod, keys(1, base=99), ehs(1, 99))
    ix.add(C, k, ehs(1))
    ix.add(A, k, ehs(1))
    ix.add(B, k, ehs(1))
    assert set(ix.lookup(k)) == {A, B}


def test_match_keys_with_no_candidates_means_every_pod() -> None:
    """Indexer.match_keys(keys, []) scores every pod the index knows (upstream's empty set)."""
    from kvaware_scorer import Indexer

    indexer = Indexer({"kvBlockIndexConfig": {"inMemoryConfig": {"size": 1000}}})
    k = keys(4)
    indexer.index.add(A, k, ehs(4))
    indexer.index.add(B, k[:2], ehs(2))
    res = indexer.match_keys(k, [])
    assert res.scores() == {A: 1.0, B: 0.5}
