"""Speculative holdings of the memory backend: blocks a pod is counted as holding for a few
seconds, after a routing decision and before its KV events confirm it.

`SpeculativeHolds` keeps a holder mask per block (pod slots as bits, as `HolderTable` does), a
deadline per (slot, block) and a queue of deadlines to expire them in order. It is bounded by
what callers record within one TTL: every entry leaves at its deadline (or with its pod).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from kvaware_scorer.keys import BlockKey

__all__ = ["SpeculativeHolds"]


class SpeculativeHolds:
    """Time-limited holder masks per block (see the module docstring).

    Attributes:
        masks: Block key -> slots holding it speculatively (a lookup ORs it into the real
            holders).
        queue: (deadline, slot, keys) in recording order: non-empty while something may expire.

    Not thread-safe by itself: `InMemoryIndex` calls it under its lock.
    """

    __slots__ = ("_deadline", "masks", "queue")

    def __init__(self) -> None:
        self.masks: dict[BlockKey, int] = {}
        self._deadline: dict[int, dict[BlockKey, float]] = {}  # slot -> key -> deadline
        self.queue: deque[tuple[float, int, tuple[BlockKey, ...]]] = deque()

    def add(self, slot: int, keys: Sequence[BlockKey], deadline: float) -> None:
        """Count `keys` as held by `slot` until `deadline` (a later one replaces an earlier)."""
        bit = 1 << slot
        masks = self.masks
        get = masks.get
        dl = self._deadline.get(slot)
        if dl is None:
            dl = self._deadline[slot] = {}
        for k in keys:
            masks[k] = get(k, 0) | bit
            dl[k] = deadline
        self.queue.append((deadline, slot, tuple(keys)))

    def expire(self, now: float) -> None:
        """Drop the holdings whose deadline is past."""
        q = self.queue
        masks = self.masks
        while q and q[0][0] <= now:
            _, slot, keys = q.popleft()
            dl = self._deadline.get(slot)
            if dl is None:
                continue
            bit = 1 << slot
            for k in keys:
                d = dl.get(k)
                if d is None or d > now:
                    continue  # gone already, or re-recorded with a later deadline
                del dl[k]
                rest = masks.get(k, 0) & ~bit
                if rest:
                    masks[k] = rest
                else:
                    masks.pop(k, None)
            if not dl:
                del self._deadline[slot]

    def drop_slot(self, slot: int) -> None:
        """Forget every holding of `slot` (its pod was purged)."""
        bit = 1 << slot
        masks = self.masks
        for k in self._deadline.pop(slot, {}):
            rest = masks.get(k, 0) & ~bit
            if rest:
                masks[k] = rest
            else:
                masks.pop(k, None)

    def entries(self) -> int:
        """(block, slot) holdings not expired yet."""
        return sum(len(d) for d in self._deadline.values())
