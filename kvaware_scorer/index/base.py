"""The `KVBlockIndex` protocol, its result types and the tier table shared by every backend."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, cast, runtime_checkable

from kvaware_scorer.keys import BlockKey, EngineHash

__all__ = [
    "MAX_TIERS",
    "IndexStats",
    "IndexWriteBatch",
    "KVBlockIndex",
    "PodMatch",
    "TierTable",
    "normalize_medium",
]

#: Tier ids are 4-bit fields in the compact entry encoding (and Redis hash fields).
MAX_TIERS = 16


def normalize_medium(medium: str | None, default: str = "gpu") -> str:
    """vLLM's ``medium`` as a tier name: case-insensitive, stripped; None/"" -> `default`."""
    if medium is None:
        return default
    name = medium.strip().lower()
    return name or default


class TierTable:
    """Tier names <-> small ids and their scoring weights.

    Id 0 is the default tier (``gpu`` unless configured): entries at that tier with a
    reference count of one have the cheapest encoding in the memory backend. Other names get
    ids as they are first seen (at most `MAX_TIERS` in all).

    Args:
        weights: Tier name -> weight (names lower-case).
        unknown_weight: Weight of a tier not in `weights`.
        default_tier: Tier of events whose medium is nil.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        unknown_weight: float = 0.5,
        default_tier: str = "gpu",
    ) -> None:
        self.default_tier = normalize_medium(default_tier)
        self._weights = {normalize_medium(k): float(v) for k, v in (weights or {}).items()}
        self.unknown_weight = float(unknown_weight)
        self._names: list[str] = [self.default_tier]
        self._ids: dict[str, int] = {self.default_tier: 0}
        self.weights_by_id: list[float] = [self.weight(self.default_tier)]
        for name in self._weights:
            self.id(name)

    def weight(self, name: str) -> float:
        """Weight of a tier name."""
        return self._weights.get(name, self.unknown_weight)

    def id(self, medium: str | None) -> int:
        """Id of a medium (normalized); new names get the next id.

        Raises:
            ValueError: When more than `MAX_TIERS` distinct tiers are seen.
        """
        name = normalize_medium(medium, self.default_tier)
        tid = self._ids.get(name)
        if tid is not None:
            return tid
        if len(self._names) >= MAX_TIERS:
            raise ValueError(f"too many distinct KV-cache tiers (max {MAX_TIERS}): {name!r}")
        tid = len(self._names)
        self._names.append(name)
        self._ids[name] = tid
        self.weights_by_id.append(self.weight(name))
        return tid

    def name(self, tier_id: int) -> str:
        """Name of a tier id."""
        return self._names[tier_id]

    @property
    def names(self) -> list[str]:
        """Known tier names in id order."""
        return list(self._names)


class PodMatch(NamedTuple):
    """What one pod holds of a prompt, from block 0.

    Attributes:
        blocks: Consecutive blocks held from block 0.
        weight: Sum over those blocks of the best tier weight the pod holds each at.
        tiers: Best tier name -> number of those blocks held best at that tier.
    """

    blocks: int
    weight: float
    tiers: Mapping[str, int]


@dataclass(slots=True)
class IndexStats:
    """A snapshot of an index's size and activity counters."""

    backend: str
    blocks: int = 0
    entries: int = 0
    pods: int = 0
    capacity: int = 0
    evictions: int = 0
    speculative_entries: int = 0
    engine_hashes: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class IndexWriteBatch(Protocol):
    """Writes collected by `KVBlockIndex.batch`, applied in call order.

    Each method mirrors the `KVBlockIndex` method of the same name and appends that method's
    result to ``results`` (None where it is not known: a remote backend that buffers writes
    through an outage). A remote backend sends the whole batch in one round trip when the
    ``with`` block exits, so ``results`` is only complete after it; the in-memory backend
    applies each call at once.
    """

    results: list[int | None]

    def add(
        self,
        pod: str,
        keys: Sequence[BlockKey],
        engine_hashes: Sequence[EngineHash] | None = None,
        tier: str | None = None,
    ) -> None:
        """Queue `KVBlockIndex.add` (result: None)."""
        ...

    def add_new(
        self,
        pod: str,
        keys: Sequence[BlockKey],
        engine_hashes: Sequence[EngineHash] | None = None,
        tier: str | None = None,
    ) -> None:
        """Queue `KVBlockIndex.add_new` (result: engine hashes skipped)."""
        ...

    def add_tier(self, pod: str, engine_hashes: Sequence[EngineHash], tier: str | None) -> None:
        """Queue `KVBlockIndex.add_tier` (result: unknown engine hashes)."""
        ...

    def remove(
        self, pod: str, engine_hashes: Sequence[EngineHash], tier: str | None = None
    ) -> None:
        """Queue `KVBlockIndex.remove` (result: known engine hashes)."""
        ...

    def purge(self, pod: str) -> None:
        """Queue `KVBlockIndex.purge` (result: entries dropped)."""
        ...


@runtime_checkable
class KVBlockIndex(Protocol):
    """Which pod holds which block, at which tier, reference-counted per (block, pod, tier).

    Keys are our block keys (`BlockKey`, see `kvaware_scorer.keys`); engine hashes
    (`EngineHash`) are the hashes the engine publishes, remembered per pod so that removals
    and parent lookups can be resolved.
    Implementations are safe to call from several threads.

    Attributes:
        blocking_io: Whether calls wait on the network (a remote store): the scheduler then
            keeps scoring off its event loop.
    """

    blocking_io: bool

    def add(
        self,
        pod: str,
        keys: Sequence[BlockKey],
        engine_hashes: Sequence[EngineHash] | None = None,
        tier: str | None = None,
    ) -> None:
        """Record that `pod` stored `keys` (one reference each) at `tier`.

        Args:
            pod: Pod id (``"<address>:<port>"``).
            keys: Block keys, in prompt order.
            engine_hashes: The engine hash each key came from (same length as `keys`; equal
                consecutive hashes mean one engine block covering several keys). None: the
                keys are the engine hashes (``vllm`` key mode).
            tier: Medium (normalized; None = the default tier).
        """
        ...

    def add_new(
        self,
        pod: str,
        keys: Sequence[BlockKey],
        engine_hashes: Sequence[EngineHash] | None = None,
        tier: str | None = None,
    ) -> int:
        """`add`, except that engine hashes `pod` already holds at `tier` get no new reference.

        For stores that re-announce cached blocks (vLLM's ``kv_cache_report_mode=full`` sends
        prefix-cache hits again, parent-less): the same physical blocks must not count twice.
        An engine hash counts as held when it maps to the same key on `pod` and `pod` holds
        that block at `tier`; every other engine hash (and its keys) is added as by `add`.

        Returns:
            How many engine hashes were skipped as already held.
        """
        ...

    def add_tier(self, pod: str, engine_hashes: Sequence[EngineHash], tier: str | None) -> int:
        """Add `tier` to blocks `pod` already holds, named by engine hash (offload stores).

        Returns:
            How many engine hashes were unknown for this pod (nothing recorded for those).
        """
        ...

    def remove(self, pod: str, engine_hashes: Sequence[EngineHash], tier: str | None = None) -> int:
        """Drop one reference per engine hash at `tier`; unknown hashes are ignored.

        Returns:
            How many engine hashes were known (and dereferenced).
        """
        ...

    def resolve(self, pod: str, engine_hash: EngineHash) -> BlockKey | None:
        """The key of the last block `engine_hash` covers on `pod`, or None if unknown."""
        ...

    def lookup(
        self, keys: Sequence[BlockKey], pods: Collection[str] | None = None
    ) -> dict[str, PodMatch]:
        """Walk `keys` from block 0 for the candidate `pods` (None = every known pod).

        Stops at the first block no candidate holds; a pod's run ends at its first miss.
        Pods that hold block 0 of `keys` appear in the result, others do not.
        """
        ...

    def add_speculative(self, pod: str, keys: Sequence[BlockKey], ttl: float) -> None:
        """Count `keys` as held by `pod` for `ttl` seconds (at the default tier's weight)
        unless real events arrive first (routing decisions not yet confirmed by events)."""
        ...

    def purge(self, pod: str) -> int:
        """Forget everything about `pod`. Returns the number of entries dropped."""
        ...

    def batch(
        self, on_done: Callable[[list[int | None] | Exception], None] | None = None
    ) -> AbstractContextManager[IndexWriteBatch]:
        """Collect writes to apply in order (one round trip on a remote backend).

        Without `on_done`, the writes are applied when the block exits, after those of every
        earlier batch of this index.

        Args:
            on_done: Called with the batch's results (or the exception that stopped it) once
                its writes are applied. A remote backend may then apply them after the block
                exits (write behind, in order, off the caller's thread): later reads of the
                engine-hash map (`resolve`, `references`), `purge` and direct writes of the
                same index see them; lookups may not yet. The in-memory backend applies
                everything in the block and calls `on_done` on exit. `on_done` must not call
                the index.

        Example:
            >>> with index.batch() as b:  # doctest: +SKIP
            ...     b.add(pod, keys, hashes)
            ...     b.remove(pod, old_hashes)
            >>> b.results  # doctest: +SKIP
            [None, 3]
        """
        ...

    def references(self, pod: str) -> dict[str, dict[EngineHash, int]]:
        """Tier name -> engine hash -> references `pod` holds there (an inspection, O(pod)).

        Only engine hashes whose block the pod still holds are listed.
        """
        ...

    def pods(self) -> list[str]:
        """Pods with at least one entry or engine hash."""
        ...

    def stats(self) -> IndexStats:
        """Current size and counters."""
        ...

    def close(self) -> None:
        """Release resources (connections, threads)."""
        ...


def iter_groups(
    keys: Sequence[BlockKey], engine_hashes: Sequence[EngineHash] | None
) -> Iterable[tuple[EngineHash, tuple[BlockKey, ...]]]:
    """(engine hash, keys it covers) groups; consecutive equal engine hashes form one group.

    Without engine hashes (``vllm`` key mode) each key is its own engine hash.
    """
    if engine_hashes is None:
        for k, eh in zip(keys, cast("Sequence[EngineHash]", keys), strict=True):
            yield eh, (k,)
        return
    if len(engine_hashes) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(engine_hashes)} engine hashes")
    start = 0
    n = len(keys)
    while start < n:
        eh = engine_hashes[start]
        end = start + 1
        while end < n and engine_hashes[end] == eh:
            end += 1
        yield eh, tuple(keys[start:end])
        start = end
