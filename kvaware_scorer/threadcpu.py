"""CPU seconds per thread of this process, as a Prometheus counter by thread group.

``kvaware_thread_cpu_seconds_total{thread="..."}``: the process's Python threads grouped by
name (a pool's numbered threads, ``kvaware-kv-apply-0`` .. ``-3`` or ``kvaware-prepare_0``, are
one group; the main thread, which runs the gateway's event loop, is ``main``), and ``native``
for what no Python thread accounts for (threads started by native code: ZMQ's I/O threads, the
tokenizers' worker pool, gRPC's). The groups add up to the process's CPU time. It answers
"which part of the gateway burns the CPU" from a dashboard, without a profiler.

Read from ``/proc/self/task/<tid>/stat`` (Linux; elsewhere only ``native`` is reported, then the
whole process). A thread that ends keeps its group's count: its last reading is carried over, so
the counters only grow (the CPU it used after its last reading is lost, at most one scrape
interval's worth).

Bounds: at most `MAX_GROUPS` groups (threads of further names count as ``other``); per live
thread one entry (dropped when it ends).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["MAX_GROUPS", "ThreadCPUCollector", "register_thread_cpu", "thread_group"]

#: Most thread groups reported; later names count as "other".
MAX_GROUPS = 64

_NUMBERED = re.compile(r"(?:[-_ ]?\d+)+$")
_TASKS = "/proc/self/task"


def thread_group(name: str) -> str:
    """The group a thread name reports under: a numbered pool thread's name without its numbers
    (``ThreadPoolExecutor-3_0`` -> ``ThreadPoolExecutor``) and without the ``(target)`` suffix
    Python adds to unnamed threads' names."""
    base = name.split(" (", 1)[0]
    return _NUMBERED.sub("", base) or base


def _task_cpu(tid: int, tick: float) -> float | None:
    """CPU seconds (user + system) of one thread of this process, None when it cannot be read
    (the thread is gone, or the read failed: out of file descriptors, say)."""
    try:
        with open(f"{_TASKS}/{tid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # NOTE: the command name (field 2) is in parentheses and may hold spaces or ")": the
    # fields after the last ")" are fixed; utime and stime are the 14th and 15th of the line.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return (int(fields[11]) + int(fields[12])) * tick
    except (IndexError, ValueError):
        return None


class ThreadCPUCollector(Collector):
    """Collects ``kvaware_thread_cpu_seconds_total`` on every scrape of its registry.

    Args:
        max_groups: Most groups reported (further names count as ``other``).
    """

    def __init__(self, max_groups: int = MAX_GROUPS) -> None:
        self.max_groups = max_groups
        self._lock = threading.Lock()
        self._tick = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self._proc = os.path.isdir(_TASKS)
        # (native id, Python ident) -> (group, last reading)
        self._live: dict[tuple[int, int | None], tuple[str, float]] = {}
        self._ended: dict[str, float] = {}  # group -> CPU of its threads that ended
        self._native = 0.0  # never reported lower than before (clock-tick rounding)

    def _group(self, name: str, groups: dict[str, float]) -> str:
        group = thread_group(name)
        if (
            group in groups
            or group in self._ended
            or len(groups) + len(self._ended) < self.max_groups
        ):
            return group
        return "other"

    def sample(self) -> dict[str, float]:
        """CPU seconds by thread group now (``native``: the process's rest)."""
        with self._lock:
            groups: dict[str, float] = {}
            seen: dict[tuple[int, int | None], tuple[str, float]] = {}
            if self._proc:
                main = threading.main_thread()
                for t in threading.enumerate():
                    tid = t.native_id
                    if tid is None:
                        continue
                    key = (tid, t.ident)
                    cpu = _task_cpu(tid, self._tick)
                    if cpu is None:
                        # NOTE: a live thread whose file could not be read this time keeps its
                        # last reading; moved to `_ended`, it would count twice once readable
                        last = self._live.get(key)
                        if last is None or not t.is_alive():
                            continue
                        cpu = last[1]
                    name = "main" if t is main else self._group(t.name, groups)
                    groups[name] = groups.get(name, 0.0) + cpu
                    seen[key] = (name, cpu)
                for key, (name, cpu) in self._live.items():
                    if key not in seen:
                        self._ended[name] = self._ended.get(name, 0.0) + cpu
                self._live = seen
            out = dict(self._ended)
            for name, cpu in groups.items():
                out[name] = out.get(name, 0.0) + cpu
            self._native = max(self._native, time.process_time() - sum(out.values()))
            out["native"] = self._native
            return out

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "kvaware_thread_cpu_seconds",
            "CPU seconds used by this process's threads, by thread group (main: the event "
            "loop; native: threads of native libraries)",
            labels=["thread"],
        )

    def describe(self) -> Iterator[CounterMetricFamily]:
        # NOTE: the name, without reading any thread: the registry refuses a second collector
        # of the same name by it.
        yield self._family()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        for name, cpu in sorted(self.sample().items()):
            family.add_metric([name], cpu)
        yield family


def register_thread_cpu(registry: CollectorRegistry) -> None:
    """Serve ``kvaware_thread_cpu_seconds_total`` from `registry` (once: a registry that has
    it already is left as it is)."""
    try:
        registry.register(ThreadCPUCollector())
    except ValueError:  # duplicated time series: registered before
        pass
