"""The `KVBlockIndex` contract: one suite every backend runs unchanged.

A backend's test module subclasses `IndexContract` and provides a ``make_index`` fixture:
``make_index(size=..., pod_cache_size=..., tiers=...) -> KVBlockIndex`` returning a fresh,
empty index.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from kvaware_scorer.index import KVBlockIndex, TierTable

Factory = Callable[..., KVBlockIndex]

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def keys(n: int, base: int = 1000) -> list[int]:
    return [base + i for i in range(n)]


def ehs(n: int, base: int = 9_000_000_000_000_000_000) -> list[int]:
    # engine hashes above 2**63 exercise unsigned handling
    return [base + i for i in range(n)]


class IndexContract:
    """Behaviour every `KVBlockIndex` backend must have."""

    #: An engine hash stored again under other keys releases the pod's old keys at once.
    #: (A Redis Cluster shard only sees its own keys: the old ones, on another shard, stay
    #: mapped there and go with the engine hash's removal or the pod's purge.)
    moves_engine_hashes = True

    def test_empty_lookup(self, make_index: Factory) -> None:
        """An empty index matches nothing and reports zero size."""
        ix = make_index()
        assert ix.lookup(keys(4), [A]) == {}
        assert ix.lookup([], None) == {}
        st = ix.stats()
        assert st.entries == 0 and st.blocks == 0

    def test_consecutive_prefix_only(self, make_index: Factory) -> None:
        """A pod's match is its run from block 0 and ends at its first missing block."""
        ix = make_index()
        k = keys(8)
        ix.add(A, k[:3] + k[4:8], ehs(7))
        ix.add(B, k[:6], ehs(6, 5))
        res = ix.lookup(k, [A, B])
        assert res[A].blocks == 3
        assert res[B].blocks == 6
        assert res[A].weight == pytest.approx(3.0)

    def test_walk_stops_when_no_candidate_holds(self, make_index: Factory) -> None:
        """Blocks after the first block no candidate holds are not counted."""
        ix = make_index()
        k = keys(6)
        ix.add(A, [k[0], k[1], k[3], k[4], k[5]], ehs(5))
        assert ix.lookup(k, [A])[A].blocks == 2

    def test_missing_block_zero_means_no_match(self, make_index: Factory) -> None:
        """A pod that lacks block 0 has no match even if it holds later blocks."""
        ix = make_index()
        k = keys(5)
        ix.add(A, k[1:], ehs(4))
        assert A not in ix.lookup(k, [A])

    def test_candidates_filter(self, make_index: Factory) -> None:
        """Only candidate pods are reported; None means every known pod."""
        ix = make_index()
        k = keys(4)
        ix.add(A, k, ehs(4))
        ix.add(B, k, ehs(4, 100))
        assert set(ix.lookup(k, [B])) == {B}
        assert set(ix.lookup(k, None)) == {A, B}
        assert ix.lookup(k, [C]) == {}
        assert ix.lookup(k, []) == {}

    def test_tiers_best_weight_per_block(self, make_index: Factory) -> None:
        """Each block counts at the best tier the pod holds it at."""
        ix = make_index(tiers=TierTable({"gpu": 1.0, "cpu": 0.8, "storage": 0.5}))
        k = keys(4)
        e = ehs(4)
        ix.add(A, k[:2], e[:2], "GPU")
        ix.add(A, k[2:], e[2:], "cpu")
        ix.add_tier(A, e[:1], "STORAGE")
        res = ix.lookup(k, [A])[A]
        assert res.blocks == 4
        assert res.weight == pytest.approx(1.0 + 1.0 + 0.8 + 0.8)
        assert dict(res.tiers) == {"gpu": 2, "cpu": 2}

    def test_unknown_tier_gets_unknown_weight(self, make_index: Factory) -> None:
        """A medium not configured counts at the unknown-tier weight."""
        ix = make_index(tiers=TierTable({"gpu": 1.0}, unknown_weight=0.25))
        k = keys(2)
        ix.add(A, k, ehs(2), "LMCache-Disk")
        res = ix.lookup(k, [A])[A]
        assert res.weight == pytest.approx(0.5)
        assert dict(res.tiers) == {"lmcache-disk": 2}

    def test_none_medium_is_default_tier(self, make_index: Factory) -> None:
        """A nil medium is the default tier."""
        ix = make_index()
        ix.add(A, keys(2), ehs(2), None)
        assert dict(ix.lookup(keys(2), [A])[A].tiers) == {"gpu": 2}

    def test_refcounted_removal(self, make_index: Factory) -> None:
        """A hash stored twice on one pod survives one removal and goes with the second."""
        ix = make_index()
        k = keys(2)
        e = ehs(2)
        ix.add(A, k, e)
        ix.add(A, k[1:], e[1:])  # the same hash stored again (vLLM resend)
        assert ix.remove(A, e[1:]) == 1
        assert ix.lookup(k, [A])[A].blocks == 2
        assert ix.remove(A, e[1:]) == 1
        assert ix.lookup(k, [A])[A].blocks == 1
        assert ix.stats().entries == 1

    def test_removal_is_per_tier(self, make_index: Factory) -> None:
        """Removing the CPU copy keeps the GPU copy, and vice versa."""
        ix = make_index()
        k = keys(1)
        e = ehs(1)
        ix.add(A, k, e, "GPU")
        ix.add_tier(A, e, "CPU")
        ix.remove(A, e, "GPU")
        res = ix.lookup(k, [A])[A]
        assert dict(res.tiers) == {"cpu": 1}
        ix.remove(A, e, "CPU")
        assert ix.lookup(k, [A]) == {}
        assert ix.stats().entries == 0

    def test_unknown_removals_ignored(self, make_index: Factory) -> None:
        """Removing hashes never stored (or from an unknown pod) changes nothing."""
        ix = make_index()
        ix.add(A, keys(2), ehs(2))
        assert ix.remove(A, [123, 456]) == 0
        assert ix.remove(C, ehs(2)) == 0
        assert ix.lookup(keys(2), [A])[A].blocks == 2

    def test_add_tier_unknown_hash_counted(self, make_index: Factory) -> None:
        """Offload stores naming hashes the pod never announced are reported unknown."""
        ix = make_index()
        ix.add(A, keys(1), ehs(1))
        assert ix.add_tier(A, [777], "CPU") == 1
        assert ix.add_tier(B, [777], "CPU") == 1
        assert ix.add_tier(A, ehs(1), "CPU") == 0

    def test_resolve_engine_hash(self, make_index: Factory) -> None:
        """Engine hashes resolve to the key they were stored under, per pod."""
        ix = make_index()
        k = keys(3)
        e = ehs(3)
        ix.add(A, k, e)
        assert ix.resolve(A, e[2]) == k[2]
        assert ix.resolve(B, e[2]) is None
        assert ix.resolve(A, 42) is None

    def test_engine_block_covering_several_keys(self, make_index: Factory) -> None:
        """One engine hash over several keys (re-chunked block) resolves to its last key
        and removes all of them."""
        ix = make_index()
        k = keys(4)
        ix.add(A, k, [7, 7, 8, 8])
        assert ix.resolve(A, 7) == k[1]
        assert ix.lookup(k, [A])[A].blocks == 4
        ix.remove(A, [8])
        assert ix.lookup(k, [A])[A].blocks == 2
        assert ix.stats().entries == 2

    def test_vllm_mode_keys_are_engine_hashes(self, make_index: Factory) -> None:
        """Without engine hashes the keys themselves resolve removals."""
        ix = make_index()
        k = ehs(3)
        ix.add(A, k)
        ix.remove(A, k[2:])
        assert ix.lookup(k, [A])[A].blocks == 2

    def test_purge_pod(self, make_index: Factory) -> None:
        """Purging forgets only that pod, and the pod can be indexed again afterwards."""
        ix = make_index()
        k = keys(5)
        ix.add(A, k, ehs(5))
        ix.add(B, k[:2], ehs(2, 50))
        dropped = ix.purge(A)
        assert dropped == 5
        res = ix.lookup(k, [A, B])
        assert A not in res and res[B].blocks == 2
        assert ix.resolve(A, ehs(5)[0]) is None
        assert ix.stats().entries == 2
        assert ix.purge(A) == 0
        ix.add(A, k[:1], ehs(1))
        assert ix.lookup(k, [A])[A].blocks == 1

    def test_engine_hash_stored_again_under_another_key(self, make_index: Factory) -> None:
        """A pod's engine hash that comes back with another key maps to the new key, and no
        key the pod held under it is left unreachable by removals and purges (nor inherited
        by a pod registered after the purge)."""
        ix = make_index()
        k = keys(4)
        e = ehs(4)
        ix.add(A, k[:2], e[:2])
        ix.add(A, k[2:], e[:2])  # the same engine hashes, other keys
        assert ix.lookup(k[2:], [A])[A].blocks == 2
        assert ix.resolve(A, e[1]) == k[3]
        if self.moves_engine_hashes:
            assert A not in ix.lookup(k[:2], [A])
            assert ix.stats().entries == 2
        else:
            assert ix.lookup(k[:2], [A])[A].blocks == 2
        assert ix.remove(A, e[:1]) == 1
        assert ix.lookup(k[2:], [A]) == {} and ix.lookup(k[:1], [A]) == {}
        ix.add(A, k[:1], e[1:2])  # and once more, back to a key it held before
        ix.purge(A)
        assert ix.stats().entries == 0
        ix.add(B, keys(1, base=900), ehs(1, 900))
        assert ix.lookup(k, [A, B]) == {}
        assert ix.stats().entries == 1

    def test_grouped_engine_hash_stored_again_under_other_keys(self, make_index: Factory) -> None:
        """The same for a re-chunked engine block (one engine hash over several keys)."""
        ix = make_index()
        k = keys(4)
        e = ehs(1)
        ix.add(A, k[:2], e * 2)
        ix.add(A, k[2:], e * 2)
        assert ix.lookup(k[2:], [A])[A].blocks == 2
        if self.moves_engine_hashes:
            assert A not in ix.lookup(k[:2], [A])
            assert ix.stats().entries == 2
        ix.purge(A)
        ix.add(B, keys(1, base=900), ehs(1, 900))
        assert ix.lookup(k, [A, B]) == {}
        assert ix.stats().entries == 1

    def test_stats_counts_entries_and_blocks(self, make_index: Factory) -> None:
        """Entries count (block, pod) pairs; blocks count distinct keys."""
        ix = make_index()
        ix.add(A, keys(3), ehs(3))
        ix.add(B, keys(2), ehs(2, 10))
        st = ix.stats()
        assert st.entries == 5
        assert st.blocks == 3
        assert st.pods == 2
        assert sorted(ix.pods()) == [A, B]

    def test_bounded_with_lru_eviction(self, make_index: Factory) -> None:
        """Beyond its capacity the index evicts, and a recently used prefix survives."""
        ix = make_index(size=200)
        hot = keys(20, base=1)
        ix.add(A, hot, ehs(20, 1))
        for i in range(40):
            ix.lookup(hot, [A])  # keep the hot prefix recently used
            ix.add(B, keys(10, base=10_000 + 100 * i), ehs(10, 10_000 + 100 * i))
        st = ix.stats()
        assert st.entries <= 200
        assert st.evictions > 0
        assert ix.lookup(hot, [A])[A].blocks == 20
        oldest = keys(10, base=10_000)
        assert B not in ix.lookup(oldest, [B])

    def test_pod_cache_size_limits_holders(self, make_index: Factory) -> None:
        """With podCacheSize N, a block remembers at most N pods and the newest stays."""
        ix = make_index(pod_cache_size=2)
        k = keys(1)
        ix.add(A, k, ehs(1))
        ix.add(B, k, ehs(1))
        ix.add(C, k, ehs(1))
        res = ix.lookup(k, [A, B, C])
        assert len(res) == 2 and C in res

    def test_speculative_entries_expire(self, make_index: Factory) -> None:
        """Speculative entries count until their TTL ends."""
        ix = make_index()
        k = keys(4)
        ix.add_speculative(A, k, ttl=0.3)
        assert ix.lookup(k, [A])[A].blocks == 4
        assert ix.stats().entries == 0
        time.sleep(0.45)
        assert ix.lookup(k, [A]) == {}

    def test_speculative_extends_real_entries(self, make_index: Factory) -> None:
        """A real prefix plus a speculative continuation form one run."""
        ix = make_index()
        k = keys(6)
        ix.add(A, k[:3], ehs(3))
        ix.add_speculative(A, k, ttl=5)
        assert ix.lookup(k, [A])[A].blocks == 6

    def test_large_unsigned_keys(self, make_index: Factory) -> None:
        """Keys and hashes over 2**63 round-trip."""
        ix = make_index()
        k = [2**64 - 1, 2**63, 2**63 + 1]
        ix.add(A, k, [2**64 - 2, 2**63 + 5, 1])
        assert ix.lookup(k, [A])[A].blocks == 3
        assert ix.resolve(A, 2**64 - 2) == 2**64 - 1

    def test_many_pods(self, make_index: Factory) -> None:
        """Runs are tracked independently for many pods."""
        ix = make_index()
        k = keys(64)
        pods = [f"10.1.{i // 256}.{i % 256}:8000" for i in range(100)]
        for i, p in enumerate(pods):
            n = i % 64 + 1
            ix.add(p, k[:n], ehs(n, 10_000 * i))
        res = ix.lookup(k, pods)
        for i, p in enumerate(pods):
            assert res[p].blocks == i % 64 + 1

    def test_concurrent_writes_and_reads(self, make_index: Factory) -> None:
        """Concurrent writers and readers leave a consistent index."""
        import threading

        ix = make_index()
        k = keys(32)
        errors: list[Any] = []

        def writer(pod: str, base: int) -> None:
            try:
                for _ in range(20):
                    ix.add(pod, k, ehs(32, base))
                    ix.remove(pod, ehs(32, base))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def reader() -> None:
            try:
                for _ in range(50):
                    ix.lookup(k, [A, B])
            except Exception as exc:  # pragma: no cover
                errors.append(exc)

        threads = [
            threading.Thread(target=writer, args=(A, 0)),
            threading.Thread(target=writer, args=(B, 500)),
        ]
        threads += [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert ix.stats().entries == 0

    def test_add_new_skips_what_the_pod_holds_at_the_tier(self, make_index: Factory) -> None:
        """add_new adds no reference for engine hashes the pod already holds at that tier
        under the same keys, and adds everything else like add."""
        ix = make_index()
        k, e = keys(4), ehs(4)
        ix.add(A, k[:2], e[:2])
        assert ix.add_new(A, k, e) == 2
        assert ix.lookup(k, [A])[A].blocks == 4
        assert ix.remove(A, e[:1]) == 1
        assert A not in ix.lookup(k, [A])  # one reference only: block 0 is gone
        assert ix.add_new(A, k[1:2], e[1:2], "cpu") == 0  # held at gpu, not at cpu
        assert ix.add_new(B, k, e) == 0
        assert ix.add_new(A, [99], e[3:4]) == 0  # same engine hash, another key: moved
        assert ix.resolve(A, e[3]) == 99 and ix.lookup([99], [A])[A].blocks == 1
        if self.moves_engine_hashes:
            assert ix.stats().entries == 3 + 4
            assert A not in ix.lookup(k[3:], [A])
        assert ix.add_new(A, [], []) == 0

    def test_add_new_of_rechunked_engine_blocks(self, make_index: Factory) -> None:
        """An engine block covering several keys is skipped whole when the pod holds it."""
        ix = make_index()
        k = keys(6)
        ix.add(A, k[:4], [7, 7, 8, 8])
        assert ix.add_new(A, k, [7, 7, 8, 8, 9, 9]) == 2
        ix.remove(A, [7, 8, 9])
        assert ix.lookup(k, [A]) == {}
        assert ix.stats().entries == 0

    def test_references_per_tier(self, make_index: Factory) -> None:
        """references lists, per tier, the copies a pod holds of each engine hash it still
        holds there."""
        ix = make_index()
        k, e = keys(3), ehs(3)
        ix.add(A, k, e)
        ix.add(A, k[1:2], e[1:2])
        ix.add_tier(A, e[:1], "CPU")
        ix.add(B, k[:1], [5])
        assert ix.references(A) == {"gpu": {e[0]: 1, e[1]: 2, e[2]: 1}, "cpu": {e[0]: 1}}
        ix.remove(A, e[2:])
        ix.remove(A, e[:1], "cpu")
        assert ix.references(A) == {"gpu": {e[0]: 1, e[1]: 2}}
        assert ix.references(B) == {"gpu": {5: 1}}
        assert ix.references(C) == {}
        ix.purge(A)
        assert ix.references(A) == {}

    def test_batch_applies_writes_in_order(self, make_index: Factory) -> None:
        """A write batch applies its writes in call order and returns each one's result."""
        ix = make_index()
        k, e = keys(4), ehs(4)
        with ix.batch() as b:
            b.add(A, k, e)
            b.remove(A, e[3:])
            b.add_new(A, k[:3], e[:3])
            b.add_tier(A, e[:1] + [777], "cpu")
            b.remove(A, [555, e[2]])
            b.add(B, k[:2], e[:2])
            b.purge(B)
            b.add(B, k[:1], [6])
        assert b.results == [None, 1, 3, 1, 1, None, 2, None]
        assert ix.lookup(k, [A, B]) == {
            A: ix.lookup(k, [A])[A],
            B: ix.lookup(k[:1], [B])[B],
        }
        assert ix.lookup(k, [A])[A].blocks == 2
        assert ix.references(A) == {"gpu": {e[0]: 1, e[1]: 1}, "cpu": {e[0]: 1}}
        assert ix.references(B) == {"gpu": {6: 1}}
