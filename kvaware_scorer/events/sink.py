"""The write path's narrow interfaces: what a transport needs of ingestion, and back.

These Protocols sit below every other module of the write path, so that each side is written
against an interface instead of the other side's class:

* `KVEventSink`: anything that accepts KV-event payload frames in process (the scheduler's
  in-process event sinks, the emulator's pods). The precise scorer plugin and the `Indexer`
  are ones.
* `EventSink`: what the ZMQ subscriber needs of ingestion: apply a frame with its seq and
  engine, purge a pod, register itself as the replay source, take the transport's bounds.
  `EventIngestor` implements it.
* `SinkProvider`: an owner of an `EventSink` (the `Indexer` facade); the subscriber accepts
  one in place of the sink for compatibility and takes its ``ingestor``.
* `ReplaySource` / `ReplayResult`: how ingestion asks the transport for a pod's buffered
  batches (the subscriber implements it over vLLM's replay protocol).
* `BatchDecoder`: one engine's wire format (``decode.EventDecoder`` for vLLM,
  ``sglang.SGLangEventDecoder`` for SGLang); ingestion picks one per stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from kvaware_scorer.events.decode import DecodedBatch
    from kvaware_scorer.index.base import IndexStats
    from kvaware_scorer.metrics import Metrics

__all__ = [
    "BatchDecoder",
    "EventSink",
    "KVEventSink",
    "ReplayResult",
    "ReplaySource",
    "SinkProvider",
]


class BatchDecoder(Protocol):
    """Decodes one engine's KV-event payload frames."""

    def decode(self, payload: bytes) -> DecodedBatch:
        """The batch in `payload`.

        Raises:
            EventDecodeError: A malformed payload (its ``reason`` is counted).
        """
        ...


@dataclass(slots=True)
class ReplayResult:
    """What a replay request brought back.

    Attributes:
        frames: ``(seq, payload)`` pairs in the order the publisher sent them.
        status: ``ok`` (end marker received), ``timeout`` or ``error``.
    """

    frames: list[tuple[int, bytes]]
    status: str = "ok"


class ReplaySource(Protocol):
    """Fetches a pod's buffered batches from ``start_seq`` on (the subscriber implements it)."""

    def replay(self, pod: str, rank: int, start_seq: int, reason: str) -> ReplayResult | None:
        """Ask `pod`'s rank-`rank` publisher for its batches with seq >= `start_seq`.

        Args:
            pod: Pod id.
            rank: Data-parallel rank of the stream.
            start_seq: First sequence number wanted.
            reason: ``gap``, ``join`` or ``resync``.

        Returns:
            The frames received, or None when no replay is possible for this stream.
        """
        ...


@runtime_checkable
class KVEventSink(Protocol):
    """Accepts vLLM KV-event payload frames delivered in process."""

    def ingest(self, pod: str, model: str | None, payload: bytes, seq: int | None = None) -> None:
        """Apply one msgpack ``EventBatch`` payload from `pod`."""
        ...


class EventSink(Protocol):
    """What the ZMQ subscriber needs of ingestion (`EventIngestor` is the implementation).

    Attributes:
        metrics: Where the transport counts its own drops (``kvaware_dropped_messages``).
        max_event_tokens: Most token ids one BlockStored may carry.
        max_payload_bytes: Largest payload decoded.
        max_seq_jump: Largest live seq step that is still a gap (not a restart).
    """

    metrics: Metrics
    max_event_tokens: int
    max_payload_bytes: int
    max_seq_jump: int

    def ingest(
        self,
        pod: str,
        model: str | None,
        payload: bytes,
        seq: int | None = None,
        engine: str = "vllm",
    ) -> None:
        """Apply one payload frame from `pod` in `engine`'s wire format (never raises for bad
        data; raises ValueError for an unknown `engine`)."""
        ...

    def purge_pod(self, pod: str, reason: str = "manual") -> int:
        """Forget `pod`: its streams and its index entries. Returns the entries dropped."""
        ...

    def set_replay_source(self, source: ReplaySource | None) -> None:
        """Register (or clear with None) where gaps and joins are replayed from."""
        ...

    @property
    def replay_source(self) -> ReplaySource | None:
        """The registered replay source, if any."""
        ...

    def stats(self) -> IndexStats:
        """The index's size and counters; also refreshes the size gauges."""
        ...


@runtime_checkable
class SinkProvider(Protocol):
    """Owns an `EventSink` (the `Indexer` facade, through its ``ingestor``)."""

    @property
    def ingest_enabled(self) -> bool:
        """Whether this owner applies KV events at all."""
        ...

    @property
    def ingestor(self) -> EventSink:
        """The sink events go to."""
        ...
