"""``dcgm-data-source`` / ``dcgm-extractor``: GPU utilization read from a real HTTP exporter on
127.0.0.1 (sidecar and node-exporter layouts), fed to ``endpoint-attribute-filter`` /
``-scorer`` as upstream's GPU-aware config wires them; parsing rules, expiry, bounds."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.scheduler import Endpoint, Scheduler, SchedulingRequest

from .conftest import FakeClock, build

CORPUS = Path(__file__).parent / "upstream_corpus" / "dcgm-gpu-utilization.yaml"
GAUGE = "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"


def page(utils: dict[str | None, list[float]]) -> str:
    """A DCGM exporter page: per pod (None: no pod label), one sample per GPU."""
    lines = [
        "# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).",
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge",
    ]
    for pod, values in utils.items():
        for gpu, v in enumerate(values):
            labels = f'gpu="{gpu}",UUID="GPU-{gpu}",modelName="NVIDIA H100 80GB HBM3"'
            if pod is not None:
                labels += f',pod="{pod}",namespace="llm",container="vllm"'
            lines.append(f"DCGM_FI_DEV_GPU_UTIL{{{labels}}} {v}")
    lines += [
        "# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).",
        "# TYPE DCGM_FI_DEV_FB_USED gauge",
        'DCGM_FI_DEV_FB_USED{gpu="0"} 70000',
    ]
    return "\n".join(lines) + "\n"


class Exporter:
    """A DCGM exporter stand-in: serves `text` at /metrics (404 elsewhere)."""

    def __init__(self) -> None:
        self.text = page({None: [0.0]})
        self.hits = 0
        self.delay = 0.0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner.hits += 1
                if owner.delay:
                    time.sleep(owner.delay)
                body = owner.text.encode() if self.path == "/metrics" else b"no"
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    ex = Exporter()
    yield ex
    ex.close()


def gpu_config(port: int, **source: Any) -> dict[str, Any]:
    """Upstream's GPU-aware config (sim-epp-gpu-config), the exporter on `port`."""
    data: dict[str, Any] = yaml.safe_load(CORPUS.read_text())
    data["plugins"][0]["parameters"] = {"port": port, "interval": "100ms", **source}
    return data


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def kept(s: Scheduler, eps: list[Endpoint]) -> set[str]:
    res = s.schedule(SchedulingRequest("r", "m", token_ids=list(range(64))), eps, dry_run=True)
    return {e.name for e in eps if e.id in res.candidates}


def test_node_exporter_pods_are_told_apart_and_the_hot_one_filtered(exporter: Exporter) -> None:
    """A DaemonSet exporter on the endpoints' node (useNodeAddress; the pods' own addresses are
    never dialled) labels samples by pod: each endpoint gets its own pod's busiest GPU; the
    filter drops the pod above 90 %, the scorer prefers the idler one; a new page is read."""
    exporter.text = page({"pod-a": [40.0, 95.0], "pod-b": [20.0, 10.0], "other": [5.0]})
    s = build(gpu_config(exporter.port, useNodeAddress=True))
    eps = [
        Endpoint(name, "10.255.255.1", port, pod=name, node_address="127.0.0.1")
        for name, port in (("pod-a", 8000), ("pod-b", 8001))
    ]
    s.set_endpoints(eps)
    ext = s.plugins["dcgm-extractor"]
    s.start()
    try:
        wait_for(lambda: ext.endpoint_attribute(eps[0], "GPUUtilization") is not None)
        wait_for(lambda: ext.endpoint_attribute(eps[1], "GPUUtilization") is not None)
        assert ext.endpoint_attribute(eps[0], "GPUUtilization") == pytest.approx(0.95)
        assert ext.endpoint_attribute(eps[1], "GPUUtilization") == pytest.approx(0.20)
        assert kept(s, eps) == {"pod-b"}
        res = s.schedule(SchedulingRequest("q", "m", token_ids=list(range(64))), eps[:1])
        assert res.target is eps[0]  # fallbackOnEmpty: a lone hot pod still serves
        exporter.text = page({"pod-a": [30.0], "pod-b": [60.0]})
        wait_for(lambda: ext.endpoint_attribute(eps[0], "GPUUtilization") == pytest.approx(0.3))
        wait_for(lambda: ext.endpoint_attribute(eps[1], "GPUUtilization") == pytest.approx(0.6))
        assert kept(s, eps) == {"pod-a", "pod-b"}
        res = s.schedule(SchedulingRequest("q2", "m", token_ids=list(range(64))), eps, dry_run=True)
        scores = res.scores["gpu-utilization-scorer"]
        assert scores[eps[0].id] == pytest.approx(0.7) and scores[eps[1].id] == pytest.approx(0.4)
    finally:
        s.close()


def sidecar(exporter: Exporter) -> tuple[Scheduler, Endpoint, Any]:
    """A started scheduler with one endpoint whose sidecar exporter is `exporter`."""
    s = build(gpu_config(exporter.port))
    ep = Endpoint("vllm-0", "127.0.0.1", 8000)
    s.set_endpoints([ep])
    s.start()
    return s, ep, s.plugins["dcgm-extractor"]


def test_sidecar_exporter_and_unlabelled_samples(exporter: Exporter) -> None:
    """A sidecar exporter (the pod's own address) without pod labels: every sample counts."""
    exporter.text = page({None: [12.0, 97.0]})
    s, ep, ext = sidecar(exporter)
    try:
        wait_for(lambda: ext.endpoint_attribute(ep, "GPUUtilization") is not None)
        assert ext.endpoint_attribute(ep, "GPUUtilization") == pytest.approx(0.97)
        assert ext.endpoint_attribute(ep, "KVCacheUsagePercent") is None
    finally:
        s.close()


def test_values_expire_and_missing_pods_pass(exporter: Exporter) -> None:
    """No answer (or no sample for the pod): the last value is kept for three intervals (at
    least 3 s), then the endpoint has no attribute and ``onMissing: Pass`` keeps it."""
    clock = FakeClock()
    exporter.text = page({"pod-a": [99.0]})
    data = gpu_config(exporter.port, useNodeAddress=True)
    s = build(data, clock=clock)
    eps = [
        Endpoint(n, "10.255.255.1", p, pod=n, node_address="127.0.0.1")
        for n, p in (("pod-a", 8000), ("pod-b", 8001))
    ]
    s.set_endpoints(eps)
    source = s.plugins["dcgm-source"]
    ext = s.plugins["dcgm-extractor"]
    assert source.poll(eps) == 2
    assert ext.endpoint_attribute(eps[0], "GPUUtilization") == pytest.approx(0.99)
    assert ext.endpoint_attribute(eps[1], "GPUUtilization") is None  # no sample for pod-b
    assert ext.failures == 1
    assert kept(s, eps) == {"pod-b"}
    exporter.text = "garbage"
    assert source.poll(eps) == 2
    clock.advance(2.9)
    assert ext.endpoint_attribute(eps[0], "GPUUtilization") == pytest.approx(0.99)
    clock.advance(0.2)
    assert ext.endpoint_attribute(eps[0], "GPUUtilization") is None
    assert kept(s, eps) == {"pod-a", "pod-b"}
    s.set_endpoints(eps[1:])
    assert eps[0].id not in ext._values
    source.stop()
    s.close()


def test_unreachable_exporter_costs_one_round_timeout(exporter: Exporter) -> None:
    """An exporter that never answers costs one round's timeout (1 s), and the endpoint whose
    exporter answers in the same round is read."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.2", exporter.port))  # same port, another loopback address
    silent.listen(1)  # accepts connections, never answers
    try:
        exporter.text = page({"a": [50.0]})
        s = build(gpu_config(exporter.port, useNodeAddress=True, interval="200ms"))
        good = Endpoint("a", "10.255.255.1", 8000, pod="a", node_address="127.0.0.1")
        mute = Endpoint("b", "10.255.255.1", 8001, pod="b", node_address="127.0.0.2")
        s.set_endpoints([good, mute])
        source = s.plugins["dcgm-source"]
        ext = s.plugins["dcgm-extractor"]
        t0 = time.monotonic()
        assert source.poll([good, mute]) == 1
        assert time.monotonic() - t0 < 1.5
        assert ext.endpoint_attribute(good, "GPUUtilization") == pytest.approx(0.5)
        assert ext.endpoint_attribute(mute, "GPUUtilization") is None
        source.stop()
        s.close()
    finally:
        silent.close()


def test_a_value_fetched_for_an_endpoint_that_left_is_dropped(exporter: Exporter) -> None:
    """The pool changes while a round waits for pages: the departed endpoint's value does not
    stay behind (values are bounded by the pool)."""
    exporter.text = page({None: [50.0]})
    exporter.delay = 0.3
    s, _, ext = sidecar(exporter)
    try:
        wait_for(lambda: exporter.hits >= 1)
        s.set_endpoints([])
        time.sleep(0.6)
        assert ext._values == {}
    finally:
        s.close()


def test_producer_is_matched_by_type_too(exporter: Exporter) -> None:
    """Upstream keys attributes by the producer's type: an extractor named otherwise is still
    the one ``producer: dcgm-extractor`` reads."""
    exporter.text = page({"pod-a": [99.0], "pod-b": [10.0]})
    data = gpu_config(exporter.port, useNodeAddress=True)
    data["plugins"][1]["name"] = "gpu-ext"
    data["dataLayer"]["sources"][0]["extractors"][0]["pluginRef"] = "gpu-ext"
    s = build(data)
    eps = [
        Endpoint(n, "10.255.255.1", p, pod=n, node_address="127.0.0.1")
        for n, p in (("pod-a", 8000), ("pod-b", 8001))
    ]
    s.set_endpoints(eps)
    source = s.plugins["dcgm-source"]
    assert source.poll(eps) == 2
    assert kept(s, eps) == {"pod-b"}
    source.stop()
    s.close()


def test_node_address_falls_back_to_the_pod_and_names_match_pods(exporter: Exporter) -> None:
    """``useNodeAddress`` with no node address known reads the pod's own address (upstream);
    an endpoint naming no pod is matched by its name."""
    exporter.text = page({"vllm-0": [33.0], "vllm-1": [90.0]})
    s = build(gpu_config(exporter.port, useNodeAddress=True))
    ep = Endpoint("vllm-0", "127.0.0.1", 8000)
    s.set_endpoints([ep])
    source = s.plugins["dcgm-source"]
    assert source.poll([ep]) == 1
    assert s.plugins["dcgm-extractor"].endpoint_attribute(ep, "GPUUtilization") == pytest.approx(
        0.33
    )
    source.stop()
    s.close()


@pytest.mark.parametrize(
    ("text", "want", "error"),
    [
        (page({"p": [10.0, 30.0, 20.0]}), 0.3, None),
        (page({None: [55.5]}), 0.555, None),
        (page({"q": [80.0], None: [5.0]}), 0.05, None),  # another pod's sample skipped
        (GAUGE + "DCGM_FI_DEV_GPU_UTIL 42\n", 0.42, None),
        (page({"q": [80.0]}), None, "no sample for pod 'p'"),
        ("DCGM_FI_DEV_FB_USED 1\n", None, "not found"),
        ("# TYPE DCGM_FI_DEV_GPU_UTIL counter\nDCGM_FI_DEV_GPU_UTIL 3\n", None, "expected a gauge"),
        ("DCGM_FI_DEV_GPU_UTIL 3\n", None, "no TYPE line"),
        (GAUGE + "DCGM_FI_DEV_GPU_UTIL NaN\n", 0.0, None),  # upstream's max starts at 0
        (
            GAUGE + 'DCGM_FI_DEV_GPU_UTIL{gpu="0"} -50\nDCGM_FI_DEV_GPU_UTIL{gpu="1"} NaN\n',
            0.0,
            None,
        ),
        (GAUGE + "DCGM_FI_DEV_GPU_UTIL abc\n", None, "could not convert"),
        # a "pod=" inside another label's value is not the pod label
        (GAUGE + 'DCGM_FI_DEV_GPU_UTIL{modelName="x,pod=",pod="p"} 70\n', 0.7, None),
        (GAUGE + 'DCGM_FI_DEV_GPU_UTIL{pod="p" junk} 70\n', None, "malformed labels"),
    ],
)
def test_page_parsing(text: str, want: float | None, error: str | None) -> None:
    from kvaware_scorer.plugins.dcgm import gpu_utilization

    if error is None:
        assert gpu_utilization(text, "p") == pytest.approx(want)
    else:
        with pytest.raises(ValueError, match=error):
            gpu_utilization(text, "p")


def test_huge_page_is_bounded() -> None:
    """A page of a million samples parses in bounded time (the fetch caps pages anyway)."""
    from kvaware_scorer.plugins.dcgm import gpu_utilization
    from kvaware_scorer.scheduler.pagefetch import MAX_PAGE

    big = page({f"p{i}": [float(i % 100)] for i in range(MAX_PAGE // 200)})
    t0 = time.perf_counter()
    assert gpu_utilization(big, "p7") == pytest.approx(0.07)
    assert time.perf_counter() - t0 < 5.0
    # lines that open a label set and never close it (quadratic before: 176 KB took 3 s)
    for line in ("DCGM_FI_DEV_GPU_UTIL{\n", 'DCGM_FI_DEV_GPU_UTIL{a="\n'):
        hostile = GAUGE + line * 64_000
        t0 = time.perf_counter()
        with pytest.raises(ValueError):
            gpu_utilization(hostile, "p")
        assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"scheme": "https"}, "https is not supported"),
        ({"scheme": "ftp"}, "scheme"),
        ({"port": 0}, "port"),
        ({"interval": "soon"}, "interval"),
        ({"path": "/m etrics"}, "printable ASCII"),
        ({"path": "/m\u20actrics"}, "printable ASCII"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_source_parameter_errors(params: dict[str, Any], message: str) -> None:
    data = gpu_config(9400)
    data["plugins"][0]["parameters"] = params
    with pytest.raises(ConfigError, match=message) as err:
        build(data)
    assert "plugins[0].parameters" in str(err.value)


def test_upstream_gpu_config_loads_without_no_op_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Upstream's sample GPU-aware config builds; neither DCGM type is called a no-op."""
    s = build(CORPUS.read_text())
    assert not [r for r in caplog.records if "does nothing" in r.getMessage()]
    assert s.plugins["dcgm-source"].params.port == 9400
    assert s.plugins["dcgm-source"].interval == pytest.approx(1.0)
    s.close()
