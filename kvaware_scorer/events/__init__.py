"""KV events: wire decoding, application to the index, and the ZMQ transport.

The write path, one way (each module knows only the ones below it):

* `sink`: the narrow interfaces between the parts (`KVEventSink`, `EventSink`,
  `ReplaySource`, `BatchDecoder`); it names only `decode`'s records (for types).
* `decode` / `sglang`: the engines' wire formats (`BlockStored`, `BlockRemoved`,
  `AllBlocksCleared`, `KVEventBatch`) decoded into `DecodedBatch` records.
* `state`: `StreamState`, what is kept per (pod, DP rank) stream.
* `writer` and `apply`: a batch's events to index writes (keys, references, tiers).
* `streams`: per-stream order: seq gaps, restarts, replays, resyncs, sweeps.
* `ingest`: `EventIngestor`, the coordinator the `Indexer` facade builds and delegates to.
* `subscriber` (with `lanes`, `access`, `replay`, `discovery`): `KVEventSubscriber`, the ZMQ
  transport, written against `EventSink`.
* `publisher`: `VllmEventPublisher`, vLLM's publishing protocol (for the emulator and tests).

Names are imported from their modules on first use, so that importing one part (the scheduler
takes `KVEventSink` from `sink`) does not load the ZMQ transport.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from kvaware_scorer.events.ingest import EventIngestor
    from kvaware_scorer.events.publisher import VllmEventPublisher
    from kvaware_scorer.events.sink import EventSink, KVEventSink, ReplayResult, ReplaySource
    from kvaware_scorer.events.state import StreamState
    from kvaware_scorer.events.subscriber import (
        KVEventSubscriber,
        fetch_event_sources,
        parse_event_sources,
        parse_topic,
    )

#: Public name -> the module that defines it.
_HOMES = {
    "AllBlocksCleared": "decode",
    "BlockRemoved": "decode",
    "BlockStored": "decode",
    "DecodedBatch": "decode",
    "EventDecoder": "decode",
    "KVCacheEvent": "decode",
    "KVEventBatch": "decode",
    "encode_batch": "decode",
    "EventIngestor": "ingest",
    "VllmEventPublisher": "publisher",
    "EventSink": "sink",
    "KVEventSink": "sink",
    "ReplayResult": "sink",
    "ReplaySource": "sink",
    "StreamState": "state",
    "KVEventSubscriber": "subscriber",
    "fetch_event_sources": "subscriber",
    "parse_event_sources": "subscriber",
    "parse_topic": "subscriber",
}

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "DecodedBatch",
    "EventDecoder",
    "EventIngestor",
    "EventSink",
    "KVCacheEvent",
    "KVEventBatch",
    "KVEventSink",
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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
