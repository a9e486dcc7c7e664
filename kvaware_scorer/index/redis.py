"""The Redis / Valkey `KVBlockIndex` backend: one index shared by writers and scoring replicas.

Every operation is one call of one Lua script (``redis.lua`` beside this module) on one shard
of the index, so a prompt lookup is one round trip with the early stop done server-side, and
writes are one round trip: a `WriteBatch` (an event batch) is one script call per shard that
applies its writes in order. Layout, expiry, cluster sharding and failure behaviour are
described in ``docs/redis.md``; in short:

* Blocks are string keys ``<prefix>b<key>`` holding a 3-byte header and one compact record per
  holding pod (pods are small per-shard integer ids from a registry hash); each pod's engine-hash
  map is one Redis hash (engine hash -> keys) that doubles as the pod's reverse index, so a
  purge walks only that pod's entries.
* On Redis Cluster, blocks are sharded by key over shards (one hash tag each, placed on
  distinct masters; every script call stays single-slot): a lookup sends each shard its part of
  the prompt in one parallel round trip, each shard walks it with the same early stop, and the
  client merges the runs.
* When Redis is unreachable or slow, lookups raise `BackendUnavailableError` within the
  configured timeout (then immediately until the retry interval passes), writes are buffered up
  to ``max_buffered_writes`` (older ones are dropped and counted) and replayed in order by a
  background thread once Redis answers again.
"""

from __future__ import annotations

import array
import bisect
import hashlib
import itertools
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, NamedTuple, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec
import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from kvaware_scorer.config import DEFAULT_TIER_WEIGHTS, RedisIndexConfig
from kvaware_scorer.errors import BackendUnavailableError, ConfigError
from kvaware_scorer.index.base import IndexStats, PodMatch, TierTable, iter_groups, normalize_medium

__all__ = ["RedisIndex", "WriteBatch", "redis_url"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Tier-mask bit the script uses for a block held only speculatively.
_SPEC = 1 << 16
#: Engine-map entries a purge step handles per script call (keeps each call short).
_PURGE_BUDGET = 2000
#: Script call kinds of the writes (one ``w`` call per shard carries a batch of them).
_WRITE_CODES = {"add": b"a", "add_new": b"n", "remove": b"r", "add_tier": b"t"}
#: Seconds between two log lines about writes dropped while Redis is unreachable.
_DROP_LOG_INTERVAL = 10.0
#: Buffered writes replayed per pipeline.
_REPLAY_BATCH = 256
#: Write batches queued for the writer thread before `batch(on_done=...)` waits for room.
_WRITE_BEHIND = 4
_LAYOUT_VERSION = "v1"

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.RedisClusterException,
    OSError,
)


_UNAVAILABLE_OR_REPLY: tuple[type[BaseException], ...] = (
    *_UNAVAILABLE,
    redis.exceptions.ResponseError,
)


def _transient(exc: BaseException) -> bool:
    """A server reply that means "try again later" rather than "this write is wrong"."""
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(
        ("BUSY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "READONLY")
    )


def _oom(exc: BaseException) -> bool:
    """Redis refused a write for memory (``maxmemory`` reached under ``noeviction``): the
    write is fine, the server cannot take it now."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and (
        "command not allowed when used memory" in str(exc)
    )


#: Pods remembered as written (to resync after a restart lost the data) or diverged.
_MAX_TRACKED_PODS = 100_000


def redis_url(address: str) -> str:
    """The redis-py URL for a configured address (``valkey[s]://`` and ``host:port`` mapped)."""
    address = address.strip()
    if "://" not in address:
        return f"redis://{address}"
    scheme, rest = address.split("://", 1)
    scheme = scheme.lower()
    if scheme == "valkey":
        scheme = "redis"
    elif scheme == "valkeys":
        scheme = "rediss"
    return f"{scheme}://{rest}"


def _pack(values: Sequence[int]) -> bytes:
    """Unsigned 64-bit little-endian packing of keys or engine hashes."""
    try:
        arr = array.array("Q", values)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"block keys and hashes must be ints in [0, 2**64): {exc}") from None
    if sys.byteorder == "big":  # pragma: no cover - no big-endian CI
        arr.byteswap()
    return arr.tobytes()


def _key_names(prefix: bytes, keys: Sequence[int]) -> bytes:
    """Block key names (``prefix + b"b" + 8 bytes``) of `keys`, concatenated."""
    names = np.empty(len(keys), dtype=[("p", f"S{len(prefix) + 1}"), ("k", "<u8")])
    names["p"] = prefix + b"b"
    names["k"] = np.frombuffer(_pack(keys), dtype="<u8")
    return names.tobytes()


def _resp(args: Sequence[Any]) -> bytes:
    """One command in the Redis protocol (RESP)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if a.__class__ is bytes else _arg_bytes(a)
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


def _arg_bytes(a: Any) -> bytes:
    if isinstance(a, str):
        return a.encode("utf-8")
    if isinstance(a, int):
        return b"%d" % a
    return bytes(a)


def _error(message: str) -> redis.exceptions.ResponseError:
    """The redis-py exception of an error reply (NOSCRIPT, LOADING, MOVED, ...)."""
    try:
        from redis._parsers.base import BaseParser

        exc: redis.exceptions.ResponseError = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
        return exc
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other redis-py
        return redis.exceptions.ResponseError(message)


class _Wire:
    """Script calls straight over a redis-py connection's socket: one send per round trip and
    as few receives as the replies need.

    NOTE: redis-py's own command path costs two to three times the CPU per call (several
    send and receive system calls and a general parser): 100-200 us of a ~0.7 ms lookup on
    the development VM. Lookups and write batches are this backend's hot path, so they go
    this way; everything else uses redis-py. A connection that fails mid-call is dropped
    (it may hold half a reply); redis-py reconnects it on next use.
    """

    __slots__ = ("_buf", "_conn", "_pos", "_sock")

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        sock = getattr(conn, "_sock", None)
        if sock is None:
            conn.connect()
            sock = conn._sock
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def send(self, payload: bytes) -> None:
        try:
            self._sock.sendall(payload)
        except BaseException as exc:
            self._fail(exc)

    def replies(self, n: int) -> list[Any]:
        """`n` replies; error replies come back as exception objects."""
        try:
            return [self._reply() for _ in range(n)]
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> NoReturn:
        self._conn.disconnect()
        if isinstance(exc, socket.timeout):
            raise redis.exceptions.TimeoutError(f"Timeout reading from Redis: {exc}") from exc
        if isinstance(exc, OSError):
            raise redis.exceptions.ConnectionError(f"Error talking to Redis: {exc}") from exc
        raise exc

    def _more(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0

    def _line(self) -> bytes:
        while True:
            i = self._buf.find(b"\r\n", self._pos)
            if i >= 0:
                line = self._buf[self._pos : i]
                self._pos = i + 2
                return line
            self._more()

    def _take(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n + 2:
            self._more()
        data = self._buf[self._pos : self._pos + n]
        self._pos += n + 2
        return data

    def _reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._take(n)
        if kind == b":":
            return int(rest)
        if kind == b"*" or kind == b"~" or kind == b">":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        if kind == b"_":
            return None
        if kind == b"+":
            return rest
        if kind == b"-":
            return _error(rest.decode("utf-8", "replace"))
        if kind == b"!":
            return _error(self._take(int(rest)).decode("utf-8", "replace"))
        if kind == b"#":
            return rest == b"t"
        if kind == b",":
            return float(rest)
        if kind == b"(":
            return int(rest)
        if kind == b"=":
            return self._take(int(rest))[4:]
        if kind == b"%":
            out = {}
            for _ in range(int(rest)):
                key = self._reply()
                out[key] = self._reply()
            return out
        raise redis.exceptions.InvalidResponse(f"unexpected Redis reply {line[:40]!r}")


def _script_source() -> str:
    return resources.files("kvaware_scorer.index").joinpath("redis.lua").read_text("utf-8")


class _Shard(NamedTuple):
    """One shard of the index: its key prefix (with the hash tag on a cluster)."""

    prefix: bytes
    route: bytes


@dataclass(slots=True)
class _Write:
    """A write operation as the caller made it (kept as such while Redis is unreachable)."""

    kind: str
    pod: str
    keys: Sequence[int] = ()
    ehs: Sequence[int] | None = None
    tier: str = ""
    seq: int = -1
    packed: tuple[bytes, bytes] | None = None  # keys and engine hashes, as sent
    token: bytes = b""  # this write's id among its index's writes (see `RedisIndex._token`)


class WriteBatch:
    """Write operations collected to be sent in one pipeline (one round trip).

    Made by `RedisIndex.batch`; each method mirrors the `KVBlockIndex` method of the same name
    and appends one result to ``results`` (in call order) when the batch is sent.
    """

    def __init__(self, index: RedisIndex) -> None:
        self._index = index
        self._ops: list[_Write] = []
        self._empty: list[tuple[int, int | None]] = []  # adds of no keys: (position, result)
        self.results: list[int | None] = []

    def _finish(self, results: list[int | None] | None = None) -> None:
        if results is None:
            results = self._index._submit(self._ops)
        else:
            results = list(results)
        for k, (pos, value) in enumerate(self._empty):
            results.insert(pos + k, value)
        self.results = results

    def add(
        self,
        pod: str,
        keys: Sequence[int],
        engine_hashes: Sequence[int] | None = None,
        tier: str | None = None,
    ) -> None:
        """Queue `RedisIndex.add`."""
        op = self._index._add_op("add", pod, keys, engine_hashes, tier)
        if op is not None:
            self._ops.append(op)
        else:
            self._empty.append((len(self._ops), None))

    def add_new(
        self,
        pod: str,
        keys: Sequence[int],
        engine_hashes: Sequence[int] | None = None,
        tier: str | None = None,
    ) -> None:
        """Queue `RedisIndex.add_new`."""
        op = self._index._add_op("add_new", pod, keys, engine_hashes, tier)
        if op is not None:
            self._ops.append(op)
        else:
            self._empty.append((len(self._ops), 0))

    def add_tier(self, pod: str, engine_hashes: Sequence[int], tier: str | None) -> None:
        """Queue `RedisIndex.add_tier`."""
        self._ops.append(self._index._tier_op("add_tier", pod, engine_hashes, tier))

    def remove(self, pod: str, engine_hashes: Sequence[int], tier: str | None = None) -> None:
        """Queue `RedisIndex.remove`."""
        self._ops.append(self._index._tier_op("remove", pod, engine_hashes, tier))

    def purge(self, pod: str) -> None:
        """Queue `RedisIndex.purge`."""
        self._ops.append(self._index._purge_op(pod))


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
        self._code = _script_source()
        self._sha = hashlib.sha1(self._code.encode("utf-8")).hexdigest()
        self._ttl_ms = int(config.ttl_seconds * 1000)
        self._prefix = config.key_prefix.encode("utf-8")
        self._lock = threading.Lock()
        self._init_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._client: Any = None
        self._idle: deque[Any] = deque()  # connections kept for `_send_single`
        self._shards: list[_Shard] = []
        self._script_ready = False
        self._down_until = 0.0
        self._down_since: float | None = None
        # writes refused for memory: retried (reads go on) after `retry_interval`
        self._refused_until = 0.0
        self._refused_since: float | None = None
        # pods some of whose writes never reached Redis (see `take_diverged`)
        self._diverged: set[str] = set()
        self._written: set[str] = set()
        self._boot: bytes | None = None
        self._buffer: deque[_Write] = deque()
        self._seq = itertools.count()
        self._unlogged_drops = 0
        self._next_drop_log = 0.0
        self._writer = os.urandom(8).hex().encode("ascii")
        self._tokens = itertools.count()
        # (pod, engine hash) -> (key, seq of the buffered write that stores it)
        self._pending: dict[tuple[str, int], tuple[int, int]] = {}
        self._counters: dict[str, int] = {
            "buffered_writes": 0,
            "dropped_writes": 0,
            "replayed_writes": 0,
            "failed_writes": 0,
            "dropped_speculative": 0,
            "backend_errors": 0,
            "quiet_pods_purged": 0,
            "refused_writes": 0,
            "data_lost": 0,
        }
        self._last_stats = IndexStats(backend=self.backend, capacity=config.size)
        self._best: dict[tuple[int, tuple[str, ...]], tuple[str, float]] = {}
        self._alive_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # write-behind: batches queued by batch(on_done=...), applied in order by one thread
        self._wcond = threading.Condition()
        self._wqueue: deque[tuple[WriteBatch, Callable[[list[int | None] | Exception], None]]] = (
            deque()
        )
        self._winflight = 0
        self._wthread: threading.Thread | None = None
        self._wstop = False

    # -- connection -------------------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        kwargs: dict[str, Any] = {
            "socket_timeout": cfg.socket_timeout,
            "socket_connect_timeout": cfg.connect_timeout,
            # NOTE: no client-side retries: a lookup must fail within one timeout, and writes
            # are retried (in order) by our own buffer.
            "retry": Retry(NoBackoff(), 0),
            "retry_on_timeout": False,
        }
        if cfg.username is not None:
            kwargs["username"] = cfg.username
        if cfg.password is not None:
            kwargs["password"] = cfg.password
        return kwargs

    def _connection(self) -> Any:
        client = self._client
        if client is not None:
            return client
        with self._init_lock:
            if self._client is not None:
                return self._client
            url = redis_url(self.config.address)
            kwargs = self._client_kwargs()
            if self.config.cluster:
                # NOTE: redis-py lets credentials in the URL win over arguments; configured
                # ones are meant to override the URL's, so the URL loses them.
                if "username" in kwargs or "password" in kwargs:
                    parts = urlsplit(url)
                    url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
                client = RedisCluster.from_url(url, **kwargs)
                try:
                    shards = self._cluster_layout(client)
                except BaseException:
                    client.close()
                    raise
            else:
                pool = redis.ConnectionPool.from_url(url, **kwargs)
                # NOTE: the URL's db and credentials win in redis-py; configured ones win here.
                for name, value in (
                    ("db", self.config.db),
                    ("username", self.config.username),
                    ("password", self.config.password),
                ):
                    if value is not None:
                        pool.connection_kwargs[name] = value
                client = redis.Redis(connection_pool=pool)
                shards = [_Shard(self._prefix, self._prefix + b"c")]
            self._shards = shards
            self._client = client
            return client

    def _cluster_layout(self, client: Any) -> list[_Shard]:
        """Shard hash tags, created on first use (one per master) and stored in the cluster."""
        key = self._prefix + b"layout"
        raw = client.get(key)
        if raw is None:
            primaries = sorted(node.name for node in client.get_primaries())
            count = self.config.cluster_shards or len(primaries)
            tags: list[str] = []
            used: set[int] = set()
            candidates = (f"k{i}" for i in itertools.count())
            for shard in range(count):
                want = primaries[shard % len(primaries)]
                for _ in range(100_000):
                    tag = next(candidates)
                    slot = client.keyslot(tag)
                    if slot not in used and client.get_node_from_key(tag).name == want:
                        used.add(slot)
                        tags.append(tag)
                        break
                else:  # pragma: no cover - needs a master owning almost no slots
                    raise ConfigError(f"no hash slot found on master {want}", "redisConfig")
            client.set(key, " ".join([_LAYOUT_VERSION, *tags]).encode(), nx=True)
            raw = client.get(key)
        parts = bytes(raw).decode("ascii").split()
        if not parts or parts[0] != _LAYOUT_VERSION or len(parts) < 2:
            raise ConfigError(f"unknown index layout {parts[:1]} at {key!r}", "redisConfig")
        shards = []
        for tag in parts[1:]:
            prefix = self._prefix + b"{" + tag.encode("ascii") + b"}"
            shards.append(_Shard(prefix, prefix + b"c"))
        return shards

    def _load_script(self, client: Any) -> None:
        client.script_load(self._code)
        self._script_ready = True
        self._check_boot(client)

    def _check_boot(self, client: Any) -> None:
        """Tell whether the server still holds what we wrote (run when the script must be
        loaded: first use, or after a restart or a script flush).

        A marker key is created once per dataset; a server that answers with another marker
        (or none) lost the data we wrote (restarted empty, or flushed): every pod we wrote for
        is then diverged, and the ingestor rebuilds it (see `take_diverged`).
        """
        key = self._prefix + b"boot"
        try:
            client.set(key, os.urandom(8).hex(), nx=True)
            marker = client.get(key)
        except redis.exceptions.ResponseError as exc:  # e.g. OOM: checked at the next load
            logger.debug("Redis index: no dataset marker (%s)", exc)
            return
        if self._boot is not None and marker != self._boot:
            with self._lock:
                lost = set(self._written)
                self._diverged |= lost
                self._counters["data_lost"] += 1
            logger.warning(
                "Redis index at %s lost its data (restarted empty or flushed): %d pods will "
                "be rebuilt from their KV events",
                self.config.address,
                len(lost),
            )
        self._boot = marker

    def _argv(self, shard: _Shard, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self._sha, 1, shard.route, args[0], shard.prefix, self._ttl_ms, *args[1:])

    def _eval(self, shard: _Shard, *args: Any) -> Any:
        client = self._connection()
        if self.config.cluster:
            try:
                return client.evalsha(*self._argv(shard, args))
            except redis.exceptions.NoScriptError:
                self._load_script(client)
                return client.evalsha(*self._argv(shard, args))
        reply = self._send_single(client, [(shard, args)])[0]
        if isinstance(reply, redis.exceptions.NoScriptError):
            self._load_script(client)
            reply = self._send_single(client, [(shard, args)])[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _send_single(
        self, client: Any, items: Sequence[tuple[_Shard, tuple[Any, ...]]]
    ) -> list[Any]:
        """Script calls on the single server in one round trip (errors returned).

        NOTE: connections are borrowed from redis-py's pool once and kept by this index (a
        pool checkout costs ~20 us: it polls the socket); `_Wire` always reads whole replies
        or drops the connection, so a kept one is always ready.
        """
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = client.connection_pool.get_connection()
        try:
            wire = _Wire(conn)
            wire.send(b"".join(_resp(("EVALSHA", *self._argv(s, a))) for s, a in items))
            return wire.replies(len(items))
        finally:
            self._idle.append(conn)

    def _pipeline(self, items: Sequence[tuple[_Shard, tuple[Any, ...]]]) -> list[Any]:
        """Run script calls in one pipeline; per-call errors are returned, not raised."""
        client = self._connection()
        if not self._script_ready:
            self._load_script(client)
        results: list[Any] = [None] * len(items)
        todo = list(range(len(items)))
        for attempt in range(2):
            batch = [items[i] for i in todo]
            if self.config.cluster:
                out = self._cluster_send(client, batch)
            else:
                out = self._send_single(client, batch)
            retry = []
            for i, r in zip(todo, out, strict=True):
                if isinstance(r, redis.exceptions.NoScriptError) and attempt == 0:
                    retry.append(i)
                else:
                    results[i] = r
            if not retry:
                break
            self._load_script(client)
            todo = retry
        return results

    def _cluster_send(
        self, client: Any, items: Sequence[tuple[_Shard, tuple[Any, ...]]]
    ) -> list[Any]:
        """Script calls to several masters at once: every master's calls are written before
        any answer is read, so the whole fan-out costs one round trip.

        NOTE: redis-py's cluster pipeline refuses EVALSHA; calls answered with a redirect
        (slot moved, migrating, cluster reconfiguring) are re-run through the cluster client,
        which follows redirects and refreshes its slot map.
        """
        by_node: dict[str, list[int]] = {}
        nodes: dict[str, Any] = {}
        for i, (shard, _args) in enumerate(items):
            node = client.get_node_from_key(shard.route)
            by_node.setdefault(node.name, []).append(i)
            nodes[node.name] = node
        results: list[Any] = [None] * len(items)
        sent: list[tuple[Any, Any, _Wire, list[int]]] = []
        try:
            for name, idxs in by_node.items():
                r = nodes[name].redis_connection
                conn = r.connection_pool.get_connection()
                wire = _Wire(conn)
                sent.append((r, conn, wire, idxs))
                wire.send(b"".join(_resp(("EVALSHA", *self._argv(*items[i]))) for i in idxs))
            for _r, _conn, wire, idxs in sent:
                for i, reply in zip(idxs, wire.replies(len(idxs)), strict=True):
                    results[i] = reply
        except BaseException:
            for _r, conn, _w, _idxs in sent:
                conn.disconnect()
            raise
        finally:
            for r, conn, _w, _idxs in sent:
                r.connection_pool.release(conn)
        for i, res in enumerate(results):
            if isinstance(
                res,
                redis.exceptions.AskError
                | redis.exceptions.TryAgainError
                | redis.exceptions.ClusterDownError,
            ):
                try:
                    results[i] = client.evalsha(*self._argv(*items[i]))
                except redis.exceptions.ResponseError as exc:
                    results[i] = exc
        return results

    # -- availability -----------------------------------------------------------------------

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _check_available(self) -> None:
        wait = self._down_until - time.monotonic()
        if wait > 0:
            raise BackendUnavailableError(
                f"Redis index at {self.config.address} is unavailable (next try in {wait:.2f}s)"
            )

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            self._counters["backend_errors"] += 1
            self._down_until = time.monotonic() + self.config.retry_interval
            self._script_ready = False
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
        if first:
            logger.warning("Redis index at %s unavailable: %s", self.config.address, exc)

    def _writable(self) -> bool:
        return time.monotonic() >= self._refused_until

    def _refuse(self, exc: BaseException) -> None:
        """Redis refused writes for memory: keep them buffered and retry after
        `retry_interval` (lookups go on meanwhile). Logged once per episode."""
        with self._lock:
            self._counters["refused_writes"] += 1
            self._refused_until = time.monotonic() + self.config.retry_interval
            first = self._refused_since is None
            if first:
                self._refused_since = time.monotonic()
        if first:
            logger.warning(
                "Redis index at %s refuses writes (%s): buffering them (at most %d) and "
                "retrying every %.1fs",
                self.config.address,
                str(exc).split("\n", 1)[0][:200],
                self.config.max_buffered_writes,
                self.config.retry_interval,
            )

    def _accepted(self) -> None:
        """Writes went through again after a refusal episode."""
        if self._refused_since is None:
            return
        with self._lock:
            since, self._refused_since = self._refused_since, None
            self._refused_until = 0.0
        if since is not None:
            logger.warning(
                "Redis index at %s accepts writes again after %.1fs",
                self.config.address,
                time.monotonic() - since,
            )

    def take_diverged(self) -> set[str]:
        """Pods whose index entries may differ from their KV events (some of their writes never
        reached Redis: dropped from a full buffer, refused, or lost with the server's data),
        returned once Redis takes writes again and nothing is buffered; then forgotten.

        The event ingestor purges each and rebuilds it from its publisher's replay buffer.
        """
        if not self._diverged or self._buffer or not self._available() or not self._writable():
            return set()
        with self._lock:
            out, self._diverged = self._diverged, set()
        return out

    def _mark_diverged(self, pods: Iterable[str]) -> None:
        """Record pods whose writes were lost (bounded; caller holds `_lock`)."""
        for pod in pods:
            if len(self._diverged) < _MAX_TRACKED_PODS:
                self._diverged.add(pod)

    def _mark_up(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            since = self._down_since
            self._down_since = None
            self._down_until = 0.0
        if since is not None:
            logger.warning(
                "Redis index at %s reachable again after %.1fs (%d writes buffered)",
                self.config.address,
                time.monotonic() - since,
                len(self._buffer),
            )
            # NOTE: another process may have reloaded the script after a restart, so a missing
            # script cannot be relied on to reveal lost data: check the marker on every return.
            client = self._client
            if client is not None:
                try:
                    self._check_boot(client)
                except redis.exceptions.RedisError as exc:
                    logger.debug("Redis index: dataset marker not checked (%s)", exc)

    def _guarded(self, what: str, fn: Callable[[], T]) -> T:
        """Run a read; backend trouble becomes `BackendUnavailableError`."""
        self._check_available()
        try:
            result = fn()
        except _UNAVAILABLE as exc:
            self._mark_down(exc)
            raise BackendUnavailableError(f"Redis index {what} failed: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            with self._lock:
                self._counters["backend_errors"] += 1
            raise BackendUnavailableError(f"Redis index {what} failed: {exc}") from exc
        self._mark_up()
        return result

    # -- writes -----------------------------------------------------------------------------

    def _add_op(
        self,
        kind: str,
        pod: str,
        keys: Sequence[int],
        engine_hashes: Sequence[int] | None,
        tier: str | None,
    ) -> _Write | None:
        if not keys:
            return None
        if engine_hashes is not None and len(engine_hashes) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(engine_hashes)} engine hashes")
        kb = _pack(keys)  # bad keys fail here, in the caller, not at replay
        self._track(pod)
        eb = b"" if engine_hashes is None else _pack(engine_hashes)
        tname = normalize_medium(tier, self.tiers.default_tier)
        ehs = None if engine_hashes is None else tuple(engine_hashes)
        return _Write(kind, pod, tuple(keys), ehs, tname, packed=(kb, eb), token=self._token())

    def _tier_op(
        self, kind: str, pod: str, engine_hashes: Sequence[int], tier: str | None
    ) -> _Write:
        eb = _pack(engine_hashes)
        tname = normalize_medium(tier, self.tiers.default_tier)
        self._track(pod)
        return _Write(
            kind, pod, (), tuple(engine_hashes), tname, packed=(b"", eb), token=self._token()
        )

    def _track(self, pod: str) -> None:
        """Remember that we wrote for `pod` (bounded), to rebuild it if the data is lost."""
        written = self._written
        if pod not in written and len(written) < _MAX_TRACKED_PODS:
            written.add(pod)

    def _purge_op(self, pod: str) -> _Write:
        return _Write("purge", pod, token=self._token())

    def _token(self) -> bytes:
        """A new write id: the script applies a write at most once per (writer, token).

        NOTE: a write whose reply is lost (a timeout, a dropped connection) may or may not have
        been applied; it is buffered and sent again, and the server skips it if it was applied,
        so that no reference is ever counted twice (a stale entry nothing would remove).
        """
        return b"%d" % next(self._tokens)

    def _shard_size(self) -> int:
        size = self.config.size
        shards = max(1, len(self._shards) if self._shards else self.config.cluster_shards or 1)
        return -(-size // shards) if size else 0

    @staticmethod
    def _add_write(
        w: _Write,
        keys: Sequence[int],
        ehs: Sequence[int] | None,
        foreign: bytes = b"",
        packed: tuple[bytes, bytes] | None = None,
    ) -> tuple[bytes, str, str, bytes, bytes, bytes, bytes]:
        """The script's arguments of one store (see ``w`` in redis.lua)."""
        plain = (
            not foreign
            and len(set(keys)) == len(keys)
            and (ehs is None or len(set(ehs)) == len(ehs))
        )
        kb, eb = packed if packed is not None else (_pack(keys), b"" if ehs is None else _pack(ehs))
        flags = b"1" if plain else b"0" + foreign
        return (_WRITE_CODES[w.kind], w.pod, w.tier, kb, eb, flags, w.token)

    def _plan(self, w: _Write) -> list[tuple[_Shard, bool, tuple[Any, ...]]]:
        """The script work of one write: ``(shard, batched, args)`` per shard it touches.

        Batched items are writes that one ``w`` call per shard carries for the whole batch;
        the others (purges, liveness) are script calls of their own.
        """
        shards = self._shards
        n = len(shards)
        if w.kind in ("add", "add_new"):
            if n == 1:
                return [(shards[0], True, self._add_write(w, w.keys, w.ehs, packed=w.packed))]
            parts: dict[int, tuple[list[int], list[int]]] = {}
            foreign: dict[int, list[bytes]] = {}
            for eh, ks in iter_groups(w.keys, w.ehs):
                touched = set()
                for k in ks:
                    s = k % n
                    pk, pe = parts.setdefault(s, ([], []))
                    pk.append(k)
                    pe.append(eh)
                    touched.add(s)
                last = ks[-1]
                for s in touched - {last % n}:
                    foreign.setdefault(s, []).append(_pack([eh, last]))
            items: list[tuple[_Shard, bool, tuple[Any, ...]]] = [
                (
                    shards[s],
                    True,
                    self._add_write(
                        w, pk, None if w.ehs is None else pe, b"".join(foreign.get(s, ()))
                    ),
                )
                for s, (pk, pe) in parts.items()
            ]
            return items + self._alive_calls(w.pod, {s for s in parts})
        if w.kind == "purge":
            return [(sh, False, (b"purge", w.pod, 0, self._writer, w.token)) for sh in shards]
        eb = w.packed[1] if w.packed is not None else _pack(w.ehs or ())
        write = (_WRITE_CODES[w.kind], w.pod, w.tier, b"", eb, b"", w.token)
        return [(sh, True, write) for sh in shards]

    def _alive_calls(self, pod: str, busy: set[int]) -> list[tuple[_Shard, bool, tuple[Any, ...]]]:
        """On a cluster, tell the shards a write skipped that `pod` is alive (now and then)."""
        if self._ttl_ms == 0:
            return []
        now = time.monotonic()
        every = max(0.5, self._ttl_ms / 8000)
        with self._lock:
            if now - self._alive_at.get(pod, -every) < every:
                return []
            self._alive_at[pod] = now
            if len(self._alive_at) > 100_000:
                self._alive_at.clear()
        return [(sh, False, (b"alive", pod)) for i, sh in enumerate(self._shards) if i not in busy]

    def _combine(
        self, w: _Write, items: list[tuple[_Shard, bool, tuple[Any, ...]]], raws: list[Any]
    ) -> int | None:
        """The caller's result of one write from its items' answers."""
        for r in raws:
            if isinstance(r, redis.exceptions.ResponseError):
                self._write_failed(w, r)
            elif isinstance(r, bytes) and r.startswith(b"KVAWARE"):
                self._write_failed(w, redis.exceptions.ResponseError(r.decode("utf-8", "replace")))
        answers = [r for r in raws if not isinstance(r, BaseException)]
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
                    self._finish_purge(shard, pid)
            return dropped
        known = 0
        bits = [bytes(r) for r in answers if not bytes(r).startswith(b"KVAWARE")]
        if len(bits) == 1:
            known = bits[0].count(49)
        elif bits:  # a cluster: known where any shard knows it
            known = sum(1 for col in zip(*bits, strict=True) if 49 in col)
        if w.kind == "add_tier":
            return len(w.ehs or ()) - known
        return known

    def _fallback(self, w: _Write) -> int | None:
        """The result of a write not applied yet (buffered, or refused): not known."""
        return None

    def _apply(self, ops: Sequence[_Write], strict: bool = True) -> list[int | None]:
        """Send writes now (one round trip); raises the unavailability errors.

        `strict`: a write the script refuses raises `ValueError` (else it is counted and
        logged, and its result is the fallback).

        The batched writes of each shard travel in ``w`` calls (one per shard unless a purge
        on that shard comes between two writes), in the order the writes were made.
        """
        self._connection()
        plans = [self._plan(w) for w in ops]
        calls: list[tuple[_Shard, tuple[Any, ...]]] = []
        where: list[list[tuple[int, int]]] = []  # per op, per item: (call, position or -1)
        open_call: dict[bytes, tuple[int, list[Any]]] = {}
        size, pcs = self._shard_size(), self.config.pod_cache_size
        for plan in plans:
            spots = []
            for shard, batched, args in plan:
                if batched:
                    cur = open_call.get(shard.prefix)
                    if cur is None:
                        argv: list[Any] = [b"w", size, pcs, self._writer]
                        cur = open_call[shard.prefix] = (len(calls), argv)
                        calls.append((shard, ()))
                    spots.append((cur[0], (len(cur[1]) - 4) // 7))
                    cur[1].extend(args)
                else:
                    closed = open_call.pop(shard.prefix, None)
                    if closed is not None:
                        calls[closed[0]] = (shard, tuple(closed[1]))
                    spots.append((len(calls), -1))
                    calls.append((shard, args))
            where.append(spots)
        for idx, argv in open_call.values():
            calls[idx] = (calls[idx][0], tuple(argv))
        if len(calls) == 1:
            try:
                raws: list[Any] = [self._eval(calls[0][0], *calls[0][1])]
            except redis.exceptions.ResponseError as exc:
                if isinstance(exc, _UNAVAILABLE) or _transient(exc) or _oom(exc):
                    raise
                raws = [exc]
        else:
            raws = self._pipeline(calls)
            for r in raws:
                if isinstance(r, _UNAVAILABLE) or _transient(r) or _oom(r):
                    raise r
        self._mark_up()
        self._accepted()
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
                with self._lock:
                    self._counters["failed_writes"] += 1
                logger.warning("Redis index refused a %s of %s: %s", w.kind, w.pod, exc)
                out.append(self._fallback(w))
        return out

    def _submit(self, ops: list[_Write], strict: bool = True) -> list[int | None]:
        """Apply writes now if Redis answers, else buffer them (in order)."""
        if not ops:
            return []
        self._ensure_worker()
        if self._buffer and self._available() and self._writable():
            self._drain()
        if self._buffer or not self._available() or not self._writable():
            self._enqueue(ops)
            return [self._fallback(w) for w in ops]
        try:
            return self._apply(ops, strict)
        except _UNAVAILABLE_OR_REPLY as exc:
            if _oom(exc):
                self._refuse(exc)
            elif not isinstance(exc, _UNAVAILABLE) and not _transient(exc):
                raise
            else:
                self._mark_down(exc)
            self._enqueue(ops)
            return [self._fallback(w) for w in ops]

    # -- write-behind -------------------------------------------------------------------------

    def _queue_batch(
        self, wb: WriteBatch, on_done: Callable[[list[int | None] | Exception], None]
    ) -> None:
        """Hand a batch to the writer thread (waits while `_WRITE_BEHIND` batches queue)."""
        with self._wcond:
            while len(self._wqueue) >= _WRITE_BEHIND and not self._wstop:
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

    def _write_jobs(
        self, jobs: list[tuple[WriteBatch, Callable[[list[int | None] | Exception], None]]]
    ) -> None:
        ops = [op for wb, _ in jobs for op in wb._ops]
        outcome: list[int | None] | Exception
        try:
            outcome = self._submit(ops, strict=False)
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

    def _quiesce(self) -> None:
        """Wait until the batches queued for the writer thread are applied (callers that read
        or write after them see their effects), unless called by that thread."""
        if self._wthread is None or threading.current_thread() is self._wthread:
            return
        with self._wcond:
            while self._wqueue or self._winflight:
                self._wcond.wait()

    def _write_failed(self, w: _Write, exc: BaseException) -> None:
        msg = str(exc)
        if "KVAWARE" in msg:
            raise ValueError(msg.split("KVAWARE", 1)[1].strip()) from None
        with self._lock:
            self._counters["failed_writes"] += 1
            self._mark_diverged((w.pod,))
        logger.warning("Redis index dropped a %s of %s: %s", w.kind, w.pod, msg)

    def _enqueue(self, ops: list[_Write]) -> None:
        limit = self.config.max_buffered_writes
        dropped = 0
        with self._lock:
            if limit == 0:
                dropped = len(ops)
                self._mark_diverged(w.pod for w in ops)
            else:
                for w in ops:
                    if len(self._buffer) >= limit:
                        old = self._buffer.popleft()
                        self._unbuffer(old)
                        self._mark_diverged((old.pod,))
                        dropped += 1
                    w.seq = next(self._seq)
                    self._buffer.append(w)
                    if w.kind in ("add", "add_new"):
                        for eh, ks in iter_groups(w.keys, w.ehs):
                            self._pending[(w.pod, eh)] = (ks[-1], w.seq)
                self._counters["buffered_writes"] += len(ops)
            self._counters["dropped_writes"] += dropped
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

    def _unbuffer(self, w: _Write) -> None:
        """Forget what `w` (leaving the buffer) told `resolve`, unless a later write did too.

        NOTE: keeps the map as bounded as the buffer through an outage of any length.
        """
        if w.kind not in ("add", "add_new"):
            return
        pending = self._pending
        for eh, _ks in iter_groups(w.keys, w.ehs):
            hit = pending.get((w.pod, eh))
            if hit is not None and hit[1] == w.seq:
                del pending[(w.pod, eh)]

    def _drain(self) -> bool:
        """Replay buffered writes in order; returns whether the buffer is now empty."""
        with self._flush_lock:
            while True:
                with self._lock:
                    batch = list(itertools.islice(self._buffer, _REPLAY_BATCH))
                    if not batch:
                        self._pending.clear()
                        return True
                if not self._available() or not self._writable():
                    return False
                try:
                    self._apply_replayed(batch)
                except _UNAVAILABLE_OR_REPLY as exc:
                    if _oom(exc):
                        self._refuse(exc)
                        return False
                    if not isinstance(exc, _UNAVAILABLE) and not _transient(exc):
                        raise
                    self._mark_down(exc)
                    return False
                with self._lock:
                    last = batch[-1].seq
                    while self._buffer and self._buffer[0].seq <= last:
                        self._unbuffer(self._buffer.popleft())
                    self._counters["replayed_writes"] += len(batch)

    def _apply_replayed(self, batch: list[_Write]) -> None:
        try:
            self._apply(batch)
        except ValueError as exc:
            # NOTE: a replayed write the server refuses (e.g. a 17th tier) must not block
            # the writes queued behind it.
            logger.warning("Redis index dropped a replayed write: %s", exc)

    def flush(self) -> bool:
        """Apply queued batches and replay buffered writes now. Returns whether none are left."""
        self._quiesce()
        return self._drain()

    def add(
        self,
        pod: str,
        keys: Sequence[int],
        engine_hashes: Sequence[int] | None = None,
        tier: str | None = None,
    ) -> None:
        op = self._add_op("add", pod, keys, engine_hashes, tier)
        if op is not None:
            self._quiesce()
            self._submit([op])

    def add_new(
        self,
        pod: str,
        keys: Sequence[int],
        engine_hashes: Sequence[int] | None = None,
        tier: str | None = None,
    ) -> int:
        op = self._add_op("add_new", pod, keys, engine_hashes, tier)
        if op is None:
            return 0
        self._quiesce()
        return self._submit([op])[0] or 0

    def add_tier(self, pod: str, engine_hashes: Sequence[int], tier: str | None) -> int:
        if not engine_hashes:
            return 0
        op = self._tier_op("add_tier", pod, engine_hashes, tier)
        self._quiesce()
        return self._submit([op])[0] or 0

    def remove(self, pod: str, engine_hashes: Sequence[int], tier: str | None = None) -> int:
        if not engine_hashes:
            return 0
        op = self._tier_op("remove", pod, engine_hashes, tier)
        self._quiesce()
        return self._submit([op])[0] or 0

    def purge(self, pod: str) -> int:
        self._quiesce()
        return self._submit([self._purge_op(pod)])[0] or 0

    def references(self, pod: str) -> dict[str, dict[int, int]]:
        """Tier -> engine hash -> references `pod` holds (see `KVBlockIndex.references`).

        Raises:
            BackendUnavailableError: Redis is unreachable.
        """
        self._quiesce()
        out: dict[str, dict[int, int]] = {}
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
                eh = int.from_bytes(ehs[i : i + 8], "little")
                # NOTE: an engine block whose keys span shards is reported by each of them
                refs[eh] = max(refs.get(eh, 0), c)
        return out

    @contextmanager
    def batch(
        self, on_done: Callable[[list[int | None] | Exception], None] | None = None
    ) -> Iterator[WriteBatch]:
        """Collect writes and send them in one round trip when the block exits.

        Args:
            on_done: Write behind: the batch is handed to this index's writer thread when the
                block exits, and `on_done` is called there with its results (or the exception
                that stopped it) once applied. Batches are applied in order (several that
                queue up travel together), at most `_WRITE_BEHIND` wait, and this index's
                `resolve`, `references`, `purge` and direct writes wait for them first.
                Lookups do not wait. `on_done` must not call this index.

        Example:
            >>> with index.batch() as b:  # doctest: +SKIP
            ...     b.add(pod, keys, hashes)
            ...     b.remove(pod, old_hashes)
            >>> b.results  # doctest: +SKIP
            [None, 3]
        """
        wb = WriteBatch(self)
        yield wb
        if on_done is not None:
            self._queue_batch(wb, on_done)
            return
        self._quiesce()
        wb._finish()

    def _finish_purge(self, shard: _Shard, pid: int) -> None:
        """Drop a purged pod's records block by block (short script calls)."""
        try:
            while self._eval(shard, b"purge_step", pid, _PURGE_BUDGET):
                pass
        except _UNAVAILABLE as exc:
            # NOTE: the pod is already invisible; the next maintenance round finishes it.
            self._mark_down(exc)

    def add_speculative(self, pod: str, keys: Sequence[int], ttl: float) -> None:
        if not keys or ttl <= 0:
            return
        _pack(keys)
        ms = max(1, int(ttl * 1000))
        # NOTE: speculative entries live for seconds: replaying them later is pointless, so
        # they are dropped (and counted) rather than buffered while Redis is unreachable.
        if self._available():
            try:
                self._connection()
                n = len(self._shards)
                parts: dict[int, list[int]] = {}
                for k in keys:
                    parts.setdefault(k % n, []).append(k)
                calls = [
                    (self._shards[s], (b"spec", pod, _pack(ks), ms)) for s, ks in parts.items()
                ]
                if len(calls) == 1:
                    self._eval(calls[0][0], *calls[0][1])
                else:
                    for r in self._pipeline(calls):
                        if isinstance(r, BaseException):
                            raise r
                self._mark_up()
                return
            except _UNAVAILABLE as exc:
                self._mark_down(exc)
            except redis.exceptions.RedisError as exc:
                logger.warning("speculative insert for %s failed: %s", pod, exc)
        with self._lock:
            self._counters["dropped_speculative"] += 1

    # -- reads ------------------------------------------------------------------------------

    def lookup(
        self, keys: Sequence[int], pods: Collection[str] | None = None
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
            self._connection()
            shards = self._shards
            size = self._shard_size()
            if len(shards) == 1:
                blob = _key_names(shards[0].prefix, keys)
                raw = self._eval(shards[0], b"lookup", blob, mode, size, *names)
                return [], [raw]
            n = len(shards)
            positions: dict[int, list[int]] = {}
            for i, k in enumerate(keys):
                positions.setdefault(k % n, []).append(i)
            order = list(positions)
            items = [
                (
                    shards[s],
                    (
                        b"lookup",
                        _key_names(shards[s].prefix, [keys[i] for i in positions[s]]),
                        mode,
                        size,
                        *names,
                    ),
                )
                for s in order
            ]
            raws = self._pipeline(items)
            for r in raws:
                if isinstance(r, BaseException):
                    raise r
            return [positions[s] for s in order], raws

        where, raws = self._guarded("lookup", run)
        try:
            if not where:
                out: dict[str, PodMatch] = {}
                self._decode_lookup(raws[0], out)
                return out
            return self._merge_lookup(len(keys), where, raws)
        except (msgspec.DecodeError, TypeError, ValueError, IndexError) as exc:
            # NOTE: e.g. another kvaware version's script answering: never crash the caller.
            with self._lock:
                self._counters["backend_errors"] += 1
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
        if len(self._best) > 4096:
            self._best.clear()
        self._best[key] = found
        return found

    def resolve(self, pod: str, engine_hash: int) -> int | None:
        """The key of the last block `engine_hash` covers on `pod` (see `KVBlockIndex`).

        While writes are buffered, keys those writes would add resolve from the buffer.

        Raises:
            BackendUnavailableError: Redis is unreachable and the buffer does not know it.
        """
        self._quiesce()
        if self._buffer:
            if self._available():
                self._drain()
            if self._buffer:
                with self._lock:
                    hit = self._pending.get((pod, engine_hash))
                if hit is not None:
                    return hit[0]
        for raw in self._each_shard("resolve", b"resolve", pod, _pack([engine_hash])):
            if raw is not None:
                return int.from_bytes(raw, "little")
        return None

    def _each_shard(self, what: str, *args: Any) -> list[Any]:
        """One read call on every shard (one round trip); the replies in shard order.

        Raises:
            BackendUnavailableError: Redis is unreachable or a shard answered an error.
        """

        def run() -> list[Any]:
            self._connection()
            shards = self._shards
            if len(shards) == 1:
                return [self._eval(shards[0], *args)]
            raws = self._pipeline([(s, args) for s in shards])
            for r in raws:
                if isinstance(r, BaseException):
                    raise r
            return raws

        return self._guarded(what, run)

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
        with self._lock:
            extra: dict[str, float] = {k: float(v) for k, v in self._counters.items()}
            extra["buffered_now"] = float(len(self._buffer))
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
        pods = len(names)
        spec, queue, entries, blocks, evictions, emaps, expired = (
            sum(int(p[i]) for p in parts) for i in range(1, 8)
        )
        extra["queue"] = float(queue)
        extra["expired"] = float(expired)
        st = IndexStats(
            backend=self.backend,
            blocks=blocks,
            entries=entries,
            pods=pods,
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
        cfg = self.config
        tick = min(cfg.retry_interval, cfg.maintenance_interval, 0.5)
        next_maint = time.monotonic() + cfg.maintenance_interval
        while not self._stop.wait(tick):
            try:
                if self._buffer and self._available() and self._writable():
                    self._drain()
                now = time.monotonic()
                if now >= next_maint and not self._buffer and self._available() and self._shards:
                    next_maint = now + cfg.maintenance_interval
                    self.maintain()
            except _UNAVAILABLE as exc:
                self._mark_down(exc)
            except Exception:
                logger.exception("Redis index maintenance failed")

    def maintain(self) -> None:
        """One maintenance round: expire idle blocks, purge pods gone quiet, finish purges.

        Writers run it in the background every ``maintenance_interval`` seconds.
        """
        interval_ms = int(self.config.maintenance_interval * 1000)
        size = self._shard_size()
        for shard in list(self._shards):
            quiet, pending, _expired = msgspec.msgpack.decode(
                self._eval(shard, b"maint", interval_ms, size)
            )
            for pid in quiet:
                dropped, got = (int(x) for x in self._eval(shard, b"purge", b"", pid))
                if got:
                    logger.info(
                        "purged a pod quiet for over %ss (id %d, %d entries)",
                        self._ttl_ms / 1000,
                        got,
                        dropped,
                    )
                    with self._lock:
                        self._counters["quiet_pods_purged"] += 1
                    self._finish_purge(shard, got)
            for pid in pending:
                self._finish_purge(shard, int(pid))

    def close(self) -> None:
        """Apply queued batches, stop the background threads, replay what is buffered if Redis
        answers, disconnect."""
        with self._wcond:
            self._wstop = True
            self._wcond.notify_all()
        w = self._wthread
        if w is not None and w is not threading.current_thread():
            w.join(timeout=30)
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        if self._buffer and self._available():
            try:
                self._drain()
            except Exception:  # pragma: no cover - best effort on shutdown
                logger.exception("Redis index could not replay buffered writes on close")
        if self._buffer:
            logger.warning("Redis index closed with %d writes not applied", len(self._buffer))
        client = self._client
        self._client = None
        while self._idle:
            conn = self._idle.pop()
            if client is not None:
                client.connection_pool.release(conn)
            else:  # pragma: no cover - no client, no borrowed connection
                conn.disconnect()
        if client is not None:
            client.close()
