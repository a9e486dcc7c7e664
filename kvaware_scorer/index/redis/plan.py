"""How the Redis backend's writes become script calls: packing, shard planning, batching.

A `Write` is one operation as the caller made it (and as the outage buffer keeps it). The
`Planner` turns a list of writes into script calls: each write's part of each shard it touches
(blocks are sharded by key on a cluster), batched so that one ``w`` call per shard carries the
writes of a whole batch in order (a purge on a shard closes that shard's open ``w`` call).
The argument layouts are those of ``redis.lua``.
"""

from __future__ import annotations

import array
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvaware_scorer.index.base import iter_groups
from kvaware_scorer.index.redis.client import Call, ScriptClient, Shard
from kvaware_scorer.keys import BlockKey, EngineHash

__all__ = ["WRITE_CODES", "Planner", "Write", "key_names", "pack"]

#: Script call kinds of the writes (one ``w`` call per shard carries a batch of them).
WRITE_CODES = {"add": b"a", "add_new": b"n", "remove": b"r", "add_tier": b"t"}
#: Pods whose last liveness call is remembered (the map is cleared beyond this).
_MAX_ALIVE_PODS = 100_000

#: One planned script item: (shard, carried by the batch's ``w`` call, arguments).
Item = tuple[Shard, bool, tuple[Any, ...]]


def pack(values: Sequence[int]) -> bytes:
    """Unsigned 64-bit little-endian packing of keys or engine hashes."""
    try:
        arr = array.array("Q", values)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"block keys and hashes must be ints in [0, 2**64): {exc}") from None
    if sys.byteorder == "big":  # pragma: no cover - no big-endian CI
        arr.byteswap()
    return arr.tobytes()


def key_names(prefix: bytes, keys: Sequence[BlockKey]) -> bytes:
    """Block key names (``prefix + b"b" + 8 bytes``) of `keys`, concatenated."""
    names = np.empty(len(keys), dtype=[("p", f"S{len(prefix) + 1}"), ("k", "<u8")])
    names["p"] = prefix + b"b"
    names["k"] = np.frombuffer(pack(keys), dtype="<u8")
    return names.tobytes()


@dataclass(slots=True)
class Write:
    """A write operation as the caller made it (kept as such while Redis is unreachable)."""

    kind: str
    pod: str
    keys: Sequence[BlockKey] = ()
    ehs: Sequence[EngineHash] | None = None
    tier: str = ""
    seq: int = -1
    packed: tuple[bytes, bytes] | None = None  # keys and engine hashes, as sent
    token: bytes = b""  # this write's id among its index's writes (see `RedisWriter.token`)


class Planner:
    """Plans writes onto the shards of one index (see the module docstring).

    Args:
        wire: The script client (its shards, TTL and shard size).
        writer_id: This process's writer id (the script applies a token once per writer).
    """

    def __init__(self, wire: ScriptClient, writer_id: bytes) -> None:
        self._wire = wire
        self.writer_id = writer_id
        self._lock = threading.Lock()
        self._alive_at: dict[str, float] = {}

    def calls(self, ops: Sequence[Write]) -> tuple[list[list[Item]], list[Call], list[Any]]:
        """The script calls of `ops`, in order.

        Returns:
            Per op its items; the calls; per op, per item, ``(call index, position in the
            call's ``w`` batch or -1)`` to find the item's answer.
        """
        plans = [self.plan(w) for w in ops]
        calls: list[Call] = []
        where: list[list[tuple[int, int]]] = []
        open_call: dict[bytes, tuple[int, list[Any]]] = {}
        size, pcs = self._wire.shard_size(), self._wire.config.pod_cache_size
        for plan in plans:
            spots = []
            for shard, batched, args in plan:
                if batched:
                    cur = open_call.get(shard.prefix)
                    if cur is None:
                        argv: list[Any] = [b"w", size, pcs, self.writer_id]
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
        return plans, calls, where

    @staticmethod
    def _add_write(
        w: Write,
        keys: Sequence[BlockKey],
        ehs: Sequence[EngineHash] | None,
        foreign: bytes = b"",
        packed: tuple[bytes, bytes] | None = None,
    ) -> tuple[bytes, str, str, bytes, bytes, bytes, bytes]:
        """The script's arguments of one store (see ``w`` in redis.lua)."""
        plain = (
            not foreign
            and len(set(keys)) == len(keys)
            and (ehs is None or len(set(ehs)) == len(ehs))
        )
        kb, eb = packed if packed is not None else (pack(keys), b"" if ehs is None else pack(ehs))
        flags = b"1" if plain else b"0" + foreign
        return (WRITE_CODES[w.kind], w.pod, w.tier, kb, eb, flags, w.token)

    def plan(self, w: Write) -> list[Item]:
        """The script work of one write: ``(shard, batched, args)`` per shard it touches.

        Batched items are writes that one ``w`` call per shard carries for the whole batch;
        the others (purges, liveness) are script calls of their own.
        """
        shards = self._wire.shards
        n = len(shards)
        if w.kind in ("add", "add_new"):
            if n == 1:
                return [(shards[0], True, self._add_write(w, w.keys, w.ehs, packed=w.packed))]
            return self._plan_sharded_add(w, shards)
        if w.kind == "purge":
            return [(sh, False, (b"purge", w.pod, 0, self.writer_id, w.token)) for sh in shards]
        eb = w.packed[1] if w.packed is not None else pack(w.ehs or ())
        write = (WRITE_CODES[w.kind], w.pod, w.tier, b"", eb, b"", w.token)
        return [(sh, True, write) for sh in shards]

    def _plan_sharded_add(self, w: Write, shards: list[Shard]) -> list[Item]:
        """A store on a cluster: each shard gets its keys; an engine block whose keys span
        shards is named to the other shards as ``foreign`` (engine hash, last key) pairs."""
        n = len(shards)
        parts: dict[int, tuple[list[BlockKey], list[EngineHash]]] = {}
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
                foreign.setdefault(s, []).append(pack([eh, last]))
        items: list[Item] = [
            (
                shards[s],
                True,
                self._add_write(w, pk, None if w.ehs is None else pe, b"".join(foreign.get(s, ()))),
            )
            for s, (pk, pe) in parts.items()
        ]
        return items + self._alive_calls(w.pod, set(parts))

    def _alive_calls(self, pod: str, busy: set[int]) -> list[Item]:
        """On a cluster, tell the shards a write skipped that `pod` is alive (now and then)."""
        ttl_ms = self._wire.ttl_ms
        if ttl_ms == 0:
            return []
        now = time.monotonic()
        every = max(0.5, ttl_ms / 8000)
        with self._lock:
            if now - self._alive_at.get(pod, -every) < every:
                return []
            self._alive_at[pod] = now
            if len(self._alive_at) > _MAX_ALIVE_PODS:
                self._alive_at.clear()
        return [
            (sh, False, (b"alive", pod)) for i, sh in enumerate(self._wire.shards) if i not in busy
        ]
