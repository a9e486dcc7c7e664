"""`StreamState`: what ingestion keeps about one (pod, DP rank) event stream.

A plain record shared by the two halves of ingestion, and below both: `streams` reads and
writes its sequencing fields (seqs, replay and resync marks), `apply` its indexing fields
(KV-cache group, per-rank references, recent keys). Every bound is stated here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["RECENT", "FailedSeqs", "StreamState"]

#: Engine hash -> key pairs a stream remembers in each of its two ``recent`` generations.
RECENT: Final = 1024


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
        """Record `engine_hash` -> `key` in `recent` (two generations of `RECENT` pairs)."""
        recent = self.recent
        recent[engine_hash] = key
        if len(recent) >= RECENT:
            self.recent_old = recent
            self.recent = {}


class FailedSeqs:
    """Sequence numbers of frames that failed to decode, per pod (bounded: `max_seqs` per pod,
    `max_pods` pods, the oldest forgotten first), so that the gap they leave is not replayed
    (a replay would only bring the same bytes back). Thread-safe.
    """

    def __init__(self, max_seqs: int, max_pods: int) -> None:
        self.max_seqs = max_seqs
        self.max_pods = max_pods
        self._seqs: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def add(self, pod: str, seq: int) -> None:
        """Remember that `pod`'s frame `seq` failed to decode."""
        failed = self._seqs
        with self._lock:
            seqs = failed.pop(pod, None)
            if seqs is None:
                seqs = []
                if len(failed) >= self.max_pods:
                    del failed[next(iter(failed))]
            seqs.append(seq)
            if len(seqs) > self.max_seqs:
                del seqs[0]
            failed[pod] = seqs

    def covers(self, pod: str, start: int, end: int) -> bool:
        """Whether every seq in ``[start, end)`` is a frame of `pod` that failed to decode."""
        with self._lock:
            seqs = self._seqs.get(pod)
            if not seqs or end - start > len(seqs):
                return False
            return set(range(start, end)) <= set(seqs)

    def forget(self, pod: str) -> None:
        """Forget `pod`'s failed frames."""
        with self._lock:
            self._seqs.pop(pod, None)
