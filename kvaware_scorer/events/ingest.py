"""Applies vLLM KV-event payloads to an indexer's index: keys, reference counts and ordering.

One `EventIngestor` per `Indexer` (``indexer.ingestor``). Every frame goes through `ingest`,
whether it comes from the ZMQ subscriber, a replay, or a direct call. It never raises for bad
data: a bad payload or event is dropped, counted by reason (``kvaware_dropped_messages``) and
logged at debug level.

State is kept per *stream*, that is per (pod, data-parallel rank), because every DP rank of a
vLLM server has its own publisher, sequence counter and block pool:

* ``last_seq`` / ``live_seq``: the last sequence number applied (from any source) and the last
  one received live. A live seq at or below ``live_seq`` means the publisher restarted; one
  above ``last_seq + 1`` is a gap, recovered from the pod's replay buffer when a
  `ReplaySource` is registered (else counted as lost).
* References: the index counts references per (block, pod, tier), mirroring vLLM's physical
  blocks. A pod with one stream (one DP rank, the common case) owns all of its pod's
  references, so the index alone is the truth: removals go straight to it, a parent-less
  re-announcement of blocks the pod already holds adds nothing (`KVBlockIndex.add_new`), and a
  restart or AllBlocksCleared purges the pod. Only when a second rank of the pod streams does
  each stream keep its own ``held`` counts (tier -> engine hash -> copies), so that one rank's
  removals, restart or clear touch only that rank's references.
* ``recent``: engine hash -> key of the blocks this stream stored last (and of parents it
  resolved), so that decode continuations and chunked-prefill stores find their parent's key
  without asking the index (a round trip on a remote index).

Each batch's writes are sent through ``index.batch()`` in event order: one round trip per batch
on a remote index, with consecutive stores (or removals) of one tier merged into one call.

Keys: in ``derived`` mode each stored block's key is chained from its parent's key (from
``recent``, else resolved through the index's engine-hash map) over the block's tokens; a
parent-less run starts at the root of (model or LoRA, cache_salt). A block whose parent is
unknown is never keyed as if it started a prompt: it is counted as orphaned and left out. In
``vllm`` mode the engine hash is the key.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import msgspec
import xxhash

from kvaware_scorer.errors import EventDecodeError, KVAwareError
from kvaware_scorer.events.decode import (
    DECODE_ERRORS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodedBatch,
    EventDecoder,
)
from kvaware_scorer.events.sglang import SGLangEventDecoder
from kvaware_scorer.index.base import MAX_TIERS, normalize_medium
from kvaware_scorer.keys import BlockKey, DerivedKeyer, EngineHash

if TYPE_CHECKING:
    from prometheus_client import Counter

    from kvaware_scorer.indexer import Indexer

__all__ = [
    "FULL_ATTENTION_KINDS",
    "EventIngestor",
    "ReplayResult",
    "ReplaySource",
    "StreamState",
]

logger = logging.getLogger(__name__)

#: Seconds between two resync attempts of one stream.
_RESYNC_INTERVAL: Final = 30.0

#: Engine hash -> key pairs a stream remembers in each of its two ``recent`` generations.
_RECENT: Final = 1024

#: Sequence numbers of undecodable frames remembered per pod, and pods remembered.
_FAILED_SEQS: Final = 64
_FAILED_PODS: Final = 4096

#: Seconds between two checks for pods a remote index lost writes of.
_HEAL_INTERVAL: Final = 1.0

#: Locks pods are spread over (a pod's frames apply under its lock, in order).
_LOCK_STRIPES: Final = 64

#: KV-cache group kinds whose blocks are indexed (the prefix a request can hit).
FULL_ATTENTION_KINDS: Final = frozenset({"full_attention", "mla_attention", "sink_full_attention"})

#: Index errors a write or a read of the ingestion path can meet (counted, never raised).
_BACKEND_ERRORS: Final = (KVAwareError, OSError, ValueError)


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
            reason: ``gap`` or ``join``.

        Returns:
            The frames received, or None when no replay is possible for this stream.
        """
        ...


@dataclass(slots=True)
class StreamState:
    """Ingestion state of one (pod, DP rank) event stream.

    Attributes:
        pod: Pod id.
        rank: Data-parallel rank.
        model: Last model named for this stream.
        last_seq: Last sequence number applied (live or replayed); None before the first.
        live_seq: Last sequence number received live; None before the first.
        main_group: The KV-cache group whose blocks are indexed (learned from the first
            full-attention store).
        held: Tier -> engine hash -> copies held by this stream, kept only while other DP
            ranks of the pod stream too; None when the stream is its pod's only one (the
            index's references are then exactly this stream's).
        recent: Engine hash -> key of blocks stored (or parents resolved) lately.
        recent_old: The previous generation of `recent`.
        batches: Batches applied.
        first_seq: Sequence number of the first batch applied since the stream (re)started.
        incomplete: A replay (join or gap) was attempted and failed, so some parents may be
            unknown; the first orphan then asks for a resync.
        next_resync: Monotonic time before which no further resync is attempted.
        last_digest: xxh3-64 of the payload applied under `last_seq` (tells a restarted
            publisher's batch from the one applied under the same seq).
        last_seen: Monotonic time of the stream's last frame.
        merging: A join replay is being applied over index entries that an earlier ingestor
            (another process on a shared index) wrote for this pod: stores add no reference
            the pod already holds, offload placeholders are skipped.
        decoder: The wire decoder of the stream's engine (None: vLLM's).
    """

    pod: str
    rank: int
    model: str | None = None
    last_seq: int | None = None
    live_seq: int | None = None
    main_group: int | None = None
    held: dict[str, dict[int, int]] | None = None
    recent: dict[int, int] = field(default_factory=dict)
    recent_old: dict[int, int] = field(default_factory=dict)
    batches: int = 0
    first_seq: int | None = None
    incomplete: bool = False
    next_resync: float = 0.0
    last_digest: int | None = None
    last_seen: float = field(default_factory=time.monotonic)
    merging: bool = False
    decoder: Any = None

    def remember(self, engine_hash: int, key: int) -> None:
        """Record `engine_hash` -> `key` in `recent` (two generations of `_RECENT` pairs)."""
        recent = self.recent
        recent[engine_hash] = key
        if len(recent) >= _RECENT:
            self.recent_old = recent
            self.recent = {}


class _Counters:
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


def _digest(payload: bytes) -> int:
    """A payload's identity (whether a replayed batch is the one applied under its seq)."""
    digest: int = xxhash.xxh3_64_intdigest(payload)
    return digest


def _salt_of(entry: Any, lora: str | None) -> str | None:
    """The cache_salt in block 0's untagged extra keys (after the LoRA name, if any)."""
    if not isinstance(entry, list) or not entry:
        return None
    items = entry[1:] if lora is not None and entry[0] == lora else entry
    for x in items:
        if isinstance(x, str):
            return x
    return None


#: Never equal to a decoded medium.
_UNSET: Final = object()

# write operations queued by a _Writer: (kind, tier, keys or engine hashes, engine hashes, n)
_ADD, _ADD_NEW, _REMOVE, _REMOVE_HELD, _ADD_TIER = range(5)


_Op = tuple[int, str, list[int], list[int] | None, int]


class _Writer:
    """One batch's index writes, kept in event order and sent through ``index.batch()`` (one
    round trip on a remote index, written behind) when flushed. Consecutive stores (or
    removals) of one tier become one call, which saves the per-call cost of most of a batch's
    events. What the writes did is counted when the index reports their results."""

    __slots__ = ("_ehs", "_ing", "_keys", "_last", "_n", "_ops", "_per", "_pod", "_tier")

    def __init__(self, ingestor: EventIngestor, pod: str) -> None:
        self._ing = ingestor
        self._pod = pod
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
        return self._ing.index.resolve(self._pod, EngineHash(engine_hash))

    def flush(self) -> None:
        """Send the queued writes; their results are counted when the index reports them."""
        if self._keys is not None:
            self._end_run()
        ops = self._ops
        if not ops:
            return
        self._ops = []
        pod = self._pod
        ing = self._ing
        b = None
        try:
            with ing.index.batch(functools.partial(ing._count_writes, pod, ops)) as b:
                for kind, tier, a, ehs, _n in ops:
                    # `a` holds block keys for adds, engine hashes otherwise
                    if kind == _ADD:
                        b.add(
                            pod,
                            cast("list[BlockKey]", a),
                            cast("list[EngineHash] | None", ehs),
                            tier,
                        )
                    elif kind in (_REMOVE, _REMOVE_HELD):
                        b.remove(pod, cast("list[EngineHash]", a), tier)
                    elif kind == _ADD_NEW:
                        b.add_new(
                            pod,
                            cast("list[BlockKey]", a),
                            cast("list[EngineHash] | None", ehs),
                            tier,
                        )
                    else:
                        b.add_tier(pod, cast("list[EngineHash]", a), tier)
        except _BACKEND_ERRORS as exc:
            # NOTE: the in-memory index applied the writes before the failing one
            done = [] if b is None else b.results
            ing._count_writes(pod, ops[: len(done)], done)
            ing._count_writes(pod, ops[len(done) :], exc)


class EventIngestor:
    """Decodes payload frames and applies their events to ``indexer.index``, per stream, in order.

    Every `sweep_interval` seconds, `ingest` also releases what idle streams keep (see `sweep`),
    so that pods that vanished without a purge (bind mode has no endpoint list) leave nothing
    growing behind.

    Args:
        indexer: The indexer whose index, keyer, block size, tiers and metrics are used.

    Attributes:
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

    idle_after: float = 300.0
    sweep_interval: float = 60.0
    max_event_tokens: int = 1 << 20
    max_payload_bytes: int = 8 << 20
    max_seq_jump: int = 1 << 24

    def __init__(self, indexer: Indexer) -> None:
        self.indexer = indexer
        self.index = indexer.index
        self.metrics = indexer.metrics
        self.block_size = indexer.block_size
        self.default_tier = indexer.config.default_tier
        keyer = indexer.keyer
        self._keyer: DerivedKeyer | None = keyer if isinstance(keyer, DerivedKeyer) else None
        self._decoder = EventDecoder()
        # NOTE: one decoder per engine wire format, chosen per frame (`ingest(engine=...)`).
        self.decoders: dict[str, Any] = {
            "vllm": self._decoder,
            "sglang": SGLangEventDecoder(self.block_size),
        }
        self._engine_warned: set[str] = set()
        self._encoder = msgspec.msgpack.Encoder()
        self._streams: dict[str, dict[int, StreamState]] = {}
        self._locks = [threading.RLock() for _ in range(_LOCK_STRIPES)]
        self._last_sweep = time.monotonic()
        self._replay_source: ReplaySource | None = None
        self._failed: dict[str, list[int]] = {}
        # NOTE: a remote index may lose writes (a full buffer through a long outage, a server
        # that restarted empty); it then names the pods to rebuild.
        self._take_diverged = getattr(self.index, "take_diverged", None)
        self._next_heal = 0.0
        self._failed_lock = threading.Lock()
        m = self.metrics
        self._dropped = _Counters(m.dropped)
        self._skipped = _Counters(m.blocks_skipped)
        self._events = _Counters(m.events)
        self._batches = _Counters(m.event_batches)
        self._tiers: dict[str | None, str] = {}
        # NOTE: the index keeps at most MAX_TIERS tiers; an event naming one more is refused
        # up front (bad_tier) instead of failing half-applied.
        self._tier_names: set[str] = {self.default_tier, *indexer.tiers.names}

    # -- wiring ------------------------------------------------------------------------------

    def set_replay_source(self, source: ReplaySource | None) -> None:
        """Register (or clear with None) where gaps and joins are replayed from."""
        self._replay_source = source

    @property
    def replay_source(self) -> ReplaySource | None:
        """The registered replay source, if any."""
        return self._replay_source

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
            # NOTE: vllm key mode reproduces vLLM's own block hashes from prompts; another
            # engine's hashes never equal them, so its blocks could only be misses.
            self._dropped["engine_key_mode"].inc()
            if engine not in self._engine_warned:
                self._engine_warned.add(engine)
                logger.warning(
                    "%s KV events need derived keys (tokenProcessorConfig keyMode 'derived'); "
                    "dropping them in vllm key mode",
                    engine,
                )
            return
        try:
            self._ingest(pod, model, payload, seq, decoder)
        except Exception:
            self._dropped["internal_error"].inc()
            logger.exception("KV-event frame from %s (seq %s) failed", pod, seq)

    def forget_pod(self, pod: str) -> None:
        """Drop every stream of `pod` (called by `Indexer.purge_pod` after a purge).

        The next frame from the pod starts a new stream (and a join replay, where possible).
        """
        with self._lock_for(pod):
            self._streams.pop(pod, None)
        with self._failed_lock:
            self._failed.pop(pod, None)

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
        now = self._last_sweep = time.monotonic()
        limit = now - self.idle_after
        idle: list[str] = []
        for pod, streams in list(self._streams.items()):
            lock = self._lock_for(pod)
            if not lock.acquire(blocking=False):
                continue  # busy, hence not idle
            try:
                quiet = True
                for st in streams.values():
                    if st.last_seen > limit:
                        quiet = False
                    elif st.recent or st.recent_old:
                        st.recent, st.recent_old = {}, {}
                if quiet:
                    idle.append(pod)
            finally:
                lock.release()
        if not idle:
            return 0
        try:
            known = set(self.index.pods())
        except _BACKEND_ERRORS as exc:
            logger.debug("sweep: the index cannot list its pods: %s", exc)
            return 0
        forgotten = 0
        for pod in idle:
            if pod in known:
                continue
            with self._lock_for(pod):
                current = self._streams.get(pod)
                if current is not None and all(st.last_seen <= limit for st in current.values()):
                    del self._streams[pod]
                    forgotten += 1
        if forgotten:
            logger.info("forgot %d idle pods the index no longer holds", forgotten)
        return forgotten

    def _heal(self) -> None:
        """Purge the pods whose writes the index lost; each one's next frame starts a new
        stream, which replays its publisher's buffer from seq 0 (a rebuild), where a replay
        endpoint is known."""
        assert self._take_diverged is not None
        try:
            pods: set[str] = self._take_diverged()
        except _BACKEND_ERRORS as exc:
            logger.debug("the index cannot name diverged pods: %s", exc)
            return
        for pod in pods:
            logger.warning("pod %s: index writes were lost; rebuilding it from its events", pod)
            self.indexer.purge_pod(pod, reason="index_diverged")

    def wait(self) -> None:
        """Return once every write of the frames ingested so far has reached the index (a
        remote index applies them behind `ingest`, in order)."""
        with self.index.batch():
            pass

    def streams(self, pod: str) -> dict[int, StreamState]:
        """The live stream states of `pod` by DP rank (for inspection; do not mutate)."""
        with self._lock_for(pod):
            return dict(self._streams.get(pod, {}))

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
        with self._lock_for(pod):
            for r, st in self._streams.get(pod, {}).items():
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

    # -- sequencing --------------------------------------------------------------------------

    def _lock_for(self, pod: str) -> threading.RLock:
        # NOTE: striped, not one lock per pod: a lock per pod id ever seen would only grow.
        return self._locks[hash(pod) % _LOCK_STRIPES]

    def _stream(self, pod: str, rank: int, model: str | None) -> StreamState:
        streams = self._streams.get(pod)
        if streams is None:
            streams = self._streams[pod] = {}
        st = streams.get(rank)
        if st is None:
            if streams and self._split(pod, streams):
                st = StreamState(pod, rank, held={})
            else:
                st = StreamState(pod, rank)
            self._streams.setdefault(pod, streams)[rank] = st
        if model:
            st.model = model
        st.last_seen = time.monotonic()
        return st

    def _split(self, pod: str, streams: dict[int, StreamState]) -> bool:
        """A second DP rank of `pod` starts streaming: the pod's only stream so far takes the
        index's references of the pod as its own ``held`` counts, so that later each rank
        removes only its own. Returns False when the index could not tell (the pod is then
        purged and its streams start over)."""
        for st in streams.values():
            if st.held is not None:
                continue
            try:
                refs = self.index.references(pod)
            except _BACKEND_ERRORS as exc:
                self.metrics.backend_errors.labels("ingest").inc()
                logger.warning(
                    "pod %s: a second DP rank streams but the index cannot list the first"
                    " rank's references (%s): purging the pod",
                    pod,
                    exc,
                )
                self.indexer.purge_pod(pod, reason="rank_split")
                streams.clear()
                return False
            st.held = {t: dict(r.items()) for t, r in refs.items()}
        return True

    def _decode(self, payload: bytes, decoder: Any = None) -> DecodedBatch | None:
        if len(payload) > self.max_payload_bytes:
            # NOTE: decoding costs ~40 bytes per token id; the subscriber's sockets refuse such
            # frames already, this guards direct callers and replays alike.
            self._dropped["frame_too_large"].inc()
            logger.debug("dropped a KV-event payload of %d bytes", len(payload))
            return None
        try:
            batch: DecodedBatch = (decoder or self._decoder).decode(payload)
            return batch
        except EventDecodeError as exc:
            self._dropped[exc.reason].inc()
            logger.debug("dropped KV-event payload (%d bytes): %s", len(payload), exc)
            return None
        except DECODE_ERRORS as exc:  # the decoder's own guard missed one: still a bad frame
            self._dropped["decode_error"].inc()
            logger.debug("dropped KV-event payload (%d bytes): %r", len(payload), exc)
            return None

    def _ingest(
        self, pod: str, model: str | None, payload: bytes, seq: int | None, decoder: Any = None
    ) -> None:
        now = time.monotonic()
        if now - self._last_sweep >= self.sweep_interval:
            self.sweep()
        if self._take_diverged is not None and now >= self._next_heal:
            self._next_heal = now + _HEAL_INTERVAL
            self._heal()
        batch = self._decode(payload, decoder)
        if batch is None:
            if seq is not None:
                self._skipped_seq(pod, seq)
            return
        rank = batch.data_parallel_rank or 0
        with self._lock_for(pod):
            st = self._stream(pod, rank, model)
            st.decoder = decoder
            if seq is None:
                self._apply(st, batch, "unsequenced")
                return
            self._observe_lag(batch.ts)
            live = st.live_seq
            if live is not None and seq > live + self.max_seq_jump:
                logger.info(
                    "pod %s rank %d: seq jumped from %d to %d: publisher restarted",
                    pod,
                    rank,
                    live,
                    seq,
                )
                self._dropped["seq_jump"].inc()
                st = self._reset(st, "publisher_restart", keep_seq=False)
                live = None
            if live is not None and seq <= live:
                logger.info(
                    "pod %s rank %d: seq went from %d back to %d: publisher restarted",
                    pod,
                    rank,
                    live,
                    seq,
                )
                st = self._reset(st, "publisher_restart", keep_seq=False)
            last = st.last_seq
            st.live_seq = seq
            if last is None:
                st.first_seq = seq
                if seq > 0:
                    st = self._join(st, seq)
            elif seq > last + 1 and self._only_failed(pod, last + 1, seq):
                # NOTE: the missing frames arrived but could not be decoded (counted then):
                # a replay would only bring the same bytes back.
                pass
            elif seq > last + 1:
                self.metrics.seq_gaps.inc()
                logger.info("pod %s rank %d: seq gap %d..%d", pod, rank, last + 1, seq - 1)
                st = self._recover_gap(st, last, seq)
            if (
                st.incomplete
                and self._replay_source is not None
                and time.monotonic() >= st.next_resync
                and self._has_orphan(st, batch)
            ):
                st = self._resync(st, seq)
            st = self._apply(st, batch, "live")
            st.last_seq = seq
            st.last_digest = _digest(payload)

    def _skipped_seq(self, pod: str, seq: int) -> None:
        """Remember that `pod`'s frame `seq` failed to decode (bounded: `_FAILED_SEQS` per
        pod, `_FAILED_PODS` pods), so that the gap it leaves is not replayed."""
        failed = self._failed
        with self._failed_lock:
            seqs = failed.pop(pod, None)
            if seqs is None:
                seqs = []
                if len(failed) >= _FAILED_PODS:
                    del failed[next(iter(failed))]
            seqs.append(seq)
            if len(seqs) > _FAILED_SEQS:
                del seqs[0]
            failed[pod] = seqs

    def _only_failed(self, pod: str, start: int, end: int) -> bool:
        """Whether every seq in ``[start, end)`` is a frame of `pod` that failed to decode."""
        with self._failed_lock:
            seqs = self._failed.get(pod)
            if not seqs or end - start > len(seqs):
                return False
            return set(range(start, end)) <= set(seqs)

    def _observe_lag(self, ts: float) -> None:
        lag = time.time() - ts
        if 0.0 <= lag < 86400.0 and math.isfinite(lag):
            self.metrics.event_lag.observe(lag)

    def _fetch(self, st: StreamState, start: int, reason: str) -> ReplayResult | None:
        """`st`'s publisher's buffered batches from `start` on; None without a replay source."""
        source = self._replay_source
        if source is None:
            return None
        try:
            return self._unlocked(source, st, start, reason)
        except Exception:
            logger.exception("replay for %s rank %d failed", st.pod, st.rank)
            return ReplayResult([], "error")

    def _unlocked(
        self, source: ReplaySource, st: StreamState, start: int, reason: str
    ) -> ReplayResult | None:
        """Ask `source` for a replay without holding `st`'s lock (held once by `_ingest`).

        NOTE: locks are striped: other pods share this one, and a replay may take up to its
        deadline. The subscriber runs a pod's frames one at a time, so nothing else applies to
        this stream meanwhile (the sweep leaves it alone: it was just seen).
        """
        lock = self._lock_for(st.pod)
        lock.release()
        try:
            return source.replay(st.pod, st.rank, start, reason)
        finally:
            lock.acquire()

    def _recover_gap(self, st: StreamState, last: int, seq: int) -> StreamState:
        """Fill the gap ``(last, seq)``; first check that the publisher is the one whose batch
        was applied under `last`.

        NOTE: a restarted vLLM counts from 0 again. When the router missed more of the new
        publisher's batches than the old one had sent, the new seq is above the old and looks
        like a gap. The replay buffer tells the two apart: asked from `last`, a restarted
        publisher answers a different batch under that seq (or one of its own), so the pod
        is purged and replayed from 0 instead of keeping the old process's blocks.
        """
        if st.last_digest is None or self._replay_source is None:
            return self._replay(st, last + 1, seq, "gap")
        result = self._fetch(st, last, "gap")
        if result is None:
            return self._replay(st, last + 1, seq, "gap")
        frames = result.frames
        if frames and frames[0][0] == last and _digest(frames[0][1]) != st.last_digest:
            logger.info(
                "pod %s rank %d: the batch under seq %d changed: publisher restarted",
                st.pod,
                st.rank,
                last,
            )
            st = self._reset(st, "publisher_restart", keep_seq=False)
            st.live_seq = seq
            st.first_seq = seq
            return self._replay(st, 0, seq, "join")
        return self._apply_replay(st, result, last + 1, seq, "gap")

    def _join(self, st: StreamState, seq: int) -> StreamState:
        """First frame of a stream at `seq` > 0: replay the publisher's buffer ``[0, seq)``.

        NOTE: the index may already hold the pod's blocks, written by an earlier ingestor on a
        shared index (an ingest process restarted on Redis); applying the buffer again would
        count its stores twice (stale entries no removal ever takes back). When the buffer
        reaches back to seq 0 it is the publisher's whole history: the pod is purged and
        rebuilt from it exactly (which also drops blocks of an earlier publisher). Otherwise
        the buffer is merged: stores add no reference the pod already holds at that tier and
        offload placeholders are skipped (duplicate copies may be undercounted: misses, never
        stale hits).
        """
        result = self._fetch(st, 0, "join")
        if result is None:
            return st
        frames = result.frames
        if st.held is None and frames and frames[0][0] < seq and self._index_holds(st.pod):
            if frames[0][0] == 0 and result.status == "ok":
                logger.info("pod %s rank %d: rebuilt from the publisher's buffer", st.pod, st.rank)
                st = self._reset(st, "rejoin", keep_seq=False)
                st.live_seq = st.first_seq = seq
            else:
                logger.info("pod %s rank %d: merging the publisher's buffer", st.pod, st.rank)
                st.merging = True
        st = self._apply_replay(st, result, 0, seq, "join")
        st.merging = False
        return st

    def _index_holds(self, pod: str) -> bool:
        """Whether the index has entries for `pod` (True when it cannot tell)."""
        try:
            return pod in self.index.pods()
        except _BACKEND_ERRORS:
            return True

    def _replay(self, st: StreamState, start: int, until: int, reason: str) -> StreamState:
        """Fetch and apply batches ``[start, until)`` of `st`'s publisher, in order."""
        result = self._fetch(st, start, reason)
        if result is None:
            # NOTE: no replay endpoint for this stream: nothing a later resync could fetch.
            if reason == "gap":
                self.metrics.lost_batches.inc(until - start)
                logger.warning(
                    "pod %s rank %d: %d batches lost (no replay endpoint)",
                    st.pod,
                    st.rank,
                    until - start,
                )
            return st
        return self._apply_replay(st, result, start, until, reason)

    def _apply_replay(
        self, st: StreamState, result: ReplayResult, start: int, until: int, reason: str
    ) -> StreamState:
        """Apply the frames of `result` within ``[start, until)``, counting what is missing."""
        m = self.metrics
        expected = start
        lost = 0
        applied = 0
        for seq, payload in result.frames:
            if seq < expected:
                continue
            if seq >= until:
                break
            if seq > expected and reason == "gap":
                lost += seq - expected
            batch = self._decode(payload, st.decoder)
            if batch is not None:
                if (batch.data_parallel_rank or 0) != st.rank:
                    self._dropped["rank_mismatch"].inc()
                else:
                    st = self._apply(st, batch, "replay")
                    applied += 1
            st.last_seq = seq
            st.last_digest = _digest(payload)
            expected = seq + 1
        status = result.status
        if status != "ok":
            st.incomplete = True
        if reason == "gap":
            lost += until - expected
            if lost:
                st.incomplete = True
                m.lost_batches.inc(lost)
                logger.warning(
                    "pod %s rank %d: replay recovered %d of %d batches (%s)",
                    st.pod,
                    st.rank,
                    until - start - lost,
                    until - start,
                    status,
                )
                if status == "ok":
                    status = "incomplete"
        m.replays.labels(status).inc()
        m.replayed_batches.labels(reason).inc(applied)
        return st

    def _has_orphan(self, st: StreamState, batch: DecodedBatch) -> bool:
        """Whether applying `batch` would orphan a store (derived keys only)."""
        if self._keyer is None:
            return False
        resolve = self.index.resolve
        seen: set[int] = set()
        for ev in batch.events:
            if not isinstance(ev, BlockStored):
                continue
            parent = ev.parent_block_hash
            if (
                parent is not None
                and ev.token_ids
                and ev.kv_cache_spec_kind in (None, *FULL_ATTENTION_KINDS)
                and parent not in seen
                and parent not in st.recent
                and parent not in st.recent_old
            ):
                try:
                    if resolve(st.pod, EngineHash(parent)) is None:
                        return True
                except _BACKEND_ERRORS:
                    return False  # no resync while the index cannot answer
            seen.update(ev.block_hashes)
        return False

    def _resync(self, st: StreamState, until: int) -> StreamState:
        """Rebuild `st` from the publisher's whole buffer when its history is incomplete.

        Only when the buffer still holds every batch applied since the stream started (else
        the rebuild would forget more than it recovers); the rebuilt state then also holds
        the blocks stored before this subscriber joined, with their parents.
        """
        source = self._replay_source
        assert source is not None
        st.next_resync = time.monotonic() + _RESYNC_INTERVAL
        try:
            result = self._unlocked(source, st, 0, "resync")
        except Exception:
            logger.exception("resync replay for %s rank %d failed", st.pod, st.rank)
            result = ReplayResult([], "error")
        if result is None:
            return st
        frames = [(q, p) for q, p in result.frames if q < until]
        first = frames[0][0] if frames else None
        contiguous = all(b[0] == a[0] + 1 for a, b in itertools.pairwise(frames))
        covers = (
            result.status == "ok"
            and first is not None
            and st.first_seq is not None
            and first <= st.first_seq
            and contiguous
            and frames[-1][0] == until - 1
        )
        if not covers:
            self.metrics.replays.labels("unusable").inc()
            logger.info(
                "pod %s rank %d: replay buffer does not cover this stream; no resync",
                st.pod,
                st.rank,
            )
            return st
        logger.info(
            "pod %s rank %d: resyncing from the replay buffer (seq %d..%d)",
            st.pod,
            st.rank,
            first,
            until - 1,
        )
        saved = (st.live_seq, st.next_resync)
        st = self._reset(st, "resync", keep_seq=False)
        st.live_seq, st.next_resync = saved
        st.first_seq = first
        applied = 0
        for q, payload in frames:
            batch = self._decode(payload, st.decoder)
            if batch is not None and (batch.data_parallel_rank or 0) == st.rank:
                st = self._apply(st, batch, "replay")
                applied += 1
            st.last_seq = q
            st.last_digest = _digest(payload)
        # NOTE: as complete as the buffer allows; blocks stored before it stay unknown, and
        # retrying would only rebuild the same state.
        st.incomplete = False
        self.metrics.replays.labels("ok").inc()
        self.metrics.replayed_batches.labels("resync").inc(applied)
        return st

    def _reset(self, st: StreamState, reason: str, keep_seq: bool) -> StreamState:
        """Forget what `st`'s pool held: purge the pod, or only this rank's references when
        other ranks of the pod are streaming too."""
        pod, rank = st.pod, st.rank
        streams = self._streams.get(pod, {})
        others = any(r != rank for r in streams)
        if others:
            self._purge_stream(st, reason)
            new = StreamState(pod, rank, st.model, held={})
            streams[rank] = new
        else:
            self.indexer.purge_pod(pod, reason=reason)
            self._streams.pop(pod, None)
            new = self._stream(pod, rank, st.model)
        new.decoder = st.decoder
        if keep_seq:
            new.last_seq, new.live_seq, new.main_group = st.last_seq, st.live_seq, st.main_group
            new.first_seq, new.incomplete = st.first_seq, st.incomplete
            new.next_resync, new.last_digest = st.next_resync, st.last_digest
        return new

    def _purge_stream(self, st: StreamState, reason: str) -> None:
        w = _Writer(self, st.pod)
        for tier, held in (st.held or {}).items():
            hashes = [h for h, c in held.items() for _ in range(c)]
            if hashes:
                w.remove(tier, hashes, counted=False)
        w.flush()
        if st.held is not None:
            st.held.clear()
        self.metrics.purges.labels(reason).inc()

    def _count_writes(
        self, pod: str, ops: list[_Op], results: list[int | None] | Exception
    ) -> None:
        """Count what a batch of writes did, from the index's results (maybe on the index's
        writer thread: metrics only)."""
        m = self.metrics
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

    # -- applying ----------------------------------------------------------------------------

    def _tier(self, medium: str | None) -> str | None:
        """The tier name of `medium`; None when it would be a tier beyond the index's bound."""
        name = self._tiers.get(medium)
        if name is None:
            name = normalize_medium(medium, self.default_tier)
            if name not in self._tier_names:
                if len(self._tier_names) >= MAX_TIERS:
                    return None
                self._tier_names.add(name)
            if len(self._tiers) < 1024:
                self._tiers[medium] = name
        return name

    def _apply(self, st: StreamState, batch: DecodedBatch, source: str) -> StreamState:
        self._batches[source].inc()
        st.batches += 1
        for reason in batch.rejected:
            self._dropped[reason].inc()
            logger.debug("dropped an event from %s: %s", st.pod, reason)
        w = _Writer(self, st.pod)
        n_removed = n_stored = unknown = 0
        # NOTE: removals are the most frequent events (one hash each, as vLLM evicts); the
        # loop keeps them on locals and hands them to the writer once per run. A pod's only
        # stream hands them over as they are (the index counts the unknown ones); a stream
        # sharing its pod with other ranks removes only what it holds itself.
        gone: list[int] = []
        gone_tier = ""
        last_medium: object = _UNSET  # the medium of the removals in `gone`
        tier: str | None = None
        shared = st.held is not None
        held: dict[int, int] | None = None
        main = 0 if st.main_group is None else st.main_group
        for ev in batch.events:
            cls = ev.__class__
            if cls is BlockRemoved or (cls is not BlockStored and isinstance(ev, BlockRemoved)):
                rm: BlockRemoved = ev  # type: ignore[assignment]
                n_removed += 1
                g = rm.group_idx
                medium = rm.medium
                if (g is None or g == main) and medium == last_medium and not shared:
                    gone += rm.block_hashes  # the hot path: one more eviction of the run
                    continue
                if g is not None and g != main:
                    self._skipped["kv_group"].inc(len(rm.block_hashes))
                    continue
                if medium != last_medium:
                    last_medium = medium
                    tier = self._tier(medium)
                    if gone and tier != gone_tier:
                        w.remove(gone_tier, gone, not shared)
                        gone = []
                    if tier is not None:
                        gone_tier = tier
                        if shared:
                            held = st.held.get(tier)  # type: ignore[union-attr]
                if tier is None:
                    last_medium = _UNSET  # NOTE: keeps a refused medium off the hot path
                    self._dropped["bad_tier"].inc()
                    n_removed -= 1
                    continue
                if not shared:
                    gone += rm.block_hashes
                    continue
                if held is None:
                    unknown += len(rm.block_hashes)
                    continue
                get = held.get
                for h in rm.block_hashes:
                    c = get(h)
                    if c is None:
                        unknown += 1
                    elif c == 1:
                        del held[h]
                        gone.append(h)
                    else:
                        held[h] = c - 1
                        gone.append(h)
                continue
            last_medium = _UNSET  # a store may create this stream's dict for the tier
            if gone:
                w.remove(gone_tier, gone, not shared)
                gone = []
            if cls is BlockStored or isinstance(ev, BlockStored):
                n_stored += self._store(st, ev, w)  # type: ignore[arg-type]
                main = 0 if st.main_group is None else st.main_group
            elif isinstance(ev, AllBlocksCleared):
                w.flush()
                self._events["AllBlocksCleared"].inc()
                st = self._reset(st, "all_blocks_cleared", keep_seq=True)
                w = _Writer(self, st.pod)
                shared = st.held is not None
                main = 0 if st.main_group is None else st.main_group
        if gone:
            w.remove(gone_tier, gone, not shared)
        w.flush()
        if n_removed:
            self._events["BlockRemoved"].inc(n_removed)
        if n_stored:
            self._events["BlockStored"].inc(n_stored)
        if unknown:
            self._skipped["unknown_block"].inc(unknown)
        return st

    def _group_ok(self, st: StreamState, group: int | None, kind: str | None) -> bool:
        if kind is not None and kind != "unknown":
            if kind not in FULL_ATTENTION_KINDS:
                return False
            if st.main_group is None:
                st.main_group = group
                return True
            return group == st.main_group
        # NOTE: no kind: vLLM < 0.24, or an offload placeholder; "unknown": a spec vLLM does not
        # classify (e.g. a platform plugin's own attention spec, the only group of its model).
        # Group 0 is vLLM's first (attention) group unless a full-attention group was learned.
        if group is None:
            return True
        return group == (0 if st.main_group is None else st.main_group)

    def _store(self, st: StreamState, ev: BlockStored, w: _Writer) -> bool:
        """Apply one store; False when it was dropped (and counted as such)."""
        hashes = ev.block_hashes
        n = len(hashes)
        pod = st.pod
        group = ev.group_idx
        kind = ev.kv_cache_spec_kind
        if (
            group != st.main_group or kind != "full_attention" or group is None
        ) and not self._group_ok(st, group, kind):
            self._skipped["kv_group"].inc(n)
            return True
        medium = ev.medium
        tier = self._tiers.get(medium) or self._tier(medium)
        if tier is None:
            self._drop("bad_tier", pod, ev)
            return False
        toks = ev.token_ids
        if not toks:
            return self._placeholder(st, hashes, tier, w)
        bs = ev.block_size
        if len(toks) > self.max_event_tokens:
            self._drop("too_many_tokens", pod, ev)
            return False
        if bs <= 0 or len(toks) != n * bs:
            self._drop("token_count_mismatch", pod, ev)
            return False
        bsz = self.block_size
        parent = ev.parent_block_hash
        ehs: list[int] | None
        keyer = self._keyer
        if keyer is None:
            if bs != bsz:
                self._drop("block_size_mismatch", pod, ev)
                return False
            keys: list[int] = hashes
            ehs = None
            per = 1
        else:
            if bs % bsz:
                self._drop("block_size_mismatch", pod, ev)
                return False
            per = bs // bsz
            lora = ev.lora_name
            extra = ev.extra_keys
            if parent is None:
                space = lora
                if space is None and ev.lora_id is not None:
                    # NOTE: vLLM 0.11 names the adapter by its int id only (no lora_name): its
                    # blocks are hashed with the adapter, so they are keyed apart from the
                    # model's (no request names this namespace: misses, never stale hits).
                    space = f"\x00lora_id\x00{ev.lora_id}\x00{st.model or ''}"
                if space is None and not st.model:
                    self._drop("no_model", pod, ev)
                    return False
                salt = _salt_of(extra[0], lora) if extra else None
                pkey = keyer.root(st.model or "", space, salt)
            else:
                found = st.recent.get(parent)
                if found is None:
                    found = st.recent_old.get(parent)
                    if found is None:
                        try:
                            found = w.resolve(parent)
                        except _BACKEND_ERRORS as exc:
                            self.metrics.backend_errors.labels("ingest").inc()
                            logger.warning("resolving a parent on %s failed: %s", pod, exc)
                            self._drop("backend_error", pod, ev)
                            return False
                        if found is None:
                            self.metrics.orphaned_blocks.inc(n)
                            self._drop("orphaned_parent", pod, ev)
                            return False
                    st.remember(parent, found)
                pkey = found
            if extra and extra.count(None) != len(extra):
                content = self._content(extra, lora, parent is None)
            else:
                content = None
            if content is None:
                keys = keyer.chain(pkey, toks, bsz)
            else:
                keys = self._chain_mixed(keyer, pkey, toks, bs, content)
            ehs = hashes if per == 1 else [h for h in hashes for _ in range(per)]
            recent = st.recent
            recent[hashes[-1]] = keys[-1]
            if len(recent) >= _RECENT:
                st.recent_old = recent
                st.recent = {}
        held_tiers = st.held
        if held_tiers is None:
            if parent is None or st.merging:
                w.add_new(tier, keys, ehs, n)
            else:
                w.add(tier, keys, ehs, n, per)
            return True
        held = held_tiers.get(tier)
        if held is None:
            held = held_tiers[tier] = {}
        fresh = dict.fromkeys(hashes, 1)
        if len(fresh) == n and held.keys().isdisjoint(fresh):
            held.update(fresh)  # the common case: new blocks, no duplicates
        else:
            if parent is None:
                # NOTE: a parent-less store of blocks this stream already holds re-announces
                # prefix-cache hits (kv_cache_report_mode=full): same physical blocks, so no
                # new reference (else the later single BlockRemoved would leave a stale entry).
                keep = [i for i, h in enumerate(hashes) if h not in held]
                if len(keep) < n:
                    self._skipped["reannounced"].inc(n - len(keep))
                    if not keep:
                        return True
                    hashes = [hashes[i] for i in keep]
                    keys = [keys[i * per + j] for i in keep for j in range(per)]
                    if ehs is not None:
                        ehs = [h for h in hashes for _ in range(per)]
                    n = len(hashes)
            for h in hashes:
                held[h] = held.get(h, 0) + 1
        w.add(tier, keys, ehs, n, per)
        return True

    def _placeholder(self, st: StreamState, hashes: list[int], tier: str, w: _Writer) -> bool:
        """An offload placeholder (no tokens): add `tier` to blocks the pod already holds."""
        held_tiers = st.held
        if held_tiers is None:
            if st.merging:
                # NOTE: may have been applied already; a tier counted twice would stay
                self._skipped["rejoin"].inc(len(hashes))
                return True
            w.add_tier(tier, list(hashes))
            return True
        # NOTE: several ranks share the pod: count the tier for this rank only where the pod
        # knows the block.
        pod = st.pod
        try:
            if w.pending:
                w.flush()
            resolve = self.index.resolve
            known = [h for h in hashes if resolve(pod, EngineHash(h)) is not None]
        except _BACKEND_ERRORS as exc:
            self.metrics.backend_errors.labels("ingest").inc()
            logger.warning("offload store for %s failed: %s", pod, exc)
            self._dropped["backend_error"].inc()
            return False
        if len(known) < len(hashes):
            self._skipped["unknown_block"].inc(len(hashes) - len(known))
        if not known:
            return True
        w.add_tier(tier, known)
        held = held_tiers.get(tier)
        if held is None:
            held = held_tiers[tier] = {}
        for h in known:
            held[h] = held.get(h, 0) + 1
        return True

    def _content(
        self, extra: list[Any], lora: str | None, at_root: bool
    ) -> list[bytes | None] | None:
        """Per block: the extra keys that change the block's content (multimodal inputs,
        prompt embeddings, ...), encoded; None when no block has any.

        The LoRA name and the cache_salt are left out: both already seed the root key.
        """
        out: list[bytes | None] | None = None
        for i, entry in enumerate(extra):
            if entry is None:
                continue
            if isinstance(entry, list):
                items = entry[1:] if lora is not None and entry and entry[0] == lora else entry
                if i == 0 and at_root:
                    for j, x in enumerate(items):
                        if isinstance(x, str):
                            items = items[:j] + items[j + 1 :]
                            break
                if not items:
                    continue
            else:
                items = [entry]
            if out is None:
                out = [None] * len(extra)
            out[i] = self._encoder.encode(items)
        return out

    @staticmethod
    def _chain_mixed(
        keyer: DerivedKeyer, parent: int, toks: list[int], bs: int, content: list[bytes | None]
    ) -> list[int]:
        """Chained keys where each block's content extra keys are mixed into its key, so a
        multimodal block never shares a key with a text block of the same token ids."""
        bsz = keyer.block_size
        keys: list[int] = []
        key = parent
        for i in range(len(toks) // bs):
            c = content[i] if i < len(content) else None
            run = toks[i * bs : (i + 1) * bs]
            if c is None:
                ks = keyer.chain(key, run, bsz)
                keys.extend(ks)
                key = ks[-1]
                continue
            for j in range(0, bs, bsz):
                k = keyer.chain(key, run[j : j + bsz], bsz)[0]
                key = xxhash.xxh3_64_intdigest(c, k)
                keys.append(key)
        return keys

    def _drop(self, reason: str, pod: str, ev: BlockStored) -> None:
        self._dropped[reason].inc()
        logger.debug(
            "dropped BlockStored from %s (%s): %d blocks, block_size %d, %d tokens",
            pod,
            reason,
            len(ev.block_hashes),
            ev.block_size,
            len(ev.token_ids),
        )
