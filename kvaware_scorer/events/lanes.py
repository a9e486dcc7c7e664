"""Per-pod ordered work on a small thread pool: the subscriber's applying threads.

Each pod's frames run in arrival order, one at a time, on whichever pool thread is free; other
pods' frames run meanwhile on the other threads. At most `active` threads apply frames at once
(the configured concurrency); a thread waiting for a replay gives its turn up meanwhile. A pod
stuck in a slow replay therefore holds one thread and its own queue, never the others' live
events (the pool has a thread per allowed concurrent replay on top of `active`).

Bounds: at most `capacity` frames wait in total (beyond it `submit` waits: back pressure on
the receiving thread, as a full ZMQ queue would give); a pod that is replaying may hold at
most `replay_backlog` of them, beyond which its frames are dropped (counted by the caller; the
gap they leave is recovered by the next replay). Pods without queued work keep no state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Final

__all__ = ["PodLanes"]

logger = logging.getLogger(__name__)

#: Frames a thread runs for one pod before letting the next pod in (fairness).
_SLICE: Final = 64


class PodLanes:
    """Runs callables per pod, in order per pod, on `threads` threads.

    Args:
        threads: Pool threads.
        active: Most threads running callables at once (a thread inside `replaying` does not
            count).
        capacity: Most callables waiting in total.
        replay_backlog: Most callables waiting for a pod marked as replaying.
        on_error: Called (on the pool thread) with nothing when a callable raised; the
            exception is logged here.
        name: Thread name prefix.
    """

    def __init__(
        self,
        threads: int,
        active: int,
        capacity: int,
        replay_backlog: int,
        on_error: Callable[[], None],
        name: str = "kvaware-kv-apply",
    ) -> None:
        self._capacity = capacity
        self._replay_backlog = max(1, replay_backlog)
        self._on_error = on_error
        # NOTE: one lock, two conditions: a frame wakes one pool thread, and only a submitter
        # waiting for room is woken when frames are taken. With one condition, taking frames
        # woke every idle pool thread to find nothing (three wake-ups and GIL hand-offs per
        # frame, most of the appliers' CPU).
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # work is ready (pool threads wait)
        self._room = threading.Condition(lock)  # the queue has room (submitters wait)
        self._pending: dict[str, deque[Callable[[], None]]] = {}
        self._ready: deque[str] = deque()
        self._active: set[str] = set()
        self._replaying: dict[str, int] = {}
        self._queued = 0
        self._stopped = False
        self._active_limit = active
        # NOTE: threads holding work (taken from `_ready`, not in a replay). A frame wakes a
        # thread only while fewer than `active` do: a busy thread takes the next ready pod
        # itself once done (warm, without a wake-up and a GIL hand-off per frame), and a
        # thread woken beyond `active` would only wait for a turn.
        self._busy = 0
        self._slots = threading.Semaphore(active)
        self._local = threading.local()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    @property
    def queued(self) -> int:
        """Callables waiting now."""
        return self._queued

    def submit(self, pod: str, work: Callable[[], None]) -> bool:
        """Queue `work` after `pod`'s earlier work. Returns False when it was dropped (the pod is
        replaying and its backlog is full, or the lanes are stopped)."""
        with self._cond:
            while True:
                if self._stopped:
                    return False
                dq = self._pending.get(pod)
                if pod in self._replaying and dq is not None and len(dq) >= self._replay_backlog:
                    return False
                if self._queued < self._capacity:
                    break
                self._room.wait(0.1)
            if dq is None:
                dq = self._pending[pod] = deque()
            dq.append(work)
            self._queued += 1
            if pod not in self._active:
                self._active.add(pod)
                self._ready.append(pod)
                if self._busy < self._active_limit:
                    self._cond.notify()
        return True

    def replaying(self, pod: str, on: bool) -> None:
        """Mark (or unmark) `pod` as replaying: its backlog is then bounded by `replay_backlog`.
        Called on a pool thread, the thread gives its turn to apply up while the replay runs
        (and waits for one again after)."""
        holding = getattr(self._local, "slot", None)
        with self._cond:
            n = self._replaying.get(pod, 0) + (1 if on else -1)
            if n > 0:
                self._replaying[pod] = n
            else:
                self._replaying.pop(pod, None)
            if holding is not None and on == bool(holding):
                # a pool thread leaving (or rejoining) the applying threads for a replay
                self._busy += -1 if on else 1
                if on and self._ready:
                    self._cond.notify()  # its turn is free for another pod
        if holding is None:
            return  # not a pool thread
        if on and holding:
            self._local.slot = False
            self._slots.release()
        elif not on and not holding:
            self._take_slot()
            self._local.slot = True

    def _take_slot(self) -> bool:
        """Wait for a turn to apply; False when the lanes stopped meanwhile."""
        while not self._stopped:
            if self._slots.acquire(timeout=0.1):
                return True
        return False

    def stop(self, timeout: float) -> None:
        """Stop the threads; work still queued is dropped (bounded by `timeout`)."""
        with self._cond:
            self._stopped = True
            self._pending.clear()
            self._ready.clear()
            self._queued = 0
            self._cond.notify_all()
            self._room.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._ready and not self._stopped:
                    cond.wait()
                if self._stopped:
                    return
                pod = self._ready.popleft()
                self._busy += 1
                dq = self._pending.get(pod)
                items: list[Callable[[], None]] = []
                while dq and len(items) < _SLICE:
                    items.append(dq.popleft())
                self._queued -= len(items)
                self._room.notify_all()  # room for waiting submitters (none: no wake-up)
            if not self._take_slot():
                return
            self._local.slot = True
            try:
                for item in items:
                    try:
                        item()
                    except Exception:
                        self._on_error()
                        logger.exception("KV-event apply error (continuing)")
                    # NOTE: hand the GIL to waiting threads (the scheduler's score calls) after
                    # every frame rather than after CPython's 5 ms switch interval.
                    time.sleep(0)
            finally:
                if self._local.slot:
                    self._slots.release()
                self._local.slot = None
            with cond:
                self._busy -= 1
                dq = self._pending.get(pod)
                if dq:
                    self._ready.append(pod)  # this thread looks at `_ready` next
                else:
                    self._pending.pop(pod, None)
                    self._active.discard(pod)
