"""`EventIngestor`: KV-event payload frames in, index writes out (the write path's core).

Every frame goes through `EventIngestor.ingest`, whether it comes from the ZMQ subscriber, a
replay, or a direct call; it never raises for bad data: a bad payload or event is dropped,
counted by reason (``kvaware_dropped_messages``) and logged at debug level. The ingestor is a
thin coordinator over three parts, each in its own module:

* a decoder per engine wire format (`decode.EventDecoder` for vLLM, `sglang.SGLangEventDecoder`
  for SGLang), chosen per frame by ``engine``;
* `streams.StreamTracker`: per (pod, DP rank) stream order: seq gaps, restarts, join and gap
  replays, resyncs, sweeps of idle streams, healing of pods a remote index lost writes of;
* `apply.BatchApplier`: a batch's events to index writes: keys, references, tiers,
  placeholders, through one ``index.batch()`` per batch (`writer.BatchWriter`).

It is built from its collaborators (the index, the key maker, the tiers, the metrics), knows
nothing of the `Indexer` facade that owns it, and implements `sink.EventSink`, the interface
the subscriber is written against. The flow is one way: subscriber -> ingestor -> index; a
purge the ingestor makes by itself (a restart, a clear) is reported through ``on_purge``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from kvaware_scorer.events.apply import FULL_ATTENTION_KINDS, BatchApplier, index_stats
from kvaware_scorer.events.decode import EventDecoder
from kvaware_scorer.events.sglang import SGLangEventDecoder
from kvaware_scorer.events.sink import ReplayResult, ReplaySource
from kvaware_scorer.events.state import StreamState
from kvaware_scorer.events.streams import StreamTracker
from kvaware_scorer.index.base import normalize_medium
from kvaware_scorer.keys import DerivedKeyer
from kvaware_scorer.metrics import Metrics

if TYPE_CHECKING:
    import threading

    from kvaware_scorer.events.sink import BatchDecoder
    from kvaware_scorer.index.base import IndexStats, KVBlockIndex
    from kvaware_scorer.keys import BlockKeyer

__all__ = [
    "FULL_ATTENTION_KINDS",
    "EventIngestor",
    "ReplayResult",
    "ReplaySource",
    "StreamState",
]

logger = logging.getLogger(__name__)


class EventIngestor:
    """Decodes payload frames and applies their events to `index`, per stream, in order.

    Every `sweep_interval` seconds, `ingest` also releases what idle streams keep (see `sweep`),
    so that pods that vanished without a purge (bind mode has no endpoint list) leave nothing
    growing behind.

    Args:
        index: Where events are applied.
        keyer: The key maker (``derived`` mode chains keys over tokens; with any other keyer
            the engine hashes are the keys).
        block_size: The index's block size in tokens.
        tier_names: Tier names the index knows (beyond `default_tier`).
        default_tier: The tier of events naming no medium.
        metrics: Where events, drops, replays and purges are counted (a private one if None).
        on_purge: Told ``(pod, reason)`` after every purge of a pod the ingestor makes
            (publisher restart, AllBlocksCleared, lost writes, rank split, `purge_pod`).
        decoders: Engine name -> decoder, added to (or replacing) the built-in ``vllm`` and
            ``sglang`` ones.

    Attributes:
        decoders: Engine name -> decoder of that engine's wire format.
        idle_after: Seconds without a frame after which a stream counts as idle.
        sweep_interval: Seconds between two sweeps.
        max_event_tokens: Most token ids one BlockStored may carry (a model's context is far
            below the default, 2**20); beyond it the event is dropped (``too_many_tokens``),
            so one event can never make more than ``max_event_tokens / block_size`` keys.
        max_payload_bytes: Largest payload decoded (larger ones are dropped as
            ``frame_too_large`` before decoding).
        max_seq_jump: A live seq more than this above the stream's last one is a publisher
            restart (purge, then join), not a gap of that many lost batches (``seq_jump``).
    """

    def __init__(
        self,
        index: KVBlockIndex,
        keyer: BlockKeyer,
        block_size: int,
        *,
        tier_names: Iterable[str] = (),
        default_tier: str = "gpu",
        metrics: Metrics | None = None,
        on_purge: Callable[[str, str], object] | None = None,
        decoders: Mapping[str, BatchDecoder] | None = None,
    ) -> None:
        self.index = index
        self.metrics = metrics if metrics is not None else Metrics()
        self.block_size = block_size
        self.default_tier = default_tier
        self._keyer: DerivedKeyer | None = keyer if isinstance(keyer, DerivedKeyer) else None
        # NOTE: one decoder per engine wire format, chosen per frame (`ingest(engine=...)`).
        self.decoders: dict[str, Any] = {
            "vllm": EventDecoder(),
            "sglang": SGLangEventDecoder(block_size),
            **(decoders or {}),
        }
        self._engine_warned: set[str] = set()
        self._applier = BatchApplier(
            index, self._keyer, block_size, tier_names, default_tier, self.metrics
        )
        self._tracker = StreamTracker(
            index, self._applier, self.metrics, self.decoders["vllm"], on_purge
        )

    # -- wiring ------------------------------------------------------------------------------

    def set_replay_source(self, source: ReplaySource | None) -> None:
        """Register (or clear with None) where gaps and joins are replayed from."""
        self._tracker.replay_source = source

    @property
    def replay_source(self) -> ReplaySource | None:
        """The registered replay source, if any."""
        return self._tracker.replay_source

    @property
    def max_event_tokens(self) -> int:
        return self._applier.max_event_tokens

    @max_event_tokens.setter
    def max_event_tokens(self, value: int) -> None:
        self._applier.max_event_tokens = value

    @property
    def max_payload_bytes(self) -> int:
        return self._tracker.max_payload_bytes

    @max_payload_bytes.setter
    def max_payload_bytes(self, value: int) -> None:
        self._tracker.max_payload_bytes = value

    @property
    def max_seq_jump(self) -> int:
        return self._tracker.max_seq_jump

    @max_seq_jump.setter
    def max_seq_jump(self, value: int) -> None:
        self._tracker.max_seq_jump = value

    @property
    def idle_after(self) -> float:
        return self._tracker.idle_after

    @idle_after.setter
    def idle_after(self, value: float) -> None:
        self._tracker.idle_after = value

    @property
    def sweep_interval(self) -> float:
        return self._tracker.sweep_interval

    @sweep_interval.setter
    def sweep_interval(self, value: float) -> None:
        self._tracker.sweep_interval = value

    # -- public entry points -----------------------------------------------------------------

    def ingest(
        self,
        pod: str,
        model: str | None,
        payload: bytes,
        seq: int | None = None,
        engine: str = "vllm",
    ) -> None:
        """Apply one payload frame from `pod` (never raises for bad data).

        Args:
            pod: Pod id (``"<address>:<port>"``).
            model: Served model name, if known (needed to key parent-less stores without a
                LoRA in ``derived`` key mode; remembered per stream).
            payload: The msgpack ``EventBatch`` frame.
            seq: The frame's sequence number, when it came from a publisher: enables restart
                and gap detection. None applies the frame as it is.
            engine: The frame's wire format (``"vllm"``, the default, or ``"sglang"``); a
                stream keeps the format of its latest frame (replays are decoded with it).

        Raises:
            ValueError: `engine` names no known wire format.
        """
        decoder = self.decoders.get(engine)
        if decoder is None:
            known = ", ".join(sorted(self.decoders))
            raise ValueError(f"unknown KV-event engine {engine!r} (known: {known})")
        if engine != "vllm" and self._keyer is None:
            self._refuse_engine(engine)
            return
        try:
            self._tracker.ingest(pod, model, payload, seq, decoder)
        except Exception:
            self._applier.dropped["internal_error"].inc()
            logger.exception("KV-event frame from %s (seq %s) failed", pod, seq)

    def _refuse_engine(self, engine: str) -> None:
        # NOTE: vllm key mode reproduces vLLM's own block hashes from prompts; another
        # engine's hashes never equal them, so its blocks could only be misses.
        self._applier.dropped["engine_key_mode"].inc()
        if engine not in self._engine_warned:
            self._engine_warned.add(engine)
            logger.warning(
                "%s KV events need derived keys (tokenProcessorConfig keyMode 'derived'); "
                "dropping them in vllm key mode",
                engine,
            )

    def purge_pod(self, pod: str, reason: str = "manual") -> int:
        """Forget `pod`: its streams and its index entries (counted by `reason`). Returns the
        entries dropped; a failing index is counted and logged, never raised.

        The next frame from the pod starts a new stream (and a join replay, where possible).
        """
        return self._tracker.purge_pod(pod, reason)

    def forget_pod(self, pod: str) -> None:
        """Drop every stream of `pod`, leaving the index as it is (see `purge_pod`)."""
        self._tracker.forget_pod(pod)

    def sweep(self) -> int:
        """Release what idle streams keep (done by `ingest` every `sweep_interval` seconds).

        A stream without a frame for `idle_after` seconds drops its recent stores (parents are
        resolved through the index again if it wakes up). A pod whose streams are all idle and
        that the index no longer lists (its entries were evicted or expired, or it was purged)
        is forgotten: its next frame starts a new stream, which replays the publisher's buffer
        into an index that holds nothing of it.

        Returns:
            How many pods were forgotten.
        """
        return self._tracker.sweep()

    def wait(self) -> None:
        """Return once every write of the frames ingested so far has reached the index (a
        remote index applies them behind `ingest`, in order)."""
        with self.index.batch():
            pass

    def stats(self) -> IndexStats:
        """The index's size and counters; also refreshes the size gauges."""
        return index_stats(self.index, self.metrics)

    # -- inspection --------------------------------------------------------------------------

    def streams(self, pod: str) -> dict[int, StreamState]:
        """The live stream states of `pod` by DP rank (for inspection; do not mutate)."""
        return self._tracker.streams(pod)

    def references(self, pod: str, rank: int | None = None) -> dict[str, dict[int, int]]:
        """Tier -> engine hash -> copies `pod` holds, per our events (an inspection, O(pod)).

        Args:
            pod: Pod id.
            rank: One DP rank; None sums every rank.

        Raises:
            BackendUnavailableError: A remote index could not answer (single-rank pods are
                answered by the index).
        """
        out: dict[str, dict[int, int]] = {}
        with self._tracker.lock_for(pod):
            for r, st in self._tracker.streams(pod).items():
                if rank is not None and r != rank:
                    continue
                held = st.held if st.held is not None else self.index.references(pod)
                for tier, refs in held.items():
                    acc = out.get(tier)
                    if acc is None:
                        acc = out[tier] = {}
                    for h, c in refs.items():
                        acc[h] = acc.get(h, 0) + c
        return {t: refs for t, refs in out.items() if refs}

    def held(self, pod: str, tier: str | None = None, rank: int | None = None) -> dict[int, int]:
        """Engine hash -> copies `pod` holds at `tier` (None = default tier), per our events.

        Args:
            pod: Pod id.
            tier: Medium name (normalized); None = the default tier.
            rank: One DP rank; None sums every rank.

        Raises:
            BackendUnavailableError: A remote index could not answer.
        """
        return self.references(pod, rank).get(normalize_medium(tier, self.default_tier), {})

    def _lock_for(self, pod: str) -> threading.RLock:
        """The lock `pod`'s frames apply under (shared with other pods)."""
        return self._tracker.lock_for(pod)
