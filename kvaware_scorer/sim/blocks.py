"""One pod's KV block pool with vLLM v1's prefix-cache semantics (``vllm/v1/core/block_pool.py``).

* Block 0 is vLLM's reserved null block; the others start in the free queue in id order.
* The free queue is LRU: `get_new_blocks` pops from the head; `free_blocks` appends blocks whose
  reference count dropped to 0 at the tail, in the order given. A request frees its blocks in
  reverse (tail first), so its last blocks are evicted first.
* A free block may still hold a cached hash. A prefix-cache hit on it (`touch`) takes it out of
  the free queue; reusing it for new data evicts the hash and emits ``BlockRemoved``.
* Hashes are not de-duplicated: one hash may be cached in several physical blocks (a resend's
  last block is recomputed because the hit is capped at ``num_tokens - 1``).
* `cache_full_blocks` emits one ``BlockStored`` per call (per request per step) with the parent.
* `reset_prefix_cache` succeeds only when every block is free and emits ``AllBlocksCleared``.

Block ids are ints; per-block state lives in flat lists (cheap in the hot loop).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

from kvaware_scorer.sim.wire import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    event_extra_keys,
)

__all__ = ["NULL_BLOCK", "BlockPool"]

NULL_BLOCK = 0


class BlockPool:
    """Physical KV blocks, the free queue and the hash -> cached block map.

    Args:
        num_gpu_blocks: Blocks in the pool, including the null block.
        block_size: Tokens per block.
        enable_events: Record KV events (taken with `take_events`).
    """

    def __init__(self, num_gpu_blocks: int, block_size: int, enable_events: bool = True) -> None:
        if num_gpu_blocks < 2:
            raise ValueError("a block pool needs at least 2 blocks (one is the null block)")
        self.num_gpu_blocks = num_gpu_blocks
        self.block_size = block_size
        self.enable_events = enable_events
        self.ref_cnt: list[int] = [0] * num_gpu_blocks
        self.block_hash: list[int | None] = [None] * num_gpu_blocks
        # OrderedDict as the doubly linked free list: O(1) popleft, append and removal.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_gpu_blocks))
        # hash -> block id, or -> {block id: None} when several physical blocks hold it.
        self.cached: dict[int, int | dict[int, None]] = {}
        self.events: list[KVEvent] = []
        self.evictions = 0
        del self.free[NULL_BLOCK]
        self.ref_cnt[NULL_BLOCK] = 1

    # -- queries --------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be (re)allocated, cached or not."""
        return len(self.free)

    def usage(self) -> float:
        """vLLM's ``kv_cache_usage_perc``: 1 - free / (num_gpu_blocks - 1)."""
        return 1.0 - len(self.free) / (self.num_gpu_blocks - 1)

    def get_cached_block(self, block_hash: int) -> int | None:
        """One block caching `block_hash` (the first cached copy), or None."""
        entry = self.cached.get(block_hash)
        if entry is None or isinstance(entry, int):
            return entry
        return next(iter(entry))

    def longest_hit(self, block_hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Blocks caching the longest prefix of `block_hashes`, at most `max_blocks` of them."""
        cached = self.cached
        out: list[int] = []
        for h in block_hashes[:max_blocks]:
            entry = cached.get(h)
            if entry is None:
                break
            out.append(entry if isinstance(entry, int) else next(iter(entry)))
        return out

    def cached_hashes(self) -> dict[int, int]:
        """Hash -> number of physical blocks caching it (a snapshot, for tests and reports)."""
        return {h: 1 if isinstance(e, int) else len(e) for h, e in self.cached.items()}

    # -- allocation -----------------------------------------------------------------------------

    def touch(self, blocks: Iterable[int]) -> None:
        """Take hit blocks for a request: out of the free queue if unused, one more reference."""
        ref, free = self.ref_cnt, self.free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def get_new_blocks(self, n: int) -> list[int]:
        """Pop `n` blocks from the free queue head, evicting any hash they still cache.

        Raises:
            ValueError: Fewer than `n` free blocks.
        """
        free = self.free
        if n > len(free):
            raise ValueError(f"cannot get {n} free blocks, only {len(free)} left")
        out: list[int] = []
        ref, bh = self.ref_cnt, self.block_hash
        for _ in range(n):
            b, _none = free.popitem(last=False)
            h = bh[b]
            if h is not None:
                self._evict(b, h)
            ref[b] = 1
            out.append(b)
        return out

    def _evict(self, block: int, block_hash: int) -> None:
        entry = self.cached[block_hash]
        if isinstance(entry, int):
            del self.cached[block_hash]
        else:
            del entry[block]
            if len(entry) == 1:
                self.cached[block_hash] = next(iter(entry))
        self.block_hash[block] = None
        self.evictions += 1
        if self.enable_events:
            self.events.append(BlockRemoved([block_hash], MEDIUM_GPU, 0))

    def free_blocks(self, ordered: Iterable[int]) -> None:
        """Drop one reference per block; blocks reaching 0 go to the free queue tail in order."""
        ref, free = self.ref_cnt, self.free
        released: list[int] = []
        for b in ordered:
            ref[b] -= 1
            if ref[b] == 0 and b != NULL_BLOCK:
                released.append(b)
        for b in released:
            free[b] = None

    # -- caching --------------------------------------------------------------------------------

    def cache_full_blocks(
        self,
        blocks: Sequence[int],
        block_hashes: Sequence[int],
        num_cached_blocks: int,
        num_full_blocks: int,
        token_ids: np.ndarray,
        lora_name: str | None = None,
        lora_id: int | None = None,
        cache_salt: str | None = None,
        session_id: str | None = None,
    ) -> None:
        """Mark a request's newly full blocks as cached and emit one ``BlockStored`` for them.

        Args:
            blocks: The request's physical blocks.
            block_hashes: The request's block hashes (at least `num_full_blocks`).
            num_cached_blocks: Blocks of the request already cached (hits or earlier steps).
            num_full_blocks: Blocks of the request that are full now.
            token_ids: The request's tokens (at least ``num_full_blocks * block_size``).
            lora_name: LoRA adapter name (keys the event's extra keys).
            lora_id: LoRA int id (the deprecated ``lora_id`` field).
            cache_salt: The request's cache salt (block 0's extra key).
            session_id: The request's session id (vLLM >= 0.30 sends it when set).
        """
        # NOTE: long on purpose: emulator hot path (once per request step); kept inline, no calls.
        if num_cached_blocks >= num_full_blocks:
            return
        cached, bh = self.cached, self.block_hash
        new_hashes: list[int] = []
        for i in range(num_cached_blocks, num_full_blocks):
            b = blocks[i]
            h = block_hashes[i]
            bh[b] = h
            entry = cached.get(h)
            if entry is None:
                cached[h] = b
            elif isinstance(entry, int):
                cached[h] = {entry: None, b: None}
            else:
                entry[b] = None
            new_hashes.append(h)
        if not self.enable_events:
            return
        parent = bh[blocks[num_cached_blocks - 1]] if num_cached_blocks > 0 else None
        bs = self.block_size
        n = num_full_blocks - num_cached_blocks
        self.events.append(
            BlockStored(
                block_hashes=new_hashes,
                parent_block_hash=parent,
                token_ids=token_ids[num_cached_blocks * bs : num_full_blocks * bs].tolist(),
                block_size=bs,
                lora_id=lora_id,
                medium=MEDIUM_GPU,
                lora_name=lora_name,
                extra_keys=event_extra_keys(n, num_cached_blocks, lora_name, cache_salt),
                group_idx=0,
                kv_cache_spec_kind="full_attention",
                session_id=session_id,
            )
        )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no block is in use. Emits the clear."""
        if len(self.free) != self.num_gpu_blocks - 1:
            return False
        self.cached.clear()
        self.block_hash = [None] * self.num_gpu_blocks
        if self.enable_events:
            self.events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        """The events recorded since the last call, in generation order."""
        events = self.events
        self.events = []
        return events
