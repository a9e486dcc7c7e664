"""`RedisIndex`: the `KVBlockIndex` kept in Redis / Valkey, its reads and its maintenance.

It wires the backend's parts -- the script client (`ScriptClient`), the server's health
(`Health`) and the writer (`RedisWriter`) -- and does the index's own work: lookups (one script
call per shard, one round trip, merged client-side on a cluster), `resolve`, `references`,
`pods`, `stats`, and the background maintenance round (expiry, quiet-pod purges, replay of
buffered writes). Writes are handed to the writer.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

import msgspec
import redis

from kvaware_scorer.config import DEFAULT_TIER_WEIGHTS, RedisIndexConfig
from kvaware_scorer.errors import BackendUnavailableError, ConfigError
from kvaware_scorer.index.base import IndexStats, PodMatch, TierTable
from kvaware_scorer.index.redis.client import UNAVAILABLE, ScriptClient
from kvaware_scorer.index.redis.health import Health
from kvaware_scorer.index.redis.plan import Write, key_names, pack
from kvaware_scorer.index.redis.writer import RedisWriter, WriteBatch
from kvaware_scorer.keys import BlockKey, EngineHash

__all__ = ["RedisIndex"]

logger = logging.getLogger(__name__.rpartition(".")[0])

T = TypeVar("T")

#: Tier-mask bit the script uses for a block held only speculatively.
_SPEC = 1 << 16
#: (tier mask, tier names) -> best tier remembered; the memo is cleared beyond this.
_MAX_BEST = 4096


class RedisIndex:
    """A `KVBlockIndex` kept in Redis or Valkey (optionally Redis Cluster).

    Safe to use from several threads and from several processes at once: every operation is
    atomic on the server. Construction does not contact Redis; the first operation does.

    Args:
        config: Address, credentials, bounds, TTL and timeouts.
        tiers: Tier weights (and the default tier); tier ids themselves are kept in Redis so
            that every process agrees on them.

    Raises:
        ConfigError: A database other than 0 on a cluster.
    """

    backend = "redis"

    blocking_io = True

    def __init__(self, config: RedisIndexConfig, tiers: TierTable | None = None) -> None:
        if config.cluster and config.db not in (None, 0):
            raise ConfigError("must be 0 (or unset) on a cluster", "redisConfig.db")
        self.config = config
        self.tiers = tiers or TierTable(DEFAULT_TIER_WEIGHTS)
        self._health = Health(
            config, buffered=lambda: len(self._writer.buffer), on_down=self._script_lost
        )
        self._wire = ScriptClient(config, on_script_load=self._health.check_boot)
        self._writer = RedisWriter(
            self._wire, self._health, self.tiers, on_write=self._ensure_worker
        )
        self._last_stats = IndexStats(backend=self.backend, capacity=config.size)
        self._best: dict[tuple[int, tuple[str, ...]], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _script_lost(self) -> None:
        """Redis went unreachable: it may come back without the script (reload first)."""
        self._wire.script_ready = False

    def _mark_down(self, exc: BaseException) -> None:
        self._health.mark_down(exc)

    def _guarded(self, what: str, fn: Callable[[], T]) -> T:
        """Run a read; backend trouble becomes `BackendUnavailableError`."""
        wait = self._health.retry_in()
        if wait > 0:
            raise BackendUnavailableError(
                f"Redis index at {self.config.address} is unavailable (next try in {wait:.2f}s)"
            )
        try:
            result = fn()
        except UNAVAILABLE as exc:
            self._mark_down(exc)
            raise BackendUnavailableError(f"Redis index {what} failed: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            self._health.count("backend_errors")
            raise BackendUnavailableError(f"Redis index {what} failed: {exc}") from exc
        self._health.mark_up(self._wire.client)
        return result

    def take_diverged(self) -> set[str]:
        """Pods whose index entries may differ from their KV events (some of their writes never
        reached Redis: dropped from a full buffer, refused, or lost with the server's data),
        returned once Redis takes writes again and nothing is buffered; then forgotten.

        The event ingestor purges each and rebuilds it from its publisher's replay buffer.
        """
        return self._health.take_diverged()

    # -- writes -------------------------------------------------------------------------------

    def _apply(self, op: Write) -> int:
        """Send one write once queued batches are applied; its result (0 when not known)."""
        self._writer.quiesce()
        return self._writer.submit([op])[0] or 0

    def flush(self) -> bool:
        """Apply queued batches and replay buffered writes now. Returns whether none are left."""
        self._writer.quiesce()
        return self._writer.drain()

    def add(
        self,
        pod: str,
        keys: Sequence[BlockKey],
        engine_hashes: Sequence[EngineHash] | None = None,
        tier: str | None = None,
    ) -> None:
        op = self._writer.add_op("add", pod, keys, engine_hashes, tier)
        if op is not None:
            self._apply(op)

    def add_new(
        self,
        pod: str,
        keys: Sequence[BlockKey],
        engine_hashes: Sequence[EngineHash] | None = None,
        tier: str | None = None,
    ) -> int:
        op = self._writer.add_op("add_new", pod, keys, engine_hashes, tier)
        return 0 if op is None else self._apply(op)

    def add_tier(self, pod: str, engine_hashes: Sequence[EngineHash], tier: str | None) -> int:
        if not engine_hashes:
            return 0
        return self._apply(self._writer.tier_op("add_tier", pod, engine_hashes, tier))

    def remove(self, pod: str, engine_hashes: Sequence[EngineHash], tier: str | None = None) -> int:
        if not engine_hashes:
            return 0
        return self._apply(self._writer.tier_op("remove", pod, engine_hashes, tier))

    def purge(self, pod: str) -> int:
        return self._apply(self._writer.purge_op(pod))

    @contextmanager
    def batch(
        self, on_done: Callable[[list[int | None] | Exception], None] | None = None
    ) -> Iterator[WriteBatch]:
        """Collect writes and send them in one round trip when the block exits.

        Args:
            on_done: Write behind: the batch is handed to this index's writer thread when the
                block exits, and `on_done` is called there with its results (or the exception
                that stopped it) once applied. Batches are applied in order (several that
                queue up travel together), at most ``WRITE_BEHIND`` wait, and this index's
                `resolve`, `references`, `purge` and direct writes wait for them first.
                Lookups do not wait. `on_done` must not call this index.

        Example:
            >>> with index.batch() as b:  # doctest: +SKIP
            ...     b.add(pod, keys, hashes)
            ...     b.remove(pod, old_hashes)
            >>> b.results  # doctest: +SKIP
            [None, 3]
        """
        wb = WriteBatch(self._writer)
        yield wb
        if on_done is not None:
            self._writer.queue_batch(wb, on_done)
            return
        self._writer.quiesce()
        wb._finish()

    def add_speculative(self, pod: str, keys: Sequence[BlockKey], ttl: float) -> None:
        if not keys or ttl <= 0:
            return
        pack(keys)
        ms = max(1, int(ttl * 1000))
        # NOTE: speculative entries live for seconds: replaying them later is pointless, so
        # they are dropped (and counted) rather than buffered while Redis is unreachable.
        if self._health.available():
            try:
                self._wire.connect()
                shards = self._wire.shards
                n = len(shards)
                parts: dict[int, list[BlockKey]] = {}
                for k in keys:
                    parts.setdefault(k % n, []).append(k)
                self._wire.pipeline_or_raise(
                    [(shards[s], (b"spec", pod, pack(ks), ms)) for s, ks in parts.items()]
                )
                self._health.mark_up(self._wire.client)
                return
            except UNAVAILABLE as exc:
                self._mark_down(exc)
            except redis.exceptions.RedisError as exc:
                logger.warning("speculative insert for %s failed: %s", pod, exc)
        self._health.count("dropped_speculative")

    # -- reads --------------------------------------------------------------------------------

    def lookup(
        self, keys: Sequence[BlockKey], pods: Collection[str] | None = None
    ) -> dict[str, PodMatch]:
        """Walk `keys` from block 0 for `pods` (see `KVBlockIndex.lookup`).

        Raises:
            BackendUnavailableError: Redis is unreachable or did not answer in time.
        """
        if not keys:
            return {}
        names: list[str] = []
        if pods is not None:
            names = list(dict.fromkeys(pods))
            if not names:
                return {}
        mode = b"1" if pods is None else b"0"

        def run() -> tuple[list[list[int]], list[Any]]:
            wire = self._wire
            wire.connect()
            shards = wire.shards
            size = wire.shard_size()
            if len(shards) == 1:
                blob = key_names(shards[0].prefix, keys)
                return [], [wire.eval(shards[0], b"lookup", blob, mode, size, *names)]
            n = len(shards)
            positions: dict[int, list[int]] = {}
            for i, k in enumerate(keys):
                positions.setdefault(k % n, []).append(i)
            order = list(positions)
            calls = [
                (
                    shards[s],
                    (
                        b"lookup",
                        key_names(shards[s].prefix, [keys[i] for i in positions[s]]),
                        mode,
                        size,
                        *names,
                    ),
                )
                for s in order
            ]
            return [positions[s] for s in order], wire.pipeline_or_raise(calls)

        where, raws = self._guarded("lookup", run)
        try:
            if not where:
                out: dict[str, PodMatch] = {}
                self._decode_lookup(raws[0], out)
                return out
            return self._merge_lookup(len(keys), where, raws)
        except (msgspec.DecodeError, TypeError, ValueError, IndexError) as exc:
            # NOTE: e.g. another kvaware version's script answering: never crash the caller.
            self._health.count("backend_errors")
            raise BackendUnavailableError(f"unexpected lookup reply from Redis: {exc}") from exc

    def _decode_lookup(self, raw: bytes, out: dict[str, PodMatch]) -> None:
        data = msgspec.msgpack.decode(raw)
        if not data:
            return
        names = tuple(data[0])
        best = self._best_tier
        for i in range(1, len(data), 3):
            pod, run, ranges = data[i], data[i + 1], data[i + 2]
            weight = 0.0
            counts: dict[str, int] = {}
            for j in range(0, len(ranges), 3):
                n = ranges[j + 1] - ranges[j]
                tname, w = best(ranges[j + 2], names)
                weight += n * w
                counts[tname] = counts.get(tname, 0) + n
            out[pod] = PodMatch(run, weight, counts)

    def _merge_lookup(
        self, total: int, where: list[list[int]], raws: list[Any]
    ) -> dict[str, PodMatch]:
        """Combine per-shard walks: a pod's run ends at its first miss in any shard."""
        parts = []
        seen: dict[str, None] = {}
        for raw in raws:
            data = msgspec.msgpack.decode(raw)
            got: dict[str, tuple[int, list[int]]] = {}
            names: tuple[str, ...] = ()
            if data:
                names = tuple(data[0])
                for i in range(1, len(data), 3):
                    got[data[i]] = (data[i + 1], data[i + 2])
                    seen[data[i]] = None
            parts.append((got, names))
        out: dict[str, PodMatch] = {}
        best = self._best_tier
        for pod in seen:
            run = total
            for pos, (got, _names) in zip(where, parts, strict=True):
                hit = got.get(pod)
                local = 0 if hit is None else hit[0]
                if local < len(pos):
                    run = min(run, pos[local])
            if run == 0:
                continue
            weight = 0.0
            counts: dict[str, int] = {}
            for pos, (got, names) in zip(where, parts, strict=True):
                hit = got.get(pod)
                if hit is None:
                    continue
                ranges = hit[1]
                for j in range(0, len(ranges), 3):
                    lo, hi = ranges[j], ranges[j + 1]
                    n = bisect.bisect_left(pos, run, lo, hi) - lo
                    if n > 0:
                        tname, w = best(ranges[j + 2], names)
                        weight += n * w
                        counts[tname] = counts.get(tname, 0) + n
            out[pod] = PodMatch(run, weight, counts)
        return out

    def _best_tier(self, mask: int, names: tuple[str, ...]) -> tuple[str, float]:
        """Name and weight of the best tier in a tier mask (speculative -> default tier)."""
        key = (mask, names)
        hit = self._best.get(key)
        if hit is not None:
            return hit
        tiers = self.tiers
        found: tuple[str, float] | None = None
        if mask == _SPEC:
            mask = 0  # speculative only: the default tier
        for tid in range(16):
            if mask >> tid & 1:
                name = names[tid] if tid < len(names) and names[tid] else f"tier-{tid}"
                w = tiers.weight(name)
                if found is None or w > found[1]:
                    found = (name, w)
        if found is None:
            found = (tiers.default_tier, tiers.weight(tiers.default_tier))
        if len(self._best) > _MAX_BEST:
            self._best.clear()
        self._best[key] = found
        return found

    def resolve(self, pod: str, engine_hash: EngineHash) -> BlockKey | None:
        """The key of the last block `engine_hash` covers on `pod` (see `KVBlockIndex`).

        While writes are buffered, keys those writes would add resolve from the buffer.

        Raises:
            BackendUnavailableError: Redis is unreachable and the buffer does not know it.
        """
        writer = self._writer
        writer.quiesce()
        if writer.buffer:
            if self._health.available():
                writer.drain()
            if writer.buffer:
                hit = writer.buffered_key(pod, engine_hash)
                if hit is not None:
                    return hit
        for raw in self._each_shard("resolve", b"resolve", pod, pack([engine_hash])):
            if raw is not None:
                return BlockKey(int.from_bytes(raw, "little"))
        return None

    def _each_shard(self, what: str, *args: Any) -> list[Any]:
        """One read call on every shard (one round trip); the replies in shard order.

        Raises:
            BackendUnavailableError: Redis is unreachable or a shard answered an error.
        """

        def run() -> list[Any]:
            self._wire.connect()
            return self._wire.pipeline_or_raise([(s, args) for s in self._wire.shards])

        return self._guarded(what, run)

    def references(self, pod: str) -> dict[str, dict[EngineHash, int]]:
        """Tier -> engine hash -> references `pod` holds (see `KVBlockIndex.references`).

        Raises:
            BackendUnavailableError: Redis is unreachable.
        """
        self._writer.quiesce()
        out: dict[str, dict[EngineHash, int]] = {}
        for raw in self._each_shard("references", b"refs", pod):
            if not raw:
                continue
            names, ehs, counts = raw
            decoded = msgspec.msgpack.decode(names)
            tiers: list[str] = list(decoded) if isinstance(decoded, list) else []
            for i in range(0, len(ehs), 8):
                tid, c = counts[i // 4], counts[i // 4 + 1]
                name = tiers[tid] if tid < len(tiers) else f"tier-{tid}"
                refs = out.get(name)
                if refs is None:
                    refs = out[name] = {}
                eh = EngineHash(int.from_bytes(ehs[i : i + 8], "little"))
                # NOTE: an engine block whose keys span shards is reported by each of them
                refs[eh] = max(refs.get(eh, 0), c)
        return out

    def pods(self) -> list[str]:
        """Pods with entries or engine hashes that wrote within the TTL.

        Raises:
            BackendUnavailableError: Redis is unreachable.
        """
        names: dict[str, None] = {}
        for part in map(msgspec.msgpack.decode, self._each_shard("pods", b"pods")):
            names.update(dict.fromkeys(part))
        return list(names)

    def stats(self) -> IndexStats:
        """Sizes summed over shards, plus this client's write-path counters in ``extra``.

        While Redis is unreachable, the last sizes seen are returned with
        ``extra["available"] == 0``.
        """
        with self._health.lock:
            extra: dict[str, float] = {k: float(v) for k, v in self._health.counters.items()}
            extra["buffered_now"] = float(len(self._writer.buffer))
        try:
            parts = [msgspec.msgpack.decode(r) for r in self._each_shard("stats", b"stats")]
        except BackendUnavailableError:
            extra["available"] = 0.0
            return replace(self._last_stats, extra=extra)
        extra["available"] = 1.0
        extra["shards"] = float(len(parts))
        names: set[str] = set()
        for p in parts:
            names.update(p[0])
        spec, queue, entries, blocks, evictions, emaps, expired = (
            sum(int(p[i]) for p in parts) for i in range(1, 8)
        )
        extra["queue"] = float(queue)
        extra["expired"] = float(expired)
        st = IndexStats(
            backend=self.backend,
            blocks=blocks,
            entries=entries,
            pods=len(names),
            capacity=self.config.size,
            evictions=evictions,
            speculative_entries=spec,
            engine_hashes=emaps,
            extra=extra,
        )
        self._last_stats = st
        return st

    # -- maintenance --------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._thread is not None or self._stop.is_set():
            return
        with self._lock:
            if self._thread is None:
                t = threading.Thread(target=self._run, name="kvaware-redis-index", daemon=True)
                self._thread = t
                t.start()

    def _run(self) -> None:
        """The background thread: replays buffered writes and runs the maintenance rounds."""
        cfg = self.config
        writer = self._writer
        tick = min(cfg.retry_interval, cfg.maintenance_interval, 0.5)
        next_maint = time.monotonic() + cfg.maintenance_interval
        while not self._stop.wait(tick):
            try:
                if writer.buffer and writer.writable():
                    writer.drain()
                now = time.monotonic()
                ready = not writer.buffer and self._health.available() and self._wire.shards
                if now >= next_maint and ready:
                    next_maint = now + cfg.maintenance_interval
                    self.maintain()
            except UNAVAILABLE as exc:
                self._mark_down(exc)
            except Exception:
                logger.exception("Redis index maintenance failed")

    def maintain(self) -> None:
        """One maintenance round: expire idle blocks, purge pods gone quiet, finish purges.

        Writers run it in the background every ``maintenance_interval`` seconds.
        """
        wire = self._wire
        interval_ms = int(self.config.maintenance_interval * 1000)
        size = wire.shard_size()
        for shard in list(wire.shards):
            quiet, pending, _expired = msgspec.msgpack.decode(
                wire.eval(shard, b"maint", interval_ms, size)
            )
            for pid in quiet:
                dropped, got = (int(x) for x in wire.eval(shard, b"purge", b"", pid))
                if got:
                    logger.info(
                        "purged a pod quiet for over %ss (id %d, %d entries)",
                        wire.ttl_ms / 1000,
                        got,
                        dropped,
                    )
                    self._health.count("quiet_pods_purged")
                    self._writer.finish_purge(shard, got)
            for pid in pending:
                self._writer.finish_purge(shard, int(pid))

    def close(self) -> None:
        """Apply queued batches, stop the background threads, replay what is buffered if Redis
        answers, disconnect."""
        self._writer.stop()
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        writer = self._writer
        if writer.buffer and self._health.available():
            try:
                writer.drain()
            except Exception:  # pragma: no cover - best effort on shutdown
                logger.exception("Redis index could not replay buffered writes on close")
        if writer.buffer:
            logger.warning("Redis index closed with %d writes not applied", len(writer.buffer))
        self._wire.close()
