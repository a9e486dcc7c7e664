"""Pod metrics: parsing real vLLM-format exposition text and scraping it over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvaware_scorer.scheduler import (
    DEFAULT_SCRAPE_INTERVAL,
    Endpoint,
    MetricsScraper,
    Scheduler,
    SchedulingRequest,
    make_plugin_manager,
    parse_vllm_metrics,
)
from kvaware_scorer.scheduler.metrics import SchedulerMetrics
from kvaware_scorer.scheduler.scrape import Activity

from .conftest import FakeClock, config

MODEL = "Qwen/Qwen3-8B"
ROOT = Path(__file__).resolve().parents[2]


def vllm_exposition(
    engines: dict[str, dict[str, float]], block_size: int = 16, legacy_usage: bool = False
) -> str:
    """Exposition text shaped like vLLM's PrometheusStatLogger (names, types, labels per engine)."""
    reg = CollectorRegistry()
    labels = ["model_name", "engine"]
    running = Gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        labels,
        registry=reg,
    )
    waiting = Gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        labels,
        registry=reg,
    )
    by_reason = Gauge(
        "vllm:num_requests_waiting_by_reason",
        "Waiting requests by reason.",
        [*labels, "reason"],
        registry=reg,
    )
    usage_name = "vllm:gpu_cache_usage_perc" if legacy_usage else "vllm:kv_cache_usage_perc"
    usage = Gauge(usage_name, "KV-cache usage. 1 means 100 percent usage.", labels, registry=reg)
    queries = Counter(
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        labels,
        registry=reg,
    )
    hits = Counter(
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        labels,
        registry=reg,
    )
    ttft = Histogram(
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        labels,
        buckets=[
            0.001,
            0.005,
            0.01,
            0.02,
            0.04,
            0.06,
            0.08,
            0.1,
            0.25,
            0.5,
            0.75,
            1.0,
            2.5,
            5.0,
            7.5,
            10.0,
        ],
        registry=reg,
    )
    info_labels = [
        "block_size",
        "cache_dtype",
        "enable_prefix_caching",
        "gpu_memory_utilization",
        "num_cpu_blocks",
        "num_gpu_blocks",
        "prefix_caching_hash_algo",
        "engine",
    ]
    info = Gauge(
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        info_labels,
        registry=reg,
    )
    for engine, v in engines.items():
        running.labels(MODEL, engine).set(v["running"])
        waiting.labels(MODEL, engine).set(v["waiting"])
        by_reason.labels(MODEL, engine, "capacity").set(v["waiting"])
        usage.labels(MODEL, engine).set(v["usage"])
        queries.labels(MODEL, engine).inc(1000)
        hits.labels(MODEL, engine).inc(400)
        for x in (0.01, 0.2, 3.0):
            ttft.labels(MODEL, engine).observe(x)
        info.labels(
            str(block_size), "auto", "True", "0.9", "0", str(int(v["blocks"])), "sha256", engine
        ).set(1)
    return generate_latest(reg).decode()


def test_parse_single_engine() -> None:
    """Queue, running, KV usage and cache_config_info labels come from a vLLM page."""
    text = vllm_exposition(
        {"0": {"running": 7, "waiting": 3, "usage": 0.42, "blocks": 12000}}, block_size=32
    )
    m = parse_vllm_metrics(text)
    assert (m.waiting_queue_size, m.running_requests_size) == (3, 7)
    assert m.kv_cache_usage_percent == pytest.approx(0.42)
    assert (m.cache_block_size, m.cache_num_blocks) == (32, 12000)
    assert m.update_time == 0.0


def test_parse_data_parallel_pod_sums_engines() -> None:
    """A DP pod's engines add up (queues, running, blocks); usage is block-weighted."""
    text = vllm_exposition(
        {
            "0": {"running": 4, "waiting": 1, "usage": 0.2, "blocks": 1000},
            "1": {"running": 6, "waiting": 5, "usage": 0.8, "blocks": 3000},
        }
    )
    m = parse_vllm_metrics(text)
    assert (m.waiting_queue_size, m.running_requests_size) == (6, 10)
    assert m.kv_cache_usage_percent == pytest.approx((0.2 * 1000 + 0.8 * 3000) / 4000)
    assert (m.cache_block_size, m.cache_num_blocks) == (16, 4000)


def test_parse_legacy_usage_name() -> None:
    """Older vLLM's vllm:gpu_cache_usage_perc is read when kv_cache_usage_perc is absent."""
    text = vllm_exposition(
        {"0": {"running": 1, "waiting": 0, "usage": 0.5, "blocks": 10}}, legacy_usage=True
    )
    assert parse_vllm_metrics(text).kv_cache_usage_percent == pytest.approx(0.5)


@pytest.mark.parametrize("text", ["", "# HELP foo bar\nfoo 1\n", "not prometheus {{{\n"])
def test_parse_rejects_pages_without_vllm_metrics(text: str) -> None:
    """A page without vLLM load metrics is an error (the endpoint's metrics then go stale)."""
    with pytest.raises(ValueError):
        parse_vllm_metrics(text)


class _Pod:
    """A real HTTP server on 127.0.0.1 serving a vLLM-format /metrics page."""

    def __init__(self) -> None:
        self.body = vllm_exposition(
            {"0": {"running": 0, "waiting": 0, "usage": 0.0, "blocks": 100}}
        )
        self.status = 200
        self.hits = 0  # GET /metrics served
        pod = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                pod.hits += self.path == "/metrics"
                data = pod.body.encode() if self.path == "/metrics" else b"not found"
                status = pod.status if self.path == "/metrics" else 404
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pods() -> Iterator[list[_Pod]]:
    started = [_Pod(), _Pod()]
    yield started
    for p in started:
        p.stop()


def test_scraper_updates_metrics_over_http_and_goes_stale(pods: list[_Pod]) -> None:
    """Scrapes fill endpoint metrics with the scheduler clock's time; a failing pod keeps old values until stale."""
    clock = FakeClock(500.0)
    pods[0].body = vllm_exposition({"0": {"running": 2, "waiting": 9, "usage": 0.9, "blocks": 500}})
    pods[1].body = vllm_exposition({"0": {"running": 1, "waiting": 0, "usage": 0.1, "blocks": 500}})
    eps = [Endpoint(f"p{i}", "127.0.0.1", p.port) for i, p in enumerate(pods)]
    from prometheus_client import CollectorRegistry as Reg

    metrics = SchedulerMetrics(Reg())
    scraper = MetricsScraper(lambda: eps, clock=clock, metrics=metrics, timeout=2.0)
    try:
        assert scraper.scrape_all() == 2
        assert eps[0].metrics.waiting_queue_size == 9
        assert eps[1].metrics.kv_cache_usage_percent == pytest.approx(0.1)
        assert eps[0].metrics.update_time == 500.0
        clock.advance(1.0)
        pods[0].status = 500
        assert scraper.scrape_all() == 1
        assert eps[0].metrics.update_time == 500.0 and eps[0].metrics.waiting_queue_size == 9
        assert eps[1].metrics.update_time == 501.0
    finally:
        scraper.stop()


def test_scheduler_scrapes_endpoints_file_and_uses_metrics(pods: list[_Pod], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With an endpoints file and scraping, the queue scorer routes away from the loaded pod."""
    pods[0].body = vllm_exposition(
        {"0": {"running": 30, "waiting": 12, "usage": 0.7, "blocks": 500}}
    )
    pods[1].body = vllm_exposition({"0": {"running": 3, "waiting": 0, "usage": 0.2, "blocks": 500}})
    f = tmp_path / "endpoints.yaml"
    f.write_text(
        "endpoints:\n" + "".join(f"  - {{address: 127.0.0.1, port: {p.port}}}\n" for p in pods)
    )
    s = Scheduler.from_config(
        config([{"type": "queue-scorer"}, {"type": "kv-cache-utilization-scorer"}]),
        plugin_manager=make_plugin_manager(use_env=False),
        seed=0,
    )
    s.use_endpoints_file(f, scrape_interval=0.02, scrape_timeout=1.0)
    # before any scrape, every endpoint's metrics are unknown: neutral, never fail closed
    r = s.schedule(SchedulingRequest("r0", "m", token_ids=[1]))
    assert set(r.scores["queue-scorer"].values()) == {0.5}
    s.start()
    try:
        import time

        deadline = time.monotonic() + 5
        while any(e.metrics.update_time == 0 for e in s.endpoints) and time.monotonic() < deadline:
            time.sleep(0.01)
        r = s.schedule(SchedulingRequest("r1", "m", token_ids=[1]))
        assert r.targets[0].port == pods[1].port
        assert r.scores["queue-scorer"] == {
            f"127.0.0.1:{pods[0].port}": 0.0,
            f"127.0.0.1:{pods[1].port}": 1.0,
        }
    finally:
        s.close()


SGLANG_PAGE = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="m",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 5.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="m",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 2.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{dp_rank="0",engine_type="unified",model_name="m",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 3.0
sglang:num_queue_reqs{dp_rank="1",engine_type="unified",model_name="m",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 1.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{dp_rank="0",engine_type="unified",model_name="m",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 0.25
sglang:token_usage{dp_rank="1",engine_type="unified",model_name="m",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 0.75
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{dp_rank="0",engine_type="unified",model_name="m",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 0.5
"""


def test_parse_sglang_metrics() -> None:
    """An SGLang pod's queue, running and token-usage gauges, one scheduler per DP rank."""
    m = parse_vllm_metrics(SGLANG_PAGE)
    assert (m.waiting_queue_size, m.running_requests_size) == (4, 7)
    assert m.kv_cache_usage_percent == pytest.approx(0.5)


def _hits_after(
    pods: list[_Pod], tmp_path, cfg: str | dict, seconds: float
) -> tuple[int, Scheduler]:  # type: ignore[no-untyped-def]
    f = tmp_path / "endpoints.yaml"
    f.write_text(
        "endpoints:\n" + "".join(f"  - {{address: 127.0.0.1, port: {p.port}}}\n" for p in pods)
    )
    for p in pods:
        p.hits = 0
    s = Scheduler.from_config(cfg, plugin_manager=make_plugin_manager(use_env=False), seed=0)
    s.use_endpoints_file(f, scrape_timeout=1.0)
    s.start()
    try:
        import time

        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.activity.mark()  # the metrics are read all the time (a busy gateway)
            time.sleep(0.01)
    finally:
        s.close()
    return sum(p.hits for p in pods), s


def test_config_reading_no_metrics_scrapes_nothing(pods: list[_Pod], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """random.yaml reads no pod metrics: the scheduler never GETs a pod's /metrics."""
    hits, s = _hits_after(pods, tmp_path, ROOT / "config" / "random.yaml", 0.5)
    assert s.metrics_interval is None and s.scrape_interval is None
    assert hits == 0


def test_scrape_interval_is_what_the_configured_plugins_need(pods: list[_Pod], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """load.yaml's queue scorer asks for fresh metrics (100 ms); the predicted-TTFT scorer alone
    only for a slow correction (its metricsInterval); either way the pods are scraped."""
    hits, s = _hits_after(pods, tmp_path, ROOT / "config" / "load.yaml", 0.5)
    assert s.scrape_interval == DEFAULT_SCRAPE_INTERVAL
    assert hits >= 2 * len(pods)
    slow = config([{"type": "predicted-ttft-scorer", "parameters": {"metricsInterval": "250ms"}}])
    hits, s = _hits_after(pods, tmp_path, slow, 0.6)
    assert s.scrape_interval == pytest.approx(0.25)
    assert len(pods) <= hits <= 4 * len(pods)
    off = config([{"type": "predicted-ttft-scorer", "parameters": {"metricsInterval": 0}}])
    hits, s = _hits_after(pods, tmp_path, off, 0.3)
    assert s.scrape_interval is None and hits == 0


def test_parse_reads_escaped_label_values_and_skips_lookalike_families() -> None:
    """Quoted label values may hold braces, quotes and backslashes (escaped); a family whose
    name only starts like a wanted one is not read; a malformed value of a wanted one is an
    error."""
    page = (
        'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9\n'
        'vllm:num_requests_waiting{model_name="a\\"b}\\\\",engine="0"} 3\n'
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="800",engine="0"} 1.0\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.25\n'
    )
    m = parse_vllm_metrics(page)
    assert (m.waiting_queue_size, m.kv_cache_usage_percent) == (3, 0.25)
    assert (m.cache_block_size, m.cache_num_blocks) == (16, 800)
    with pytest.raises(ValueError):
        parse_vllm_metrics('vllm:num_requests_waiting{engine="0"} three\n')


def test_parse_bounds_label_cache_and_hostile_lines() -> None:
    """Label parses are cached only for short label sets (the cache's size is bounded); a long
    label set is still read correctly, an unterminated one on a huge line is an error found in
    one pass, and vLLM's current KV usage name wins over the older one on the same page."""
    from kvaware_scorer.scheduler import scrape

    long_value = "x" * (scrape.MAX_CACHED_LABELS + 10)
    page = (
        f'vllm:num_requests_running{{engine="0",note="{long_value}"}} 5\n'
        'vllm:gpu_cache_usage_perc{engine="0"} 0.9\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.3\n'
    )
    before = scrape._cached_labels.cache_info().currsize
    m = parse_vllm_metrics(page)
    assert (m.running_requests_size, m.kv_cache_usage_percent) == (5, 0.3)
    assert scrape._cached_labels.cache_info().maxsize == scrape.LABEL_CACHE
    assert scrape._cached_labels.cache_info().currsize <= before + 1  # engine="0" at most
    hostile = 'vllm:num_requests_waiting{engine="' + "a" * 2_000_000 + "\n"
    with pytest.raises(ValueError):
        parse_vllm_metrics(hostile)
    # the broken line does not hide the good lines after it
    m = parse_vllm_metrics(hostile + 'vllm:num_requests_waiting{engine="0"} 4\n')
    assert m.waiting_queue_size == 4


def test_scraper_goes_round_when_the_metrics_are_read(pods: list[_Pod]) -> None:
    """Rounds follow reads: without any, one per idle interval; a read after a quiet spell
    starts one at once and no more; reads more often than the interval keep it at the
    interval; reads slower than the interval get one round each."""
    import time

    eps = [Endpoint("p0", "127.0.0.1", pods[0].port)]
    activity = Activity()
    scraper = MetricsScraper(lambda: eps, interval=0.05, activity=activity, idle_interval=5.0)

    def hits_during(seconds: float, read_every: float | None = None) -> int:
        before = pods[0].hits
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if read_every is not None:
                activity.mark()
            time.sleep(read_every or seconds)
        return pods[0].hits - before

    scraper.start()
    try:
        time.sleep(0.1)  # the first round
        quiet = hits_during(0.4)  # no read: the idle interval (5 s)
        activity.mark()
        woke = hits_during(0.15)  # a round at once, and only one without another read
        after = hits_during(0.3)  # none after it either
        busy = hits_during(0.6, read_every=0.005)  # reads all the time: every 50 ms
        time.sleep(0.1)
        sparse = hits_during(0.9, read_every=0.3)  # a read every 300 ms: a round each
        assert quiet == 0, quiet
        assert woke == 1, woke
        assert after == 0, after
        assert 8 <= busy <= 14, busy
        assert 2 <= sparse <= 4, sparse
    finally:
        scraper.stop()


def test_a_read_during_the_wait_is_never_missed() -> None:
    """`Activity.wait(since=...)`: a mark at or after `since` made before the wait began
    returns at once (the scraper checks, then waits: a mark in between is not lost)."""
    import time

    activity = Activity()
    t0 = time.monotonic()
    activity.mark()
    started = time.monotonic()
    assert activity.wait(5.0, since=t0)
    assert time.monotonic() - started < 1.0
    assert not activity.wait(0.05, since=time.monotonic() + 10)


def test_scheduling_marks_activity_for_the_scraper(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = Scheduler.from_config(
        config([{"type": "queue-scorer"}]),
        plugin_manager=make_plugin_manager(use_env=False),
        seed=0,
    )
    s.set_endpoints([Endpoint("a", "127.0.0.1", 1)])
    s.activity.last = before = 0.0
    s.schedule(SchedulingRequest("r0", "m", token_ids=[1]))
    assert s.activity.last > before
    s.activity.last = 0.0
    s.context()  # flow control's look at the pool's load
    assert s.activity.last > before


def test_scrapers_sharing_one_activity_each_see_it() -> None:
    """A mark wakes every idle scraper of the same scheduler; none swallows it for another."""
    import time

    act = Activity()
    act.last = time.monotonic() - 60  # quiet for a minute
    woken: list[bool] = []
    waiters = [threading.Thread(target=lambda: woken.append(act.wait(5.0))) for _ in range(3)]
    for t in waiters:
        t.start()
    time.sleep(0.1)
    act.mark()
    for t in waiters:
        t.join(2.0)
    assert woken == [True, True, True]
    assert not act.wait(0.05)  # no new mark: a waiter times out


def test_unclosed_label_sets_parse_in_linear_time() -> None:
    """A hostile page of lines that open a label set and never close it costs one pass (it was
    quadratic, holding the GIL: 176 KB took ~5 s)."""
    import time

    for line in ("vllm:num_requests_waiting{\n", 'vllm:num_requests_waiting{a="x\n'):
        text = "vllm:num_requests_running 1\n" + line * 64_000
        t0 = time.perf_counter()
        assert parse_vllm_metrics(text).running_requests_size == 1
        assert time.perf_counter() - t0 < 1.0


def test_each_round_that_updated_metrics_is_reported(pods: list[_Pod]) -> None:
    """`on_round` runs after every round that updated an endpoint (flow control looks at the
    pool again), never after one that updated none."""
    import threading
    import time

    rounds: list[str] = []
    eps = [Endpoint("p0", "127.0.0.1", pods[0].port)]
    scraper = MetricsScraper(
        lambda: eps,
        interval=0.02,
        on_round=lambda: rounds.append(threading.current_thread().name),
    )
    scraper.start()
    try:
        deadline = time.monotonic() + 5
        while len(rounds) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scraper.stop()
    assert len(rounds) >= 3 and set(rounds) == {"kvaware-scrape"}
    idle: list[int] = []
    dead = MetricsScraper(
        lambda: [Endpoint("gone", "127.0.0.1", 1)],
        interval=0.02,
        timeout=0.05,
        on_round=lambda: idle.append(1),
    )
    dead.start()
    try:
        time.sleep(0.2)  # several rounds, none of which updated anything
    finally:
        dead.stop()
    assert idle == []
