"""What the Redis backend knows about its server's health, shared by the writer and the reads.

`Health` tracks three episodes and the counters reported in ``stats().extra``:

* **unreachable** (`mark_down` / `mark_up`): reads fail fast until ``retry_interval`` passes,
  writes are buffered; each episode is logged once, at its start and at its end.
* **refusing writes** (`refuse` / `accepted`): Redis answers but is out of memory; reads go
  on, writes are buffered and retried after ``retry_interval``.
* **lost data** (`check_boot`, `mark_diverged`, `take_diverged`): a server that comes back
  empty (restarted, flushed) or writes that never reached it leave pods whose index entries
  differ from their KV events; the event ingestor asks for them and rebuilds them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from kvaware_scorer.config import RedisIndexConfig

__all__ = ["MAX_TRACKED_PODS", "Health"]

# NOTE: every module of the backend logs under the package's name, the one operators set.
logger = logging.getLogger(__name__.rpartition(".")[0])

#: Pods remembered as written (to resync after a restart lost the data) or diverged.
MAX_TRACKED_PODS = 100_000


class Health:
    """Availability, refusal and data-loss state of one Redis index (see the module docstring).

    Args:
        config: The address (for log lines), ``retry_interval`` and ``max_buffered_writes``.
        buffered: How many writes wait in the writer's buffer now.
        on_down: Called (under `lock`) each time Redis is found unreachable.

    Attributes:
        lock: Guards the counters, the pod sets and (shared with the writer) its buffer.
        counters: Write-path counters reported in ``stats().extra``.
    """

    def __init__(
        self,
        config: RedisIndexConfig,
        buffered: Callable[[], int],
        on_down: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.lock = threading.Lock()
        self._buffered = buffered
        self._on_down = on_down
        self._down_until = 0.0
        self._down_since: float | None = None
        # writes refused for memory: retried (reads go on) after `retry_interval`
        self._refused_until = 0.0
        self._refused_since: float | None = None
        # pods some of whose writes never reached Redis (see `take_diverged`)
        self._diverged: set[str] = set()
        self._written: set[str] = set()
        self._boot: bytes | None = None
        self.counters: dict[str, int] = {
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

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n

    # -- reachability -------------------------------------------------------------------------

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def retry_in(self) -> float:
        """Seconds until the next try after Redis went unreachable (<= 0: try now)."""
        return self._down_until - time.monotonic()

    def mark_down(self, exc: BaseException) -> None:
        """Redis is unreachable: count it, back off for ``retry_interval``, log the start."""
        with self.lock:
            self.counters["backend_errors"] += 1
            self._down_until = time.monotonic() + self.config.retry_interval
            if self._on_down is not None:
                self._on_down()
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
        if first:
            logger.warning("Redis index at %s unavailable: %s", self.config.address, exc)

    def mark_up(self, client: Any) -> None:
        """Redis answered: end an unreachable episode (and check the server kept our data)."""
        if self._down_since is None:
            return
        with self.lock:
            since = self._down_since
            self._down_since = None
            self._down_until = 0.0
        if since is not None:
            logger.warning(
                "Redis index at %s reachable again after %.1fs (%d writes buffered)",
                self.config.address,
                time.monotonic() - since,
                self._buffered(),
            )
            # NOTE: another process may have reloaded the script after a restart, so a missing
            # script cannot be relied on to reveal lost data: check the marker on every return.
            if client is not None:
                try:
                    self.check_boot(client)
                except redis.exceptions.RedisError as exc:
                    logger.debug("Redis index: dataset marker not checked (%s)", exc)

    # -- refused writes -----------------------------------------------------------------------

    def writable(self) -> bool:
        return time.monotonic() >= self._refused_until

    def refuse(self, exc: BaseException) -> None:
        """Redis refused writes for memory: keep them buffered and retry after
        `retry_interval` (lookups go on meanwhile). Logged once per episode."""
        with self.lock:
            self.counters["refused_writes"] += 1
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

    def accepted(self) -> None:
        """Writes went through again after a refusal episode."""
        if self._refused_since is None:
            return
        with self.lock:
            since, self._refused_since = self._refused_since, None
            self._refused_until = 0.0
        if since is not None:
            logger.warning(
                "Redis index at %s accepts writes again after %.1fs",
                self.config.address,
                time.monotonic() - since,
            )

    # -- lost data ----------------------------------------------------------------------------

    def check_boot(self, client: Any) -> None:
        """Tell whether the server still holds what we wrote (run when the script must be
        loaded: first use, or after a restart or a script flush).

        A marker key is created once per dataset; a server that answers with another marker
        (or none) lost the data we wrote (restarted empty, or flushed): every pod we wrote for
        is then diverged, and the ingestor rebuilds it (see `take_diverged`).
        """
        key = self.config.key_prefix.encode("utf-8") + b"boot"
        try:
            client.set(key, os.urandom(8).hex(), nx=True)
            marker = client.get(key)
        except redis.exceptions.ResponseError as exc:  # e.g. OOM: checked at the next load
            logger.debug("Redis index: no dataset marker (%s)", exc)
            return
        if self._boot is not None and marker != self._boot:
            with self.lock:
                lost = set(self._written)
                self._diverged |= lost
                self.counters["data_lost"] += 1
            logger.warning(
                "Redis index at %s lost its data (restarted empty or flushed): %d pods will "
                "be rebuilt from their KV events",
                self.config.address,
                len(lost),
            )
        self._boot = marker

    def track(self, pod: str) -> None:
        """Remember that we wrote for `pod` (bounded), to rebuild it if the data is lost."""
        written = self._written
        if pod not in written and len(written) < MAX_TRACKED_PODS:
            written.add(pod)

    def mark_diverged(self, pods: Iterable[str]) -> None:
        """Record pods whose writes were lost (bounded; caller holds `lock`)."""
        for pod in pods:
            if len(self._diverged) < MAX_TRACKED_PODS:
                self._diverged.add(pod)

    def take_diverged(self) -> set[str]:
        """The diverged pods, once Redis takes writes again and nothing is buffered; then
        forgotten (see `RedisIndex.take_diverged`)."""
        if not self._diverged or self._buffered() or not self.available() or not self.writable():
            return set()
        with self.lock:
            out, self._diverged = self._diverged, set()
        return out
