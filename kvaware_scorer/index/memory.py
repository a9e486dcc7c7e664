"""The embedded KV-block index: compact, bounded (CLOCK-approximated LRU), O(pod) purge.

Layout (chosen for memory and for a fast walk over a prompt's keys):

* ``_blocks: dict[key, int | _Multi]``: which pod slots hold each block (a bit mask in the
  common case), kept by `HolderTable` (``holders.py``), which this index extends.
* ``_emaps[slot]: dict[engine_hash, key | tuple[key, ...]]`` per pod: resolves removals and
  parents, and doubles as the pod's reverse index, so a purge touches only that pod's entries.
* Lookups walk keys from block 0 with one dict probe and a few int operations per block; pods
  are bits, so 16 or 1,000 candidates cost the same per block.
* Speculative holdings (routing decisions not yet confirmed by events) live apart, with
  their deadlines, in `SpeculativeHolds` (``speculative.py``); a lookup ORs them in.
* `batch` applies each write at once (`DirectBatch`, ``direct.py``): no round trip to save.

NOTE: A lookup sets the referenced bit of every block it walks; eviction gives referenced blocks
a second chance. A shared system prompt that is hit by every request but never re-stored (vLLM
does not re-announce hits) therefore stays, where a write-order LRU would evict it first.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import cast

from kvaware_scorer.index.base import IndexStats, PodMatch, TierTable, iter_groups
from kvaware_scorer.index.direct import DirectBatch
from kvaware_scorer.index.holders import HolderTable, _bits, _Multi
from kvaware_scorer.index.speculative import SpeculativeHolds
from kvaware_scorer.keys import BlockKey, EngineHash

__all__ = ["InMemoryIndex"]

_PURGE_CHUNK = 4096

#: What an engine hash maps to on a pod: its block key, or the keys of a re-chunked block.
_Target = BlockKey | tuple[BlockKey, ...]


class InMemoryIndex(HolderTable):
    """In-process `KVBlockIndex` (no call waits on I/O: ``blocking_io`` is False).

    Args:
        size: Maximum (block, pod) entries; beyond it blocks are evicted, least recently used
            first (CLOCK).
        pod_cache_size: Maximum pods per block (0 = unlimited); beyond it the pod that stored
            the block least recently is forgotten, as upstream's per-block pod LRU.
        tiers: Tier names, ids and weights.
        clock: Monotonic clock (seconds), for speculative entries' TTL.
    """

    backend = "memory"

    blocking_io = False

    def __init__(
        self,
        size: int = 10_000_000,
        pod_cache_size: int = 0,
        tiers: TierTable | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        super().__init__(pod_cache_size)
        self.size = size
        self.tiers = tiers or TierTable({"gpu": 1.0, "cpu": 0.8, "storage": 0.5})
        self._clock = clock
        self._lock = threading.RLock()
        self._slot_of: dict[str, int] = {}
        self._pod_of: dict[int, str] = {}
        self._free_slots: list[int] = []
        self._next_slot = 1
        self._emaps: dict[int, dict[EngineHash, _Target]] = {}
        self._emap_size = 0
        self._speculative = SpeculativeHolds()

    # -- slots -----------------------------------------------------------------------------

    def _slot(self, pod: str) -> int:
        slot = self._slot_of.get(pod)
        if slot is None:
            if self._free_slots:
                slot = min(self._free_slots)
                self._free_slots.remove(slot)
            else:
                slot = self._next_slot
                self._next_slot += 1
            self._slot_of[pod] = slot
            self._pod_of[slot] = pod
            self._emaps[slot] = {}
            self._slot_entries[slot] = 0
            self._live_mask |= 1 << slot
        return slot

    # -- writes ------------------------------------------------------------------------------

    def add(
        self,
        pod: str,
        keys: Sequence[BlockKey],
        engine_hashes: Sequence[EngineHash] | None = None,
        tier: str | None = None,
    ) -> None:
        if not keys:
            return
        # NOTE: without engine hashes (``vllm`` key mode) each key is its own engine hash.
        ehs = cast("Sequence[EngineHash]", keys) if engine_hashes is None else engine_hashes
        if len(ehs) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(ehs)} engine hashes")
        # NOTE: re-chunked engine blocks repeat their hash over consecutive keys, always in runs
        # of the same length, so two equal leading hashes tell the grouped form apart.
        grouped = len(ehs) > 1 and ehs[0] == ehs[1]
        with self._lock:
            tid = self.tiers.id(tier)
            slot = self._slot(pod)
            bit = 1 << slot
            emap = self._emaps[slot]
            before = len(emap)
            moved: list[tuple[EngineHash, _Target]] = []
            if grouped:
                inc = self._inc
                for eh, ks in iter_groups(keys, ehs):
                    for k in ks:
                        inc(k, slot, bit, tid)
                    t = ks[0] if len(ks) == 1 else ks
                    if emap.setdefault(eh, t) != t:
                        moved.append((eh, t))
            elif tid == 0 and not self.pod_cache_size:
                self._add_plain(keys, ehs, slot, bit, emap, moved)
            else:
                inc = self._inc
                for k, eh in zip(keys, ehs, strict=True):
                    inc(k, slot, bit, tid)
                    if emap.setdefault(eh, k) != k:
                        moved.append((eh, k))
            if moved:
                self._move(slot, emap, moved)
            self._emap_size += len(emap) - before
            if self._entries > self.size:
                self._evict()

    def _add_plain(
        self,
        keys: Sequence[BlockKey],
        ehs: Sequence[EngineHash],
        slot: int,
        bit: int,
        emap: dict[EngineHash, _Target],
        moved: list[tuple[EngineHash, _Target]],
    ) -> None:
        """`add` at the default tier without a holder limit: the hot path of ingestion."""
        setdefault = emap.setdefault
        blocks = self._blocks
        get = blocks.get
        intern = self._intern
        shared_bit = intern(bit)
        new = 0
        for k, eh in zip(keys, ehs, strict=True):
            v = get(k)
            if v is None:
                blocks[k] = shared_bit
                new += 1
            elif v.__class__ is int and not v & bit:
                blocks[k] = intern(v | bit)
                new += 1
            else:
                self._inc(k, slot, bit, 0)  # a second reference, or a multi-tier block
            if setdefault(eh, k) != k:
                moved.append((eh, k))
        self._entries += new
        self._slot_entries[slot] += new

    def _move(
        self,
        slot: int,
        emap: dict[EngineHash, _Target],
        moved: list[tuple[EngineHash, _Target]],
    ) -> None:
        """Point engine hashes that came back with other keys at those keys.

        The pod no longer holds the old keys: every holding must stay reachable from the
        engine-hash map, or removals, purges (and the next pod in the slot) would miss it.
        """
        for eh, target in moved:
            old = emap[eh]
            new = (target,) if target.__class__ is int else target
            for k in (old,) if isinstance(old, int) else old:
                if k not in new:  # type: ignore[operator]
                    self._drop_slot_at(k, slot)
            emap[eh] = target

    def add_new(
        self,
        pod: str,
        keys: Sequence[BlockKey],
        engine_hashes: Sequence[EngineHash] | None = None,
        tier: str | None = None,
    ) -> int:
        if not keys:
            return 0
        with self._lock:
            slot = self._slot_of.get(pod)
            if slot is None:
                self.add(pod, keys, engine_hashes, tier)
                return 0
            tid = self.tiers.id(tier)
            bit = 1 << slot
            ck = slot << 4 | tid
            emap = self._emaps[slot]
            get = self._blocks.get
            new_keys: list[BlockKey] = []
            new_ehs: list[EngineHash] = []
            skipped = 0
            for eh, ks in iter_groups(keys, engine_hashes):
                target = emap.get(eh)
                if target is not None:
                    k = target if target.__class__ is int else target[0]  # type: ignore[index]
                    v = get(k)
                    if k == ks[0] and v is not None:
                        if v.__class__ is int:
                            held = tid == 0 and bool(v & bit)
                        else:
                            held = ck in v.counts  # type: ignore[union-attr]
                        if held:
                            skipped += 1
                            continue
                new_keys.extend(ks)
                new_ehs.extend([eh] * len(ks))
            if new_keys:
                self.add(pod, new_keys, None if engine_hashes is None else new_ehs, tier)
            return skipped

    def add_tier(self, pod: str, engine_hashes: Sequence[EngineHash], tier: str | None) -> int:
        with self._lock:
            slot = self._slot_of.get(pod)
            if slot is None:
                return len(engine_hashes)
            tid = self.tiers.id(tier)
            bit = 1 << slot
            emap = self._emaps[slot]
            unknown = 0
            for eh in engine_hashes:
                target = emap.get(eh)
                if target is None:
                    unknown += 1
                    continue
                for k in (target,) if isinstance(target, int) else target:
                    self._inc(k, slot, bit, tid)
            if self._entries > self.size:
                self._evict()
            return unknown

    def remove(self, pod: str, engine_hashes: Sequence[EngineHash], tier: str | None = None) -> int:
        with self._lock:
            slot = self._slot_of.get(pod)
            if slot is None:
                return 0
            tid = self.tiers.id(tier)
            bit = 1 << slot
            emap = self._emaps[slot]
            blocks = self._blocks
            dec = self._dec
            intern = self._intern
            known = 0
            gone = 0
            for eh in engine_hashes:
                target = emap.get(eh)
                if target is None:
                    continue
                known += 1
                if target.__class__ is int:
                    k: int = target
                    v = blocks.get(k)
                    if tid == 0 and v.__class__ is int and v & bit:
                        # the hot path: one default-tier reference held by this pod
                        rest = v & ~bit
                        if rest & ~1:
                            blocks[k] = intern(rest)
                        else:
                            del blocks[k]
                        gone += 1
                        still = False
                    else:
                        still = dec(k, slot, bit, tid)
                else:
                    still = False
                    for k in target:  # type: ignore[union-attr]
                        still = dec(k, slot, bit, tid) or still
                if not still:
                    del emap[eh]
                    self._emap_size -= 1
            if gone:
                self._entries -= gone
                self._slot_entries[slot] -= gone
            return known

    def resolve(self, pod: str, engine_hash: EngineHash) -> BlockKey | None:
        with self._lock:
            slot = self._slot_of.get(pod)
            if slot is None:
                return None
            target = self._emaps[slot].get(engine_hash)
        if target is None or isinstance(target, int):
            return target
        return target[-1]

    def purge(self, pod: str) -> int:
        with self._lock:
            slot = self._slot_of.pop(pod, None)
            if slot is None:
                return 0
            del self._pod_of[slot]
            bit = 1 << slot
            self._live_mask &= ~bit
            emap = self._emaps.pop(slot)
            self._emap_size -= len(emap)
            dropped = self._slot_entries.pop(slot, 0)
            self._entries -= dropped
            self._speculative.drop_slot(slot)
        # NOTE: the slot is already invisible to lookups (not live); clear its bits in chunks so
        # that purging a large pod never holds the lock for long.
        targets = iter(list(emap.values()))
        while True:
            chunk = list(itertools.islice(targets, _PURGE_CHUNK))
            if not chunk:
                break
            with self._lock:
                for target in chunk:
                    for k in (target,) if isinstance(target, int) else target:
                        self._drop_slot_at(k, slot)
        with self._lock:
            self._free_slots.append(slot)
        return dropped

    def batch(
        self, on_done: Callable[[list[int | None] | Exception], None] | None = None
    ) -> DirectBatch:
        """Writes applied at once, with their results in ``results`` (see `KVBlockIndex`)."""
        return DirectBatch(self, on_done)

    def references(self, pod: str) -> dict[str, dict[EngineHash, int]]:
        with self._lock:
            slot = self._slot_of.get(pod)
            if slot is None:
                return {}
            bit = 1 << slot
            get = self._blocks.get
            name = self.tiers.name
            default: dict[EngineHash, int] = {}
            out: dict[str, dict[EngineHash, int]] = {name(0): default}
            for eh, target in self._emaps[slot].items():
                v = get(target if target.__class__ is int else target[0])  # type: ignore[index]
                if v is None:
                    continue
                if v.__class__ is int:
                    if v & bit:
                        default[eh] = 1
                    continue
                for ck, c in v.counts.items():  # type: ignore[union-attr]
                    if ck >> 4 == slot:
                        tier = name(ck & 15)
                        refs = out.get(tier)
                        if refs is None:
                            refs = out[tier] = {}
                        refs[eh] = c
            return {t: refs for t, refs in out.items() if refs}

    # -- eviction ----------------------------------------------------------------------------

    def _evict(self) -> None:
        """Evict down to ``size`` entries, then drop engine-hash mappings left stale."""
        self._sweep(self.size)
        if self._emap_size > 2 * self._entries + 65536:
            self._gc_emaps()

    def _gc_emaps(self) -> None:
        """Drop engine-hash mappings whose blocks were evicted (stale but harmless until now)."""
        blocks = self._blocks
        for slot, emap in self._emaps.items():
            bit = 1 << slot
            stale = []
            for eh, target in emap.items():
                k = target if isinstance(target, int) else target[-1]
                v = blocks.get(k)
                held = v is not None and ((v if isinstance(v, int) else v.mask) & bit)
                if not held:
                    stale.append(eh)
            for eh in stale:
                del emap[eh]
            self._emap_size -= len(stale)

    # -- speculative entries -----------------------------------------------------------------

    def add_speculative(self, pod: str, keys: Sequence[BlockKey], ttl: float) -> None:
        if not keys or ttl <= 0:
            return
        with self._lock:
            now = self._clock()
            spec = self._speculative
            spec.expire(now)
            spec.add(self._slot(pod), keys, now + ttl)

    # -- reads -------------------------------------------------------------------------------

    def lookup(
        self, keys: Sequence[BlockKey], pods: Collection[str] | None = None
    ) -> dict[str, PodMatch]:
        # Over 60 lines: the walk is the read path's hot loop, inlined once per speculative case.
        with self._lock:
            speculative = self._speculative
            if speculative.queue:
                speculative.expire(self._clock())
            if pods is None:
                cand = self._live_mask
            else:
                cand = 0
                slot_of = self._slot_of
                for p in pods:
                    s = slot_of.get(p)
                    if s is not None:
                        cand |= 1 << s
            if not cand or not keys:
                return {}
            blocks = self._blocks
            get = blocks.get
            intern = self._intern
            active = cand
            run = 0
            drops: list[tuple[int, int]] = []
            multis: list[tuple[int, _Multi, int]] = []
            spec = speculative.masks
            if not spec:
                for k in keys:
                    v = get(k)
                    if v is None:
                        break
                    if v.__class__ is int:
                        iv: int = v
                        m = iv & active
                        if not m:
                            break
                        if not iv & 1:
                            blocks[k] = intern(iv | 1)
                    else:
                        mv: _Multi = v  # type: ignore[assignment]
                        m = mv.mask & active
                        if not m:
                            break
                        mv.mask |= 1
                        multis.append((run, mv, m))
                    if m != active:
                        drops.append((run, active & ~m))
                        active = m
                    run += 1
            else:
                sget = spec.get
                for k in keys:
                    v = get(k)
                    sm = sget(k, 0)
                    if v is None:
                        m = sm & active
                        if not m:
                            break
                    elif v.__class__ is int:
                        iv2: int = v
                        m = (iv2 | sm) & active
                        if not m:
                            break
                        if not iv2 & 1:
                            blocks[k] = intern(iv2 | 1)
                    else:
                        mv2: _Multi = v  # type: ignore[assignment]
                        m = (mv2.mask | sm) & active
                        if not m:
                            break
                        mv2.mask |= 1
                        multis.append((run, mv2, m))
                    if m != active:
                        drops.append((run, active & ~m))
                        active = m
                    run += 1
            return self._results(run, active, drops, multis)

    def _results(
        self,
        run: int,
        active: int,
        drops: list[tuple[int, int]],
        multis: list[tuple[int, _Multi, int]],
    ) -> dict[str, PodMatch]:
        runs: dict[int, int] = {}
        for s in _bits(active & ~1):
            runs[s] = run
        for r, dropped in drops:
            if r:
                for s in _bits(dropped & ~1):
                    runs[s] = r
        tiers = self.tiers
        w0 = tiers.weights_by_id[0]
        name0 = tiers.name(0)
        weights = {s: r * w0 for s, r in runs.items()}
        tier_counts: dict[int, dict[str, int]] = {s: {name0: r} for s, r in runs.items()}
        wby = tiers.weights_by_id
        for idx, mv, m in multis:
            for s in _bits(m & ~1):
                if runs.get(s, 0) <= idx:
                    continue
                best_t = -1
                best_w = -1.0
                for ck in mv.counts:
                    if ck >> 4 == s:
                        t = ck & 15
                        w = wby[t]
                        if w > best_w:
                            best_w, best_t = w, t
                if best_t > 0:
                    weights[s] += best_w - w0
                    tc = tier_counts[s]
                    tc[name0] -= 1
                    name = tiers.name(best_t)
                    tc[name] = tc.get(name, 0) + 1
        pod_of = self._pod_of
        out: dict[str, PodMatch] = {}
        for s, r in runs.items():
            pod = pod_of.get(s)
            if pod is None or r == 0:
                continue
            tc = {n: c for n, c in tier_counts[s].items() if c}
            out[pod] = PodMatch(r, weights[s], tc)
        return out

    def pods(self) -> list[str]:
        with self._lock:
            return list(self._slot_of)

    def entries_for(self, pod: str) -> int:
        """(block, pod) entries currently held by `pod`."""
        with self._lock:
            slot = self._slot_of.get(pod)
            return 0 if slot is None else self._slot_entries.get(slot, 0)

    def stats(self) -> IndexStats:
        with self._lock:
            return IndexStats(
                backend=self.backend,
                blocks=len(self._blocks),
                entries=self._entries,
                pods=len(self._slot_of),
                capacity=self.size,
                evictions=self._evictions,
                speculative_entries=self._speculative.entries(),
                engine_hashes=self._emap_size,
            )

    def close(self) -> None:
        return None
