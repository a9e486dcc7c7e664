"""The applying threads: order per pod, other pods not held up, bounded backlogs."""

from __future__ import annotations

import threading
import time

from kvaware_scorer.events.lanes import PodLanes


def test_a_stuck_pod_holds_neither_other_pods_nor_unbounded_memory() -> None:
    """While one pod's work waits for a slow replay, other pods' work runs at once (even with
    one applying turn), the stuck pod's backlog is capped, and its queued work then runs in
    order."""
    errors: list[int] = []
    lanes = PodLanes(2, 1, capacity=100, replay_backlog=3, on_error=lambda: errors.append(1))
    release = threading.Event()
    done: list[tuple[str, int]] = []
    try:
        started = threading.Event()

        def stuck() -> None:  # a frame whose replay trickles
            lanes.replaying("a", True)
            started.set()
            release.wait()
            lanes.replaying("a", False)

        assert lanes.submit("a", stuck)
        assert started.wait(5)
        accepted = [lanes.submit("a", lambda i=i: done.append(("a", i))) for i in range(5)]
        assert accepted == [True, True, True, False, False]
        t0 = time.monotonic()
        assert lanes.submit("b", lambda: done.append(("b", 0)))
        while ("b", 0) not in done:
            assert time.monotonic() - t0 < 2.0
            time.sleep(0.005)
        release.set()
        deadline = time.monotonic() + 5
        while len(done) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert [x for x in done if x[0] == "a"] == [("a", 0), ("a", 1), ("a", 2)]
        assert lanes.queued == 0
    finally:
        release.set()
        lanes.stop(2.0)
    assert errors == []


def test_work_that_raises_is_counted_and_the_pod_goes_on() -> None:
    """A callable that raises is counted; the pod's next work still runs."""
    errors: list[int] = []
    lanes = PodLanes(1, 1, capacity=10, replay_backlog=5, on_error=lambda: errors.append(1))
    ran = threading.Event()
    try:

        def boom() -> None:
            raise RuntimeError("bad frame")

        lanes.submit("a", boom)
        lanes.submit("a", ran.set)
        assert ran.wait(5)
    finally:
        lanes.stop(2.0)
    assert errors == [1]


def test_one_frame_wakes_one_pool_thread(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Idle pool threads stay asleep: a frame wakes the one thread that runs it (taking
    frames wakes only submitters waiting for room), so a frame costs one hand-off however
    large the pool."""
    wakes: list[str] = []

    class Counting(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            got = super().wait(timeout)
            wakes.append(threading.current_thread().name)
            return got

    monkeypatch.setattr(threading, "Condition", Counting)
    lanes = PodLanes(4, 2, capacity=100, replay_backlog=10, on_error=lambda: None)
    monkeypatch.undo()
    try:
        time.sleep(0.2)  # every pool thread waiting
        wakes.clear()
        for i in range(30):
            ran = threading.Event()
            assert lanes.submit(f"pod{i % 3}", ran.set)
            assert ran.wait(5)
            time.sleep(0.01)  # the thread back to waiting
        # one wake-up per frame (a spurious one now and then at most), not one per thread
        assert len(wakes) <= 36, len(wakes)
    finally:
        lanes.stop(2.0)


def test_frames_that_come_while_every_turn_is_taken_go_to_the_busy_thread() -> None:
    """With one applying turn, frames of other pods submitted while a thread applies do not
    wake the idle threads (they could only wait for the turn): the busy thread takes them
    when done, and a replay that gives the turn up still lets another thread take them."""
    lanes = PodLanes(3, 1, capacity=100, replay_backlog=10, on_error=lambda: None)
    ran: dict[str, str] = {}
    release = threading.Event()
    started = threading.Event()
    try:

        def slow() -> None:
            ran["a"] = threading.current_thread().name
            started.set()
            release.wait(5)

        assert lanes.submit("a", slow)
        assert started.wait(5)
        for pod in ("b", "c", "d"):
            assert lanes.submit(
                pod, lambda pod=pod: ran.update({pod: threading.current_thread().name})
            )
        time.sleep(0.1)  # a woken thread would have taken a pod by now (and waited for the turn)
        release.set()
        deadline = time.monotonic() + 5
        while len(ran) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert {ran[p] for p in "abcd"} == {ran["a"]}

        # a replay gives the turn up: another thread applies the other pods' frames meanwhile
        replay_started = threading.Event()
        replay_done = threading.Event()

        def replaying() -> None:
            lanes.replaying("a", True)
            replay_started.set()
            replay_done.wait(5)
            lanes.replaying("a", False)

        assert lanes.submit("a", replaying)
        assert replay_started.wait(5)
        other = threading.Event()
        assert lanes.submit("e", other.set)
        assert other.wait(5)
        replay_done.set()
    finally:
        release.set()
        lanes.stop(2.0)
