"""`StreamTracker`: the order of each (pod, DP rank) event stream, and its recovery.

Every DP rank of a vLLM server has its own publisher, sequence counter and block pool, so
state is kept per *stream* (`StreamState`). The tracker decodes a frame, finds its stream and
places the frame in the stream's sequence before the `BatchApplier` applies it:

* ``last_seq`` / ``live_seq``: the last sequence number applied (from any source) and the last
  one received live. A live seq at or below ``live_seq`` (or far above it) means the publisher
  restarted: the stream is reset. One above ``last_seq + 1`` is a gap, recovered from the pod's
  replay buffer when a `ReplaySource` is registered (else counted as lost); frames that
  arrived but failed to decode are remembered, so their gap is not replayed.
* A stream's first frame at seq > 0 *joins*: the publisher's buffer ``[0, seq)`` is replayed
  first (merged, or rebuilt from seq 0, when a shared index holds the pod already).
* A stream whose history is incomplete (a failed replay) *resyncs* from the whole buffer when
  a store would be orphaned, at most every `_RESYNC_INTERVAL` seconds.
* *Resets* (restart, AllBlocksCleared, resync) purge the pod, or only the rank's own
  references when other ranks of the pod stream too (see `apply`); a second rank starting to
  stream *splits* the pod's references per rank.
* *Sweeps* release what idle streams keep and forget pods the index no longer lists; a remote
  index that lost writes names the pods to *heal* (purge and rebuild from their events).

A pod's frames apply under its lock (striped over `_LOCK_STRIPES` locks), in order; a replay is
fetched without holding it. This module decides when a stream replays and what the replay means
for it; `recovery.StreamReplays` fetches replays and applies their frames. Nothing here raises
for bad data.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from kvaware_scorer.errors import EventDecodeError
from kvaware_scorer.events.apply import purge_index
from kvaware_scorer.events.decode import DECODE_ERRORS
from kvaware_scorer.events.recovery import StreamReplays, payload_digest
from kvaware_scorer.events.sink import ReplayResult, ReplaySource
from kvaware_scorer.events.state import FailedSeqs, StreamState
from kvaware_scorer.events.writer import BACKEND_ERRORS

if TYPE_CHECKING:
    from kvaware_scorer.events.apply import BatchApplier
    from kvaware_scorer.events.decode import DecodedBatch
    from kvaware_scorer.events.sink import BatchDecoder
    from kvaware_scorer.index.base import KVBlockIndex
    from kvaware_scorer.metrics import Metrics

__all__ = ["StreamTracker"]

logger = logging.getLogger(__name__)

#: Seconds between two resync attempts of one stream.
_RESYNC_INTERVAL: Final = 30.0

#: Sequence numbers of undecodable frames remembered per pod, and pods remembered.
_FAILED_SEQS: Final = 64
_FAILED_PODS: Final = 4096

#: Seconds between two checks for pods a remote index lost writes of.
_HEAL_INTERVAL: Final = 1.0

#: Locks pods are spread over (a pod's frames apply under its lock, in order).
_LOCK_STRIPES: Final = 64


class StreamTracker:
    """Keeps every stream's sequence and hands its batches to `applier` in order.

    Args:
        index: The index (listing pods, splitting references, purging, healing).
        applier: Applies decoded batches; its ``on_clear`` is set here to reset the stream.
        metrics: Where drops, gaps, replays and purges are counted.
        decoder: The decoder of frames whose stream names none (vLLM's).
        on_purge: Told ``(pod, reason)`` after each purge of a pod (restart, clear, lost
            writes, rank split, or `purge_pod`).

    Attributes:
        idle_after: Seconds without a frame after which a stream counts as idle.
        sweep_interval: Seconds between two sweeps.
        max_payload_bytes: Largest payload decoded (larger ones are dropped as
            ``frame_too_large`` before decoding).
        max_seq_jump: A live seq more than this above the stream's last one is a publisher
            restart (purge, then join), not a gap of that many lost batches (``seq_jump``).
    """

    idle_after: float = 300.0
    sweep_interval: float = 60.0
    max_payload_bytes: int = 8 << 20
    max_seq_jump: int = 1 << 24

    def __init__(
        self,
        index: KVBlockIndex,
        applier: BatchApplier,
        metrics: Metrics,
        decoder: BatchDecoder,
        on_purge: Callable[[str, str], object] | None = None,
    ) -> None:
        self.index = index
        self.metrics = metrics
        self._applier = applier
        applier.on_clear = self._cleared
        self._decoder = decoder
        self._on_purge = on_purge
        self._dropped = applier.dropped
        self._replays = StreamReplays(applier, metrics, self._decode, self.lock_for)
        self._streams: dict[str, dict[int, StreamState]] = {}
        self._locks = [threading.RLock() for _ in range(_LOCK_STRIPES)]
        self._last_sweep = time.monotonic()
        self.replay_source: ReplaySource | None = None
        self._failed = FailedSeqs(_FAILED_SEQS, _FAILED_PODS)
        # NOTE: a remote index may lose writes (a full buffer through a long outage, a server
        # that restarted empty); it then names the pods to rebuild.
        self._take_diverged = getattr(index, "take_diverged", None)
        self._next_heal = 0.0

    # -- frames ------------------------------------------------------------------------------

    def ingest(
        self, pod: str, model: str | None, payload: bytes, seq: int | None, decoder: Any
    ) -> None:
        """Decode `payload` and apply it to its stream of `pod`, in sequence (see the module
        doc); `seq` None applies it as it is."""
        now = time.monotonic()
        if now - self._last_sweep >= self.sweep_interval:
            self.sweep()
        if self._take_diverged is not None and now >= self._next_heal:
            self._next_heal = now + _HEAL_INTERVAL
            self._heal()
        batch = self._decode(payload, decoder)
        if batch is None:
            if seq is not None:
                self._failed.add(pod, seq)
            return
        rank = batch.data_parallel_rank or 0
        with self.lock_for(pod):
            st = self._stream(pod, rank, model)
            st.decoder = decoder
            if seq is None:
                self._applier.apply(st, batch, "unsequenced")
                return
            self._observe_lag(batch.ts)
            st = self._sequence(st, seq, batch)
            st = self._applier.apply(st, batch, "live")
            st.last_seq = seq
            st.last_digest = payload_digest(payload)

    def _sequence(self, st: StreamState, seq: int, batch: DecodedBatch) -> StreamState:
        """Place live frame `seq` in `st`'s sequence before it applies: a restart resets the
        stream, a first frame joins, a gap is replayed, an incomplete history resyncs."""
        pod, rank = st.pod, st.rank
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
        elif seq > last + 1 and self._failed.covers(pod, last + 1, seq):
            # NOTE: the missing frames arrived but could not be decoded (counted then):
            # a replay would only bring the same bytes back.
            pass
        elif seq > last + 1:
            self.metrics.seq_gaps.inc()
            logger.info("pod %s rank %d: seq gap %d..%d", pod, rank, last + 1, seq - 1)
            st = self._recover_gap(st, last, seq)
        if (
            st.incomplete
            and self.replay_source is not None
            and time.monotonic() >= st.next_resync
            and self._applier.has_orphan(st, batch)
        ):
            st = self._resync(st, seq)
        return st

    # -- pods --------------------------------------------------------------------------------

    def purge_pod(self, pod: str, reason: str) -> int:
        """Forget `pod`'s streams and drop its index entries (counted by `reason`); returns
        the entries dropped. The pod's next frame starts a new stream (and a join replay)."""
        self.forget_pod(pod)
        dropped = purge_index(self.index, self.metrics, pod, reason)
        if self._on_purge is not None:
            self._on_purge(pod, reason)
        return dropped

    def forget_pod(self, pod: str) -> None:
        """Drop every stream of `pod` (and nothing else: see `purge_pod`).

        The next frame from the pod starts a new stream (and a join replay, where possible).
        """
        with self.lock_for(pod):
            self._streams.pop(pod, None)
        self._failed.forget(pod)

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
            lock = self.lock_for(pod)
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
        except BACKEND_ERRORS as exc:
            logger.debug("sweep: the index cannot list its pods: %s", exc)
            return 0
        forgotten = 0
        for pod in idle:
            if pod in known:
                continue
            with self.lock_for(pod):
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
        except BACKEND_ERRORS as exc:
            logger.debug("the index cannot name diverged pods: %s", exc)
            return
        for pod in pods:
            logger.warning("pod %s: index writes were lost; rebuilding it from its events", pod)
            self.purge_pod(pod, reason="index_diverged")

    def streams(self, pod: str) -> dict[int, StreamState]:
        """The live stream states of `pod` by DP rank (for inspection; do not mutate)."""
        with self.lock_for(pod):
            return dict(self._streams.get(pod, {}))

    # -- streams -----------------------------------------------------------------------------

    def lock_for(self, pod: str) -> threading.RLock:
        """The lock `pod`'s frames apply under (shared with other pods)."""
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
            except BACKEND_ERRORS as exc:
                self.metrics.backend_errors.labels("ingest").inc()
                logger.warning(
                    "pod %s: a second DP rank streams but the index cannot list the first"
                    " rank's references (%s): purging the pod",
                    pod,
                    exc,
                )
                self.purge_pod(pod, reason="rank_split")
                streams.clear()
                return False
            st.held = {t: {int(h): c for h, c in r.items()} for t, r in refs.items()}
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

    def _observe_lag(self, ts: float) -> None:
        lag = time.time() - ts
        if 0.0 <= lag < 86400.0 and math.isfinite(lag):
            self.metrics.event_lag.observe(lag)

    # -- replays -----------------------------------------------------------------------------

    def _fetch(self, st: StreamState, start: int, reason: str) -> ReplayResult | None:
        """`st`'s publisher's buffered batches from `start` on; None without a replay source."""
        source = self.replay_source
        if source is None:
            return None
        return self._replays.fetch(source, st, start, reason)

    def _recover_gap(self, st: StreamState, last: int, seq: int) -> StreamState:
        """Fill the gap ``(last, seq)``; first check that the publisher is the one whose batch
        was applied under `last`.

        NOTE: a restarted vLLM counts from 0 again. When the router missed more of the new
        publisher's batches than the old one had sent, the new seq is above the old and looks
        like a gap. The replay buffer tells the two apart: asked from `last`, a restarted
        publisher answers a different batch under that seq (or one of its own), so the pod
        is purged and replayed from 0 instead of keeping the old process's blocks.
        """
        if st.last_digest is None or self.replay_source is None:
            return self._replay(st, last + 1, seq, "gap")
        result = self._fetch(st, last, "gap")
        if result is None:
            return self._replay(st, last + 1, seq, "gap")
        frames = result.frames
        if frames and frames[0][0] == last and payload_digest(frames[0][1]) != st.last_digest:
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
        return self._replays.apply(st, result, last + 1, seq, "gap")

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
        st = self._replays.apply(st, result, 0, seq, "join")
        st.merging = False
        return st

    def _index_holds(self, pod: str) -> bool:
        """Whether the index has entries for `pod` (True when it cannot tell)."""
        try:
            return pod in self.index.pods()
        except BACKEND_ERRORS:
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
        return self._replays.apply(st, result, start, until, reason)

    def _resync(self, st: StreamState, until: int) -> StreamState:
        """Rebuild `st` from the publisher's whole buffer when its history is incomplete.

        Only when the buffer still holds every batch applied since the stream started (else
        the rebuild would forget more than it recovers); the rebuilt state then also holds
        the blocks stored before this subscriber joined, with their parents.
        """
        source = self.replay_source
        assert source is not None
        st.next_resync = time.monotonic() + _RESYNC_INTERVAL
        result = self._replays.fetch(source, st, 0, "resync")
        if result is None:
            return st
        frames = StreamReplays.covering(st, result, until)
        if frames is None:
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
            frames[0][0],
            until - 1,
        )
        saved = (st.live_seq, st.next_resync)
        st = self._reset(st, "resync", keep_seq=False)
        st.live_seq, st.next_resync = saved
        st.first_seq = frames[0][0]
        return self._replays.rebuild(st, frames)

    # -- resets ------------------------------------------------------------------------------

    def _cleared(self, st: StreamState) -> StreamState:
        """An AllBlocksCleared in `st`'s batch: the pod's pool was emptied; the stream goes on
        from the same seq."""
        return self._reset(st, "all_blocks_cleared", keep_seq=True)

    def _reset(self, st: StreamState, reason: str, keep_seq: bool) -> StreamState:
        """Forget what `st`'s pool held: purge the pod, or only this rank's references when
        other ranks of the pod are streaming too."""
        pod, rank = st.pod, st.rank
        streams = self._streams.get(pod, {})
        others = any(r != rank for r in streams)
        if others:
            self._applier.purge_stream(st, reason)
            new = StreamState(pod, rank, st.model, held={})
            streams[rank] = new
        else:
            self.purge_pod(pod, reason=reason)
            self._streams.pop(pod, None)
            new = self._stream(pod, rank, st.model)
        new.decoder = st.decoder
        if keep_seq:
            new.last_seq, new.live_seq, new.main_group = st.last_seq, st.live_seq, st.main_group
            new.first_seq, new.incomplete = st.first_seq, st.incomplete
            new.next_resync, new.last_digest = st.next_resync, st.last_digest
        return new
