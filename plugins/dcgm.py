"""GPU utilization from NVIDIA's DCGM exporter: ``dcgm-data-source`` and ``dcgm-extractor``
(upstream llm-d's GPU-utilization-aware routing).

* ``dcgm-data-source`` polls each endpoint's DCGM exporter (``http://<host>:<port><path>``, the
  pod's address for a sidecar exporter, its node's with ``useNodeAddress`` for a DaemonSet, the
  pod's when no node address is known, as upstream) every ``interval`` (rounded to a multiple of
  upstream's 50 ms base tick), from one background thread, all endpoints at once (keep-alive
  connections, one wait on every socket, 1 s for a round: an exporter that does not answer
  costs the others nothing), and hands each page to every ``dcgm-extractor`` configured
  (upstream wires them with ``dataLayer.sources``; that section is not read here, and one
  source feeding every extractor is what its published configurations describe).
* ``dcgm-extractor`` reads the ``DCGM_FI_DEV_GPU_UTIL`` samples of a page as upstream does: the
  family must be declared a gauge; a sample labelled ``pod`` counts only for the endpoint of
  that pod (the endpoint's ``pod``, else its name, as upstream matches the endpoint's name); an
  unlabelled sample counts for every endpoint the page was fetched for; the maximum starts at
  0 (a negative or NaN sample reads as 0); divided by 100 it becomes the endpoint attribute
  ``GPUUtilization``, read by ``endpoint-attribute-filter`` / ``-scorer`` whose ``producer``
  names the extractor (by name, or by type as upstream). A page without a sample for the pod,
  or with a malformed one, leaves the attribute as it was; a value older than three intervals
  (at least 3 s) is no longer published (the endpoint then counts as missing the attribute, as
  the filter's ``onMissing`` says), and the values of endpoints that left the pool are dropped
  after each round.

Bounds: one connection per endpoint of the current pool, one page of at most
`pagefetch.MAX_PAGE` bytes each, one value per endpoint (forgotten when it leaves the pool).
Only ``http`` is served: ``scheme: https`` is refused at load time (naming the parameter), as is
a ``path`` that is not printable ASCII without spaces.
"""

from __future__ import annotations

import logging
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
from kvaware_scorer.scheduler.pagefetch import PagePool
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

# NOTE: label text never spans a line break, so a malformed line costs one pass over itself
# (a page of unclosed "{" lines took quadratic time, holding the GIL, when it could).
_SAMPLE = re.compile(
    r"^" + GPU_UTIL_METRIC + r"(?:\{((?:[^\"}\n]++|\"(?:[^\"\\\n]++|\\.)*+\")*+)\})?[ \t]+(\S+)",
    re.MULTILINE,
)
_TYPE = re.compile(r"^#[ \t]+TYPE[ \t]+" + GPU_UTIL_METRIC + r"[ \t]+(\S+)", re.MULTILINE)
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\\n]|\\.)*)"\s*,?')
#: Paths sent to the exporter: printable ASCII without spaces (nothing to escape in a request line).
_PATH = re.compile(r"/[\x21-\x7e]*")
#: Upstream's base tick: intervals are rounded to a multiple of it.
BASE_TICK: Final = 0.05


def _pod_label(text: str | None) -> str | None:
    """The ``pod`` label's value in a sample's label text, None when it has none.

    Raises:
        ValueError: The label text is malformed.
    """
    found: str | None = None
    pos, end = 0, len(text or "")
    while pos < end:
        assert text is not None
        m = _LABEL.match(text, pos)
        if m is None:
            if text[pos:].strip():
                raise ValueError(f"malformed labels of a {GPU_UTIL_METRIC} sample")
            break
        if m.group(1) == "pod" and found is None:
            found = m.group(2)
        pos = m.end()
    return found


def gpu_utilization(page: str, pod: str | None) -> float:
    """The busiest GPU's ``DCGM_FI_DEV_GPU_UTIL`` of `pod` on a DCGM exporter `page`, as a
    fraction (percent / 100), as upstream computes it: samples labelled with another pod are
    skipped, unlabelled ones count (a sidecar exporter serves one pod), with `pod` None every
    sample counts; the maximum starts at 0 (a negative or NaN sample reads as 0).

    Raises:
        ValueError: The metric is missing or not declared a gauge, has no sample for the pod,
            or a sample is malformed.
    """
    declared = _TYPE.search(page)
    if declared is None:
        if _SAMPLE.search(page) is None:
            raise ValueError(f"{GPU_UTIL_METRIC} not found in the DCGM exporter's page")
        raise ValueError(f"{GPU_UTIL_METRIC} is not declared a gauge (no TYPE line)")
    if declared.group(1) != "gauge":
        raise ValueError(f"{GPU_UTIL_METRIC} is a {declared.group(1)}, expected a gauge")
    best = 0.0
    found = False
    for m in _SAMPLE.finditer(page):
        if pod:
            label = _pod_label(m.group(1))
            if label is not None and label != pod:
                continue
        value = float(m.group(2))  # ValueError when not a number
        if value > best:
            best = value
        found = True
    if not found:
        raise ValueError(f"{GPU_UTIL_METRIC} has no sample for pod {pod!r}")
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
        #: Pages that yielded no value (diagnostics).
        self.failures = 0

    def extract(self, endpoint: Endpoint, page: str) -> bool:
        """Read `endpoint`'s value from `page`; whether one was published."""
        try:
            value = gpu_utilization(page, endpoint.pod or endpoint.name)
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

    def retain(self, ids: set[str]) -> None:
        """Keep only the values of endpoints in `ids` (the pool after a poll round: a page
        fetched for an endpoint that left meanwhile must not leave its value behind)."""
        with self._lock:
            for eid in [k for k in self._values if k not in ids]:
                del self._values[eid]


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
        value = value if value.startswith("/") else "/" + value
        if not _PATH.fullmatch(value):
            raise ValueError("path must be printable ASCII without spaces")
        return value


class DCGMDataSource:
    """``dcgm-data-source``: polls the endpoints' DCGM exporters in a background thread (see the
    module documentation)."""

    def __init__(self, params: DCGMSourceParams, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.params = params
        # NOTE: as upstream, the interval is a multiple of the base tick (at least one tick),
        # and an exporter gets 1 s to answer.
        wanted = params.interval or DEFAULT_SCRAPE_INTERVAL
        self.interval = max(BASE_TICK, round(wanted / BASE_TICK) * BASE_TICK)
        self.timeout = 1.0
        self._scheduler = ctx.scheduler
        self._extractors: list[DCGMExtractor] | None = None
        self._pages = PagePool()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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

    def _host(self, endpoint: Endpoint) -> str:
        """The exporter's host: the pod's address, or its node's with ``useNodeAddress`` (the
        pod's when no node address is known, as upstream)."""
        if self.params.use_node_address and endpoint.node_address:
            return endpoint.node_address
        return endpoint.address

    def poll(self, endpoints: Sequence[Endpoint]) -> int:
        """One round over `endpoints`; returns how many pages were fetched."""
        extractors = self.extractors()
        live = {e.id for e in endpoints}
        self._pages.keep_only(live)
        if not endpoints or not extractors:
            return 0
        p = self.params
        answers = self._pages.get(
            [(e.id, self._host(e), p.port, p.path) for e in endpoints], self.timeout
        )
        fetched = 0
        for e, (body, _) in zip(endpoints, answers, strict=True):
            if isinstance(body, OSError):
                logger.debug("%s: %s: %s", self.name, e.id, body)
                continue
            fetched += 1
            page = body.decode("utf-8", errors="replace")
            for ext in extractors:
                ext.extract(e, page)
        live_now = {e.id for e in self._endpoints()} if self._scheduler is not None else live
        for ext in extractors:
            ext.retain(live_now)
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
        self._pages.close()


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
