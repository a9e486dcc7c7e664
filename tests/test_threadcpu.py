"""CPU seconds by thread group (`kvaware_scorer.threadcpu`), read from /proc on Linux."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kvaware_scorer.threadcpu import (
    MAX_GROUPS,
    ThreadCPUCollector,
    register_thread_cpu,
    thread_group,
)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")


def _burn(seconds: float) -> None:
    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        pass


def test_thread_group_names() -> None:
    assert thread_group("kvaware-kv-apply-3") == "kvaware-kv-apply"
    assert thread_group("kvaware-prepare_12") == "kvaware-prepare"
    assert thread_group("kvaware-scrape") == "kvaware-scrape"
    assert thread_group("Thread-7 (worker)") == "Thread"
    assert thread_group("ThreadPoolExecutor-3_0") == "ThreadPoolExecutor"
    assert thread_group("42") == "42"  # a name that is only a number stays itself


@linux
def test_pool_threads_report_as_one_group_and_keep_their_cpu_after_ending() -> None:
    # NOTE: room for every group: earlier tests leave threads of many names in this process
    collector = ThreadCPUCollector(max_groups=10_000)
    burned = threading.Barrier(3)
    stop = threading.Event()

    def work() -> None:
        _burn(0.3)
        burned.wait(30)
        # NOTE: alive until read: the GIL is not fair, and on a loaded machine two busy threads
        # can keep the reading thread from running until both have ended
        stop.wait(30)

    threads = [threading.Thread(target=work, name=f"kvaware-burner-{i}") for i in range(2)]
    for t in threads:
        t.start()
    try:
        burned.wait(30)
        first = collector.sample()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert first.get("kvaware-burner", 0.0) >= 0.5, first  # clock ticks: 10 ms steps
    assert not any(k.startswith("kvaware-burner-") for k in first)
    mid = collector.sample()  # the threads ended after `first`: their last reading stays
    assert mid["kvaware-burner"] >= first["kvaware-burner"]
    before = time.process_time()
    later = collector.sample()
    after = time.process_time()
    assert later["kvaware-burner"] == mid["kvaware-burner"]
    # every group only grows, and together they are the process's CPU (give or take /proc's
    # 10 ms clock ticks per thread: `native`, the rest, never goes down)
    for name, cpu in first.items():
        assert later[name] >= cpu
    ticks = 0.01 * (len(threading.enumerate()) + 4)
    assert before - 0.01 <= sum(later.values()) <= after + ticks


@linux
def test_a_busy_thread_shows_most_of_its_cpu_under_its_own_name() -> None:
    collector = ThreadCPUCollector(max_groups=10_000)
    done = threading.Event()
    seen: dict[str, float] = {}

    def work() -> None:
        _burn(0.4)
        seen.update(collector.sample())  # read while this thread still runs
        done.set()

    t = threading.Thread(target=work, name="kvaware-busy")
    t.start()
    assert done.wait(30)
    t.join()
    assert seen["kvaware-busy"] >= 0.3  # clock ticks: /proc counts in 10 ms steps


@linux
def test_a_failed_read_of_a_live_thread_does_not_count_its_cpu_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kvaware_scorer.threadcpu as threadcpu

    collector = ThreadCPUCollector(max_groups=10_000)
    stop = threading.Event()

    def work() -> None:
        _burn(0.1)
        stop.wait(30)

    t = threading.Thread(target=work, name="kvaware-flaky")
    t.start()
    try:
        deadline = time.monotonic() + 30
        first = collector.sample()
        while first.get("kvaware-flaky", 0.0) < 0.05 and time.monotonic() < deadline:
            time.sleep(0.02)
            first = collector.sample()
        assert first.get("kvaware-flaky", 0.0) >= 0.05, first
        real = threadcpu._task_cpu
        # out of file descriptors, say: every read fails for one sample
        monkeypatch.setattr(threadcpu, "_task_cpu", lambda tid, tick: None)
        blind = collector.sample()
        monkeypatch.setattr(threadcpu, "_task_cpu", real)
        again = collector.sample()
    finally:
        stop.set()
        t.join()
    assert blind["kvaware-flaky"] == first["kvaware-flaky"]
    # readable again: the thread's own reading, not that plus the reading carried before
    assert first["kvaware-flaky"] <= again["kvaware-flaky"] < 2 * first["kvaware-flaky"]


@linux
def test_groups_are_bounded() -> None:
    collector = ThreadCPUCollector()
    stop = threading.Event()
    threads = [
        threading.Thread(target=stop.wait, name=f"kvaware-n{chr(97 + i % 26)}{i // 26}x")
        for i in range(MAX_GROUPS + 20)
    ]
    for t in threads:
        t.start()
    try:
        groups = collector.sample()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(groups) <= MAX_GROUPS + 2  # + "other" and "native"
    assert "other" in groups


def test_registered_once_per_registry() -> None:
    registry = CollectorRegistry()
    register_thread_cpu(registry)
    register_thread_cpu(registry)
    text = generate_latest(registry).decode()
    assert text.count("# TYPE kvaware_thread_cpu_seconds_total counter") == 1
    assert 'kvaware_thread_cpu_seconds_total{thread="native"}' in text
