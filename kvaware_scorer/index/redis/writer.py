"""The Redis backend's writer: writes applied in order, whatever state Redis is in.

`RedisWriter` takes the index's writes (direct ones and those of each `WriteBatch`) and

* applies them in one round trip (planned by `Planner`) when Redis takes writes;
* otherwise keeps them in the **outage buffer** (at most ``max_buffered_writes``, oldest
  dropped and their pods marked diverged) and replays them in order once Redis answers and
  accepts writes again (an out-of-memory refusal is retried every ``retry_interval``);
* runs **write behind** for ``batch(on_done=...)``: one thread applies queued batches in
  order, at most `WRITE_BEHIND` waiting (the caller waits for room beyond that).

While writes are buffered, the keys they store stay resolvable (`pending`).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis

from kvaware_scorer.errors import BackendUnavailableError
from kvaware_scorer.index.base import TierTable, iter_groups, normalize_medium
from kvaware_scorer.index.redis.client import (
    UNAVAILABLE,
    UNAVAILABLE_OR_REPLY,
    ScriptClient,
    Shard,
    oom,
    transient,
)
from kvaware_scorer.index.redis.health import Health
from kvaware_scorer.index.redis.plan import Item, Planner, Write, pack
from kvaware_scorer.keys import BlockKey, EngineHash

__all__ = ["PURGE_BUDGET", "WRITE_BEHIND", "RedisWriter", "WriteBatch"]

logger = logging.getLogger(__name__.rpartition(".")[0])

#: Engine-map entries a purge step handles per script call (keeps each call short).
PURGE_BUDGET = 2000
#: Seconds between two log lines about writes dropped while Redis is unreachable.
_DROP_LOG_INTERVAL = 10.0
#: Buffered writes replayed per pipeline.
_REPLAY_BATCH = 256
#: Write batches queued for the writer thread before `batch(on_done=...)` waits for room.
WRITE_BEHIND = 4

OnDone = Callable[[list[int | None] | Exception], None]


class WriteBatch:
    """Write operations collected to be sent in one pipeline (one round trip).

    Made by `RedisIndex.batch`; each method mirrors the `KVBlockIndex` method of the same name
    and appends one result to ``results`` (in call order) when the batch is sent.
    """

    def __init__(self, writer: RedisWriter) -> None:
        self._writer = writer
        self._ops: list[Write] = []
        self._empty: list[tuple[int, int | None]] = []  # adds of no keys: (position, result)
        self.results: list[int | None] = []

    def _finish(self, results: list[int | None] | None = None) -> None:
        if results is None:
            results = self._writer.submit(self._ops)
        else:
            results = list(results)
        for k, (pos, value) in enumerate(self._empty):
            results.insert(pos + k, value)
        self.results = results

    def _queue(self, op: Write | None, empty: int | None) -> None:
        """Queue `op`, or the result `empty` of an add of no keys at its place."""
        if op is not None:
            self._ops.append(op)
        else:
            self._empty.append((len(self._ops), empty))

    def add(
        self,
        pod: str,
        keys: Sequence[BlockKey],
        engine_hashes: Sequence[EngineHash] | None = None,
        tier: str | None = None,
    ) -> None:
        """Queue `RedisIndex.add`."""
        self._queue(self._writer.add_op("add", pod, keys, engine_hashes, tier), None)

    def add_new(
        self,
        pod: str,
        keys: Sequence[BlockKey],
        engine_hashes: Sequence[EngineHash] | None = None,
        tier: str | None = None,
    ) -> None:
        """Queue `RedisIndex.add_new`."""
        self._queue(self._writer.add_op("add_new", pod, keys, engine_hashes, tier), 0)

    def add_tier(self, pod: str, engine_hashes: Sequence[EngineHash], tier: str | None) -> None:
        """Queue `RedisIndex.add_tier`."""
        self._ops.append(self._writer.tier_op("add_tier", pod, engine_hashes, tier))

    def remove(
        self, pod: str, engine_hashes: Sequence[EngineHash], tier: str | None = None
    ) -> None:
        """Queue `RedisIndex.remove`."""
        self._ops.append(self._writer.tier_op("remove", pod, engine_hashes, tier))

    def purge(self, pod: str) -> None:
        """Queue `RedisIndex.purge`."""
        self._ops.append(self._writer.purge_op(pod))


class RedisWriter:
    """Applies, buffers, replays and writes behind one index's writes (see the module).

    Args:
        wire: The script client.
        health: Shared availability state and counters (its lock also guards the buffer).
        tiers: For the default tier of writes that name none.
        on_write: Called before each submission (the index starts its background thread).
    """

    def __init__(
        self,
        wire: ScriptClient,
        health: Health,
        tiers: TierTable,
        on_write: Callable[[], None] | None = None,
    ) -> None:
        self._wire = wire
        self._health = health
        self._lock = health.lock
        self.config = wire.config
        self.tiers = tiers
        self._on_write = on_write
        self.planner = Planner(wire, os.urandom(8).hex().encode("ascii"))
        self._flush_lock = threading.Lock()
        self.buffer: deque[Write] = deque()
        self._seq = itertools.count()
        self._unlogged_drops = 0
        self._next_drop_log = 0.0
        self._tokens = itertools.count()
        # (pod, engine hash) -> (key, seq of the buffered write that stores it)
        self.pending: dict[tuple[str, EngineHash], tuple[BlockKey, int]] = {}
        # write-behind: batches queued by batch(on_done=...), applied in order by one thread
        self._wcond = threading.Condition()
        self._wqueue: deque[tuple[WriteBatch, OnDone]] = deque()
        self._winflight = 0
        self._wthread: threading.Thread | None = None
        self._wstop = False

    def writable(self) -> bool:
        """Redis answers and takes writes (as far as this writer knows)."""
        return self._health.available() and self._health.writable()

    # -- making writes ------------------------------------------------------------------------

    def add_op(
        self,
        kind: str,
        pod: str,
        keys: Sequence[BlockKey],
        engine_hashes: Sequence[EngineHash] | None,
        tier: str | None,
    ) -> Write | None:
        if not keys:
            return None
        if engine_hashes is not None and len(engine_hashes) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(engine_hashes)} engine hashes")
        kb = pack(keys)  # bad keys fail here, in the caller, not at replay
        self._health.track(pod)
        eb = b"" if engine_hashes is None else pack(engine_hashes)
        tname = normalize_medium(tier, self.tiers.default_tier)
        ehs = None if engine_hashes is None else tuple(engine_hashes)
        return Write(kind, pod, tuple(keys), ehs, tname, packed=(kb, eb), token=self.token())

    def tier_op(
        self, kind: str, pod: str, engine_hashes: Sequence[EngineHash], tier: str | None
    ) -> Write:
        eb = pack(engine_hashes)
        tname = normalize_medium(tier, self.tiers.default_tier)
        self._health.track(pod)
        return Write(
            kind, pod, (), tuple(engine_hashes), tname, packed=(b"", eb), token=self.token()
        )

    def purge_op(self, pod: str) -> Write:
        return Write("purge", pod, token=self.token())

    def token(self) -> bytes:
        """A new write id: the script applies a write at most once per (writer, token).

        NOTE: a write whose reply is lost (a timeout, a dropped connection) may or may not have
        been applied; it is buffered and sent again, and the server skips it if it was applied,
        so that no reference is ever counted twice (a stale entry nothing would remove).
        """
        return b"%d" % next(self._tokens)

    # -- applying -----------------------------------------------------------------------------

    def apply(self, ops: Sequence[Write], strict: bool = True) -> list[int | None]:
        """Send writes now (one round trip); raises the unavailability errors.

        `strict`: a write the script refuses raises `ValueError` (else it is counted and
        logged, and its result is the fallback).
        """
        wire = self._wire
        wire.connect()
        plans, calls, where = self.planner.calls(ops)
        if len(calls) == 1:
            try:
                raws: list[Any] = [wire.eval(calls[0][0], *calls[0][1])]
            except redis.exceptions.ResponseError as exc:
                if isinstance(exc, UNAVAILABLE) or transient(exc) or oom(exc):
                    raise
                raws = [exc]
        else:
            raws = wire.pipeline(calls)
            for r in raws:
                if isinstance(r, UNAVAILABLE) or transient(r) or oom(r):
                    raise r
        self._health.mark_up(wire.client)
        self._health.accepted()
        out: list[int | None] = []
        for w, plan, spots in zip(ops, plans, where, strict=True):
            got = []
            for call, pos in spots:
                raw = raws[call]
                if pos >= 0 and not isinstance(raw, BaseException):
                    raw = raw[pos]
                got.append(raw)
            try:
                out.append(self._combine(w, plan, got))
            except ValueError as exc:
                if strict:
                    raise
                self._health.count("failed_writes")
                logger.warning("Redis index refused a %s of %s: %s", w.kind, w.pod, exc)
                out.append(None)  # not known, as for a buffered write
        return out

    def _combine(self, w: Write, items: list[Item], raws: list[Any]) -> int | None:
        """The caller's result of one write from its items' answers."""
        for r in raws:
            if isinstance(r, redis.exceptions.ResponseError):
                self._write_failed(w, r)
            elif isinstance(r, bytes) and r.startswith(b"KVAWARE"):
                self._write_failed(w, redis.exceptions.ResponseError(r.decode("utf-8", "replace")))
        if w.kind == "add":
            return None
        if w.kind == "add_new":
            skipped = [
                bytes(r)
                for r, (_, batched, _a) in zip(raws, items, strict=True)
                if batched and isinstance(r, bytes) and not r.startswith(b"KVAWARE")
            ]
            if len(skipped) == 1:
                return len(skipped[0]) // 8
            return len({b[i : i + 8] for b in skipped for i in range(0, len(b), 8)})
        if w.kind == "purge":
            dropped = 0
            for (shard, _b, _args), raw in zip(items, raws, strict=True):
                if isinstance(raw, BaseException):
                    continue
                n, pid = (int(x) for x in raw)
                dropped += n
                if pid:
                    self.finish_purge(shard, pid)
            return dropped
        known = 0
        answers = [r for r in raws if not isinstance(r, BaseException)]
        bits = [bytes(r) for r in answers if not bytes(r).startswith(b"KVAWARE")]
        if len(bits) == 1:
            known = bits[0].count(49)
        elif bits:  # a cluster: known where any shard knows it
            known = sum(1 for col in zip(*bits, strict=True) if 49 in col)
        if w.kind == "add_tier":
            return len(w.ehs or ()) - known
        return known

    def _write_failed(self, w: Write, exc: BaseException) -> None:
        msg = str(exc)
        if "KVAWARE" in msg:
            raise ValueError(msg.split("KVAWARE", 1)[1].strip()) from None
        with self._lock:
            self._health.counters["failed_writes"] += 1
            self._health.mark_diverged((w.pod,))
        logger.warning("Redis index dropped a %s of %s: %s", w.kind, w.pod, msg)

    def finish_purge(self, shard: Shard, pid: int) -> None:
        """Drop a purged pod's records block by block (short script calls)."""
        try:
            while self._wire.eval(shard, b"purge_step", pid, PURGE_BUDGET):
                pass
        except UNAVAILABLE as exc:
            # NOTE: the pod is already invisible; the next maintenance round finishes it.
            self._health.mark_down(exc)

    def submit(self, ops: list[Write], strict: bool = True) -> list[int | None]:
        """Apply writes now if Redis answers, else buffer them (in order)."""
        if not ops:
            return []
        if self._on_write is not None:
            self._on_write()
        if self.buffer and self.writable():
            self.drain()
        if self.buffer or not self.writable():
            self._enqueue(ops)
            return [None for _ in ops]
        try:
            return self.apply(ops, strict)
        except UNAVAILABLE_OR_REPLY as exc:
            if oom(exc):
                self._health.refuse(exc)
            elif not isinstance(exc, UNAVAILABLE) and not transient(exc):
                raise
            else:
                self._health.mark_down(exc)
            self._enqueue(ops)
            return [None for _ in ops]

    # -- write-behind -------------------------------------------------------------------------

    def queue_batch(self, wb: WriteBatch, on_done: OnDone) -> None:
        """Hand a batch to the writer thread (waits while `WRITE_BEHIND` batches queue)."""
        with self._wcond:
            while len(self._wqueue) >= WRITE_BEHIND and not self._wstop:
                self._wcond.wait()
            if self._wstop:
                raise BackendUnavailableError("Redis index is closed")
            self._wqueue.append((wb, on_done))
            if self._wthread is None:
                t = threading.Thread(target=self._write_loop, name="kvaware-redis-writer")
                t.daemon = True
                self._wthread = t
                t.start()
            self._wcond.notify_all()

    def _write_loop(self) -> None:
        """The writer thread: applies queued batches in order; batches that queued up while
        one was in flight travel together (one round trip)."""
        while True:
            with self._wcond:
                while not self._wqueue and not self._wstop:
                    self._wcond.wait()
                if not self._wqueue:
                    return
                jobs = list(self._wqueue)
                self._wqueue.clear()
                self._winflight = len(jobs)
                self._wcond.notify_all()
            try:
                self._write_jobs(jobs)
            finally:
                with self._wcond:
                    self._winflight = 0
                    self._wcond.notify_all()

    def _write_jobs(self, jobs: list[tuple[WriteBatch, OnDone]]) -> None:
        ops = [op for wb, _ in jobs for op in wb._ops]
        outcome: list[int | None] | Exception
        try:
            outcome = self.submit(ops, strict=False)
        except Exception as exc:  # a bug or an unexpected reply: the batches' callers learn it
            logger.exception("Redis index writer failed on %d writes", len(ops))
            outcome = exc
        i = 0
        for wb, on_done in jobs:
            n = len(wb._ops)
            try:
                if isinstance(outcome, Exception):
                    on_done(outcome)
                else:
                    wb._finish(outcome[i : i + n])
                    on_done(wb.results)
            except Exception:
                logger.exception("Redis index write callback failed")
            i += n

    def quiesce(self) -> None:
        """Wait until the batches queued for the writer thread are applied (callers that read
        or write after them see their effects), unless called by that thread."""
        if self._wthread is None or threading.current_thread() is self._wthread:
            return
        with self._wcond:
            while self._wqueue or self._winflight:
                self._wcond.wait()

    def stop(self) -> None:
        """Apply the queued batches and stop the writer thread."""
        with self._wcond:
            self._wstop = True
            self._wcond.notify_all()
        w = self._wthread
        if w is not None and w is not threading.current_thread():
            w.join(timeout=30)

    # -- outage buffer ------------------------------------------------------------------------

    def _enqueue(self, ops: list[Write]) -> None:
        limit = self.config.max_buffered_writes
        dropped = 0
        health = self._health
        with self._lock:
            if limit == 0:
                dropped = len(ops)
                health.mark_diverged(w.pod for w in ops)
            else:
                for w in ops:
                    if len(self.buffer) >= limit:
                        old = self.buffer.popleft()
                        self._unbuffer(old)
                        health.mark_diverged((old.pod,))
                        dropped += 1
                    w.seq = next(self._seq)
                    self.buffer.append(w)
                    if w.kind in ("add", "add_new"):
                        for eh, ks in iter_groups(w.keys, w.ehs):
                            self.pending[(w.pod, eh)] = (ks[-1], w.seq)
                health.counters["buffered_writes"] += len(ops)
            health.counters["dropped_writes"] += dropped
            self._unlogged_drops += dropped
            now = time.monotonic()
            report = self._unlogged_drops if now >= self._next_drop_log else 0
            if report:
                # NOTE: at most one line per interval: a long outage drops on every write
                self._unlogged_drops = 0
                self._next_drop_log = now + _DROP_LOG_INTERVAL
        if report:
            logger.warning(
                "Redis index unavailable: dropped %d writes (buffer limit %d)", report, limit
            )

    def _unbuffer(self, w: Write) -> None:
        """Forget what `w` (leaving the buffer) told `resolve`, unless a later write did too.

        NOTE: keeps the map as bounded as the buffer through an outage of any length.
        """
        if w.kind not in ("add", "add_new"):
            return
        pending = self.pending
        for eh, _ks in iter_groups(w.keys, w.ehs):
            hit = pending.get((w.pod, eh))
            if hit is not None and hit[1] == w.seq:
                del pending[(w.pod, eh)]

    def buffered_key(self, pod: str, engine_hash: EngineHash) -> BlockKey | None:
        """The key a buffered write stores for (`pod`, `engine_hash`), if any."""
        with self._lock:
            hit = self.pending.get((pod, engine_hash))
        return None if hit is None else hit[0]

    def drain(self) -> bool:
        """Replay buffered writes in order; returns whether the buffer is now empty."""
        with self._flush_lock:
            while True:
                with self._lock:
                    batch = list(itertools.islice(self.buffer, _REPLAY_BATCH))
                    if not batch:
                        self.pending.clear()
                        return True
                if not self.writable():
                    return False
                try:
                    self._apply_replayed(batch)
                except UNAVAILABLE_OR_REPLY as exc:
                    if oom(exc):
                        self._health.refuse(exc)
                        return False
                    if not isinstance(exc, UNAVAILABLE) and not transient(exc):
                        raise
                    self._health.mark_down(exc)
                    return False
                with self._lock:
                    last = batch[-1].seq
                    while self.buffer and self.buffer[0].seq <= last:
                        self._unbuffer(self.buffer.popleft())
                    self._health.counters["replayed_writes"] += len(batch)

    def _apply_replayed(self, batch: list[Write]) -> None:
        try:
            self.apply(batch)
        except ValueError as exc:
            # NOTE: a replayed write the server refuses (e.g. a 17th tier) must not block
            # the writes queued behind it.
            logger.warning("Redis index dropped a replayed write: %s", exc)
