"""`StreamReplays`: fetching a stream's replays and applying their frames in sequence.

The stream tracker (`streams`) decides when a stream replays (a join, a gap, a resync) and what
a replay means for the stream (a restart, a rebuild, a merge); this module does the mechanics:
it asks the `ReplaySource` without holding the stream's lock, decodes and applies the frames in
order through the `BatchApplier`, and counts what is missing. Nothing here raises for bad data.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import xxhash

from kvaware_scorer.events.sink import ReplayResult

if TYPE_CHECKING:
    import threading

    from kvaware_scorer.events.apply import BatchApplier
    from kvaware_scorer.events.decode import DecodedBatch
    from kvaware_scorer.events.sink import ReplaySource
    from kvaware_scorer.events.state import StreamState
    from kvaware_scorer.metrics import Metrics

__all__ = ["StreamReplays", "payload_digest"]

logger = logging.getLogger(__name__)


def payload_digest(payload: bytes) -> int:
    """A payload's identity (whether a replayed batch is the one applied under its seq)."""
    digest: int = xxhash.xxh3_64_intdigest(payload)
    return digest


class StreamReplays:
    """Fetches replays of a stream's publisher and applies their frames to the stream.

    Args:
        applier: Applies the replayed batches.
        metrics: Where lost batches, replays and replayed batches are counted.
        decode: Decodes a payload with a stream's decoder (None: the default one); None for a
            frame that was dropped (and counted).
        lock_for: The lock a pod's frames apply under (released while a replay is fetched).
    """

    def __init__(
        self,
        applier: BatchApplier,
        metrics: Metrics,
        decode: Callable[[bytes, Any], DecodedBatch | None],
        lock_for: Callable[[str], threading.RLock],
    ) -> None:
        self._applier = applier
        self._metrics = metrics
        self._decode = decode
        self._lock_for = lock_for

    def fetch(
        self, source: ReplaySource, st: StreamState, start: int, reason: str
    ) -> ReplayResult | None:
        """`st`'s publisher's buffered batches from `start` on, asked of `source` without
        holding `st`'s lock (held once by the caller); None when `source` has none for it, an
        empty ``error`` result when asking failed (logged).

        NOTE: locks are striped: other pods share this one, and a replay may take up to its
        deadline. The subscriber runs a pod's frames one at a time, so nothing else applies to
        this stream meanwhile (the sweep leaves it alone: it was just seen).
        """
        lock = self._lock_for(st.pod)
        lock.release()
        try:
            return source.replay(st.pod, st.rank, start, reason)
        except Exception:
            logger.exception("%s replay for %s rank %d failed", reason, st.pod, st.rank)
            return ReplayResult([], "error")
        finally:
            lock.acquire()

    def apply(
        self, st: StreamState, result: ReplayResult, start: int, until: int, reason: str
    ) -> StreamState:
        """Apply the frames of `result` within ``[start, until)``, counting what is missing."""
        m = self._metrics
        applier = self._applier
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
                    applier.dropped["rank_mismatch"].inc()
                else:
                    st = applier.apply(st, batch, "replay")
                    applied += 1
            st.last_seq = seq
            st.last_digest = payload_digest(payload)
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

    def rebuild(self, st: StreamState, frames: list[tuple[int, bytes]]) -> StreamState:
        """Apply every one of `frames` (from `covering`) to a reset `st`: a resync."""
        applier = self._applier
        applied = 0
        for q, payload in frames:
            batch = self._decode(payload, st.decoder)
            if batch is not None and (batch.data_parallel_rank or 0) == st.rank:
                st = applier.apply(st, batch, "replay")
                applied += 1
            st.last_seq = q
            st.last_digest = payload_digest(payload)
        # NOTE: as complete as the buffer allows; blocks stored before it stay unknown, and
        # retrying would only rebuild the same state.
        st.incomplete = False
        self._metrics.replays.labels("ok").inc()
        self._metrics.replayed_batches.labels("resync").inc(applied)
        return st

    @staticmethod
    def covering(
        st: StreamState, result: ReplayResult, until: int
    ) -> list[tuple[int, bytes]] | None:
        """The frames of `result` before `until` when they are every batch since `st` started,
        without a hole; else None."""
        frames = [(q, p) for q, p in result.frames if q < until]
        if not frames or result.status != "ok" or st.first_seq is None:
            return None
        contiguous = all(b[0] == a[0] + 1 for a, b in itertools.pairwise(frames))
        if frames[0][0] <= st.first_seq and contiguous and frames[-1][0] == until - 1:
            return frames
        return None
