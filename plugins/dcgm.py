"""GPU utilization from NVIDIA's DCGM exporter: ``dcgm-data-source`` and ``dcgm-extractor``
(upstream llm-d's GPU-utilization-aware routing).

* ``dcgm-data-source`` polls each endpoint's DCGM exporter (``http://<host>:<port><path>``, the
  pod's address for a sidecar exporter, its node's with ``useNodeAddress`` for a DaemonSet) every
  ``interval``, from one background thread, all endpoints at once (keep-alive connections, one
  wait on every socket: an exporter that does not answer within the round costs the others
  nothing), and hands each page to every ``dcgm-extractor`` configured (upstream wires them with
  ``dataLayer.sources``; that section is not read here, and one source feeding every extractor
  is what its published configurations describe).
* ``dcgm-extractor`` reads the ``DCGM_FI_DEV_GPU_UTIL`` samples of a page, keeps those of the
  endpoint's pod (a sample labelled ``pod`` counts only for the endpoint of that pod, when the
  endpoint names its pod; an unlabelled sample counts for every endpoint the page was fetched
  for), takes the busiest GPU (max) and publishes it, divided by 100, as the endpoint attribute
  ``GPUUtilization``, read by ``endpoint-attribute-filter`` / ``-scorer`` whose ``producer``
  names the extractor. A page without such samples, or with a malformed one, leaves the
  attribute as it was; a value older than three intervals (at least 3 s) is no longer
  published (the endpoint then counts as missing the attribute, as the filter's ``onMissing``
  says).

Bounds: one connection per endpoint of the current pool, one page of at most
`pagefetch.MAX_PAGE` bytes each, one value per endpoint (forgotten when it leaves the pool).
Only ``http`` is served: ``scheme: https`` is refused at load time (naming the parameter).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from pydantic import Field, field_validator

from kvaware_scorer.config import ConfigModel
from kvaware_scorer.scheduler import (
    Endpoint,
    PluginContext,
    PluginRegistry,
    parse_duration,
)
from kvaware_scorer.scheduler.pagefetch import PageConnection, fetch_pages
from kvaware_scorer.scheduler.scrape import DEFAULT_SCRAPE_INTERVAL

__all__ = [
    "GPU_UTILIZATION",
    "GPU_UTIL_METRIC",
    "DCGMDataSource",
    "DCGMExtractor",
    "DCGMSourceParams",
    "gpu_utilization",
    "register",
]

logger = logging.getLogger(__name__)

#: The DCGM metric read (percent, per GPU).
GPU_UTIL_METRIC: Final = "DCGM_FI_DEV_GPU_UTIL"
#: The endpoint attribute published (a fraction 0..1).
GPU_UTILIZATION: Final = "GPUUtilization"
#: Seconds a published value stays valid, at least (three intervals when longer).
MIN_VALIDITY: Final = 3.0

_SAMPLE = re.compile(
    r"^" + GPU_UTIL_METRIC + r"(?:\{((?:[^\"}]++|\"(?:[^\"\\]++|\\.)*+\")*+)\})?[ \t]+(\S+)",
    re.MULTILINE,
)
_TYPE = re.compile(r"^#[ \t]+TYPE[ \t]+" + GPU_UTIL_METRIC + r"[ \t]+(\S+)", re.MULTILINE)
_POD_LABEL = re.compile(r'(?:^|,)\s*pod\s*=\s*"((?:[^"\\]|\\.)*)"')


def gpu_utilization(page: str, pod: str | None) -> float:
    """The busiest GPU's ``DCGM_FI_DEV_GPU_UTIL`` of `pod` on a DCGM exporter `page`, as a
    fraction (percent / 100). Samples labelled with another pod are skipped; unlabelled ones
    count (a sidecar exporter serves one pod); with `pod` None every sample counts.

    Raises:
        ValueError: The metric is missing, declared other than a gauge, has no sample for the
            pod, or a sample value is not a number.
    """
    declared = _TYPE.search(page)
    if declared is not None and declared.group(1) not in ("gauge", "untyped"):
        raise ValueError(f"{GPU_UTIL_METRIC} is a {declared.group(1)}, expected a gauge")
    best: float | None = None
    seen = False
    for m in _SAMPLE.finditer(page):
        seen = True
        if pod:
            label = _POD_LABEL.search(m.group(1) or "")
            if label is not None and label.group(1) != pod:
                continue
        value = float(m.group(2))
        if not math.isfinite(value):
            raise ValueError(f"{GPU_UTIL_METRIC} sample {m.group(2)!r} is not finite")
        best = value if best is None else max(best, value)
    if best is None:
        if seen:
            raise ValueError(f"{GPU_UTIL_METRIC} has no sample for pod {pod!r}")
        raise ValueError(f"{GPU_UTIL_METRIC} not found in the DCGM exporter's page")
    return best / 100.0


class DCGMExtractor:
    """``dcgm-extractor``: the ``GPUUtilization`` attribute of each endpoint (see the module
    documentation); ``endpoint_attribute`` is what ``endpoint-attribute-filter`` / ``-scorer``
    read when their ``producer`` names it."""

    def __init__(self, params: Any, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.clock = ctx.clock
        #: Seconds a value stays valid (set by the data source from its interval).
        self.validity = MIN_VALIDITY
        self._lock = threading.Lock()
        self._values: dict[str, tuple[float, float]] = {}  # endpoint id -> (value, clock time)
        #: Pages that yielded no value, by endpoint id of the last failure (for diagnostics).
        self.failures = 0

    def extract(self, endpoint: Endpoint, page: str) -> bool:
        """Read `endpoint`'s value from `page`; whether one was published."""
        try:
            value = gpu_utilization(page, endpoint.pod)
        except ValueError as exc:
            self.failures += 1
            logger.debug("%s: %s: %s", self.name, endpoint.id, exc)
            return False
        with self._lock:
            self._values[endpoint.id] = (value, self.clock())
        return True

    def endpoint_attribute(self, endpoint: Endpoint, name: str) -> float | None:
        """`endpoint`'s ``GPUUtilization`` while valid, else None (no other attribute)."""
        if name != GPU_UTILIZATION:
            return None
        with self._lock:
            got = self._values.get(endpoint.id)
        if got is None or self.clock() - got[1] > self.validity:
            return None
        return got[0]

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """Forget the values of endpoints that left the pool."""
        if removed:
            with self._lock:
                for e in removed:
                    self._values.pop(e.id, None)


class DCGMSourceParams(ConfigModel):
    """Parameters of ``dcgm-data-source`` (upstream's names and defaults).

    Attributes:
        scheme: ``http`` (``https`` is refused: this source speaks plain HTTP).
        path: The exporter's metrics path.
        port: The exporter's port.
        insecure_skip_verify: Upstream's TLS setting (accepted; no TLS here).
        use_node_address: Scrape the endpoint's node (a DaemonSet exporter) instead of the pod.
        interval: Seconds between polls (0 or empty: the scheduler's base scrape interval,
            0.1 s).
    """

    scheme: Literal["http", "https"] = "http"
    path: str = "/metrics"
    port: int = Field(9400, ge=1, le=65535)
    insecure_skip_verify: bool = True
    use_node_address: bool = False
    interval: float = Field(0.0, ge=0)

    @field_validator("interval", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        if value in (None, ""):
            return 0.0
        return parse_duration(value)

    @field_validator("scheme")
    @classmethod
    def _http_only(cls, value: str) -> str:
        if value == "https":
            raise ValueError("scheme https is not supported here (the exporter is read over http)")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return value if value.startswith("/") else "/" + value


class DCGMDataSource:
    """``dcgm-data-source``: polls the endpoints' DCGM exporters in a background thread (see the
    module documentation)."""

    def __init__(self, params: DCGMSourceParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.params = params
        self.interval = params.interval or DEFAULT_SCRAPE_INTERVAL
        self.timeout = min(1.0, max(0.1, self.interval))
        self._scheduler = ctx.scheduler
        self._extractors: list[DCGMExtractor] | None = None
        self._conns: dict[str, PageConnection] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_no_node: set[str] = set()
        #: Rounds run and pages fetched (diagnostics).
        self.rounds = 0
        self.pages = 0

    def extractors(self) -> list[DCGMExtractor]:
        """The configured ``dcgm-extractor`` plugins this source feeds."""
        if self._extractors is None:
            plugins: Mapping[str, Any] = (
                self._scheduler.plugins if self._scheduler is not None else {}
            )
            self._extractors = [p for p in plugins.values() if isinstance(p, DCGMExtractor)]
            validity = max(MIN_VALIDITY, 3 * self.interval)
            for ext in self._extractors:
                ext.validity = max(ext.validity, validity)
        return self._extractors

    def _host(self, endpoint: Endpoint) -> str | None:
        if not self.params.use_node_address:
            return endpoint.address
        if endpoint.node_address:
            return endpoint.node_address
        if endpoint.id not in self._warned_no_node and len(self._warned_no_node) < 1024:
            self._warned_no_node.add(endpoint.id)
            logger.warning(
                "%s: useNodeAddress is set but endpoint %s names no node address "
                "(nodeAddress in the endpoints file); its GPU metrics are not read",
                self.name,
                endpoint.id,
            )
        return None

    def poll(self, endpoints: Sequence[Endpoint]) -> int:
        """One round over `endpoints`; returns how many pages were fetched."""
        extractors = self.extractors()
        targets = [(e, h) for e in endpoints if (h := self._host(e)) is not None]
        live = {e.id for e, _ in targets}
        for eid in [k for k in self._conns if k not in live]:
            self._conns.pop(eid).close()
        if not targets or not extractors:
            return 0
        conns: list[PageConnection] = []
        for e, host in targets:
            conn = self._conns.get(e.id)
            if conn is None or (conn.host, conn.port) != (host, self.params.port):
                if conn is not None:
                    conn.close()
                conn = self._conns[e.id] = PageConnection(host, self.params.port, self.timeout)
            conns.append(conn)
        answers = fetch_pages([(c, self.params.path) for c in conns], self.timeout)
        fetched = 0
        for (e, _), conn, answer in zip(targets, conns, answers, strict=True):
            if isinstance(answer, OSError):
                logger.debug("%s: %s: %s", self.name, e.id, answer)
                continue
            if answer[0] != 200:
                conn.close()
                logger.debug("%s: %s: HTTP %d", self.name, e.id, answer[0])
                continue
            fetched += 1
            page = answer[1].decode("utf-8", errors="replace")
            for ext in extractors:
                ext.extract(e, page)
        self.rounds += 1
        self.pages += fetched
        return fetched

    def _endpoints(self) -> list[Endpoint]:
        return list(self._scheduler.endpoints) if self._scheduler is not None else []

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.poll(self._endpoints())
            except Exception:
                logger.exception("%s: DCGM poll round failed (continuing)", self.name)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))

    def start(self) -> None:
        """Start polling in a daemon thread; idempotent."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kvaware-dcgm", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (bounded by one round's timeout) and close the connections."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 1.0)
            self._thread = None
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


def register(registry: PluginRegistry) -> None:
    """Register ``dcgm-data-source`` and ``dcgm-extractor``."""
    registry.register(
        "dcgm-data-source",
        DCGMDataSource,
        params=DCGMSourceParams,
        kinds=(),
        description="polls each endpoint's NVIDIA DCGM exporter for GPU metrics",
    )
    registry.register(
        "dcgm-extractor",
        DCGMExtractor,
        kinds=(),
        description="GPU utilization (DCGM_FI_DEV_GPU_UTIL) as the endpoint attribute "
        "GPUUtilization",
    )
