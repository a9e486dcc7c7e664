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
* ``held``: per tier, engine hash -> copies this stream holds. These counts mirror vLLM's
  physical blocks: a removal dereferences only what this stream stored, a parent-less
  re-announcement of blocks it already holds adds no reference (see docs/events.md), and a
  restart or AllBlocksCleared of one rank drops exactly that rank's references.

Keys: in ``derived`` mode each stored block's key is chained from its parent's key (resolved
through the index's engine-hash map) over the block's tokens; a parent-less run starts at the
root of (model or LoRA, cache_salt). A block whose parent is unknown is never keyed as if it
started a prompt: it is counted as orphaned and left out. In ``vllm`` mode the engine hash is
the key.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec
import xxhash

from kvaware_scorer.errors import EventDecodeError, KVAwareError
from kvaware_scorer.events.decode import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodedBatch,
    EventDecoder,
)
from kvaware_scorer.index.base import MAX_TIERS, normalize_medium
from kvaware_scorer.keys import DerivedKeyer

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

#: KV-cache group kinds whose blocks are indexed (the prefix a request can hit).
FULL_ATTENTION_KINDS: Final = frozenset({"full_attention", "mla_attention", "sink_full_attention"})


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
        held: Tier -> engine hash -> copies held by this stream.
        batches: Batches applied.
        first_seq: Sequence number of the first batch applied since the stream (re)started.
        incomplete: A replay (join or gap) was attempted and failed, so some parents may be
            unknown; the first orphan then asks for a resync.
        next_resync: Monotonic time before which no further resync is attempted.
    """

    pod: str
    rank: int
    model: str | None = None
    last_seq: int | None = None
    live_seq: int | None = None
    main_group: int | None = None
    held: dict[str, dict[int, int]] = field(default_factory=dict)
    batches: int = 0
    first_seq: int | None = None
    incomplete: bool = False
    next_resync: float = 0.0


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


def _salt_of(entry: Any, lora: str | None) -> str | None:
    """The cache_salt in block 0's untagged extra keys (after the LoRA name, if any)."""
    if not isinstance(entry, list) or not entry:
        return None
    items = entry[1:] if lora is not None and entry[0] == lora else entry
    for x in items:
        if isinstance(x, str):
            return x
    return None


class _Writer:
    """One batch's pending index writes: consecutive stores (or removals) of one tier go to
    the index in one call, which saves the per-call cost of most of a batch's events."""

    __slots__ = (
        "_add_ehs",
        "_add_hashes",
        "_add_held",
        "_add_keys",
        "_add_tier",
        "_ing",
        "_pod",
        "_rm",
        "_rm_tier",
        "removed",
        "stored",
        "unknown",
    )

    def __init__(self, ingestor: EventIngestor, pod: str) -> None:
        self._ing = ingestor
        self._pod = pod
        self._add_tier = ""
        self._add_keys: list[int] = []
        self._add_ehs: list[int] | None = None
        self._add_hashes: list[int] = []
        self._add_held: dict[int, int] = {}
        self._rm_tier = ""
        self._rm: list[int] = []
        self.stored = 0
        self.removed = 0
        self.unknown = 0

    def resolve(self, engine_hash: int) -> int | None:
        """The key of `engine_hash` on this pod, including stores still pending."""
        key = self._ing.index.resolve(self._pod, engine_hash)
        if key is None and self._add_keys:
            # NOTE: rare: the parent was stored earlier in this very batch.
            self._flush_add()
            key = self._ing.index.resolve(self._pod, engine_hash)
        return key

    def add(
        self,
        tier: str,
        keys: list[int],
        ehs: list[int] | None,
        hashes: list[int],
        held: dict[int, int],
    ) -> None:
        if self._rm:
            self._flush_rm()
        if self._add_keys and (
            tier != self._add_tier
            or (ehs is not None and self._add_ehs is not None and self._add_ehs[-1] == ehs[0])
        ):
            # NOTE: equal engine hashes across two stores would read as one engine block.
            self._flush_add()
        self._add_tier = tier
        self._add_keys.extend(keys)
        if ehs is not None:
            if self._add_ehs is None:
                self._add_ehs = []
            self._add_ehs.extend(ehs)
        self._add_hashes.extend(hashes)
        self._add_held = held

    def remove(self, tier: str, hashes: list[int]) -> None:
        if self._add_keys:
            self._flush_add()
        if self._rm and tier != self._rm_tier:
            self._flush_rm()
        self._rm_tier = tier
        self._rm.extend(hashes)

    def flush(self) -> None:
        if self._add_keys:
            self._flush_add()
        if self._rm:
            self._flush_rm()

    def _flush_add(self) -> None:
        keys, ehs, hashes = self._add_keys, self._add_ehs, self._add_hashes
        self._add_keys, self._add_ehs, self._add_hashes = [], None, []
        held = self._add_held
        ing = self._ing
        try:
            ing.index.add(self._pod, keys, ehs, self._add_tier)
        except (KVAwareError, OSError, ValueError) as exc:
            ing.metrics.backend_errors.labels("ingest").inc()
            logger.warning("storing %d blocks of %s failed: %s", len(keys), self._pod, exc)
            for h in hashes:
                c = held.get(h, 0)
                if c <= 1:
                    held.pop(h, None)
                else:
                    held[h] = c - 1
            return
        self.stored += len(hashes)

    def _flush_rm(self) -> None:
        hashes, self._rm = self._rm, []
        ing = self._ing
        try:
            self.removed += ing.index.remove(self._pod, hashes, self._rm_tier)
        except (KVAwareError, OSError, ValueError) as exc:
            ing.metrics.backend_errors.labels("ingest").inc()
            logger.warning("removing %d blocks of %s failed: %s", len(hashes), self._pod, exc)


class EventIngestor:
    """Decodes payload frames and applies their events to ``indexer.index``, per stream, in order.

    Args:
        indexer: The indexer whose index, keyer, block size, tiers and metrics are used.
    """

    def __init__(self, indexer: Indexer) -> None:
        self.indexer = indexer
        self.index = indexer.index
        self.metrics = indexer.metrics
        self.block_size = indexer.block_size
        self.default_tier = indexer.config.default_tier
        keyer = indexer.keyer
        self._keyer: DerivedKeyer | None = keyer if isinstance(keyer, DerivedKeyer) else None
        self._decoder = EventDecoder()
        self._encoder = msgspec.msgpack.Encoder()
        self._streams: dict[str, dict[int, StreamState]] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._replay_source: ReplaySource | None = None
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

    def ingest(self, pod: str, model: str | None, payload: bytes, seq: int | None = None) -> None:
        """Apply one payload frame from `pod` (never raises).

        Args:
            pod: Pod id (``"<address>:<port>"``).
            model: Served model name, if known (needed to key parent-less stores without a
                LoRA in ``derived`` key mode; remembered per stream).
            payload: The msgpack ``EventBatch`` frame.
            seq: The frame's sequence number, when it came from a publisher: enables restart
                and gap detection. None applies the frame as it is.
        """
        try:
            self._ingest(pod, model, payload, seq)
        except Exception:
            self._dropped["internal_error"].inc()
            logger.exception("KV-event frame from %s (seq %s) failed", pod, seq)

    def forget_pod(self, pod: str) -> None:
        """Drop every stream of `pod` (called by `Indexer.purge_pod` after a purge).

        The next frame from the pod starts a new stream (and a join replay, where possible).
        """
        with self._lock_for(pod):
            self._streams.pop(pod, None)

    def streams(self, pod: str) -> dict[int, StreamState]:
        """The live stream states of `pod` by DP rank (for inspection; do not mutate)."""
        with self._lock_for(pod):
            return dict(self._streams.get(pod, {}))

    def held(self, pod: str, tier: str | None = None, rank: int | None = None) -> dict[int, int]:
        """Engine hash -> copies `pod` holds at `tier` (None = default tier), per our events.

        Args:
            pod: Pod id.
            tier: Medium name (normalized); None = the default tier.
            rank: One DP rank; None sums every rank.
        """
        name = normalize_medium(tier, self.default_tier)
        out: dict[int, int] = {}
        with self._lock_for(pod):
            for r, st in self._streams.get(pod, {}).items():
                if rank is not None and r != rank:
                    continue
                for h, c in st.held.get(name, {}).items():
                    out[h] = out.get(h, 0) + c
        return out

    # -- sequencing --------------------------------------------------------------------------

    def _lock_for(self, pod: str) -> threading.RLock:
        lock = self._locks.get(pod)
        if lock is None:
            with self._locks_guard:
                lock = self._locks.setdefault(pod, threading.RLock())
        return lock

    def _stream(self, pod: str, rank: int, model: str | None) -> StreamState:
        streams = self._streams.get(pod)
        if streams is None:
            streams = self._streams[pod] = {}
        st = streams.get(rank)
        if st is None:
            st = streams[rank] = StreamState(pod, rank)
        if model:
            st.model = model
        return st

    def _decode(self, payload: bytes) -> DecodedBatch | None:
        try:
            return self._decoder.decode(payload)
        except EventDecodeError as exc:
            self._dropped[exc.reason].inc()
            logger.debug("dropped KV-event payload (%d bytes): %s", len(payload), exc)
            return None

    def _ingest(self, pod: str, model: str | None, payload: bytes, seq: int | None) -> None:
        batch = self._decode(payload)
        if batch is None:
            return
        rank = batch.data_parallel_rank or 0
        with self._lock_for(pod):
            st = self._stream(pod, rank, model)
            if seq is None:
                self._apply(st, batch, "unsequenced")
                return
            self._observe_lag(batch.ts)
            live = st.live_seq
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
                    st = self._replay(st, 0, seq, "join")
            elif seq > last + 1:
                self.metrics.seq_gaps.inc()
                logger.info("pod %s rank %d: seq gap %d..%d", pod, rank, last + 1, seq - 1)
                st = self._replay(st, last + 1, seq, "gap")
            if (
                st.incomplete
                and self._replay_source is not None
                and time.monotonic() >= st.next_resync
                and self._has_orphan(st, batch)
            ):
                st = self._resync(st, seq)
            st = self._apply(st, batch, "live")
            st.last_seq = seq

    def _observe_lag(self, ts: float) -> None:
        lag = time.time() - ts
        if 0.0 <= lag < 86400.0 and math.isfinite(lag):
            self.metrics.event_lag.observe(lag)

    def _replay(self, st: StreamState, start: int, until: int, reason: str) -> StreamState:
        """Fetch and apply batches ``[start, until)`` of `st`'s publisher, in order."""
        m = self.metrics
        source = self._replay_source
        result: ReplayResult | None = None
        if source is not None:
            try:
                result = source.replay(st.pod, st.rank, start, reason)
            except Exception:
                logger.exception("replay for %s rank %d failed", st.pod, st.rank)
                result = ReplayResult([], "error")
        if result is None:
            # NOTE: no replay endpoint for this stream: nothing a later resync could fetch.
            if reason == "gap":
                m.lost_batches.inc(until - start)
                logger.warning(
                    "pod %s rank %d: %d batches lost (no replay endpoint)",
                    st.pod,
                    st.rank,
                    until - start,
                )
            return st
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
            batch = self._decode(payload)
            if batch is not None:
                if (batch.data_parallel_rank or 0) != st.rank:
                    self._dropped["rank_mismatch"].inc()
                else:
                    st = self._apply(st, batch, "replay")
                    applied += 1
            st.last_seq = seq
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
                and resolve(st.pod, parent) is None
            ):
                return True
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
            result = source.replay(st.pod, st.rank, 0, "resync")
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
            batch = self._decode(payload)
            if batch is not None and (batch.data_parallel_rank or 0) == st.rank:
                st = self._apply(st, batch, "replay")
                applied += 1
            st.last_seq = q
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
            new = StreamState(pod, rank, st.model)
            streams[rank] = new
        else:
            self.indexer.purge_pod(pod, reason=reason)
            self._streams.pop(pod, None)
            new = self._stream(pod, rank, st.model)
        if keep_seq:
            new.last_seq, new.live_seq, new.main_group = st.last_seq, st.live_seq, st.main_group
            new.first_seq, new.incomplete = st.first_seq, st.incomplete
            new.next_resync = st.next_resync
        return new

    def _purge_stream(self, st: StreamState, reason: str) -> None:
        w = _Writer(self, st.pod)
        for tier, held in st.held.items():
            hashes = [h for h, c in held.items() for _ in range(c)]
            if hashes:
                w.remove(tier, hashes)
        w.flush()
        if w.removed:
            self.metrics.blocks_removed.inc(w.removed)
        st.held.clear()
        self.metrics.purges.labels(reason).inc()

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
        # loop keeps them on locals and hands them to the writer once per run.
        gone: list[int] = []
        gone_tier = ""
        last_medium: str | None = ""  # NOTE: "" never equals a decoded medium's normal form
        tier: str | None = None
        held: dict[int, int] | None = None
        main = 0 if st.main_group is None else st.main_group
        for ev in batch.events:
            cls = ev.__class__
            if cls is BlockRemoved or (cls is not BlockStored and isinstance(ev, BlockRemoved)):
                rm: BlockRemoved = ev  # type: ignore[assignment]
                n_removed += 1
                g = rm.group_idx
                if g is not None and g != main:
                    self._skipped["kv_group"].inc(len(rm.block_hashes))
                    continue
                medium = rm.medium
                if medium != last_medium or last_medium == "":
                    last_medium = medium
                    tier = self._tier(medium)
                    held = None if tier is None else st.held.get(tier)
                    if gone and tier != gone_tier:
                        w.remove(gone_tier, gone)
                        gone = []
                    if tier is not None:
                        gone_tier = tier
                if held is None:
                    if tier is None:
                        self._dropped["bad_tier"].inc()
                        n_removed -= 1
                    else:
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
            last_medium = ""  # a store may create this stream's dict for the tier
            if gone:
                w.remove(gone_tier, gone)
                gone = []
            if isinstance(ev, BlockStored):
                n_stored += self._store(st, ev, w)
                main = 0 if st.main_group is None else st.main_group
            elif isinstance(ev, AllBlocksCleared):
                w.flush()
                self._events["AllBlocksCleared"].inc()
                st = self._reset(st, "all_blocks_cleared", keep_seq=True)
                main = 0 if st.main_group is None else st.main_group
        if gone:
            w.remove(gone_tier, gone)
        w.flush()
        if n_removed:
            self._events["BlockRemoved"].inc(n_removed)
        if n_stored:
            self._events["BlockStored"].inc(n_stored)
        if w.stored:
            self.metrics.blocks_stored.inc(w.stored)
        if w.removed:
            self.metrics.blocks_removed.inc(w.removed)
        unknown += w.unknown
        if unknown:
            self._skipped["unknown_block"].inc(unknown)
        return st

    def _group_ok(self, st: StreamState, group: int | None, kind: str | None) -> bool:
        if kind is not None:
            if kind not in FULL_ATTENTION_KINDS:
                return False
            if st.main_group is None:
                st.main_group = group
                return True
            return group == st.main_group
        # NOTE: no kind: vLLM < 0.24, or an offload placeholder; group 0 is vLLM's first
        # (attention) group unless a full-attention group was learned.
        if group is None:
            return True
        return group == (0 if st.main_group is None else st.main_group)

    def _store(self, st: StreamState, ev: BlockStored, w: _Writer) -> bool:
        """Apply one store; False when it was dropped (and counted as such)."""
        hashes = ev.block_hashes
        n = len(hashes)
        pod = st.pod
        if not self._group_ok(st, ev.group_idx, ev.kv_cache_spec_kind):
            self._skipped["kv_group"].inc(n)
            return True
        tier = self._tier(ev.medium)
        if tier is None:
            self._drop("bad_tier", pod, ev)
            return False
        toks = ev.token_ids
        if not toks:
            self._placeholder(st, hashes, tier, w)
            return True
        bs = ev.block_size
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
                if lora is None and not st.model:
                    self._drop("no_model", pod, ev)
                    return False
                salt = _salt_of(extra[0], lora) if extra else None
                pkey = keyer.root(st.model or "", lora, salt)
            else:
                found = w.resolve(parent)
                if found is None:
                    self.metrics.orphaned_blocks.inc(n)
                    self._drop("orphaned_parent", pod, ev)
                    return False
                pkey = found
            content = self._content(extra, lora, parent is None) if extra else None
            if content is None:
                keys = keyer.chain(pkey, toks, bsz)
            else:
                keys = self._chain_mixed(keyer, pkey, toks, bs, content)
            ehs = hashes if per == 1 else [h for h in hashes for _ in range(per)]
        held = st.held.get(tier)
        if held is None:
            held = st.held[tier] = {}
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
            for h in hashes:
                held[h] = held.get(h, 0) + 1
        w.add(tier, keys, ehs, hashes, held)
        return True

    def _placeholder(self, st: StreamState, hashes: list[int], tier: str, w: _Writer) -> None:
        """An offload placeholder (no tokens): add `tier` to blocks the pod already holds."""
        w.flush()
        pod = st.pod
        resolve = self.index.resolve
        known = [h for h in hashes if resolve(pod, h) is not None]
        w.unknown += len(hashes) - len(known)
        if not known:
            return
        try:
            self.index.add_tier(pod, known, tier)
        except (KVAwareError, OSError, ValueError) as exc:
            self.metrics.backend_errors.labels("ingest").inc()
            logger.warning("offload store for %s failed: %s", pod, exc)
            return
        held = st.held.get(tier)
        if held is None:
            held = st.held[tier] = {}
        for h in known:
            held[h] = held.get(h, 0) + 1
        w.stored += len(known)

    def _content(
        self, extra: list[Any], lora: str | None, at_root: bool
    ) -> list[bytes | None] | None:
        """Per block: the extra keys that change the block's content (multimodal inputs,
        prompt embeddings, ...), encoded; None when no block has any.

        The LoRA name and the cache_salt are left out: both already seed the root key.
        """
        if extra.count(None) == len(extra):
            return None
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
