"""`DirectBatch`: the write batch of an index with no round trip to save (`InMemoryIndex`).

`KVBlockIndex.batch` collects writes so that a remote backend can send them at once; an
in-process index applies each call at once instead and only records its result, so callers
(the event writer) use one code path for every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType

from kvaware_scorer.index.base import KVBlockIndex
from kvaware_scorer.keys import BlockKey, EngineHash

__all__ = ["DirectBatch"]


class DirectBatch:
    """An `IndexWriteBatch` whose calls are applied to `index` at once, results in ``results``.

    Args:
        index: The index written to.
        on_done: Called with ``results`` when the ``with`` block exits without an exception.
    """

    __slots__ = ("_index", "_on_done", "results")

    def __init__(
        self,
        index: KVBlockIndex,
        on_done: Callable[[list[int | None] | Exception], None] | None = None,
    ) -> None:
        self._index = index
        self._on_done = on_done
        self.results: list[int | None] = []

    def __enter__(self) -> DirectBatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None and self._on_done is not None:
            self._on_done(self.results)

    def add(
        self,
        pod: str,
        keys: Sequence[BlockKey],
        engine_hashes: Sequence[EngineHash] | None = None,
        tier: str | None = None,
    ) -> None:
        self._index.add(pod, keys, engine_hashes, tier)
        self.results.append(None)

    def add_new(
        self,
        pod: str,
        keys: Sequence[BlockKey],
        engine_hashes: Sequence[EngineHash] | None = None,
        tier: str | None = None,
    ) -> None:
        self.results.append(self._index.add_new(pod, keys, engine_hashes, tier))

    def add_tier(self, pod: str, engine_hashes: Sequence[EngineHash], tier: str | None) -> None:
        self.results.append(self._index.add_tier(pod, engine_hashes, tier))

    def remove(
        self, pod: str, engine_hashes: Sequence[EngineHash], tier: str | None = None
    ) -> None:
        self.results.append(self._index.remove(pod, engine_hashes, tier))

    def purge(self, pod: str) -> None:
        self.results.append(self._index.purge(pod))
