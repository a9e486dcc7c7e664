"""BlockPool: vLLM's free-queue LRU, tail-first freeing, hit touching, eviction and reset."""

from __future__ import annotations

import numpy as np
import pytest

from kvaware_scorer.sim.blocks import NULL_BLOCK, BlockPool
from kvaware_scorer.sim.wire import AllBlocksCleared, BlockRemoved, BlockStored


def _cache(pool: BlockPool, blocks: list[int], hashes: list[int]) -> None:
    tokens = np.arange(len(blocks) * pool.block_size, dtype=np.int32)
    pool.cache_full_blocks(blocks, hashes, 0, len(blocks), tokens)


def test_null_block_is_reserved_and_usage_excludes_it() -> None:
    """Block 0 is never handed out; usage is 1 - free / (num_gpu_blocks - 1)."""
    pool = BlockPool(5, 4)
    assert pool.num_free_blocks == 4 and pool.usage() == 0.0
    got = pool.get_new_blocks(4)
    assert NULL_BLOCK not in got and got == [1, 2, 3, 4]
    assert pool.usage() == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)


def test_freed_blocks_go_to_the_tail_in_the_given_order() -> None:
    """Freeing a request's blocks in reverse puts its last block first in line for eviction."""
    pool = BlockPool(6, 4)
    blocks = pool.get_new_blocks(3)
    _cache(pool, blocks, [11, 12, 13])
    pool.take_events()
    pool.free_blocks(reversed(blocks))
    assert list(pool.free) == [4, 5, 3, 2, 1]
    pool.get_new_blocks(3)  # 4, 5 fresh, then 3 evicts hash 13
    assert pool.take_events() == [BlockRemoved([13], "GPU", 0)]
    assert pool.get_cached_block(13) is None and pool.get_cached_block(12) == 2


def test_touch_takes_a_cached_free_block_out_of_the_queue() -> None:
    """A hit on a free cached block removes it from the free queue and counts a reference."""
    pool = BlockPool(4, 4)
    b = pool.get_new_blocks(1)
    _cache(pool, b, [7])
    pool.free_blocks(b)
    assert 1 in pool.free
    hit = pool.longest_hit([7, 8], 2)
    assert hit == [1]
    pool.touch(hit)
    assert 1 not in pool.free and pool.ref_cnt[1] == 1
    pool.touch(hit)
    pool.free_blocks(hit)
    assert 1 not in pool.free
    pool.free_blocks(hit)
    assert list(pool.free)[-1] == 1


def test_same_hash_in_two_blocks_is_reference_counted() -> None:
    """A hash cached twice stays cached until both physical copies are evicted."""
    pool = BlockPool(4, 4)
    a = pool.get_new_blocks(1)
    _cache(pool, a, [5])
    b = pool.get_new_blocks(1)
    _cache(pool, b, [5])
    assert pool.cached_hashes() == {5: 2}
    stored = pool.take_events()
    assert [type(e) for e in stored] == [BlockStored, BlockStored]
    pool.free_blocks(a)
    pool.free_blocks(b)
    pool.get_new_blocks(2)  # block 3 (fresh), then block 1 (copy of 5)
    assert pool.take_events() == [BlockRemoved([5], "GPU", 0)]
    assert pool.cached_hashes() == {5: 1}


def test_store_event_carries_parent_and_only_new_blocks() -> None:
    """A store after hits names the last hit block as parent and carries only the new tokens."""
    pool = BlockPool(8, 2)
    blocks = pool.get_new_blocks(4)
    tokens = np.arange(8, dtype=np.int32)
    pool.cache_full_blocks(blocks, [1, 2, 3, 4], 2, 4, tokens)
    (ev,) = pool.take_events()
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == [3, 4] and ev.parent_block_hash is None  # blocks 0-1 uncached
    assert ev.token_ids == [4, 5, 6, 7] and ev.block_size == 2 and ev.extra_keys == [None, None]
    pool.cache_full_blocks(blocks, [1, 2, 3, 4], 0, 2, tokens)
    pool.take_events()
    more = pool.get_new_blocks(1)
    pool.cache_full_blocks(blocks + more, [1, 2, 3, 4, 9], 4, 5, np.arange(10, dtype=np.int32))
    (ev2,) = pool.take_events()
    assert ev2.parent_block_hash == 4 and ev2.block_hashes == [9]  # type: ignore[union-attr]


def test_reset_only_when_every_block_is_free() -> None:
    """reset_prefix_cache fails while blocks are in use and clears everything once they are not."""
    pool = BlockPool(4, 4)
    b = pool.get_new_blocks(2)
    _cache(pool, b, [1, 2])
    pool.take_events()
    assert not pool.reset_prefix_cache()
    assert pool.take_events() == []
    pool.free_blocks(reversed(b))
    assert pool.reset_prefix_cache()
    assert pool.take_events() == [AllBlocksCleared()]
    assert pool.cached_hashes() == {}
    pool.get_new_blocks(3)
    assert pool.take_events() == []  # nothing left to evict
