"""Scrapes each pod's Prometheus ``/metrics`` into `EndpointMetrics` (vLLM names).

Read (``vllm-interop.md`` §4; every vLLM metric carries ``model_name`` and ``engine`` labels,
one ``engine`` per data-parallel rank):

* ``vllm:num_requests_waiting`` -> ``waiting_queue_size`` (summed over engines)
* ``vllm:num_requests_running`` -> ``running_requests_size`` (summed over engines)
* ``vllm:kv_cache_usage_perc`` (older vLLM: ``vllm:gpu_cache_usage_perc``) ->
  ``kv_cache_usage_percent`` (engines averaged, weighted by their ``num_gpu_blocks`` when known)
* ``vllm:cache_config_info`` labels ``block_size`` -> ``cache_block_size`` and
  ``num_gpu_blocks`` -> ``cache_num_blocks`` (summed over engines)

Only the sample lines of these families are read, by one regular expression that starts
with the line break before a wanted name (a vLLM page is mostly histogram buckets, skipped at
memory-scan speed). Label sets repeat from one scrape to the next, so their parses are cached
(`LABEL_CACHE` entries). A general exposition parser spent ~0.3 ms even on a 40-line page, a
``re.MULTILINE`` expression ~80 us; this costs ~15 us (~60 us on a 450-line page of
histograms), and the scraper runs it for every pod every round. A failed scrape leaves the
previous metrics in place; they go stale after the scheduler's staleness threshold and are
then treated as unknown by the scorers.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvaware_scorer.scheduler.pagefetch import PagePool
from kvaware_scorer.scheduler.types import Endpoint, EndpointMetrics

if TYPE_CHECKING:
    from kvaware_scorer.scheduler.metrics import SchedulerMetrics

__all__ = [
    "DEFAULT_SCRAPE_INTERVAL",
    "IDLE_INTERVAL",
    "Activity",
    "MetricsScraper",
    "parse_vllm_metrics",
]

logger = logging.getLogger(__name__)

#: Seconds between scrape rounds. Upstream's base tick is 50 ms; 100 ms keeps the parse cost of
#: a 16-pod fleet around a few percent of a core, and the scheduler's own in-flight counts
#: (``active-request-scorer``) are exact between scrapes anyway.
DEFAULT_SCRAPE_INTERVAL = 0.1
#: Seconds between rounds while nothing reads the metrics (at most; never faster than the
#: configured interval), below the default 2 s staleness so the first request after a quiet
#: spell still has metrics.
IDLE_INTERVAL = 1.0

WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
CACHE_INFO = ("vllm:cache_config_info", "sglang:cache_config_info")
LORA_INFO = ("vllm:lora_requests_info",)
_WANTED = WAITING + RUNNING + USAGE + CACHE_INFO + LORA_INFO
#: Read only where the current name is absent (vLLM versions in between export both).
_LEGACY_USAGE = "vllm:gpu_cache_usage_perc"


def _adapters(value: str | None) -> frozenset[str]:
    return frozenset(a.strip() for a in (value or "").split(",") if a.strip())


#: One sample line of a wanted family: a line break, the name, optional ``{labels}`` (quoted
#: values may hold any character but a line break, escaped; possessive, and never past the
#: line's end, so a malformed line costs one pass over itself: a page of unclosed ``{`` lines
#: once took quadratic time),
#: then the value. The leading line break is a literal the regex engine scans for at memory
#: speed, so the lines of every other family (mostly histogram buckets) cost one failed
#: comparison each (``re.MULTILINE``'s ``^`` was ~10x slower: it tries every position).
_SAMPLE = re.compile(
    r"\n(" + "|".join(re.escape(n) for n in _WANTED) + r")"
    r"(?:\{((?:[^\"}\n]++|\"(?:[^\"\\\n]++|\\.)*+\")*+)\})?[ \t]+(\S+)"
)
#: Label sets whose parse is kept (a pod's label sets are the same every scrape; a fleet of a
#: few hundred pods x a handful of wanted series fits, and a page of ever-new label sets only
#: evicts).
LABEL_CACHE = 1024
#: Longest label text whose parse is cached (vLLM's longest, ``cache_config_info``'s, is ~250
#: characters): the cache holds at most ~0.5 MiB of keys whatever a pod's page says.
MAX_CACHED_LABELS = 512
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
_ESCAPE = re.compile(r"\\.")


def _labels(text: str | None) -> dict[str, str]:
    """The label set of a sample (``k="v",...``), read-only (parses of short label sets are
    cached and shared); raises ValueError when malformed."""
    if not text:
        return {}
    if len(text) <= MAX_CACHED_LABELS:
        return _cached_labels(text)
    return _parse_labels(text)


@functools.lru_cache(maxsize=LABEL_CACHE)
def _cached_labels(text: str) -> dict[str, str]:
    return _parse_labels(text)


def _parse_labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos, end = 0, len(text)
    while pos < end:
        m = _LABEL.match(text, pos)
        if m is None:
            if text[pos:].strip():
                raise ValueError(f"malformed labels {{{text}}}")
            break
        value = m.group(2)
        if "\\" in value:
            value = _ESCAPE.sub(lambda e: _UNESCAPE.get(e.group(0), e.group(0)[1]), value)
        out[m.group(1)] = value
        pos = m.end()
    return out


def _int_label(value: str | None) -> int | None:
    if not value:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def _kv_usage(usage: dict[str, float], blocks: dict[str, int]) -> float:
    """The engines' KV usage, weighted by each engine's block count when every engine reports
    one, else the plain mean (0 when no engine reports usage)."""
    if not usage:
        return 0.0
    weights = {e: float(blocks.get(e, 0)) for e in usage}
    total_w = sum(weights.values())
    if total_w > 0 and all(w > 0 for w in weights.values()):
        return sum(usage[e] * weights[e] for e in usage) / total_w
    return sum(usage.values()) / len(usage)


def parse_vllm_metrics(text: str) -> EndpointMetrics:
    """`EndpointMetrics` from a vLLM (or SGLang) Prometheus exposition text.

    Args:
        text: The ``/metrics`` body.

    Returns:
        The metrics (``update_time`` left at 0 for the caller to set).

    Raises:
        ValueError: The text is not valid exposition format, or has none of the load metrics.
    """
    waiting: dict[str, float] = {}
    running: dict[str, float] = {}
    usage: dict[str, float] = {}
    blocks: dict[str, int] = {}
    block_size: int | None = None
    lora: tuple[float, dict[str, str]] | None = None  # the newest sample (value = its time)
    for m in _SAMPLE.finditer("\n" + text):  # the first line starts after a line break too
        name = m.group(1)
        labels = _labels(m.group(2))
        value = float(m.group(3))  # ValueError on a malformed value, as the page is then
        # NOTE: one sample per engine (DP rank); engines add up, and an engine's KV usage is
        # weighted by its own num_gpu_blocks (cache_config_info has no model_name label).
        # SGLang labels its schedulers by dp_rank (and tp_rank; only attention-TP rank 0
        # reports, so TP ranks never double count).
        engine = labels.get("engine") or labels.get("dp_rank", "")
        if name in WAITING:
            waiting[engine] = waiting.get(engine, 0.0) + value
        elif name in RUNNING:
            running[engine] = running.get(engine, 0.0) + value
        elif name in USAGE:
            if name != _LEGACY_USAGE or engine not in usage:
                usage[engine] = value
        elif name in CACHE_INFO:
            bs = _int_label(labels.get("block_size") or labels.get("page_size"))
            if bs and block_size is None:
                block_size = bs
            nb = _int_label(labels.get("num_gpu_blocks") or labels.get("num_pages"))
            if nb is not None:
                blocks[engine] = nb
        elif name in LORA_INFO and (lora is None or value > lora[0]):
            lora = (value, labels)
    if not (waiting or running or usage):
        raise ValueError("no vLLM load metrics (num_requests_waiting/running, kv_cache_usage_perc)")
    kv = _kv_usage(usage, blocks)
    return EndpointMetrics(
        waiting_queue_size=round(sum(waiting.values())),
        running_requests_size=round(sum(running.values())),
        kv_cache_usage_percent=min(1.0, max(0.0, kv)),
        cache_block_size=block_size,
        cache_num_blocks=sum(blocks.values()) if blocks else None,
        active_models=_adapters(lora[1].get("running_lora_adapters")) if lora else frozenset(),
        waiting_models=_adapters(lora[1].get("waiting_lora_adapters")) if lora else frozenset(),
        max_active_models=(_int_label(lora[1].get("max_lora")) or 0) if lora else 0,
    )


class Activity:
    """When the scheduler last scheduled a request or looked at the pool's load (flow control),
    and a wake-up for scrapers waiting out a quiet spell (`MetricsScraper` idle backoff).

    Any number of scrapers may share one: each decides on its own whether it is idle from
    `last`, and a mark wakes every waiting one.
    """

    __slots__ = ("_wake", "last")

    def __init__(self) -> None:
        #: `time.monotonic` of the last mark (creation counts as one).
        self.last = time.monotonic()
        self._wake = threading.Event()

    def mark(self) -> None:
        """Record activity now (every scheduling decision: a float store and a flag test)."""
        self.last = time.monotonic()
        if not self._wake.is_set():
            self._wake.set()

    def wait(self, timeout: float, since: float | None = None) -> bool:
        """Wait at most `timeout` seconds for a mark at or after `since` (default: the next
        mark); whether one came."""
        seen = self.last
        self._wake.clear()
        if since is not None:
            if self.last >= since:  # cleared after the check: a later mark sets it again
                return True
        elif self.last != seen:  # marked between the read and the clear
            return True
        return self._wake.wait(timeout)

    def wake(self) -> None:
        """Wake every waiting scraper without recording activity (shutdown)."""
        self._wake.set()


class MetricsScraper:
    """Scrapes every endpoint's metrics on an interval, in a background thread.

    Each round fetches all endpoints at once from that one thread (`pagefetch.fetch_pages`:
    keep-alive connections, one wait on all the sockets; a pod that does not answer within
    ``timeout`` costs the others nothing); a successful scrape replaces ``endpoint.metrics``
    with fresh values stamped with the scheduler's clock, a failed one leaves the old values to
    go stale.

    Bounded: one connection per endpoint of the current pool (those of endpoints that left are
    closed at the next round), one page of at most `pagefetch.MAX_PAGE` bytes each.

    Scraped when read (with ``activity``): the metrics are read only when a request is
    scheduled or flow control looks at the pool's load (each such read marks ``activity``). A
    round therefore runs ``interval`` after the previous one began only when the metrics were
    read since that one began; otherwise the scraper waits for the next read, which starts a
    round at once (``interval`` after the previous one at the soonest), and goes round every
    ``idle_interval`` seconds without any read, so metrics never go stale. A gateway
    scheduling at least one request per ``interval`` (or holding requests in flow control,
    which looks again after every round, `on_round`) scrapes every ``interval``; one
    scheduling two requests a second scrapes about twice a second instead of ten times, and an
    idle one once a second. The read that starts a round sees the metrics of the round before
    it (the round runs beside it, never in its way): they are at most the time since the
    previous read old, and the scheduler's own in-flight account covers what happened since.

    Args:
        endpoints: Returns the current pool (called every round).
        interval: Seconds between the starts of two rounds.
        timeout: HTTP timeout of one round in seconds (connect, send and the whole page).
        clock: Clock used for ``update_time`` (the scheduler's).
        metrics: Counts scrapes by result and reports stale endpoints.
        staleness: Seconds after which metrics count as stale (for the gauge).
        activity: Marked by the scheduler whenever it schedules or looks at the pool's load
            (`Scheduler.activity`); None scrapes at ``interval`` always.
        idle_interval: Seconds between rounds while nothing reads the metrics (default
            `IDLE_INTERVAL`, at most half of ``staleness``; never below ``interval``).
        on_round: Called (on the scraping thread) after each round that updated at least one
            endpoint (`Scheduler.metrics_updated`: flow control looks at the pool again).
    """

    def __init__(
        self,
        endpoints: Callable[[], Sequence[Endpoint]],
        *,
        interval: float = DEFAULT_SCRAPE_INTERVAL,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        metrics: SchedulerMetrics | None = None,
        staleness: float | None = 2.0,
        activity: Activity | None = None,
        idle_interval: float | None = None,
        on_round: Callable[[], None] | None = None,
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be > 0")
        if idle_interval is None:
            idle_interval = (
                IDLE_INTERVAL if staleness is None else min(IDLE_INTERVAL, staleness / 2)
            )
        self.activity = activity
        self.on_round = on_round
        self.idle_interval = max(interval, idle_interval)
        self._endpoints = endpoints
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self.metrics = metrics
        self.staleness = staleness
        self._pages = PagePool()
        if metrics is not None:  # the two series every scrape counts in, looked up once
            self._scraped = metrics.scrapes.labels("ok")
            self._failed = metrics.scrapes.labels("error")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fetch(self, endpoint: Endpoint) -> str:
        """GET the endpoint's metrics page (one keep-alive connection per endpoint; the page is
        bounded: `pagefetch.MAX_PAGE` bytes).

        Raises:
            OSError: Connection failure, an HTTP status other than 200, or a malformed or
                oversized answer.
        """
        ((page, _),) = self._fetch_all([endpoint])
        if isinstance(page, OSError):
            raise page
        return page

    def _fetch_all(self, endpoints: Sequence[Endpoint]) -> list[tuple[str | OSError, float]]:
        """Per endpoint: its page (or why there is none) and the seconds it took."""
        answers = self._pages.get(
            [(e.id, e.address, e.metrics_port or e.port, e.metrics_path) for e in endpoints],
            self.timeout,
        )
        return [
            (page if isinstance(page, OSError) else page.decode("utf-8", errors="replace"), took)
            for page, took in answers
        ]

    def scrape(self, endpoint: Endpoint) -> bool:
        """Scrape one endpoint now; returns whether its metrics were updated."""
        return self._scrape([endpoint]) == 1

    def _scrape(self, eps: Sequence[Endpoint]) -> int:
        ok = 0
        for e, (page, fetched) in zip(eps, self._fetch_all(eps), strict=True):
            t0 = time.perf_counter()
            try:
                if isinstance(page, OSError):
                    raise page
                fresh = parse_vllm_metrics(page)
            except (OSError, ValueError) as exc:
                logger.debug("scrape of %s failed: %s", e.id, exc)
                if self.metrics is not None:
                    self._failed.inc()
                continue
            fresh.update_time = self.clock()
            e.metrics = fresh
            ok += 1
            if self.metrics is not None:
                self._scraped.inc()
                self.metrics.scrape_latency.observe(fetched + time.perf_counter() - t0)
        return ok

    def scrape_all(self) -> int:
        """One round over the current pool; returns how many endpoints were updated."""
        eps = list(self._endpoints())
        live = {e.id for e in eps}
        self._pages.keep_only(live)
        if not eps:
            return 0
        ok = self._scrape(eps)
        if self.metrics is not None:
            now = self.clock()
            stale = sum(
                1
                for e in eps
                if e.metrics.update_time == 0.0
                or (self.staleness is not None and now - e.metrics.update_time > self.staleness)
            )
            self.metrics.stale_endpoints.set(stale)
        return ok

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                if self.scrape_all() and self.on_round is not None:
                    self.on_round()
            except Exception:
                logger.exception("metrics scrape round failed")
            self._wait_next(t0)

    def _wait_next(self, t0: float) -> None:
        """Wait until the round after the one that began at `t0` is due (class doc)."""
        act = self.activity
        if act is None:
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))
            return
        while not self._stop.is_set():
            now = time.monotonic()
            if act.last >= t0:  # read since this round began
                self._stop.wait(max(0.0, t0 + self.interval - now))
                return
            left = t0 + self.idle_interval - now
            if left <= 0:
                return
            act.wait(left, since=t0)

    def start(self) -> None:
        """Start scraping in a daemon thread; idempotent."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kvaware-scrape", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Stop scraping (waiting at most `timeout` seconds) and close connections."""
        self._stop.set()
        if self.activity is not None:
            self.activity.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._pages.close()
