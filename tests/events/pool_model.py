"""A small model of vLLM's prefix-caching BlockPool that emits vLLM's KV events (test helper).

It follows ``vllm/v1/core/block_pool.py`` closely enough to produce the event patterns an
indexer must handle, and it is the ground truth the accuracy tests compare the index with:

* a free queue (evict from the front; freed blocks are appended, a request's blocks in reverse
  order, so its tail is evicted first); taking a cached block from the queue emits
  ``BlockRemoved`` for its hash;
* prefix hits on consecutive cached blocks from block 0, capped at ``num_tokens - 1`` tokens, so
  an identical fully cached prompt recomputes its last block under the same hash (a second
  physical copy; vLLM does not de-duplicate);
* ``BlockStored`` for newly full blocks with the previous block's hash as parent, decode
  continuations one block at a time, and the opt-in ``kv_cache_report_mode=full``
  re-announcement of hits (parent None) before the normal store;
* ``AllBlocksCleared`` only when every block is free;
* an optional CPU offload tier fed by placeholders (no tokens, block size 0).
"""

from __future__ import annotations

import array
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import xxhash

from kvaware_scorer.events.decode import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
)

NONE_HASH = 0x5EED_0F_A11_B10C


def engine_hashes(
    toks: list[int], bs: int, lora: str | None = None, salt: str | None = None
) -> list[int]:
    """The chained 64-bit block hashes this model's engine publishes for a prompt."""
    out: list[int] = []
    parent = NONE_HASH
    for i in range(len(toks) // bs):
        extra = f"{lora or ''}|{salt or '' if i == 0 else ''}".encode()
        data = array.array("I", toks[i * bs : (i + 1) * bs]).tobytes() + extra
        parent = xxhash.xxh3_64_intdigest(data, parent)
        out.append(parent)
    return out


def extra_keys(n: int, lora: str | None, salt: str | None, first: int = 0) -> list[Any]:
    """vLLM's untagged per-block extra keys for blocks ``first .. first+n-1``."""
    out: list[Any] = []
    for i in range(first, first + n):
        keys: list[Any] = []
        if lora:
            keys.append(lora)
        if salt and i == 0:
            keys.append(salt)
        out.append(keys or None)
    return out


@dataclass
class _Block:
    block_id: int
    hash: int | None = None
    ref: int = 0


@dataclass
class Request:
    """A running request: its tokens, blocks and how much of it is cached."""

    toks: list[int]
    lora: str | None
    salt: str | None
    blocks: list[_Block] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    cached_blocks: int = 0


class PoolModel:
    """One engine's GPU block pool (and optional CPU offload tier) emitting KV events.

    Args:
        num_blocks: GPU blocks.
        block_size: Tokens per block.
        cpu_blocks: Capacity of the CPU offload tier (0 = none).
    """

    def __init__(self, num_blocks: int, block_size: int = 16, cpu_blocks: int = 0) -> None:
        self.bs = block_size
        self.blocks = [_Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, dict[int, None]] = {}
        self.cpu: OrderedDict[int, None] = OrderedDict()
        self.cpu_blocks = cpu_blocks
        self.events: list[KVCacheEvent] = []
        self.running: list[Request] = []

    # -- ground truth ------------------------------------------------------------------------

    def gpu_state(self) -> dict[int, int]:
        """Hash -> physical GPU blocks holding it."""
        return {h: len(ids) for h, ids in self.cached.items() if ids}

    def cpu_state(self) -> dict[int, int]:
        """Hash -> 1 for every hash on the CPU tier."""
        return dict.fromkeys(self.cpu, 1)

    def take_events(self) -> list[KVCacheEvent]:
        """The events of the step so far (vLLM's take_events)."""
        out, self.events = self.events, []
        return out

    # -- block pool --------------------------------------------------------------------------

    def _get_block(self) -> _Block | None:
        if not self.free:
            return None
        bid, _ = self.free.popitem(last=False)
        blk = self.blocks[bid]
        if blk.hash is not None:
            ids = self.cached[blk.hash]
            del ids[bid]
            if not ids:
                del self.cached[blk.hash]
            self.events.append(BlockRemoved([blk.hash], medium="GPU", group_idx=0))
            blk.hash = None
        blk.ref = 1
        return blk

    def _touch(self, blk: _Block) -> None:
        if blk.ref == 0:
            del self.free[blk.block_id]
        blk.ref += 1

    def _cache(self, req: Request, upto: int) -> None:
        """Cache req's newly full blocks [cached_blocks, upto) and emit one BlockStored."""
        start = req.cached_blocks
        if upto <= start:
            return
        for i in range(start, upto):
            blk = req.blocks[i]
            blk.hash = req.hashes[i]
            self.cached.setdefault(blk.hash, {})[blk.block_id] = None
        parent = req.hashes[start - 1] if start else None
        self.events.append(
            BlockStored(
                block_hashes=req.hashes[start:upto],
                parent_block_hash=parent,
                token_ids=req.toks[start * self.bs : upto * self.bs],
                block_size=self.bs,
                lora_id=None,
                medium="GPU",
                lora_name=req.lora,
                extra_keys=extra_keys(upto - start, req.lora, req.salt, start),
                group_idx=0,
                kv_cache_spec_kind="full_attention",
            )
        )
        req.cached_blocks = upto

    def admit(
        self,
        toks: list[int],
        lora: str | None = None,
        salt: str | None = None,
        report_full: bool = False,
    ) -> Request | None:
        """Schedule a prompt: hit, allocate (evicting), cache its full blocks."""
        bs = self.bs
        hashes = engine_hashes(toks, bs, lora, salt)
        req = Request(list(toks), lora, salt, hashes=hashes)
        max_hit = (len(toks) - 1) // bs
        hits: list[_Block] = []
        for h in hashes[:max_hit]:
            ids = self.cached.get(h)
            if not ids:
                break
            hits.append(self.blocks[next(iter(ids))])
        need = -(-len(toks) // bs) - len(hits)
        if need > len(self.free) - sum(1 for b in hits if b.ref == 0):
            return None
        for b in hits:
            self._touch(b)
        req.blocks = list(hits)
        for _ in range(need):
            blk = self._get_block()
            assert blk is not None
            req.blocks.append(blk)
        req.cached_blocks = len(hits)
        if report_full and hits:
            self.events.append(
                BlockStored(
                    block_hashes=hashes[: len(hits)],
                    parent_block_hash=None,
                    token_ids=toks[: len(hits) * bs],
                    block_size=bs,
                    lora_id=None,
                    medium="GPU",
                    lora_name=lora,
                    extra_keys=extra_keys(len(hits), lora, salt),
                    group_idx=0,
                    kv_cache_spec_kind="full_attention",
                )
            )
        self._cache(req, len(toks) // bs)
        self.running.append(req)
        return req

    def decode(self, req: Request, new_tokens: list[int]) -> bool:
        """Append generated tokens; full blocks are cached as decode continuations."""
        for t in new_tokens:
            if len(req.toks) == len(req.blocks) * self.bs:
                blk = self._get_block()
                if blk is None:
                    return False
                req.blocks.append(blk)
            req.toks.append(t)
            if len(req.toks) % self.bs == 0:
                n = len(req.toks) // self.bs
                req.hashes = engine_hashes(req.toks, self.bs, req.lora, req.salt)
                self._cache(req, n)
        return True

    def finish(self, req: Request) -> None:
        """Free a request's blocks, tail first; offload its cached blocks to the CPU tier."""
        self.running.remove(req)
        for blk in reversed(req.blocks):
            blk.ref -= 1
            if blk.ref == 0:
                self.free[blk.block_id] = None
        if self.cpu_blocks:
            for h in req.hashes[: req.cached_blocks]:
                if h in self.cpu:
                    self.cpu.move_to_end(h)
                    continue
                if not self.cached.get(h):
                    continue
                if len(self.cpu) >= self.cpu_blocks:
                    old, _ = self.cpu.popitem(last=False)
                    self.events.append(BlockRemoved([old], medium="CPU", group_idx=0))
                self.cpu[h] = None
                self.events.append(
                    BlockStored([h], None, [], 0, None, "CPU", None, None, group_idx=0)
                )

    def reset_prefix_cache(self) -> bool:
        """vLLM's reset: only when every block is free; emits AllBlocksCleared."""
        if self.running:
            return False
        for blk in self.blocks:
            blk.hash = None
        self.cached.clear()
        self.cpu.clear()
        self.events.append(AllBlocksCleared())
        return True


class Workload:
    """Random prompts sharing system prompts, repeats, LoRA and salted tenants."""

    def __init__(self, rng: random.Random, block_size: int = 16) -> None:
        self.rng = rng
        self.bs = block_size
        self.systems = [[rng.randrange(50_000) for _ in range(block_size * rng.randint(1, 6))]
                        for _ in range(6)]  # fmt: skip
        self.seen: list[tuple[list[int], str | None, str | None]] = []

    def prompt(self) -> tuple[list[int], str | None, str | None]:
        rng = self.rng
        if self.seen and rng.random() < 0.25:
            toks, lora, salt = rng.choice(self.seen)
            return list(toks), lora, salt
        system = rng.choice(self.systems)
        # NOTE: never exactly one block: an identical one-block prompt is recomputed as a
        # parent-less duplicate, which is indistinguishable on the wire from a full-report
        # re-announcement (see test_parentless_duplicate_is_counted_conservatively).
        n = rng.choice([3, 16, 17, 40, 64, 100])
        toks = system + [rng.randrange(50_000) for _ in range(n)]
        lora = rng.choice([None, None, None, "sql-lora"])
        salt = rng.choice([None, None, None, "tenant-a"])
        self.seen.append((toks, lora, salt))
        return list(toks), lora, salt
