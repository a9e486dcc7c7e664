"""vLLM KV events: wire decoding, application to the index, and the ZMQ subscriber.

* `decode`: vLLM's records (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`, `KVEventBatch`),
  decoding of both wire forms and byte-exact encoding.
* `ingest`: `EventIngestor`, behind ``Indexer.ingest``: keys, reference counts, ordering, gaps,
  replays and restarts per (pod, DP rank) stream.
* `subscriber`: `KVEventSubscriber`, the ZMQ transport (bind and connect modes, replay client,
  vLLM's ``/kv_event_sources``).
* `publisher`: `VllmEventPublisher`, vLLM's publishing protocol (for the emulator and tests).
"""

from __future__ import annotations

from kvaware_scorer.events.decode import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodedBatch,
    EventDecoder,
    KVCacheEvent,
    KVEventBatch,
    encode_batch,
)
from kvaware_scorer.events.ingest import EventIngestor, ReplayResult, ReplaySource, StreamState
from kvaware_scorer.events.publisher import VllmEventPublisher
from kvaware_scorer.events.subscriber import (
    KVEventSubscriber,
    fetch_event_sources,
    parse_event_sources,
    parse_topic,
)

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "DecodedBatch",
    "EventDecoder",
    "EventIngestor",
    "KVCacheEvent",
    "KVEventBatch",
    "KVEventSubscriber",
    "ReplayResult",
    "ReplaySource",
    "StreamState",
    "VllmEventPublisher",
    "encode_batch",
    "fetch_event_sources",
    "parse_event_sources",
    "parse_topic",
]
