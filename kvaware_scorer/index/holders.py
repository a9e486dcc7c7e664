"""The memory backend's block table: which pod slots hold each block, at which tiers.

`HolderTable` keeps ``_blocks: dict[key, int | _Multi]``. The common case -- pods holding a
block at the default tier with one reference each -- is a plain int: bit ``s`` set means pod
slot ``s`` holds the block, bit 0 is the CLOCK "referenced" flag. Anything else (a second
reference, another tier) upgrades the value to a `_Multi` with per-(slot, tier) reference
counts, and it is downgraded again once it is plain. It counts (block, pod) entries, overall
and per slot, applies the per-block holder limit (``pod_cache_size``) and evicts with a CLOCK
sweep (`_sweep`: blocks a lookup walked since the last sweep get a second chance).

`InMemoryIndex` builds on it (slots, engine-hash maps, speculative entries, lookups); its hot paths read ``_blocks`` directly, so the encoding is the contract between the
two modules.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from kvaware_scorer.keys import BlockKey

__all__ = ["HolderTable"]

_MAX_INTERNED = 1 << 16
#: Block keys the holder-order map may keep beyond the index's blocks before a sweep.
_RECENCY_SLACK = 65536


class _Multi:
    """A block held at a non-default tier or with more than one reference by some pod."""

    __slots__ = ("counts", "mask")

    def __init__(self, mask: int, counts: dict[int, int]) -> None:
        self.mask = mask  # bit 0: referenced; bit s: slot s holds the block at some tier
        self.counts = counts  # (slot << 4 | tier) -> reference count (>= 1)

    def plain(self) -> int | None:
        """The int encoding when every holding is default-tier with one reference."""
        for ck, c in self.counts.items():
            if c != 1 or ck & 15:
                return None
        return self.mask


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class HolderTable:
    """Holder masks and reference counts per block (see the module docstring).

    Args:
        pod_cache_size: Maximum pods per block (0 = unlimited); beyond it the pod that stored
            the block least recently is forgotten, as upstream's per-block pod LRU.

    Not thread-safe by itself: `InMemoryIndex` calls it under its lock.
    """

    def __init__(self, pod_cache_size: int = 0) -> None:
        self.pod_cache_size = pod_cache_size
        self._blocks: dict[BlockKey, int | _Multi] = {}
        self._live_mask = 0  # bits of the slots of live pods
        self._slot_entries: dict[int, int] = {}
        self._entries = 0
        self._evictions = 0
        self._masks: dict[int, int] = {}
        # NOTE: only with a pod_cache_size: block key -> holder slots, least recently stored
        # first. Entries of blocks that left the index are dropped lazily (`_gc_recency`), so
        # it holds at most the blocks plus _RECENCY_SLACK keys.
        self._recency: dict[BlockKey, dict[int, None]] = {}

    def _intern(self, mask: int) -> int:
        """One shared int object per distinct holder mask.

        NOTE: masks of pods beyond slot 7 are not CPython's cached small ints; a fleet has few
        distinct holder sets, so sharing them saves an int object (~32 bytes) per block.
        """
        shared = self._masks.get(mask)
        if shared is not None:
            return shared
        if len(self._masks) < _MAX_INTERNED:
            self._masks[mask] = mask
        return mask

    def _inc(self, key: BlockKey, slot: int, bit: int, tier: int) -> None:
        if self.pod_cache_size:
            rec = self._recency.get(key)
            if rec is None:
                if len(self._recency) > len(self._blocks) + _RECENCY_SLACK:
                    self._gc_recency()
                rec = self._recency[key] = {}
            rec.pop(slot, None)
            rec[slot] = None
        blocks = self._blocks
        v = blocks.get(key)
        if v is None:
            blocks[key] = self._intern(bit) if tier == 0 else _Multi(bit, {slot << 4 | tier: 1})
            self._entries += 1
            self._slot_entries[slot] += 1
            return
        if v.__class__ is int:
            iv: int = v
            if tier == 0 and not iv & bit:
                blocks[key] = self._intern(iv | bit)
                self._entries += 1
                self._slot_entries[slot] += 1
                self._limit_holders(key, iv | bit, slot)
                return
            m = _Multi(iv, {s << 4: 1 for s in _bits(iv & ~1)})
            blocks[key] = m
        else:
            m = v  # type: ignore[assignment]
        ck = slot << 4 | tier
        m.counts[ck] = m.counts.get(ck, 0) + 1
        if not m.mask & bit:
            m.mask |= bit
            self._entries += 1
            self._slot_entries[slot] += 1
            self._limit_holders(key, m.mask, slot)

    def _limit_holders(self, key: BlockKey, mask: int, keep_slot: int) -> None:
        limit = self.pod_cache_size
        if not limit:
            return
        live = mask & self._live_mask
        excess = live.bit_count() - limit
        if excess <= 0:
            return
        # NOTE: forget the holders that stored the block least recently (upstream's per-block
        # LRU): the newest announcements are the most likely to still be cached.
        rec = self._recency.get(key, {})
        unranked = [s for s in _bits(live) if s not in rec]
        ranked = [s for s in rec if live >> s & 1]
        victims = [s for s in unranked + ranked if s != keep_slot][:excess]
        for s in victims:
            self._drop_slot_at(key, s)
            rec.pop(s, None)

    def _gc_recency(self) -> None:
        """Forget the holder order of blocks no longer in the index."""
        blocks = self._blocks
        self._recency = {k: r for k, r in self._recency.items() if k in blocks}

    def _drop_slot_at(self, key: BlockKey, slot: int) -> None:
        """Remove every holding of `slot` at `key` (all tiers, all references)."""
        v = self._blocks.get(key)
        if v is None:
            return
        bit = 1 << slot
        if v.__class__ is int:
            iv: int = v
            if not iv & bit:
                return
            rest = iv & ~bit
            if rest & ~1:
                self._blocks[key] = self._intern(rest)
            else:
                del self._blocks[key]
        else:
            m: _Multi = v  # type: ignore[assignment]
            if not m.mask & bit:
                return
            for ck in [ck for ck in m.counts if ck >> 4 == slot]:
                del m.counts[ck]
            m.mask &= ~bit
            self._settle(key, m)
        if self._live_mask & bit:
            self._entries -= 1
            self._slot_entries[slot] -= 1

    def _settle(self, key: BlockKey, m: _Multi) -> None:
        if not m.counts:
            del self._blocks[key]
            return
        plain = m.plain()
        if plain is not None:
            self._blocks[key] = self._intern(plain)

    def _dec(self, key: BlockKey, slot: int, bit: int, tier: int) -> bool:
        """Drop one reference; returns whether `slot` still holds `key` at any tier."""
        v = self._blocks.get(key)
        if v is None:
            return False
        if v.__class__ is int:
            iv: int = v
            if not iv & bit:
                return False
            if tier != 0:
                return True
            rest = iv & ~bit
            if rest & ~1:
                self._blocks[key] = self._intern(rest)
            else:
                del self._blocks[key]
            self._entries -= 1
            self._slot_entries[slot] -= 1
            return False
        m: _Multi = v  # type: ignore[assignment]
        counts = m.counts
        ck = slot << 4 | tier
        c = counts.get(ck)
        if c is None:
            return bool(m.mask & bit)
        if c > 1:
            counts[ck] = c - 1
            return True
        del counts[ck]
        still = any(other >> 4 == slot for other in counts)
        if not still:
            m.mask &= ~bit
            self._entries -= 1
            self._slot_entries[slot] -= 1
        self._settle(key, m)
        return still

    def _sweep(self, target: int) -> None:
        """CLOCK sweep from the oldest block until entries are back at `target` (a bound of N
        keeps N, as upstream's LRU): a block whose referenced bit is set loses it and moves
        to the back (a second chance); the others are evicted."""
        blocks = self._blocks
        live = self._live_mask
        while self._entries > target and blocks:
            n = min(1024, 2 * (self._entries - target) + 16)
            batch = list(itertools.islice(blocks.items(), n))
            for key, v in batch:
                if self._entries <= target:
                    break
                if v.__class__ is int:
                    iv: int = v
                    if iv & 1:
                        del blocks[key]
                        blocks[key] = self._intern(iv & ~1)
                        continue
                    mask = iv
                else:
                    m: _Multi = v  # type: ignore[assignment]
                    if m.mask & 1:
                        del blocks[key]
                        m.mask &= ~1
                        blocks[key] = m
                        continue
                    mask = m.mask
                del blocks[key]
                self._evictions += 1
                for s in _bits(mask & live):
                    self._entries -= 1
                    self._slot_entries[s] -= 1
