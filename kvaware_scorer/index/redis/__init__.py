"""The Redis / Valkey `KVBlockIndex` backend: one index shared by writers and scoring replicas.

Every operation is one call of one Lua script (``redis.lua`` in this package) on one shard of
the index, so a prompt lookup is one round trip with the early stop done server-side, and
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

The modules, bottom up (each imports only those above it):

* ``resp`` -- the Redis protocol on a borrowed connection's socket (the hot path's one send).
* ``client`` -- `ScriptClient`: connections, the script, shards, cluster routing.
* ``health`` -- `Health`: unreachable / refusing-writes / lost-data episodes and counters.
* ``plan`` -- `Write` and `Planner`: writes as per-shard script calls, batched.
* ``writer`` -- `RedisWriter`: apply, outage buffer and replay, write behind; `WriteBatch`.
* ``index`` -- `RedisIndex`: lookups, resolve, stats, maintenance; wires the parts above.

Every module logs under this package's name (``kvaware_scorer.index.redis``).
"""

from __future__ import annotations

from kvaware_scorer.index.redis.client import redis_url, script_source
from kvaware_scorer.index.redis.index import RedisIndex
from kvaware_scorer.index.redis.writer import WriteBatch

#: The text of the Lua script (kept under its old private name for tools that load it).
_script_source = script_source

__all__ = ["RedisIndex", "WriteBatch", "redis_url"]
