"""The write path runs one way: subscriber -> event sink (the ingestor) -> index.

The ingestor is built from its collaborators (no `Indexer`), the subscriber takes any
`EventSink`, decoders are chosen per engine, and no module of the write path imports the
facade.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from kvaware_scorer.config import KVEventsConfig
from kvaware_scorer.events import KVEventSubscriber, VllmEventPublisher
from kvaware_scorer.events.decode import BlockStored, DecodedBatch, EventDecoder, encode_batch
from kvaware_scorer.events.ingest import EventIngestor
from kvaware_scorer.events.sink import EventSink, KVEventSink
from kvaware_scorer.index import InMemoryIndex
from kvaware_scorer.keys import DerivedKeyer
from kvaware_scorer.metrics import Metrics
from tests.conftest import free_port
from tests.events.test_ingest import BufferReplay
from tests.events.test_subscriber import wait_until

POD = "10.0.0.1:8000"
MODEL = "m"
EVENTS = Path(__file__).resolve().parents[2] / "kvaware_scorer" / "events"


def store(hashes: list[int], toks: list[int], parent: int | None = None) -> BlockStored:
    return BlockStored(
        hashes, parent, toks, 16, medium="GPU", extra_keys=[None] * len(hashes), group_idx=0
    )


def frame(*events: Any) -> bytes:
    return encode_batch(list(events), 1.0, 0)


def ingestor(**kwargs: Any) -> tuple[EventIngestor, InMemoryIndex, DerivedKeyer]:
    index = InMemoryIndex()
    keyer = DerivedKeyer(16)
    return EventIngestor(index, keyer, 16, metrics=Metrics(), **kwargs), index, keyer


def test_ingestor_is_built_from_its_collaborators() -> None:
    """An ingestor over a bare index and key maker applies stores with derived keys and
    purges a restarted publisher's pod itself, telling `on_purge`."""
    purged: list[tuple[str, str]] = []
    ing, index, keyer = ingestor(on_purge=lambda pod, reason: purged.append((pod, reason)))
    toks = list(range(32))
    ing.ingest(POD, MODEL, frame(store([1], toks[:16])), 0)
    ing.ingest(POD, MODEL, frame(store([2], toks[16:], parent=1)), 1)
    keys = keyer.block_keys(toks, MODEL)
    assert index.lookup(keys, [POD])[POD].blocks == 2
    ing.ingest(POD, MODEL, frame(store([9], toks[:16])), 0)  # seq went back: a restart
    assert purged == [(POD, "publisher_restart")]
    assert index.lookup(keys, [POD])[POD].blocks == 1  # only the new publisher's block
    assert ing.purge_pod(POD, "manual") == 1
    assert purged[-1] == (POD, "manual") and ing.streams(POD) == {}
    assert index.pods() == []


def test_decoders_are_injected_per_engine() -> None:
    """A decoder given for a new engine name decodes that engine's frames; the built-in
    ones stay."""
    seen: list[bytes] = []

    class Reversed:
        """A wire format that is vLLM's with the bytes reversed."""

        def decode(self, payload: bytes) -> DecodedBatch:
            seen.append(payload)
            return EventDecoder().decode(payload[::-1])

    ing, index, keyer = ingestor(decoders={"reversed": Reversed()})
    assert set(ing.decoders) == {"vllm", "sglang", "reversed"}
    toks = list(range(16))
    ing.ingest(POD, MODEL, frame(store([1], toks))[::-1], 0, engine="reversed")
    assert len(seen) == 1
    assert index.lookup(keyer.block_keys(toks, MODEL), [POD])[POD].blocks == 1


def test_subscriber_takes_an_event_sink_over_real_sockets() -> None:
    """The subscriber applies frames to an ingestor given directly (no Indexer) and installs
    itself as the sink's replay source while running."""
    ing, index, keyer = ingestor()
    assert isinstance(ing, KVEventSink)
    sink: EventSink = ing
    port = free_port()
    config = KVEventsConfig(default_model=MODEL, replay_timeout=1.0, stats_interval=0.2)
    sub = KVEventSubscriber(sink, config)
    assert sub.sink is ing and sub.indexer is None
    toks = list(range(32))
    pub = VllmEventPublisher(f"tcp://127.0.0.1:{port}", bind=True)
    try:
        with sub:
            assert ing.replay_source is sub
            sub.add_endpoint(POD, f"tcp://127.0.0.1:{port}")
            assert pub.wait_for_subscriber(10)
            pub.publish([store([1], toks[:16])])
            pub.publish([store([2], toks[16:], parent=1)])
            wait_until(lambda: sub.frames_handled >= 2)
            # the receiving loop refreshes the size gauges through the sink
            wait_until(lambda: ing.metrics.registry.get_sample_value("kvaware_index_pods") == 1)
        assert ing.replay_source is None
    finally:
        pub.close()
    assert index.lookup(keyer.block_keys(toks, MODEL), [POD])[POD].blocks == 2


def test_replay_source_registers_on_the_sink() -> None:
    """A gap is filled from the replay source registered on the ingestor."""
    ing, index, keyer = ingestor()
    toks = list(range(48))
    frames = [(0, frame(store([1], toks[:16]))), (1, frame(store([2], toks[16:32], parent=1)))]
    source = BufferReplay(frames)
    ing.set_replay_source(source)
    ing.ingest(POD, MODEL, frames[0][1], 0)
    ing.ingest(POD, MODEL, frame(store([3], toks[32:], parent=2)), 2)
    assert source.requests == [(POD, 0, 0, "gap")]  # from the last applied seq
    assert index.lookup(keyer.block_keys(toks, MODEL), [POD])[POD].blocks == 3


def test_kv_event_sink_is_declared_once() -> None:
    """The scheduler's KVEventSink is the events package's."""
    from kvaware_scorer.scheduler import KVEventSink as SchedulerSink
    from kvaware_scorer.scheduler.types import KVEventSink as TypesSink

    assert SchedulerSink is KVEventSink and TypesSink is KVEventSink


def test_no_write_path_module_imports_the_facade() -> None:
    """Nothing below the Indexer imports it, not even for type checking: the arrows run
    facade -> events, never back."""
    offenders = []
    for path in sorted(EVENTS.glob("*.py")):
        if path.name == "cli.py":  # the command line builds an Indexer: it sits on top
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            names = {a.name for a in node.names}
            if node.module == "kvaware_scorer.indexer" or (
                node.module == "kvaware_scorer" and "Indexer" in names
            ):
                offenders.append(path.name)
    assert offenders == []
