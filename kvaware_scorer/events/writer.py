"""`BatchWriter`: one batch's index writes, in event order, sent as one ``index.batch()``.

The applier (`apply`) queues stores, parent-less stores, removals and offload tiers here while
it walks a batch's events; `flush` sends them through one ``index.batch()`` (one round trip on
a remote index, written behind), and `WriteCounter` counts what they did from the index's
answer (maybe later, on the index's writer thread). Consecutive stores (or removals) of one
tier are merged into one call, which saves the per-call cost of most of a batch's events.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Final

from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.keys import EngineHash

if TYPE_CHECKING:
    from prometheus_client import Counter

    from kvaware_scorer.index.base import KVBlockIndex
    from kvaware_scorer.metrics import Metrics

__all__ = ["BACKEND_ERRORS", "BatchWriter", "Counters", "WriteCounter"]

logger = logging.getLogger(__name__)

#: Index errors a write or a read of the ingestion path can meet (counted, never raised).
BACKEND_ERRORS: Final = (KVAwareError, OSError, ValueError)

# write operations queued by a BatchWriter: (kind, tier, keys or engine hashes, engine hashes, n)
_ADD, _ADD_NEW, _REMOVE, _REMOVE_HELD, _ADD_TIER = range(5)

# NOTE: keys and engine hashes travel as plain ints on the hot path (`BlockKey` and
# `EngineHash` are NewTypes over int); the queued lists are typed Any so that handing them to
# the index protocol needs no per-call `cast`, a function call at run time.
_Op = tuple[int, str, list[Any], list[Any] | None, int]


class Counters:
    """Cached metric children (``labels()`` costs a lock and a dict lookup per call)."""

    __slots__ = ("_cache", "_family")

    def __init__(self, family: Any) -> None:
        self._family = family
        self._cache: dict[str, Counter] = {}

    def __getitem__(self, label: str) -> Counter:
        c = self._cache.get(label)
        if c is None:
            c = self._cache[label] = self._family.labels(label)
        return c


class WriteCounter:
    """Counts what a batch of writes did, from the index's results (stored and removed blocks,
    unknown hashes, re-announced blocks, backend errors)."""

    __slots__ = ("_metrics", "_skipped")

    def __init__(self, metrics: Metrics, skipped: Counters) -> None:
        self._metrics = metrics
        self._skipped = skipped

    def __call__(self, pod: str, ops: list[_Op], results: list[int | None] | Exception) -> None:
        """Count `ops`' `results` (maybe on the index's writer thread: metrics only)."""
        m = self._metrics
        if isinstance(results, Exception):
            if ops:
                m.backend_errors.labels("ingest").inc(len(ops))
                logger.warning("writing %d operations for %s failed: %s", len(ops), pod, results)
            return
        stored = removed = unknown = reannounced = 0
        # NOTE: a result of None is not known yet (a remote index buffering through an outage)
        for (kind, _tier, a, _ehs, n), r in zip(ops, results, strict=False):
            if kind == _ADD:
                stored += n
            elif kind == _REMOVE:
                if r is not None:
                    removed += r
                    unknown += len(a) - r
            elif kind == _REMOVE_HELD:
                removed += r or 0
            elif kind == _ADD_NEW:
                skipped = r or 0
                reannounced += skipped
                stored += n - skipped
            else:
                missing = r or 0
                unknown += missing
                stored += len(a) - missing
        if stored:
            m.blocks_stored.inc(stored)
        if removed:
            m.blocks_removed.inc(removed)
        if unknown:
            self._skipped["unknown_block"].inc(unknown)
        if reannounced:
            self._skipped["reannounced"].inc(reannounced)


class BatchWriter:
    """One batch's index writes for `pod`, kept in event order until `flush`.

    Args:
        index: Where the writes go.
        pod: The pod written for.
        count: Told what the writes did once the index reports their results.
    """

    __slots__ = (
        "_count",
        "_ehs",
        "_index",
        "_keys",
        "_last",
        "_n",
        "_ops",
        "_per",
        "_pod",
        "_tier",
    )

    def __init__(self, index: KVBlockIndex, pod: str, count: WriteCounter) -> None:
        self._index = index
        self._pod = pod
        self._count = count
        self._ops: list[_Op] = []
        self._tier = ""
        self._keys: list[int] | None = None  # the pending run of stores
        self._ehs: list[int] | None = None
        self._n = 0
        self._per = 1
        self._last = -1

    def add(self, tier: str, keys: list[int], ehs: list[int] | None, n: int, per: int) -> None:
        """Queue a store of `n` engine blocks (`per` keys each; `ehs` None: keys are hashes)."""
        pk = self._keys
        seq = keys if ehs is None else ehs
        if pk is not None:
            # NOTE: equal engine hashes across two stores would read as one engine block, and
            # the index tells re-chunked runs apart by their first two hashes.
            if tier == self._tier and per == self._per and seq[0] != self._last:
                pk += keys
                if ehs is not None:
                    self._ehs += ehs  # type: ignore[operator]
                self._n += n
                self._last = seq[-1]
                return
            self._end_run()
        self._tier = tier
        self._keys = list(keys)
        self._ehs = None if ehs is None else list(ehs)
        self._n = n
        self._per = per
        self._last = seq[-1]

    def add_new(self, tier: str, keys: list[int], ehs: list[int] | None, n: int) -> None:
        """Queue a parent-less store: blocks the pod already holds at `tier` are skipped."""
        if self._keys is not None:
            self._end_run()
        self._ops.append((_ADD_NEW, tier, keys, ehs, n))

    def remove(self, tier: str, hashes: list[int], counted: bool) -> None:
        """Queue removals; `counted`: their unknown hashes are counted from the index's answer
        (else the caller counted them already)."""
        if self._keys is not None:
            self._end_run()
        kind = _REMOVE if counted else _REMOVE_HELD
        ops = self._ops
        if ops:
            last = ops[-1]
            if last[0] == kind and last[1] == tier:
                last[2].extend(hashes)
                return
        ops.append((kind, tier, hashes, None, 0))

    def add_tier(self, tier: str, hashes: list[int]) -> None:
        """Queue an offload placeholder's tier for blocks the pod holds."""
        if self._keys is not None:
            self._end_run()
        self._ops.append((_ADD_TIER, tier, hashes, None, 0))

    def _end_run(self) -> None:
        keys = self._keys
        assert keys is not None
        self._ops.append((_ADD, self._tier, keys, self._ehs, self._n))
        self._keys = self._ehs = None

    @property
    def pending(self) -> bool:
        """Whether writes are queued."""
        return bool(self._ops) or self._keys is not None

    def resolve(self, engine_hash: int) -> int | None:
        """The index's key for `engine_hash` on this pod, after the writes queued so far.

        Raises:
            KVAwareError: The index could not answer.
            OSError: The index could not answer.
        """
        if self._ops or self._keys is not None:
            self.flush()
        return self._index.resolve(self._pod, EngineHash(engine_hash))

    def flush(self) -> None:
        """Send the queued writes; their results are counted when the index reports them."""
        if self._keys is not None:
            self._end_run()
        ops = self._ops
        if not ops:
            return
        self._ops = []
        pod = self._pod
        count = self._count
        b = None
        try:
            with self._index.batch(functools.partial(count, pod, ops)) as b:
                for kind, tier, a, ehs, _n in ops:
                    if kind == _ADD:
                        b.add(pod, a, ehs, tier)
                    elif kind in (_REMOVE, _REMOVE_HELD):
                        b.remove(pod, a, tier)
                    elif kind == _ADD_NEW:
                        b.add_new(pod, a, ehs, tier)
                    else:
                        b.add_tier(pod, a, tier)
        except BACKEND_ERRORS as exc:
            # NOTE: the in-memory index applied the writes before the failing one
            done = [] if b is None else b.results
            count(pod, ops[: len(done)], done)
            count(pod, ops[len(done) :], exc)
