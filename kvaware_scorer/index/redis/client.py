"""The Redis backend's script client: connections, the Lua script, shards and cluster routing.

`ScriptClient` connects (lazily, on first use) to one server or a Redis Cluster, loads
``redis.lua`` (again after a restart or a script flush), knows the index's shards (one on a
single server; one hash tag per master on a cluster, stored in the cluster so every process
agrees) and runs script calls: one call, or many in one round trip (to several masters at
once on a cluster). It knows nothing of what the calls mean. Errors are redis-py's; the
helpers at the top classify them for callers (unreachable, try again later, out of memory).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import deque
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from kvaware_scorer.config import RedisIndexConfig
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.index.redis.resp import Wire, encode_command

__all__ = [
    "UNAVAILABLE",
    "UNAVAILABLE_OR_REPLY",
    "ScriptClient",
    "Shard",
    "oom",
    "redis_url",
    "script_source",
    "transient",
]

_LAYOUT_VERSION = "v1"

#: Errors that mean Redis is unreachable (or cannot serve now): reads fail fast, writes buffer.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.RedisClusterException,
    OSError,
)

#: `UNAVAILABLE` plus error replies (which `transient` and `oom` sort further).
UNAVAILABLE_OR_REPLY: tuple[type[BaseException], ...] = (
    *UNAVAILABLE,
    redis.exceptions.ResponseError,
)


def transient(exc: BaseException) -> bool:
    """A server reply that means "try again later" rather than "this write is wrong"."""
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(
        ("BUSY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "READONLY")
    )


def oom(exc: BaseException) -> bool:
    """Redis refused a write for memory (``maxmemory`` reached under ``noeviction``): the
    write is fine, the server cannot take it now."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and (
        "command not allowed when used memory" in str(exc)
    )


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


def script_source() -> str:
    """The text of ``redis.lua`` (shipped beside this module)."""
    return resources.files(__package__ or __name__).joinpath("redis.lua").read_text("utf-8")


class Shard(NamedTuple):
    """One shard of the index: its key prefix (with the hash tag on a cluster)."""

    prefix: bytes
    route: bytes


#: One script call: the shard it runs on and its arguments (operation name first).
Call = tuple[Shard, tuple[Any, ...]]


class ScriptClient:
    """Runs ``redis.lua`` calls on the index's shards (see the module docstring).

    Args:
        config: Address, credentials, timeouts, prefix, TTL, cluster settings.
        on_script_load: Called with the redis-py client each time the script had to be
            loaded (first use, or the server lost it: a restart or a flush).

    Thread-safe: connections are borrowed per call.
    """

    def __init__(
        self, config: RedisIndexConfig, on_script_load: Callable[[Any], None] | None = None
    ) -> None:
        self.config = config
        self.code = script_source()
        self.sha = hashlib.sha1(self.code.encode("utf-8")).hexdigest()
        self.ttl_ms = int(config.ttl_seconds * 1000)
        self.prefix = config.key_prefix.encode("utf-8")
        self.shards: list[Shard] = []
        self.script_ready = False
        self._on_script_load = on_script_load
        self._client: Any = None
        self._init_lock = threading.Lock()
        self._idle: deque[Any] = deque()  # connections kept for `_send_single`

    @property
    def client(self) -> Any:
        """The redis-py client, or None before the first connection (and after `close`)."""
        return self._client

    def shard_size(self) -> int:
        """Each shard's share of the configured capacity (0: unbounded)."""
        size = self.config.size
        shards = max(1, len(self.shards) if self.shards else self.config.cluster_shards or 1)
        return -(-size // shards) if size else 0

    def _client_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        kwargs: dict[str, Any] = {
            "socket_timeout": cfg.socket_timeout,
            "socket_connect_timeout": cfg.connect_timeout,
            # NOTE: no client-side retries: a lookup must fail within one timeout, and writes
            # are retried (in order) by the writer's own buffer.
            "retry": Retry(NoBackoff(), 0),
            "retry_on_timeout": False,
        }
        if cfg.username is not None:
            kwargs["username"] = cfg.username
        if cfg.password is not None:
            kwargs["password"] = cfg.password
        return kwargs

    def connect(self) -> Any:
        """The redis-py client, connected (and the shards known) on first use."""
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
                shards = [Shard(self.prefix, self.prefix + b"c")]
            self.shards = shards
            self._client = client
            return client

    def _cluster_layout(self, client: Any) -> list[Shard]:
        """Shard hash tags, created on first use (one per master) and stored in the cluster."""
        key = self.prefix + b"layout"
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
            prefix = self.prefix + b"{" + tag.encode("ascii") + b"}"
            shards.append(Shard(prefix, prefix + b"c"))
        return shards

    def load_script(self, client: Any) -> None:
        client.script_load(self.code)
        self.script_ready = True
        if self._on_script_load is not None:
            self._on_script_load(client)

    def _argv(self, shard: Shard, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.sha, 1, shard.route, args[0], shard.prefix, self.ttl_ms, *args[1:])

    def eval(self, shard: Shard, *args: Any) -> Any:
        """One script call (operation name, then its arguments); an error reply raises."""
        client = self.connect()
        if self.config.cluster:
            try:
                return client.evalsha(*self._argv(shard, args))
            except redis.exceptions.NoScriptError:
                self.load_script(client)
                return client.evalsha(*self._argv(shard, args))
        reply = self._send_single(client, [(shard, args)])[0]
        if isinstance(reply, redis.exceptions.NoScriptError):
            self.load_script(client)
            reply = self._send_single(client, [(shard, args)])[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _send_single(self, client: Any, items: Sequence[Call]) -> list[Any]:
        """Script calls on the single server in one round trip (errors returned).

        NOTE: connections are borrowed from redis-py's pool once and kept by this client (a
        pool checkout costs ~20 us: it polls the socket); `Wire` always reads whole replies
        or drops the connection, so a kept one is always ready.
        """
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = client.connection_pool.get_connection()
        try:
            wire = Wire(conn)
            wire.send(b"".join(encode_command(("EVALSHA", *self._argv(s, a))) for s, a in items))
            return wire.replies(len(items))
        finally:
            self._idle.append(conn)

    def pipeline(self, items: Sequence[Call]) -> list[Any]:
        """Run script calls in one round trip; per-call errors are returned, not raised."""
        client = self.connect()
        if not self.script_ready:
            self.load_script(client)
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
            self.load_script(client)
            todo = retry
        return results

    def pipeline_or_raise(self, items: Sequence[Call]) -> list[Any]:
        """`pipeline`, raising the first error reply (reads: one call if there is one)."""
        if len(items) == 1:
            return [self.eval(items[0][0], *items[0][1])]
        raws = self.pipeline(items)
        for r in raws:
            if isinstance(r, BaseException):
                raise r
        return raws

    def _cluster_send(self, client: Any, items: Sequence[Call]) -> list[Any]:
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
        sent: list[tuple[Any, Any, Wire, list[int]]] = []
        try:
            for name, idxs in by_node.items():
                r = nodes[name].redis_connection
                conn = r.connection_pool.get_connection()
                wire = Wire(conn)
                sent.append((r, conn, wire, idxs))
                wire.send(
                    b"".join(encode_command(("EVALSHA", *self._argv(*items[i]))) for i in idxs)
                )
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

    def close(self) -> None:
        """Give the kept connections back and disconnect."""
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
